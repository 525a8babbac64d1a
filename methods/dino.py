"""DINO (Caron et al., ICCV 2021), from the official code facebookresearch/dino (main_dino.py `DINOLoss`,
`DataAugmentationDINO`, `train_one_epoch`; utils.py `cosine_scheduler`, `MultiCropWrapper`, `clip_gradients`,
`cancel_gradients_last_layer`, `get_params_groups`; vision_transformer.py `DINOHead`).

Self-distillation with no labels over multi-crop views: two global crops (area 0.4-1 of the image, full size) and
`local_crops` (8) local crops (area 0.05-0.4, side 96/224 of the image's) of each image. The student (backbone +
DINO head) sees every crop, the teacher (same architecture, no gradient) the two global crops; the loss
(blocks/ssl.py `DINOLoss`) is the cross-entropy between the teacher's centred, sharpened distribution of each
global crop (temperature `teacher_temp`, warmed up linearly from `warmup_teacher_temp` over
`warmup_teacher_temp_epochs`) and the student's (`student_temp`) of every other crop; the centre is an EMA
(`center_momentum`) of the teacher outputs of every rank. After each student update the teacher moves towards it
with momentum m = 1 − (1 − `momentum_teacher`)(cos(πk/K) + 1)/2 at update k of K. Student update as the code's:
AdamW at lr 0.0005 × batch/256 (1.25e-4 for the batch of 64), weight decay cosine from 0.04 to 0.4
(`weight_decay` → `weight_decay_end`) on weights only (not on biases and 1-D parameters), each parameter's
gradient clipped to norm 3 on its own (`clip_per_param`; the common `grad_clip` clips the global norm), the head's
last layer frozen during the first epoch (`freeze_last_layer`); 100 epochs with 10 of linear warm-up; head of the
code's defaults (3 layers, hidden 2048, bottleneck 256, 65536 outputs, weight-normalised last layer with its norm
fixed, no BatchNorm). The teacher starts as a copy of the student. The online linear probe reads the teacher's
backbone features of the two global crops, detached, and predictions use the teacher's backbone
(`eval_network` "teacher", as the code's evaluations load the teacher); `eval_network=student`: the student's.
The reported `ssl_loss` (and so `loss`) is the cross-entropy minus the teacher's entropy, KL(teacher ‖ student):
the same gradient, and it falls as the student learns, whereas the cross-entropy itself (`dino_ce`) first rises
as the centre flattens the teacher (`teacher_entropy`).

Declared differences: views for microscopy (blocks/views.py: D4 for flips, per-channel intensity/contrast jitter
0.4/0.4 at p 0.8 for colour jitter and greyscale, no solarisation; blur probabilities the code's, 1.0 / 0.1 for
the global crops and 0.5 for the local ones, σ scaled to the image size; bilinear instead of bicubic resizing);
the learning rate follows the benchmark's schedule (linear warm-up, cosine to 0; the code's ends at 1e-6); the
online probe (the code trains no classifier during pre-training); BatchNorm statistics per rank (the code converts
to SyncBatchNorm); no stochastic depth (a ViT option of the code); under mixed precision the prototype layer's
forward in float32 (blocks/ssl.py `DINOHead.prototypes`; the code's autocast runs it in float16).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .backbones import build_backbone
from .base import MethodError
from .blocks.probe import PROBE_DEFAULTS, SelfSupervised, common
from .blocks.ssl import (
    DINOHead,
    DINOLoss,
    MultiCrop,
    clip_per_parameter_,
    cosine_schedule,
    ema_update_,
    teacher_entropy,
    teacher_temperature,
)
from .blocks.views import ViewSpec, jitter_hparams
from .hparams import NON_NEGATIVE, POSITIVE, Param
from .registry import register

GLOBAL_BLUR_PROBS = (1.0, 0.1)  # the code's first and second global crops
LOCAL_BLUR_PROB = 0.5
UNIT = {"low": 0.0, "high": 1.0}


@register("dino")
class DINO(SelfSupervised):
    defaults = {
        **PROBE_DEFAULTS,
        "optimizer": common("optimizer", "adamw"),
        "lr": common("lr", 0.0005 * 64 / 256),
        "batch_size": common("batch_size", 64),
        "epochs": common("epochs", 100),
        "warmup_epochs": common("warmup_epochs", 10),
        "weight_decay": common("weight_decay", 0.04),
        "weight_decay_end": Param(0.4, **NON_NEGATIVE),
        "clip_per_param": Param(3.0, **NON_NEGATIVE),  # 0 disables
        "freeze_last_layer": Param(1, low=0),  # epochs
        "out_dim": Param(65536, low=1),
        "hidden_dim": Param(2048, low=1),
        "bottleneck_dim": Param(256, low=1),
        "head_layers": Param(3, low=1),
        "use_bn_in_head": False,
        "norm_last_layer": True,
        "momentum_teacher": Param(0.996, **UNIT),
        "teacher_temp": Param(0.04, **POSITIVE),
        "warmup_teacher_temp": Param(0.04, **POSITIVE),
        "warmup_teacher_temp_epochs": Param(0, low=0),
        "student_temp": Param(0.1, **POSITIVE),
        "center_momentum": Param(0.9, **UNIT),
        "local_crops": Param(8, low=0),
        "global_crop_min_scale": Param(0.4, low=0.0, high=1.0, low_open=True),
        "local_crop_min_scale": Param(0.05, low=0.0, high=1.0, low_open=True),
        "local_crop_max_scale": Param(0.4, low=0.0, high=1.0, low_open=True),
        "local_crop_size": Param(96 / 224, low=0.0, high=1.0, low_open=True),  # side, a fraction of the image's
        **jitter_hparams(brightness=0.4, contrast=0.4),
        "eval_network": Param("teacher", choices=("teacher", "student")),
    }
    summary = ("DINO: multi-crop self-distillation into an EMA teacher with centring and sharpening (the official "
               "code's loss, schedules and student update); online linear probe on the teacher's features.")

    def build_ssl(self) -> None:
        hp = self.hparams
        if hp["local_crop_min_scale"] >= hp["local_crop_max_scale"]:
            raise MethodError(f"method {self.name!r}: 'local_crop_min_scale' must be below 'local_crop_max_scale', "
                              f"got {hp['local_crop_min_scale']} and {hp['local_crop_max_scale']}")
        if hp["warmup_teacher_temp_epochs"] > hp["epochs"]:
            raise MethodError(f"method {self.name!r}: 'warmup_teacher_temp_epochs' must be at most epochs "
                              f"({hp['epochs']}), got {hp['warmup_teacher_temp_epochs']}")
        backbone = build_backbone(self.backbone_spec, self.task.channels, hp["weights"])
        head = DINOHead(backbone.out_dim, hp["out_dim"], hp["use_bn_in_head"], hp["norm_last_layer"],
                        hp["head_layers"], hp["hidden_dim"], hp["bottleneck_dim"])
        self.student = MultiCrop(backbone, head)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)  # moved by the EMA only
        self.dino_loss = DINOLoss(hp["out_dim"], hp["student_temp"], hp["center_momentum"])
        jitter = (hp["jitter_prob"], hp["brightness"], hp["contrast"])
        self.global_views = tuple(ViewSpec((hp["global_crop_min_scale"], 1.0), blur, *jitter)
                                  for blur in GLOBAL_BLUR_PROBS)
        self.local_view = ViewSpec((hp["local_crop_min_scale"], hp["local_crop_max_scale"]), LOCAL_BLUR_PROB, *jitter,
                                   size=hp["local_crop_size"])

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        optimizers = super().configure_optimizers()
        optimizers[0].register_step_pre_hook(self._before_student_update)
        return optimizers

    def encoder_for_eval(self) -> nn.Module:
        return (self.teacher if self.hparams["eval_network"] == "teacher" else self.student).backbone

    # ---- schedules (update k = global_step of K; epoch-wise for the temperature and the frozen last layer) ------
    def teacher_momentum(self) -> float:
        return cosine_schedule(self.hparams["momentum_teacher"], 1.0, self.global_step(), self.total_steps())

    def student_weight_decay(self) -> float:
        hp = self.hparams
        return cosine_schedule(hp["weight_decay"], hp["weight_decay_end"], self.global_step(), self.total_steps())

    def teacher_temp(self) -> float:
        hp = self.hparams
        return teacher_temperature(self.epoch, hp["warmup_teacher_temp"], hp["teacher_temp"],
                                   hp["warmup_teacher_temp_epochs"])

    def _before_student_update(self, optimizer, args, kwargs) -> None:
        """The code's student update, after the all-reduce (and loss unscaling): weight decay of the decayed
        group from its schedule, per-parameter clipping, the last layer's gradient dropped while it is frozen."""
        optimizer.param_groups[0]["weight_decay"] = self.student_weight_decay()
        if self.hparams["clip_per_param"] > 0:
            clip_per_parameter_(self.student.parameters(), self.hparams["clip_per_param"])
        if self.epoch < self.hparams["freeze_last_layer"]:
            for p in self.student.head.last_layer.parameters():
                p.grad = None

    # ---- the objective ----------------------------------------------------------------------------------
    def ssl_loss(self, images: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict]:
        crops = [view(images, g) for view in self.global_views]
        crops += [self.local_view(images, g) for _ in range(self.hparams["local_crops"])]
        with torch.no_grad():
            teacher_out, teacher_features = self.teacher(crops[:2])
        student_out, student_features = self.student(crops)
        temp = self.teacher_temp()
        entropy = float(teacher_entropy(teacher_out, self.dino_loss.center, temp))  # before the centre moves
        loss = self.dino_loss(student_out, teacher_out, len(crops), temp)
        n_global = 2 * images.shape[0]
        features = teacher_features if self.hparams["eval_network"] == "teacher" else student_features[:n_global]
        ce = float(loss.detach())
        return loss, features.detach(), {"ssl_loss": ce - entropy, "dino_ce": ce, "teacher_entropy": entropy,
                                         "teacher_temp": temp, "teacher_momentum": self.teacher_momentum()}

    def after_ssl_step(self) -> None:
        ema_update_(self.teacher.parameters(), self.student.parameters(), self.teacher_momentum())
