"""`weights=URI`: safetensors files into ViTs and ResNets (3 -> C channels), refusal of anything else, s3://,
TVN's frozen encoder, `platebench export-weights` from a run's checkpoint back to `weights=`, and the suite row
whose weights the user gives."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
from platebench.datasets.errors import StorageError
from platebench.harness.cli import main
from platebench.harness.results.layout import write_run_done
from platebench.harness.train.checkpointing import TrainingStore
from platebench.harness.train.runspec import RunSpec, resolve_run_hparams
from platebench.methods import MethodError
from platebench.methods.backbones import build_backbone
from platebench.methods.backbones.weights import check_weights_file, encode_weights, read_weights
from platebench.methods.erm import ERM
from platebench.methods.testing import TASK, build, synthetic_batch
from platebench.methods.tvn import TVN
from safetensors.torch import save, save_file
from torch import nn


def _randomise_bn(backbone: nn.Module) -> None:
    """Statistics a fresh model lacks, so that a buffer left unloaded would show."""
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)


def _equal_states(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- loading -------------------------------------------------------------------------------------------------
def test_a_timm_layout_vit_file_loads_with_its_patch_embedding_adapted_to_c_channels(tmp_path):
    torch.manual_seed(0)
    rgb = build_backbone("vit-tiny", 3).eval()
    path = tmp_path / "vit.safetensors"
    save_file({**rgb.state_dict(), "head.weight": torch.zeros(1000, 192), "head.bias": torch.zeros(1000)}, path)
    torch.manual_seed(1)
    five = build_backbone("vit-tiny", 5, weights=str(path)).eval()
    w = rgb.patch_embed.proj.weight
    assert torch.allclose(five.patch_embed.proj.weight, w.mean(1, keepdim=True).repeat(1, 5, 1, 1) * 3 / 5)
    theirs = rgb.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in five.state_dict().items() if k != "patch_embed.proj.weight")
    plane = torch.randn(2, 1, 32, 32)  # an image equal in every channel gets the RGB model's response
    with torch.no_grad():
        assert torch.allclose(five(plane.repeat(1, 5, 1, 1)), rgb(plane.repeat(1, 3, 1, 1)), atol=1e-5)


def test_a_torchvision_layout_resnet_file_loads_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    source = build_backbone("resnet-tiny", 5)
    _randomise_bn(source)
    path = tmp_path / "resnet.safetensors"
    save_file({**source.state_dict(), "fc.weight": torch.zeros(10, 128), "fc.bias": torch.zeros(10)}, path)
    torch.manual_seed(1)
    target = build_backbone("resnet-tiny", 5, weights=str(path))
    x = torch.randn(2, 5, 24, 24)
    with torch.no_grad():
        assert torch.equal(source.eval()(x), target.eval()(x))


class _RunsCode:
    """Unpickling this touches a file: proof that a refused file was never unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_pickle_or_torch_file_is_refused_in_one_line_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    evil, pt = tmp_path / "evil.pkl", tmp_path / "weights.pt"
    evil.write_bytes(pickle.dumps({"conv1.weight": _RunsCode(marker)}))
    torch.save(build_backbone("resnet-tiny", 5).state_dict(), pt)
    for path in (evil, pt):
        with pytest.raises(MethodError, match=rf"^weights '{re.escape(str(path))}': not a safetensors file "
                                              r"\(platebench loads weights only from safetensors, never a pickle"):
            build_backbone("resnet-tiny", 5, weights=str(path))
        with pytest.raises(MethodError, match="not a safetensors file"):
            check_weights_file(str(path), "resnet-tiny")  # the driver's check reads the header only
    assert not marker.exists()
    with pytest.raises(StorageError, match=r"reading weights .*missing\.safetensors: not found"):
        build_backbone("resnet-tiny", 5, weights=str(tmp_path / "missing.safetensors"))


def test_a_file_exported_from_another_backbone_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(encode_weights(build_backbone("resnet-tiny", 5).state_dict(), "resnet-tiny", 5))
    for check in (lambda: build_backbone("vit-tiny", 5, weights=str(path)),
                  lambda: check_weights_file(str(path), "vit-tiny")):
        with pytest.raises(MethodError, match=r"hold a 'resnet-tiny' backbone, not 'vit-tiny'$"):
            check()


def test_weights_from_s3(s3_env, tmp_path):
    s3 = s3_env.create_bucket("pb-weights")
    torch.manual_seed(0)
    source = build_backbone("resnet-tiny", 5)
    _randomise_bn(source)
    s3.put_object(Bucket="pb-weights", Key="enc/w.safetensors", Body=save(source.state_dict()))
    check_weights_file("s3://pb-weights/enc/w.safetensors", "resnet-tiny")
    assert _equal_states(build_backbone("resnet-tiny", 5, weights="s3://pb-weights/enc/w.safetensors"), source)


def test_the_harness_makes_a_relative_weights_path_absolute_for_the_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_run_hparams("erm", {"weights": "w.safetensors"})["weights"] == str(tmp_path / "w.safetensors")
    assert resolve_run_hparams("erm", {})["weights"] == ""  # random initialisation


