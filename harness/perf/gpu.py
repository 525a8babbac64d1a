"""`platebench perf gpu`: the GPU check in one command (one CUDA device, under 8 minutes).

1. kit: every registered method's contract-kit training steps (its own batch shape, 16 px, the kit's
   hyperparameters) on the GPU in fp32 and bf16-mixed: finite losses that fall on fixed batches, as the kit
   asks on CPU. Failures are named, not raised: the check reports every method.
2. quickstart: a `perf train --gpu` epoch (the Ray run against the plain loop, same work) in fp32 and
   bf16-mixed on the generated `quickstart` preset.
3. paper scale: a few generated `rxrx1-scale` plates (6 channels, 512 px), ResNet-50, fp32 and bf16-mixed,
   trained by the plain loop over the stream's own batches (parts cached first, so the figure is what the GPU
   sustains when fed): images/s, peak GPU memory (torch.cuda.max_memory_allocated), the GPU's busy fraction
   (the union of CUDA kernel intervals recorded by torch.profiler over the timed steps, divided by their wall
   time) and the device-side image preparation's seconds per image.
4. cores per GPU: that GPU rate divided by the stream's images/s per core on the same plates (`perf data`'s
   `stream_images_per_s_per_core`): the CPU cores a worker needs to keep one GPU fed.
The headline `ratio` is bf16-mixed images/s over fp32 at paper scale.
"""

from __future__ import annotations

import time

import torch

from ..errors import HarnessError

KIT_STEPS = 15
MEASURED_PRECISIONS = ("fp32", "bf16-mixed")
# A few rxrx1-scale plates, small enough to generate inside the check's time on one GPU node: one plate per batch
# of each source (train, val, test batches), 120 of the 308 wells (240 images at 6x512x512, about 230 MB each).
SCALE_OVERRIDES = {"layout.sources": 2, "layout.batches_per_source": 3, "layout.plates_per_batch": 1,
                   "layout.rows": 12, "layout.cols": 14}
SCALE_BACKBONE, SCALE_BATCH, SCALE_STEPS, SCALE_WARMUP = "resnet50", 32, 12, 3

KEYS = ("ratio", "kit_methods", "kit_failed",
        *(f"quickstart_{p}_{k}" for p in ("fp32", "bf16") for k in ("images_per_s", "ray_vs_plain")),
        *(f"scale_{p}_{k}" for p in ("fp32", "bf16") for k in
          ("images_per_s", "peak_mem_gib", "gpu_busy_fraction", "prep_s_per_image", "cores_per_gpu")),
        "stream_images_per_s_per_core", "scale_plates", "scale_backbone", "scale_batch_size", "image_shape")


def require_cuda() -> torch.device:
    """The CUDA device, or the one-line error `perf gpu` exits 2 with."""
    if not torch.cuda.is_available():
        raise HarnessError("perf gpu: no CUDA device is visible to torch (torch.cuda.is_available() is False); "
                           "run it on a GPU machine with a CUDA build of torch")
    return torch.device("cuda", 0)


def _short(precision: str) -> str:
    return precision.split("-")[0]


def kit_steps(name: str, device, precision: str, steps: int = KIT_STEPS) -> str | None:
    """The contract kit's fixed-batch training of `name` on `device` under `precision`: None when its losses are
    finite and fall (mean of the last 3 below the first 3), else what went wrong, in one line."""
    from platebench.methods import registry, testing
    from platebench.methods.precision import autocast

    from ..data.batching import on_device
    from ..data.stream import to_device

    try:
        method = on_device(testing.build(registry.get_method(name)), device)
        method.set_precision(precision)
        batches = to_device(testing.training_batches(method, torch.Generator().manual_seed(0)), device)
        method.train()
        with autocast(precision, device):
            losses = [float(method.training_step(batches)["loss"]) for _ in range(steps)]
    except Exception as exc:  # every method is reported, whatever one of them raises
        return f"{name} {precision}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if not all(torch.isfinite(torch.tensor(losses))):
        return f"{name} {precision}: non-finite loss {losses}"
    if sum(losses[-3:]) >= sum(losses[:3]):
        return f"{name} {precision}: loss did not fall over {steps} steps: {losses[:3]} ... {losses[-3:]}"
    return None


def kit(device, precisions=MEASURED_PRECISIONS) -> tuple[list[str], list[str]]:
    """(every registered method, the failures of kit_steps over `precisions`)."""
    from platebench.methods.registry import names

    methods = names()
    return methods, [f for m in methods for p in precisions if (f := kit_steps(m, device, p)) is not None]


