"""Contract kit: the checks every Method class must pass, built-in or out-of-tree.

    from platebench.methods.testing import check_method
    def test_my_method():
        check_method(MyMethod)                 # or one check: check_track(MyMethod)

Each check builds the method on a tiny synthetic task (5 channels, 16x16 images, 3 classes, 6
plates with plate-specific channel gains/offsets, class = a brighter channel) and feeds it batches
shaped by its own `data_request()`: plate-pure or mixed-plate, the plate's controls appended
(is_control=True, label -1) when asked, a list of plates when plates_per_step > 1. Failures are
AssertionErrors that say what was expected.

Checks (CHECKS): declarations, loss_decreases, predict_shape, track (standard: a prediction does not
depend on the rest of its batch; tta: it does, and never on the running statistics of trained BN
layers), checkpoint (checkpoint_state round trip, loaded with `torch.load(weights_only=True)` as the harness
loads it), bf16 (a few steps under bf16-mixed autocast on CPU: finite, falling loss), reproducible (same seed,
same batches: same weights),
shared_training (a method declaring `trains_as` ends a
few steps with the weights of that method), ddp (2 CPU ranks, gloo, different data, identical parameters
after the steps). Only torch is needed; the DDP check forks ranks from a forkserver,
so a plain script calling it needs the usual `if __name__ == "__main__":` guard (pytest does not).
"""

from __future__ import annotations

import functools
import io
import multiprocessing
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from .backbones.base import DEFAULT_BACKBONE
from .base import Batch, Method, Needs, TaskSpec
from .blocks.bn import randomize_running_stats
from .distributed import free_port
from .precision import autocast

TASK = TaskSpec(num_classes=3, channels=5, image_size=(16, 16),
                num_domains={"plate": 6, "batch": 3, "source": 2, "cell_type": 1})
KIT_HPARAMS: dict[str, Any] = {"batch_size": 8}  # small steps on CPU; the method's own values come after
ATOL = 1e-5


# ---- synthetic plates ----------------------------------------------------------------------------
def _plate_effect(plate: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7919 * (plate + 1))
    return 1 + 0.3 * torch.randn(channels, generator=g), 0.5 * torch.randn(channels, generator=g)


