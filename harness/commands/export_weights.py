"""`platebench export-weights`: a finished run's trained backbone as a safetensors file, for `weights=`.

    platebench export-weights --records STORAGE --run RUN_ID --to FILE.safetensors [--epoch N] [--module NAME]

Reads runs/<run_id>/spec.json and done.json, the epoch's weights from trainings/<training_id>/weights/ (the
selected epoch, else the last; --epoch for another), finds the run's backbone in them by its architecture (the
run's backbone spec: "network.featurizer" of ERM and its family, "encoder" of TVN, ...) and writes its tensors
under the backbone's own names (torchvision's or timm's layout), the spec and channel count in the file's
metadata (methods/backbones/weights.py). A method holding several copies of the backbone (a student and a
teacher) names none by itself: --module picks one. FILE may be a path or an s3:// URL.
"""

from __future__ import annotations

from ..errors import HarnessError


def add_parser(sub):
    from platebench.harness.commands import flags

    p = sub.add_parser("export-weights", help="write a finished run's trained backbone as a safetensors file "
                                              "(for --hparams weights=FILE)",
                       description="Write the backbone weights of a finished run (its selected epoch, or --epoch) "
                                   "to a safetensors file, with the backbone spec and channel count as metadata; "
                                   "any run's backbone can then start another run: --hparams weights=FILE with the "
                                   "same --backbone (tvn keeps it frozen).")
    flags.add_records_flag(p)
    flags.add_run_flag(p)
    p.add_argument("--to", required=True, metavar="FILE",
                   help="the safetensors file to write: a path, file:// or s3:// URL ending in .safetensors")
    flags.add_epoch_flag(p)
    p.add_argument("--module", metavar="NAME",
                   help="which copy of the backbone, when the method holds several (e.g. teacher.backbone)")
    return p


def run(args) -> int:
    from platebench.datasets.storage import filesystem, put_atomic, with_retries
    from platebench.methods.backbones import build_backbone
    from platebench.methods.backbones.weights import backbone_states, encode_weights, first_conv_name

    from ..results.layout import DONE_FILE, SPEC_FILE, finished_run_id, read_run_json, weights_epoch
    from ..train.checkpointing import TrainingStore

    if not args.to.endswith(".safetensors"):
        raise HarnessError(f"--to {args.to!r}: the file name must end in .safetensors")
    run_id = finished_run_id(args.records, args.run)
    spec = read_run_json(args.records, run_id, SPEC_FILE)  # present: written before the done marker
    done = read_run_json(args.records, run_id, DONE_FILE)
    epoch = args.epoch or weights_epoch(done, run_id)
    state = TrainingStore(args.records, None, done["training_id"]).load_weights(epoch)
    probe = build_backbone(spec["backbone"], 3)  # the names; the channel count comes from the weights
    found = backbone_states(state, probe)
    if args.module:
        if args.module not in found:
            raise HarnessError(f"--module {args.module!r}: run {run_id} has no {spec['backbone']!r} backbone there "
                               f"(found: {', '.join(sorted(found)) or 'none'})")
        found = {args.module: found[args.module]}
    if len(found) != 1:
        raise HarnessError(f"run {run_id} ({spec['method']}) holds {len(found) or 'no'} {spec['backbone']!r} "
                           f"backbone{'s' if len(found) != 1 else ''}{': ' + ', '.join(sorted(found)) if found else ''}"
                           f"{'; pick one with --module' if found else ''}")
    (module, tensors), = found.items()
    channels = int(tensors[first_conv_name(probe)].shape[1])
    data = encode_weights(tensors, spec["backbone"], channels, {
        "platebench.run_id": run_id, "platebench.method": spec["method"], "platebench.epoch": str(epoch),
        "platebench.module": module})
    fs, path = filesystem(args.to)

    def write():
        parent = path.rsplit("/", 1)[0]
        if parent:
            fs.makedirs(parent, exist_ok=True)
        put_atomic(fs, path, data)

    with_retries(write, f"writing {args.to}")
    print(f"{args.to}: {spec['backbone']} backbone of run {run_id} ({spec['method']}, {module}), epoch {epoch}, "
          f"{channels} channels, {len(tensors)} tensors")
    return 0
