"""`platebench synth`: generate a synthetic Cell Painting dataset in the shard format.

    platebench synth --preset quickstart --out data/quickstart --seed 0
    platebench synth --preset strong-shift --out s3://bucket/synth/strong --set effects.blur=2 --num-cpus 8

Same preset, overrides and seed => the same bytes (and the same dataset checksum), whatever the
parallelism. `--list` prints the presets and the keys `--set` accepts.
"""

from __future__ import annotations

import sys

from platebench.datasets.storage import StorageOptions, absolute
from platebench.datasets.synth import PRESETS, get_preset, override_keys, plan

from ..errors import HarnessError
from .flags import add_ray_flags, add_seed_flag, parse_pairs, positive_int


def add_parser(sub):
    p = sub.add_parser(
        "synth", help="generate a synthetic cell-painting dataset (the default workload)",
        description="Generate a synthetic Cell Painting dataset with controllable batch effects, one Ray task "
                    "per plate, in the platebench shard format.")
    p.add_argument("--preset", default="quickstart", help=f"one of: {', '.join(PRESETS)} (default: quickstart)")
    p.add_argument("--out", help="dataset root: a folder, file:// or s3:// URL")
    add_seed_flag(p, "the generator; same seed, same bytes")
    p.add_argument("--size", type=positive_int, help="image side in pixels (overrides the preset's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset field, e.g. effects.strength=2 or layout.sources=4 (repeatable; "
                        "--list shows the keys)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already at --out")
    add_ray_flags(p)
    p.add_argument("--list", action="store_true", help="list presets and override keys, then exit")
    return p


def run(args) -> int:
    if args.list:
        for name, preset in PRESETS.items():
            print(f"{name:13s} {preset.description}")
        print("\n--set keys:\n  " + "\n  ".join(override_keys()))
        return 0
    if not args.out:
        raise HarnessError("--out is required (a folder, file:// or s3:// URL)")
    overrides = parse_pairs("--set", args.overrides)
    if args.size is not None:
        overrides["size"] = args.size
    preset = get_preset(args.preset, overrides)
    from ..prepare.synth import run_synth

    result = run_synth(plan(preset, args.seed), absolute(args.out), StorageOptions.from_env(), overwrite=args.overwrite,
                       num_cpus=args.num_cpus, address=args.address)
    m = result.manifest
    print(f"synth: {result.plates} plates, {result.images} images ({len(m.channels)}x{m.height}x"
          f"{m.width} uint8), {result.bytes / 2**20:.1f} MiB in {result.seconds:.1f} s -> {result.url} "
          f"(preset {preset.name}, seed {args.seed}, checksum {m.checksum()[:12]})", file=sys.stdout)
    return 0
