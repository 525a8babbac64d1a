"""`platebench synth` as a Ray job: one task per plate (generate + write), the manifest last.

Plates are independent and each is seeded from (seed, plate index), so the result is byte-identical
whatever the number of workers or the order tasks finish in. The plan (class effects, batch
deviations) is put in the object store once and shared by every task. Storage options travel to the
tasks explicitly, so workers on other nodes reach the same S3 endpoint as the driver.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from platebench.datasets.manifest import MANIFEST_NAME, Manifest, Part
from platebench.datasets.shards import write_manifest
from platebench.datasets.storage import StorageOptions, describe_error, filesystem, join
from platebench.datasets.synth import Plan, Preset, get_preset, manifest_for, plan, write_one

from .. import ray_local
from ..errors import USER_ERRORS, HarnessError


@dataclass
class SynthResult:
    url: str
    manifest: Manifest
    plates: int
    images: int
    bytes: int
    seconds: float


def prepare_target(out: str, options: StorageOptions | None, overwrite: bool) -> None:
    """Refuse to write over an existing dataset unless `overwrite`; then clear its manifest and plates.

    The old manifest goes first, so an interrupted overwrite never leaves a manifest that lists a mix
    of old and new parts. Nothing else in the folder is touched.
    """
    fs, root = filesystem(out, options)
    manifest = join(root, MANIFEST_NAME)
    try:
        if not fs.exists(manifest):
            return
        if not overwrite:
            raise HarnessError(f"{out} already holds a dataset ({MANIFEST_NAME}); pass --overwrite to replace it")
        fs.rm_file(manifest)
        plates = join(root, "plates")
        if fs.exists(plates):
            fs.rm(plates, recursive=True)
    except HarnessError:
        raise
    except Exception as exc:  # botocore's errors (no credentials, endpoint down) are not OSErrors
        raise describe_error(exc, f"preparing {out}") from exc


def _write_plate_task(plan: Plan, index: int, out: str, options: StorageOptions | None) -> list[Part]:
    return write_one(plan, plan.plates[index], out, options)


def run_synth(plan: Plan, out: str, options: StorageOptions | None = None, *, overwrite: bool = False,
              num_cpus: int | None = None, address: str | None = None,
              progress: Callable[[str], None] | None = None) -> SynthResult:
    """Generate and write every plate of `plan` under `out` in parallel Ray tasks, then the manifest."""
    import ray

    start = time.perf_counter()
    prepare_target(out, options, overwrite)
    started_here = not ray.is_initialized()
    ray_local.init(address=address, num_cpus=num_cpus)
    try:
        task = ray.remote(num_cpus=1, max_retries=2)(_write_plate_task)
        plan_ref = ray.put(plan)
        pending = {task.remote(plan_ref, spec.index, out, options): spec.index for spec in plan.plates}
        parts_by_plate: dict[int, list[Part]] = {}
        report = progress or _stderr_progress(len(plan.plates))
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                parts_by_plate[pending.pop(ref)] = _get(ref)
            written = [p for ps in parts_by_plate.values() for p in ps]
            report(f"synth: {len(parts_by_plate)}/{len(plan.plates)} plates, {sum(p.rows for p in written)} images, "
                   f"{_mb(sum(p.bytes for p in written))}, {time.perf_counter() - start:.1f} s")
    finally:
        if started_here:
            ray_local.shutdown()
    parts = [p for i in sorted(parts_by_plate) for p in parts_by_plate[i]]
    manifest = manifest_for(plan, parts)
    write_manifest(out, manifest, options)
    return SynthResult(url=out, manifest=manifest, plates=len(plan.plates), images=manifest.rows,
                       bytes=sum(p.bytes for p in parts), seconds=time.perf_counter() - start)


def _get(ref):
    """ray.get, re-raising a task's own error (e.g. StorageError: access denied) as itself, so the CLI
    shows one clear line instead of a remote traceback."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, USER_ERRORS):
            raise exc.cause from None
        raise


def generate(preset: str | Preset, out: str, seed: int = 0, overrides: dict | None = None,
             options: StorageOptions | None = None, **kw) -> SynthResult:
    """Convenience for callers such as `platebench bench`: a preset (name or object) straight to `out`."""
    if isinstance(preset, str):
        preset = get_preset(preset, overrides)
    elif overrides:
        raise HarnessError("generate: pass overrides with a preset name, not a Preset object")
    return run_synth(plan(preset, seed), out, options, **kw)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _stderr_progress(total: int) -> Callable[[str], None]:
    """One line rewritten in place on a terminal; about ten lines otherwise (logs stay short)."""
    tty = sys.stderr.isatty()
    state = {"count": 0}

    def report(line: str) -> None:
        state["count"] += 1
        if tty:
            end = "\n" if state["count"] == total else ""
            print(f"\r{line}", end=end, file=sys.stderr, flush=True)
        elif state["count"] == total or state["count"] % max(1, total // 10) == 0:
            print(line, file=sys.stderr, flush=True)

    return report
