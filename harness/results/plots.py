"""Leaderboard plots as PNG bytes (matplotlib, Agg canvas; no pyplot global state, so this is safe to
call from any thread or Ray task). Inputs are the dicts of leaderboard.build_leaderboard."""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # No "Software"/date metadata, so the same leaderboard gives byte-identical files.
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _label(row: dict) -> str:
    if row.get("reference"):
        return f"{row['method']} ({row['track']}, reference)"
    return row["method"] + ("" if row["complete"] else " (incomplete)")


def table_title(t: dict) -> str:
    return f"{t['dataset']} · {t['split_scheme']} · {t['split']} · {t['track']} track"


def accuracy_bars(table: dict) -> bytes:
    """Mean Total accuracy (%) per method with ±std error bars; the seeds as dots; incomplete rows
    hatched and grey, the baseline dark."""
    rows = [r for r in table["rows"] if r["mean"] is not None][::-1]  # best at the top
    fig = Figure(figsize=(7, 0.45 * len(rows) + 1.4))
    ax = fig.add_subplot()
    for i, r in enumerate(rows):
        colour = "#333333" if r.get("is_baseline") or r.get("reference") else PALETTE[0]
        if not r["complete"]:
            colour = "#bbbbbb"
        ax.barh(i, 100 * r["mean"], xerr=100 * (r["std"] or 0), color=colour, capsize=3,
                hatch=None if r["complete"] else "//", edgecolor="white")
        ax.plot([100 * v for v in r["per_seed"].values()], [i] * len(r["per_seed"]), "o", color="black",
                markersize=3)
    ax.set_yticks(range(len(rows)), [_label(r) for r in rows])
    ax.set_xlabel("accuracy (%), mean ± std over seeds; dots = seeds")
    ax.set_title(table_title(table), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def knob_label(x: int, parameter: str) -> str:
    """A sweep's x value as shown: the whole plate (eval batch size 0) reads "plate"."""
    return "plate" if parameter == "eval_batch_size" and x == 0 else str(x)


def knob_values(sweep: dict) -> list[int]:
    """A sweep's x values in display order: by value, the whole plate (0) last."""
    param = sweep["parameter"]
    return sorted({p["value"] for r in sweep["rows"] for p in r["points"]},
                  key=lambda x: (x == 0 and param == "eval_batch_size", x))


def sweep_lines(sweep: dict) -> bytes:
    """Accuracy vs test batch size (or number of controls) per method, ±std bars. x is categorical,
    ordered by value with the whole plate (0) last, so uneven steps stay readable."""
    param = sweep["parameter"]
    xs = knob_values(sweep)
    pos = {x: i for i, x in enumerate(xs)}
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    for i, r in enumerate(sweep["rows"]):
        pts = [p for p in sorted(r["points"], key=lambda p: pos[p["value"]]) if p["mean"] is not None]
        ax.errorbar([pos[p["value"]] for p in pts], [100 * p["mean"] for p in pts],
                    yerr=[100 * (p["std"] or 0) for p in pts], marker="o", capsize=3,
                    color=PALETTE[i % len(PALETTE)], label=r["method"])
    ax.set_xticks(range(len(xs)), [knob_label(x, param) for x in xs])
    ax.set_xlabel("test batch size (images)" if param == "eval_batch_size" else "controls per batch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{sweep['dataset']} · {sweep['split_scheme']} · {sweep['split']} · {sweep['track']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def id_ood_scatter(id_table: dict, ood_table: dict) -> bytes:
    """One dot per (method, seed): in-distribution accuracy (x) vs out-of-distribution accuracy (y),
    paired on seed; the diagonal marks no shift."""
    ood = {(r["method"], r["track"]): r["per_seed"] for r in ood_table["rows"]}
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    lo, hi = 100.0, 0.0
    for i, r in enumerate(id_table["rows"]):
        y_seeds = ood.get((r["method"], r["track"]), {})
        seeds = sorted(set(r["per_seed"]) & set(y_seeds), key=int)
        if not seeds:
            continue
        xs = [100 * r["per_seed"][s] for s in seeds]
        ys = [100 * y_seeds[s] for s in seeds]
        lo, hi = min(lo, *xs, *ys), max(hi, *xs, *ys)
        ax.scatter(xs, ys, color=PALETTE[i % len(PALETTE)], label=r["method"], s=18)
    if hi > lo:
        ax.plot([lo, hi], [lo, hi], "--", color="grey", linewidth=1)
    ax.set_xlabel(f"{id_table['split']} accuracy (%)")
    ax.set_ylabel(f"{ood_table['split']} accuracy (%)")
    ax.set_title(f"{id_table['dataset']} · {id_table['split_scheme']} · {id_table['track']}: ID vs OOD", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def cd_diagram(overall: dict) -> bytes:
    """Demšar's critical-difference diagram of one track's overall ranking, drawn by scikit-posthocs
    (`critical_difference_diagram`): methods on the average-rank axis (1 = best), bars joining methods whose
    Nemenyi test does not separate them, and the critical difference as a segment."""
    import pandas as pd
    import scikit_posthocs as sp

    methods = overall["methods"]
    ranks = pd.Series({r["method"]: r["average_rank"] for r in overall["rows"]})
    p = pd.DataFrame(1.0, index=methods, columns=methods)
    for r in overall["rows"]:
        for other, pv in r["nemenyi_p"].items():
            p.loc[r["method"], other] = pv
    fig = Figure(figsize=(7, 0.35 * len(methods) + 1.6))
    ax = fig.add_subplot()
    sp.critical_difference_diagram(ranks, p, ax=ax, alpha=overall["alpha"], cd=overall["critical_difference"],
                                   color_palette=[PALETTE[i % len(PALETTE)] for i in range(len(methods))],
                                   label_fmt_left="{label} ({rank:.2f})", label_fmt_right="({rank:.2f}) {label}")
    fr = overall["friedman"]
    test = (f"Friedman p = {fr['p']:.3g}" if fr and fr["p"] is not None else "no Friedman test (k < 3)")
    ax.set_title(f"{overall['track']} track: average rank over {len(overall['blocks'])} blocks; {test}",
                 fontsize=10, pad=24)
    return _png(fig)


def accuracy_vs_cost(table: dict) -> bytes:
    """Mean Total accuracy (%) on the table's test split vs the mean cost per run (GPU-hours when any run used
    GPUs, else core-hours, log scale); ±std bars on both axes; hollow markers = a training shared with another
    method (its cost counted in full for each)."""
    key = "gpu_hours" if table["uses_gpus"] else "core_hours"
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    for i, r in enumerate(table["rows"]):
        c = r[key]
        if c["mean"] is None or r["accuracy"] is None or c["mean"] <= 0:
            continue
        colour = PALETTE[i % len(PALETTE)]
        ax.errorbar([c["mean"]], [100 * r["accuracy"]], xerr=[c["std"] or 0], fmt="o", color=colour, capsize=3,
                    markerfacecolor="white" if r["shared"] else colour, label=r["method"] + (" (shared)" if r["shared"]
                                                                                             else ""))
    ax.set_xscale("log")
    ax.set_xlabel(("GPU" if key == "gpu_hours" else "core") + "-hours per run (mean ± std over seeds)")
    ax.set_ylabel(f"{table['split']} accuracy (%)")
    ax.set_title(f"{table['dataset']} · {table['split_scheme']} · {table['track']} track: accuracy vs cost",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _png(fig)
