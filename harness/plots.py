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


def _knob_label(x: int, parameter: str) -> str:
    return "plate" if parameter == "eval_batch_size" and x == 0 else str(x)


def sweep_lines(sweep: dict) -> bytes:
    """Accuracy vs test batch size (or number of controls) per method, ±std bars. x is categorical,
    ordered by value with the whole plate (0) last, so uneven steps stay readable."""
    param = sweep["parameter"]

    def order(x):
        return (x == 0 and param == "eval_batch_size", x)

    xs = sorted({p["value"] for r in sweep["rows"] for p in r["points"]}, key=order)
    pos = {x: i for i, x in enumerate(xs)}
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    for i, r in enumerate(sweep["rows"]):
        pts = [p for p in sorted(r["points"], key=lambda p: order(p["value"])) if p["mean"] is not None]
        ax.errorbar([pos[p["value"]] for p in pts], [100 * p["mean"] for p in pts],
                    yerr=[100 * (p["std"] or 0) for p in pts], marker="o", capsize=3,
                    color=PALETTE[i % len(PALETTE)], label=r["method"])
    ax.set_xticks(range(len(xs)), [_knob_label(x, param) for x in xs])
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