def kernel_busy_us(prof) -> float:
    """Microseconds the GPU ran kernels in a torch.profiler trace: the union of the CUDA events' intervals
    (`prof.events()`; overlapping kernels counted once)."""
    intervals = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for s, e in intervals:
        if e > end:
            busy += e - max(s, end)
            end = e
    return busy


def loop_figures(data: str, precision: str, device, backbone: str = SCALE_BACKBONE, batch_size: int = SCALE_BATCH,
                 steps: int = SCALE_STEPS, warmup: int = SCALE_WARMUP, read_threads: int = 4) -> dict:
    """ERM on `data`'s training split through the stream (parts cached first), `warmup` untimed steps then
    `steps` timed ones: images/s, peak memory, the GPU's busy fraction (None off CUDA) and the device-side
    preparation's seconds per image."""
    from platebench.datasets.shards import open_dataset
    from platebench.methods.precision import autocast

    from ..data.stream import PartCache, StreamConfig
    from ..train.runspec import build_method, task_spec
    from .plain import PlainPlateStream
    from .prep import prep_seconds_per_image
    from .train import prepare

    spec = prepare(data, hparams={"batch_size": batch_size}, backbone=backbone, precision=precision)
    t = spec.training()
    ds = open_dataset(data)
    torch.manual_seed(0)
    method = build_method(t, task_spec(ds), device)
    stream = PlainPlateStream(ds, StreamConfig.for_training(method.data_request(), t.split_scheme, t.seed,
                                                            t.hparams["augment"]),
                              0, 1, PartCache(64 * 2**30), read_threads=read_threads)
    stream.warm(0)
    if stream.steps(0) < warmup + steps:
        raise HarnessError(f"perf gpu: {data} gives {stream.steps(0)} training steps of {batch_size}; "
                           f"{warmup + steps} needed")
    on_cuda = torch.device(device).type == "cuda"
    batches = stream.epoch(0, device)
    method.train()
    with autocast(precision, device):
        for _ in range(warmup):
            method.training_step(next(batches))
        if on_cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_cuda else [])
        images = 0
        with torch.profiler.profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                batch = next(batches)
                images += len(batch)
                method.training_step(batch)
            if on_cuda:
                torch.cuda.synchronize(device)
            wall = time.perf_counter() - t0
    batches.close()
    return {"images_per_s": images / wall,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else None,
            "gpu_busy_fraction": kernel_busy_us(prof) / 1e6 / wall if on_cuda else None,
            "prep_s_per_image": prep_seconds_per_image(stream, device)}


def quickstart(data: str, precision: str) -> dict:
    """A `perf train --gpu` epoch of ERM on the quickstart data: the run's training images/s and Ray ÷ plain."""
    from . import train

    out = train.run(train.prepare(data, precision=precision), gpu=True)
    return {"images_per_s": out["train_images"] / out["ray_training_s"], "ray_vs_plain": out["ratio"]}


def run(work: str, read_parallelism: int = 2) -> dict:
    """Every figure of the check; `work`: a scratch folder for the generated datasets."""
    from platebench.datasets.shards import open_dataset

    from ..prepare.synth import generate
    from . import data as data_perf

    device = require_cuda()
    figures: dict = {}
    methods, failed = kit(device)
    figures.update(kit_methods=len(methods), kit_failed="; ".join(failed) or "none")
    quick = f"{work}/quickstart"
    generate("quickstart", quick, seed=0)
    for precision in MEASURED_PRECISIONS:
        for k, v in quickstart(quick, precision).items():
            figures[f"quickstart_{_short(precision)}_{k}"] = v
    scale = f"{work}/rxrx1-scale"
    generate("rxrx1-scale", scale, seed=0, overrides=SCALE_OVERRIDES)
    ds = open_dataset(scale)
    per_core = data_perf.run(ds, batch_size=SCALE_BATCH, parallelism=read_parallelism, repeats=1)[
        "stream_images_per_s_per_core"]
    for precision in MEASURED_PRECISIONS:
        loop = loop_figures(scale, precision, device)
        loop["cores_per_gpu"] = loop["images_per_s"] / per_core
        figures.update({f"scale_{_short(precision)}_{k}": v for k, v in loop.items()})
    figures.update(ratio=figures["scale_bf16_images_per_s"] / figures["scale_fp32_images_per_s"],
                   stream_images_per_s_per_core=per_core, scale_plates=len(ds.manifest.plates),
                   scale_backbone=SCALE_BACKBONE, scale_batch_size=SCALE_BATCH,
                   image_shape="x".join(map(str, ds.manifest.image_shape)))
    return figures
