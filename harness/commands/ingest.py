"""`platebench ingest rxrx1|rxrx1-wilds|jump-cp --src URL --data URL ...`: raw layout -> plate shards.

Each layout registers its own flags and how they become the adapter's config (LAYOUTS below); the
adapter rejects unknown config keys. Reads of the source and writes of the output use separate storage
options: JUMP's gallery bucket is public (anonymous, us-east-1) while the output bucket usually is not.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from platebench.datasets import jump_meta
from platebench.datasets.storage import StorageOptions, absolute

from . import flags
from .flags import non_negative_int, positive_int, write_json


def _common(p: argparse.ArgumentParser, src_required: bool = True) -> argparse._MutuallyExclusiveGroup:
    """The flags of every layout; returns the group of its geometry flags (--resize, --crop, jump-cp's --size)."""
    flags.add_src_flag(p, required=src_required)
    flags.add_data_flag(p, required=True)
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad items (missing/corrupt images, bad metadata rows) instead of stopping; each one "
                        "is listed with its reason in DATA/skipped.json")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resize", type=positive_int, metavar="N",
                   help="resize every image to N x N, bilinear (jump-cp: after downscaling)")
    g.add_argument("--crop", type=positive_int, metavar="N",
                   help="centre-crop every image to N x N (jump-cp: after downscaling)")
    r = p.add_argument_group("execution")
    r.add_argument("--executor", choices=["ray", "local"], default="ray",
                   help="ray: a Ray Data job parallel over plates (default); local: one process, for debugging")
    flags.add_ray_flags(r)
    flags.add_parallelism_flag(r)
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    flags.add_json_flag(r)
    return g


def _rxrx1_flags(p):
    _common(p)
    p.add_argument("--version", default="1", help="version string recorded in the manifest")


def _rxrx1_config(a) -> dict:
    return {"src": a.src, "resize": a.resize, "crop": a.crop, "version": a.version}


def _wilds_flags(p):
    _common(p)


def _wilds_config(a) -> dict:
    return {"src": a.src, "resize": a.resize, "crop": a.crop}


def _jump_flags(p):
    geometry = _common(p, src_required=False)  # --src left out: the adapter's default, the public gallery
    flags.add_size_flag(geometry)  # one output size for all sources, needed when their image sizes differ
    p.add_argument("--sources", nargs="+", required=True, metavar="SOURCE", help="e.g. source_3 source_8")
    p.add_argument("--metadata", required=True, metavar="URL",
                   help="jump-cellpainting/datasets metadata folder (plate.csv.gz, well.csv.gz, compound.csv.gz)")
    p.add_argument("--moa", metavar="URL", help="MoA table (compound_rephub_annot.csv.gz style)")
    p.add_argument("--plate-types", nargs="+", default=["COMPOUND"], metavar="TYPE")
    p.add_argument("--exclude-batches", nargs="*", default=list(jump_meta.CSARMBN_EXCLUDED_BATCHES), metavar="BATCH",
                   help="batches to leave out (default: the 4 source_3 batches CS-ARM-BN drops)")
    p.add_argument("--illum", action="store_true", help="divide by the illumination functions [unverified maths]")
    p.add_argument("--downscale", type=positive_int, default=2, help="nearest-neighbour downscale factor (protocol: 2)")
    p.add_argument("--channels", nargs="+", default=["DNA", "ER", "RNA", "AGP", "Mito"])
    p.add_argument("--classes", nargs="+", default=sorted(jump_meta.POSCONS), metavar="JCP2022_ID",
                   help="class compounds (default: the 8 JUMP positive controls)")
    p.add_argument("--compounds", choices=["poscon", "all"], default="poscon",
                   help="poscon: class compounds + DMSO only (protocol); all: also every other compound, unlabelled")
    p.add_argument("--label-by", choices=["compound", "moa"], default="compound")
    p.add_argument("--min-position-images", type=non_negative_int, default=36,
                   help="drop labelled (compound, well) positions with at most this many images per source")
    p.add_argument("--folds", type=positive_int, default=5, help="plate-grouped folds per source")
    p.add_argument("--val-fraction", type=float, default=0.15, help="share of training batches held out for val")
    p.add_argument("--split-seed", type=non_negative_int, default=0)
    p.add_argument("--path-map", nargs="*", default=[], metavar="FROM=TO",
                   help="rewrite load_data image URLs, e.g. s3://cellpainting-gallery/cpg0016-jump=/data/cpg0016-jump")
    p.add_argument("--src-signed", action="store_true",
                   help="sign requests to the source (default: anonymous, the gallery is public)")


def _jump_config(a) -> dict:
    keys = ["src", "sources", "metadata", "moa", "plate_types", "exclude_batches", "illum", "downscale", "resize",
            "channels", "classes", "compounds", "label_by", "min_position_images", "folds", "val_fraction",
            "split_seed", "path_map"]
    return {k: getattr(a, k) for k in keys} | {"crop": a.crop if a.crop is not None else a.size}


LAYOUTS = {
    "rxrx1": ("RxRx1 (metadata.csv + images/<exp>/Plate<p>/<well>_s<site>_w<ch>.png)", _rxrx1_flags, _rxrx1_config),
    "rxrx1-wilds": ("RxRx1-WILDS v1.0 (folder holding rxrx1_v1.0/, or that folder)", _wilds_flags, _wilds_config),
    "jump-cp": ("JUMP-CP cpg0016 compound plates under the CS-ARM-BN MoA protocol", _jump_flags, _jump_config),
}


def add_parser(sub):
    p = sub.add_parser("ingest", help="convert a raw dataset into plate shards (RxRx1, RxRx1-WILDS, JUMP-CP)",
                       description="Convert a raw dataset (--src) into plate shards + manifest at the dataset root "
                                   "--data. Resumable: rerun the same command and written plates whose checksums "
                                   "still match are kept.")
    layouts = p.add_subparsers(dest="layout", metavar="DATASET", required=True)
    for name, (text, add_flags, _) in LAYOUTS.items():
        add_flags(layouts.add_parser(name, help=text, description=text))
    return p


def _src_options(layout: str, args) -> StorageOptions:
    opts = StorageOptions.from_env()
    if layout == "jump-cp":
        return replace(opts, anon=not args.src_signed, region=opts.region or "us-east-1")
    return opts


def run(args) -> int:
    from ..prepare.ingest import run_ingest

    _, _, to_config = LAYOUTS[args.layout]
    result = run_ingest(args.layout, to_config(args), absolute(args.data), skip_bad=args.skip_bad,
                        src_options=_src_options(args.layout, args), out_options=StorageOptions.from_env(),
                        executor=args.executor, address=args.address, num_cpus=args.num_cpus,
                        parallelism=args.parallelism, progress=not args.no_progress)
    if args.json:
        write_json(result, args.json)
    if args.json != "-":
        print(f"{result['dataset']}: wrote {result['images']} images ({result['plates_written']} plates written, "
              f"{result['plates_resumed']} kept from an earlier run, {result['skipped']} item(s) skipped) to "
              f"{result['out']} in {result['seconds']:.1f} s ({result['images_per_s']:.1f} images/s); "
              f"{result['images_total']} images in the dataset")
    return 0
