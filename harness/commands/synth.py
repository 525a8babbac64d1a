"""`platebench synth`: generate a synthetic Cell Painting dataset in the shard format.

    platebench synth --preset quickstart --data data/quickstart --seed 0
    platebench synth --preset strong-shift --data s3://bucket/synth/strong --set effects.blur=2 --num-cpus 8

Same preset, overrides and seed => the same bytes (and the same dataset checksum), whatever the
parallelism. `--list` prints the presets and the keys `--set` accepts.
"""

from __future__ import annotations

import sys

from platebench.datasets.storage import StorageOptions, absolute
from platebench.datasets.synth import PRESETS, get_preset, override_keys, plan

from ..errors import HarnessError
from . import flags


def add_parser(sub):
    p = sub.add_parser(
        "synth", help="generate a synthetic cell-painting dataset (the default workload)",
        description="Generate a synthetic Cell Painting dataset with controllable batch effects, one Ray task "
                    "per plate, in the platebench shard format, at the dataset root --data.")
    flags.add_preset_flag(p)
    flags.add_data_flag(p)
    flags.add_seed_flag(p)
    flags.add_size_flag(p)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset field, e.g. effects.strength=2 or layout.sources=4 (repeatable; "
                        "--list shows the keys)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already at --data")
    flags.add_ray_flags(p)
    p.add_argument("--list", action="store_true", help="list presets and override keys, then exit")
    return p


def run(args) -> int:
    if args.list:
        for name, preset in PRESETS.items():
            print(f"{name:13s} {preset.description}")
        print("\n--set keys:\n  " + "\n  ".join(override_keys()))
        return 0
    if not args.data:
        raise HarnessError("--data is required: the dataset root to write (a folder, file:// or s3:// URL)")
    flags.fill_defaults(args, "preset")
    overrides = flags.parse_pairs("--set", args.overrides)
    if args.size is not None:
        overrides["size"] = args.size
    preset = get_preset(args.preset, overrides)
    from ..prepare.synth import run_synth

    result = run_synth(plan(preset, args.seed), absolute(args.data), StorageOptions.from_env(),
                       overwrite=args.overwrite, num_cpus=args.num_cpus, address=args.address)
    m = result.manifest
    print(f"synth: {result.plates} plates, {result.images} images ({len(m.channels)}x{m.height}x"
          f"{m.width} uint8), {result.bytes / 2**20:.1f} MiB in {result.seconds:.1f} s -> {result.url} "
          f"(preset {preset.name}, seed {args.seed}, checksum {m.checksum()[:12]})", file=sys.stdout)
    return 0