def test_tvn_embeds_with_the_frozen_encoder_of_the_file(tmp_path):
    torch.manual_seed(0)
    source = build_backbone("vit-tiny", TASK.channels).eval()
    path = tmp_path / "enc.safetensors"
    save_file(source.state_dict(), path)
    method = build(TVN, {"n_controls": 8, "weights": str(path)}, backbone="vit-tiny", seed=3)
    g = torch.Generator().manual_seed(1)
    for plate in range(3):
        method.training_step(synthetic_batch(TASK, plate, 8, 8, g))
    assert _equal_states(method.encoder, source)  # frozen through training
    assert not any(p.requires_grad for p in method.encoder.parameters())
    batch = synthetic_batch(TASK, 4, 6, 8, g)
    with torch.no_grad():
        assert torch.equal(method.encode(batch.images), source(batch.images))


# ---- export-weights ------------------------------------------------------------------------------------------
def _finished_run(storage: Path, epochs: dict[int, dict], selected: int, method: str = "erm",
                  backbone: str = "resnet-tiny") -> str:
    """A finished run as the harness stores it: weights per epoch, spec.json and done.json."""
    spec = RunSpec(data="ds", dataset="tiny", dataset_checksum="c", split_scheme="new_batches", method=method,
                   hparams=resolve_run_hparams(method, {}), backbone=backbone, seed=0,
                   code={"version": "0", "source": "s"})
    store = TrainingStore(str(storage), None, spec.training().training_id)
    for epoch, state in epochs.items():
        store.save_weights(epoch, state)
    write_run_done(str(storage), spec, {"training_id": spec.training().training_id, "selected_epoch": selected,
                                        "final_metrics": {"epoch": max(epochs)}})
    return spec.run_id


def test_export_weights_writes_the_selected_epochs_backbone_that_weights_loads_back(tmp_path, capsys):
    erm = [build(ERM, seed=s) for s in (0, 1)]
    for m in erm:
        _randomise_bn(m.network.featurizer)
    run_id = _finished_run(tmp_path / "store", {1: erm[0].state_dict(), 2: erm[1].state_dict()}, selected=1)
    out = tmp_path / "w" / "erm.safetensors"
    assert main(["export-weights", "--records", str(tmp_path / "store"), "--run", "erm", "--to", str(out)]) == 0
    assert f"resnet-tiny backbone of run {run_id} (erm, network.featurizer), epoch 1" in capsys.readouterr().out
    tensors, metadata = read_weights(str(out))
    assert metadata["platebench.backbone"] == "resnet-tiny" and metadata["platebench.in_channels"] == "5"
    assert (metadata["platebench.run_id"], metadata["platebench.epoch"]) == (run_id, "1")
    loaded = build(ERM, {"weights": str(out)}, seed=7)  # weights= starts a new run from it
    assert _equal_states(loaded.network.featurizer, erm[0].network.featurizer)
    assert main(["export-weights", "--records", str(tmp_path / "store"), "--run", run_id, "--epoch", "2",
                 "--to", str(out)]) == 0
    assert _equal_states(build_backbone("resnet-tiny", 5, weights=str(out)), erm[1].network.featurizer)


def test_export_weights_asks_which_copy_when_a_method_holds_several(tmp_path, capsys):
    student, teacher = build_backbone("vit-tiny", 5), build_backbone("vit-tiny", 5)
    state = {**{f"student.{k}": v for k, v in student.state_dict().items()},
             **{f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}, "head.w": torch.zeros(2)}
    _finished_run(tmp_path / "store", {3: state}, selected=3, backbone="vit-tiny")
    out = tmp_path / "t.safetensors"
    argv = ["export-weights", "--records", str(tmp_path / "store"), "--run", "erm", "--to", str(out)]
    assert main(argv) == 2
    assert "holds 2 'vit-tiny' backbones: student, teacher.backbone; pick one with --module" in \
        capsys.readouterr().err
    assert main([*argv, "--module", "teacher.backbone"]) == 0
    assert _equal_states(build_backbone("vit-tiny", 5, weights=str(out)), teacher)
    assert main([*argv[:-1], str(tmp_path / "t.pt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err


# ---- the suite row whose weights the user gives ---------------------------------------------------------------
def test_cs_arm_bn_jump_runs_tvn_on_vit_small_once_the_user_gives_its_weights(tmp_path, capsys):
    assert main(["bench", "--suite", "cs-arm-bn-jump", "--dry-run"]) == 0
    captured = capsys.readouterr()
    tvn = [line for line in captured.out.splitlines() if line.startswith("tvn ")]
    assert tvn and all(" backbone=vit-small " in line and " weights=(yours)" in line for line in tvn)
    assert "leaves tvn.weights to you" in captured.err
    rc = main(["bench", "--suite", "cs-arm-bn-jump", "--data", str(tmp_path / "jump"), "--out", str(tmp_path / "o"),
               "--no-mlflow"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "give --hparams tvn.weights=VALUE, or run without: --methods erm " \
                                                 "adabn arm-bn cs-arm-bn" in err
    path = tmp_path / "enc.safetensors"
    assert main(["bench", "--suite", "cs-arm-bn-jump", "--hparams", f"tvn.weights={path}", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(f" weights={path} " in f"{line} " for line in lines if line.startswith("tvn "))
    assert all(" weights= " in f"{line} " for line in lines if line.startswith("erm "))  # the other rows: random init
