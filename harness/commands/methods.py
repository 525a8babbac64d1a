"""`platebench methods [NAME ...] [--json [FILE]]`: every registered method, its track, context and hyperparameters."""

from __future__ import annotations


def add_parser(sub):
    from platebench.harness.commands.flags import add_json_flag

    p = sub.add_parser("methods", help="list methods (built-in and from installed plugins) with their track, "
                                       "needed context and hyperparameter defaults")
    p.add_argument("names", nargs="*", help="only these methods")
    add_json_flag(p)
    return p


def run(args) -> int:
    from platebench.harness.commands.flags import write_json
    from platebench.methods.base import COMMON_DEFAULTS
    from platebench.methods.registry import get_method, names

    chosen = args.names or names()
    described = [get_method(n).describe() for n in chosen]  # unknown names: error with the closest match
    if args.json:
        write_json(described, args.json)
        return 0
    for d in described:
        own = {k: v for k, v in d["hparams"].items() if k not in COMMON_DEFAULTS or v != COMMON_DEFAULTS[k]}
        print(f"{d['name']:<14} track={d['track']:<9} needs: {d['needs']}")
        if d["summary"]:
            print(f"{'':14} {d['summary']}")
        print(f"{'':14} hparams: " + (", ".join(f"{k}={v}" for k, v in own.items()) or "(common only)"))
    print("\ncommon to every method: " + ", ".join(f"{k}={v}" for k, v in COMMON_DEFAULTS.items()))
    return 0