def synthetic_batch(task: TaskSpec, plate: int, n_queries: int, n_controls: int = 0,
                    generator: torch.Generator | None = None, classes: torch.Tensor | None = None) -> Batch:
    """One plate-pure batch: `n_queries` labelled images (classes random unless given) then `n_controls` controls."""
    n = n_queries + n_controls
    h, w = task.image_size
    if classes is None:
        classes = torch.randint(task.num_classes, (n_queries,), generator=generator)
    labels = torch.cat([classes.long(), torch.full((n_controls,), -1, dtype=torch.long)])
    images = torch.randn(n, task.channels, h, w, generator=generator)
    rows = torch.arange(n_queries)
    images[rows, classes % task.channels] += 2.0  # the class signal: one brighter channel
    gain, offset = _plate_effect(plate, task.channels)
    images = images * gain.view(1, -1, 1, 1) + offset.view(1, -1, 1, 1)
    n_plates = max(task.num_domains.get("plate", 1), 1)
    domains = {"plate": torch.full((n,), plate, dtype=torch.long),
               "batch": torch.full((n,), plate // 2, dtype=torch.long),
               "source": torch.full((n,), plate * 2 // n_plates, dtype=torch.long),
               "cell_type": torch.zeros(n, dtype=torch.long)}
    is_control = torch.cat([torch.zeros(n_queries, dtype=torch.bool), torch.ones(n_controls, dtype=torch.bool)])
    return Batch(images=images, labels=labels, is_control=is_control, domains=domains, plate=f"P{plate}",
                 meta={"batch": f"B{plate // 2}", "source": f"S{plate * 2 // n_plates}", "cell_type": "C0"})


def mixed_batch(task: TaskSpec, n_queries: int, n_controls: int = 0,
                generator: torch.Generator | None = None) -> Batch:
    """Rows drawn from random plates (for methods with Needs(plate_pure=False))."""
    n_plates = max(task.num_domains.get("plate", 1), 1)
    plates = torch.randint(n_plates, (n_queries + n_controls,), generator=generator)
    rows = [synthetic_batch(task, int(p), 1, 0, generator) if i < n_queries else
            synthetic_batch(task, int(p), 0, 1, generator) for i, p in enumerate(plates)]
    batch = Batch.concat(rows)
    batch.plate, batch.meta = None, {}
    return batch


def training_batches(method: Method, generator: torch.Generator, first_plate: int = 0) -> Batch | list[Batch]:
    """What the stream would hand to `training_step`, following `method.data_request()`."""
    req = method.data_request()
    task = method.task
    n_plates = max(task.num_domains.get("plate", 1), 1)
    if not req.plate_pure:
        return mixed_batch(task, req.batch_size, req.n_controls, generator)
    batches = [synthetic_batch(task, (first_plate + i) % n_plates, req.batch_size, req.n_controls, generator)
               for i in range(req.plates_per_step)]
    return batches[0] if len(batches) == 1 else batches


def eval_batch(method: Method, plate: int, n_queries: int, generator: torch.Generator,
               classes: torch.Tensor | None = None) -> Batch:
    """A plate-pure evaluation batch with the method's eval_n_controls controls appended."""
    return synthetic_batch(method.task, plate, n_queries, method.data_request().eval_n_controls, generator, classes)


def build(cls: type[Method], hparams: Mapping[str, Any] | None = None, backbone: str = DEFAULT_BACKBONE,
          task: TaskSpec = TASK, seed: int = 0) -> Method:
    torch.manual_seed(seed)
    return cls(task, {**KIT_HPARAMS, **(hparams or {})}, backbone)


def _train(method: Method, steps: int, seed: int = 0, first_plate: int = 0) -> list[dict[str, float]]:
    g = torch.Generator().manual_seed(seed)
    batches = training_batches(method, g, first_plate)
    out = []
    for _ in range(steps):
        method.train()
        out.append(method.training_step(batches))
    return out


def _buffers(method: Method) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in method.named_buffers()}


def _assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    assert a.shape == b.shape and torch.allclose(a, b, atol=ATOL, rtol=1e-4), \
        f"{what}: max |difference| {diff:.3g} (shapes {tuple(a.shape)} vs {tuple(b.shape)})"


# ---- the checks ----------------------------------------------------------------------------------
def check_declarations(cls: type[Method], hparams=None, backbone: str = DEFAULT_BACKBONE) -> None:
    """Class attributes are well formed and data_request agrees with `needs`."""
    assert cls.name, f"{cls.__qualname__} has no name: decorate it with @register('<name>')"
    assert cls.track in ("standard", "tta"), f"{cls.name}: track {cls.track!r} is not 'standard' or 'tta'"
    assert isinstance(cls.needs, Needs), f"{cls.name}: needs must be a Needs instance"
    req = build(cls, hparams, backbone).data_request()
    assert req.batch_size >= 1, f"{cls.name}: data_request().batch_size is {req.batch_size}"
    assert req.plate_pure == cls.needs.plate_pure, \
        f"{cls.name}: data_request().plate_pure={req.plate_pure} but needs.plate_pure={cls.needs.plate_pure}"
    if req.n_controls or req.eval_n_controls:
        assert cls.needs.controls, f"{cls.name}: data_request() asks for controls but needs.controls is False"
    if req.plates_per_step > 1:
        assert cls.needs.multi_plate, \
            f"{cls.name}: plates_per_step={req.plates_per_step} but needs.multi_plate is False"


def check_loss_decreases(cls: type[Method], hparams=None, backbone: str = DEFAULT_BACKBONE, steps: int = 15,
                         metric: str = "loss") -> None:
    """Repeated steps on one fixed set of batches lower the reported loss (mean of the last 3 < first 3)."""
    history = _train(build(cls, hparams, backbone), steps)
    for i, metrics in enumerate(history):
        assert metric in metrics, f"{cls.name}: training_step must return {metric!r}; step {i} returned {metrics}"
    values = [float(m[metric]) for m in history]
    first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
    assert last < first, f"{cls.name}: {metric} did not go down over {steps} steps on fixed batches: {values}"


def check_predict_shape(cls: type[Method], hparams=None, backbone: str = DEFAULT_BACKBONE) -> None:
    """predict returns [n_queries, num_classes] finite logits (control rows excluded); embed covers every row."""
    method = build(cls, hparams, backbone)
    _train(method, 1)
    method.eval()
    batch = eval_batch(method, 0, 5, torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, features = method.predict(batch), method.embed(batch)
    expected = (int(batch.queries.sum()), method.task.num_classes)
    assert tuple(logits.shape) == expected, f"{cls.name}: predict gave {tuple(logits.shape)}, expected {expected}"
    assert bool(torch.isfinite(logits).all()), f"{cls.name}: predict gave non-finite logits"
    assert features.shape[0] == len(batch), f"{cls.name}: embed gave {features.shape[0]} rows for {len(batch)}"


def check_track(cls: type[Method], hparams=None, backbone: str = DEFAULT_BACKBONE) -> None:
    """standard: an image's prediction is the same alone or in any batch. tta: it depends on its batch and
    not on the running statistics of trained BN layers. Both: predict leaves every buffer untouched."""
    method = build(cls, hparams, backbone)
    _train(method, 2)
    method.eval()
    g = torch.Generator().manual_seed(3)
    a = eval_batch(method, 1, 6, g, classes=torch.zeros(6, dtype=torch.long))
    b = eval_batch(method, 1, 6, g, classes=torch.ones(6, dtype=torch.long))
    b.images[0] = a.images[0]  # the same image, in two batches of different composition
    before = _buffers(method)
    with torch.no_grad():
        pred_a, pred_b = method.predict(a)[0], method.predict(b)[0]
    for key, value in _buffers(method).items():
        assert torch.equal(value, before[key]), f"{cls.name}: predict changed buffer {key!r}"
    if cls.track == "standard":
        alone = a.select((torch.arange(len(a)) == 0) | a.is_control)  # the image with its plate's controls, if any
        with torch.no_grad():
            pred_alone = method.predict(alone)[0]
        _assert_close(pred_a, pred_b, f"{cls.name} (standard track): prediction changed with the rest of its batch")
        _assert_close(pred_a, pred_alone, f"{cls.name} (standard track): prediction alone differs from in-batch")
        return
    diff = float((pred_a - pred_b).abs().max())
    assert diff > 1e-4, (f"{cls.name} (tta track): prediction of an image does not depend on its batch "
                         f"(max |Δlogit| {diff:.3g}); a method with no test-time statistics belongs on 'standard'")
    randomize_running_stats(method, torch.Generator().manual_seed(4), trainable_only=True)
    with torch.no_grad():
        pred_random = method.predict(a)[0]
    _assert_close(pred_a, pred_random, f"{cls.name} (tta track): prediction depends on BN running statistics")


def check_checkpoint(cls: type[Method], hparams=None, backbone: str = DEFAULT_BACKBONE) -> None:
    """checkpoint_state → bytes → load_checkpoint_state into a differently initialised instance: same state,
    same predictions. The bytes are read as the harness reads checkpoints, `torch.load(weights_only=True)`:
    tensors and plain data only (a checkpoint is data, never code)."""
    trained = build(cls, hparams, backbone, seed=0)
    _train(trained, 2)
    buffer = io.BytesIO()
    torch.save(trained.checkpoint_state(), buffer)
    buffer.seek(0)
    try:
        state = torch.load(buffer, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError and kin: the harness would refuse the checkpoint
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise AssertionError(f"{cls.name}: checkpoint_state() holds something other than tensors and plain data "
                             f"(dict, list, tuple, str, int, float, bool, None), which the harness's "
                             f"torch.load(weights_only=True) refuses: {first}") from None
    restored = build(cls, hparams, backbone, seed=1)
    restored.load_checkpoint_state(state)
    for (key, value), (_, other) in zip(trained.state_dict().items(), restored.state_dict().items()):
        assert torch.equal(value, other), f"{cls.name}: {key!r} differs after the checkpoint round trip"
    batch = eval_batch(trained, 2, 5, torch.Generator().manual_seed(5))
    trained.eval()
    restored.eval()
    with torch.no_grad():
        torch.manual_seed(9)
        want = trained.predict(batch)
        torch.manual_seed(9)
        got = restored.predict(batch)
    _assert_close(want, got, f"{cls.name}: predictions differ after the checkpoint round trip")


def check_bf16(cls: type[Method], hparams=None, backbone: str = DEFAULT_BACKBONE, steps: int = 15) -> None:
    """Under bf16-mixed autocast on CPU (as a run with --precision bf16-mixed), repeated steps on fixed batches
    report finite, falling losses (mean of the last 3 < first 3), leave finite parameters, and predict finite
    logits."""
    method = build(cls, hparams, backbone)
    method.set_precision("bf16-mixed")
    with autocast("bf16-mixed", "cpu"):
        history = _train(method, steps)
    values = [float(m["loss"]) for m in history]
    assert all(torch.isfinite(torch.tensor(values))), f"{cls.name} under bf16-mixed: non-finite loss: {values}"
    bad = [k for k, p in method.named_parameters() if not bool(torch.isfinite(p).all())]
    assert not bad, f"{cls.name} under bf16-mixed: non-finite parameters {bad[:3]}"
    first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
    assert last < first, (f"{cls.name} under bf16-mixed: loss did not go down over {steps} steps on fixed batches: "
                          f"{values}")
    method.eval()
    with torch.no_grad(), autocast("bf16-mixed", "cpu"):
        logits = method.predict(eval_batch(method, 0, 5, torch.Generator().manual_seed(1)))
    assert bool(torch.isfinite(logits).all()), f"{cls.name} under bf16-mixed: predict gave non-finite logits"


def check_reproducible(cls: type[Method], hparams=None, backbone: str = DEFAULT_BACKBONE, steps: int = 3) -> None:
    """Two instances built and trained from the same seed on the same batches end with identical weights and
    buffers: a run's id (a hash of its seed and configuration) names one result."""
    states = []
    for _ in range(2):
        method = build(cls, hparams, backbone, seed=5)
        torch.manual_seed(6)  # the method's own noise (style layers, CutMix, dropout)
        _train(method, steps, seed=7)
        states.append(method.state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), f"{cls.name}: {key!r} differs between two same-seed trainings"


def check_shared_training(cls: type[Method], hparams=None, backbone: str = DEFAULT_BACKBONE, steps: int = 3) -> None:
    """A method that declares `trains_as` trains exactly as that method: from the same seed and batches, a few
    steps leave identical parameters and buffers (so the harness may train once and evaluate both)."""
    if cls.trains_as is None:
        assert not (set(cls.predict_hparams) - set(cls.all_defaults())), \
            f"{cls.name}: predict_hparams {sorted(cls.predict_hparams)} are not all hyperparameters of the method"
        return
    from .registry import get_method

    base = get_method(cls.trains_as)
    assert base.trains_as is None, f"{cls.name}: trains_as {base.name!r}, which itself trains as {base.trains_as!r}"
    mine = build(cls, hparams, backbone, seed=0)
    training = cls.training_hparams(mine.hparams)
    unknown = set(training) - set(base.all_defaults())
    assert not unknown, (f"{cls.name}: hyperparameters {sorted(unknown)} are not {base.name!r}'s; declare them in "
                         f"predict_hparams if they only change prediction")
    theirs = build(base, training, backbone, seed=0)
    for method in (mine, theirs):
        torch.manual_seed(11)  # the same noise draws (style layers, dropout) in both trainings
        _train(method, steps, seed=11)
    for (key, a), (_, b) in zip(sorted(mine.state_dict().items()), sorted(theirs.state_dict().items())):
        assert torch.equal(a, b), (f"{cls.name} declares trains_as={base.name!r}, but {key!r} differs after "
                                   f"{steps} steps from the same seed and batches")



def _flat(tensors) -> torch.Tensor:
    tensors = [t.detach().double().flatten() for t in tensors]
    return torch.cat(tensors) if tensors else torch.zeros(0, dtype=torch.float64)


def _ddp_rank(rank: int, world: int, port: int, cls: type[Method], hparams, backbone: str, steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        method = build(cls, hparams, backbone, seed=0)  # same initial parameters on every rank
        start = _flat(method.parameters())
        _train(method, steps, seed=100 + rank, first_plate=rank)  # different data on every rank
        method.sync_buffers()
        for what, flat in (("parameters", _flat(method.parameters())), ("buffers", _flat(
                b for b in method.buffers() if b.is_floating_point()))):
            gathered = [torch.zeros_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            diff = float((gathered[0] - gathered[1]).abs().max()) if flat.numel() else 0.0
            assert diff <= 1e-6, f"{cls.name} under DDP: {what} differ across ranks by {diff:.3g} after {steps} steps"
        assert not torch.equal(start, _flat(method.parameters())), f"{cls.name} under DDP: no parameter changed"
    finally:
        dist.destroy_process_group()


def check_ddp(cls: type[Method], hparams=None, backbone: str = DEFAULT_BACKBONE, steps: int = 2,
              world: int = 2) -> None:
    """`world` CPU ranks (gloo) see different plates; after `steps` steps and sync_buffers, parameters and
    floating buffers are identical on every rank (and did change)."""
    # Ranks are forked from a forkserver that has imported torch once: far cheaper than spawn per check.
    # torch._dynamo is imported lazily by the first optimiser (seconds); importing it once in the server saves that.
    multiprocessing.set_forkserver_preload(["torch", "torch._dynamo", __name__])
    tmp.start_processes(_ddp_rank, args=(world, free_port(), cls, dict(hparams or {}), backbone, steps),
                        nprocs=world, join=True, start_method="forkserver")


def _single_threaded(check: Callable[..., None]) -> Callable[..., None]:
    """Run a check with one intra-op thread: on tiny tensors extra threads only add overhead, and on a busy
    machine spinning OpenMP threads slow these checks down a hundredfold."""

    @functools.wraps(check)
    def run(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return check(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return run


(check_declarations, check_loss_decreases, check_predict_shape, check_track, check_checkpoint, check_bf16,
 check_reproducible, check_shared_training) = (_single_threaded(c) for c in (
    check_declarations, check_loss_decreases, check_predict_shape, check_track, check_checkpoint, check_bf16,
    check_reproducible, check_shared_training))

CHECKS: dict[str, Callable[..., None]] = {
    "declarations": check_declarations,
    "loss_decreases": check_loss_decreases,
    "predict_shape": check_predict_shape,
    "track": check_track,
    "checkpoint": check_checkpoint,
    "bf16": check_bf16,
    "reproducible": check_reproducible,
    "shared_training": check_shared_training,
    "ddp": check_ddp,
}


def check_method(cls: type[Method], hparams: Mapping[str, Any] | None = None, backbone: str = DEFAULT_BACKBONE,
                 skip: tuple[str, ...] = ()) -> None:
    """Run every check of CHECKS (except `skip`) against `cls`."""
    for name, check in CHECKS.items():
        if name not in skip:
            check(cls, hparams, backbone)


__all__ = ["ATOL", "CHECKS", "KIT_HPARAMS", "TASK", "build", "check_bf16", "check_checkpoint", "check_ddp",
           "check_declarations", "check_loss_decreases", "check_method", "check_predict_shape", "check_reproducible",
           "check_shared_training", "check_track", "eval_batch", "mixed_batch", "synthetic_batch", "training_batches"]
