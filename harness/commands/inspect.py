"""`platebench inspect --data URL [--verify] [--split-scheme S] [--list-split SPLIT]`."""

from __future__ import annotations

import sys

from . import flags


def add_parser(sub):
    p = sub.add_parser("inspect", help="summarise a plate-shard dataset; --verify checks every checksum",
                       description="Print a dataset's manifest summary and per-split counts of plates, images and "
                                   "controls. With --verify, read every part and check its sha256, schema, row "
                                   "count and image sizes (exit 2, naming each damaged part).")
    flags.add_data_flag(p, required=True)
    p.add_argument("--verify", action="store_true", help="check every part's checksum, schema and images")
    flags.add_split_scheme_flag(p)
    p.add_argument("--list-split", metavar="SPLIT",
                   help="print the image_ids of SPLIT of the split scheme, one a line, and exit")
    return p


def _counts(ds, scheme: str) -> list[tuple[str, str, int, int, int, int]]:
    import pyarrow.compute as pc

    out = []
    meta = ds.metadata()
    for split in ds.manifest.scheme(scheme).splits:
        rows = meta.filter(ds.split_expression(scheme, split))
        labelled = int(pc.sum(pc.greater_equal(rows["label"], 0)).as_py() or 0) if rows.num_rows else 0
        controls = int(pc.sum(rows["is_control"]).as_py() or 0) if rows.num_rows else 0
        plates = len(pc.unique(rows["plate"])) if rows.num_rows else 0
        out.append((scheme, split, plates, rows.num_rows, labelled, controls))
    return out


def run(args) -> int:
    from platebench.datasets.shards import open_dataset

    ds = open_dataset(args.data)
    m = ds.manifest
    if args.list_split:
        scheme = args.split_scheme or flags.DEFAULTS["split_scheme"]
        rows = ds.split_metadata(scheme, args.list_split)
        sys.stdout.write("".join(f"{i}\n" for i in rows.column("image_id").to_pylist()))
        return 0
    size = sum(p.bytes for p in m.parts)
    print(f"dataset      {m.name} v{m.version}  ({args.data})")
    shape = f"{len(m.channels)}x{m.height}x{m.width} {m.dtype}"
    print(f"images       {m.rows} of {shape}  channels {', '.join(m.channels)}")
    print(f"storage      {len(m.plates)} plates, {len(m.parts)} parts, {size / 2**20:.1f} MiB (zstd Parquet)")
    classes = ", ".join(m.classes[:8]) + (f", ... ({len(m.classes)} total)" if len(m.classes) > 8 else "")
    print(f"classes      {len(m.classes)}: {classes}")
    nc = m.negative_control
    print(f"controls     {sum(p.controls for p in m.parts)} images; {nc.get('description', '')} "
          f"({nc.get('column')} in {nc.get('values')})")
    for key, label in (("source", "sources"), ("batch", "batches"), ("cell_type", "cell types")):
        values = sorted({d[key] for d in m.plates.values()})
        print(f"{label:<12} {len(values)}: {', '.join(values[:10])}{' ...' if len(values) > 10 else ''}")
    prov = m.provenance
    if prov:
        print("provenance   " + ", ".join(f"{k}={v}" for k, v in prov.items() if not isinstance(v, (dict, list))))
    schemes = [args.split_scheme] if args.split_scheme else list(m.split_schemes)
    print(f"\n{'scheme':<18}{'split':<12}{'plates':>7}{'images':>9}{'labelled':>10}{'controls':>10}")
    from platebench.datasets.errors import DatasetError

    for scheme in schemes:
        sch = m.scheme(scheme)
        try:
            rows = _counts(ds, scheme)
        except DatasetError as exc:
            if not args.verify:
                raise
            print(f"(counts unavailable: {exc})")
            break
        for row in rows:
            marker = "  <- selection" if row[1] == sch.selection_split else ""
            print(f"{row[0]:<18}{row[1]:<12}{row[2]:>7}{row[3]:>9}{row[4]:>10}{row[5]:>10}{marker}")
    if not args.verify:
        return 0
    done = [0]

    def progress(part):
        done[0] += 1
        if sys.stderr.isatty() or done[0] == len(m.parts):
            print(f"\rverified {done[0]}/{len(m.parts)} parts", end="", file=sys.stderr)

    problems = ds.verify(on_part=progress)
    print(file=sys.stderr)
    if problems:
        for line in problems:
            print(f"DAMAGED {line}", file=sys.stderr)
        raise DatasetError(f"{ds.url}: verify found {len(problems)} of {len(m.parts)} parts damaged")
    print(f"verify: all {len(m.parts)} parts match their checksums")
    return 0
