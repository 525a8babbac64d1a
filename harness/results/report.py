"""Render a leaderboard (leaderboard.build_leaderboard's dict) to files: leaderboard.md, .csv, .json,
a self-contained .html (inline CSS, plots embedded as base64, one section per track) and the PNG plots
themselves. The overall-ranking and cost tables are in the Markdown, HTML and JSON; the CSV keeps its one line
per (table, method, column)."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re

from platebench.datasets.storage import filesystem, join, put_all_atomic, with_retries

from . import plots
from .completeness import describe
from .report_tables import (
    HPARAM_HEAD,
    MIXED_CODE_MARK,
    NO_SPREAD,
    cost_matrix,
    cost_notes,
    cost_title,
    hparam_rows,
    md_table,
    overall_matrix,
    overall_notes,
    overall_title,
    representation_matrix,
    representation_title,
    same_checkpoint_matrix,
    same_checkpoint_notes,
    same_checkpoint_title,
    source_ids,
    sources_note,
    sweep_matrix,
    table_matrix,
    table_notes,
)

SKIPPED_HEAD = ("Runs left out as incomplete (not in any table, rank or test; `platebench validate` names every "
                "problem):")


DIVERGED_HEAD = ("Trainings that diverged (a non-finite training loss; nothing trained after that epoch; each run is "
                 "read at its selected epoch like every other):")


def diverged_notes(board: dict) -> list[str]:
    return [f"{d['method']} seed {d['seed']} (run {d['run_id']}): diverged at epoch {d['epoch']}"
            for d in board.get("diverged_runs", [])]


def skipped_notes(board: dict) -> list[str]:
    """One line per run the leaderboard left out (harness/results/completeness.py)."""
    return [describe(x) for x in board.get("skipped_runs", [])]


def to_markdown(board: dict) -> str:
    s = board["settings"]
    lines = ["# platebench leaderboard", "",
             f"Accuracy (%) at each run's selected epoch (selection `{s['selection']}`), mean ± std (ddof=1) "
             f"over seeds (n). Each row is compared with `{s['baseline']}` on the same seeds: Δ = mean paired "
             f"difference in percentage points with its {s['interval']['method']} {s['interval']['confidence']:.0%} "
             f"interval, two-sided paired t-test, "
             f"two-sided Wilcoxon signed-rank test. Holm: `*` = significant at α = {s['alpha']} after Holm "
             "correction over the table's complete rows. † = incomplete: no rank, no Holm decision. "
             f"`{NO_SPREAD}` = every seed's difference is the same: no p-value, not in Holm's family. "
             f"{MIXED_CODE_MARK} = runs of different code identities (--allow-mixed-code). A method that trains as "
             "another also gets a same-checkpoint table: both read at the parent's selected epoch.", ""]
    ids = source_ids(board)
    if note := sources_note(board):
        lines += [note, ""]
    if skipped := skipped_notes(board):
        lines += [SKIPPED_HEAD, "", *[f"- {n}" for n in skipped], ""]
    if diverged := diverged_notes(board):
        lines += [DIVERGED_HEAD, "", *[f"- {n}" for n in diverged], ""]
    for t in board["tables"]:
        lines += [f"## {plots.table_title(t)}", ""]
        lines += md_table(*table_matrix(t, ids))
        lines += ["", *[f"- {n}" for n in table_notes(t)], ""]
        if t.get("same_checkpoint"):
            lines += [f"### {same_checkpoint_title(t)}", "", *md_table(*same_checkpoint_matrix(t)), ""]
            lines += [*[f"- {n}" for n in same_checkpoint_notes(t)], ""]
    for sw in board["sweeps"]:
        what = "test batch size" if sw["parameter"] == "eval_batch_size" else "number of controls"
        lines += [f"## {sw['dataset']} · {sw['split_scheme']} · {sw['split']} · {sw['track']} track: "
                  f"accuracy vs {what}", ""]
        lines += md_table(*sweep_matrix(sw))
        lines += ["", f"Protocol `{sw['protocol']}`, Total accuracy at each run's selected epoch, "
                  "mean ± std (n seeds); `[main]` = the method's main evaluation (its own setting's point).", ""]
    if board.get("sweeps_left_out"):
        lines += ["Sweeps left out (recorded at another epoch than the selected one):", ""]
        lines += [f"- {x['method']} seed {x['seed']} ({x['run_id']}): selected epoch {x['selected_epoch']}, sweeps at "
                  f"epoch(s) {', '.join(map(str, x['sweep_epochs']))}" for x in board["sweeps_left_out"]]
        lines += [""]
    if board.get("representation"):
        lines += ["## Representation: batch mixing, biological signal, BatchNorm-statistics shift", "",
                  "At each run's best validation epoch, on well-level profiles of the test splits "
                  "(docs/leaderboards.md, \"Representation metrics\"); mean ± std over seeds (n), compared with the "
                  "baseline on the same seeds.", ""]
        for t in board["representation"]:
            lines += [f"### {representation_title(t)}", "", *md_table(*representation_matrix(t)), ""]
    for o in board.get("overall", []):
        lines += [f"## {overall_title(o)}", "", *md_table(*overall_matrix(o, ids)), ""]
        lines += [*[f"- {n}" for n in overall_notes(o)], ""]
    for c in board.get("cost", []):
        lines += [f"## {cost_title(c)}", "", *md_table(*cost_matrix(c, ids)), ""]
        lines += [*[f"- {n}" for n in cost_notes(c)], ""]
    not_made = [*board["settings"].get("overall", {}).get("notes", []),
                *board["settings"].get("cost", {}).get("notes", [])]
    if not_made:
        lines += ["Not shown:", "", *[f"- {n}" for n in not_made], ""]
    lines += ["## Selected hyperparameters", ""]
    lines += md_table(HPARAM_HEAD, hparam_rows(board))
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["dataset", "split_scheme", "split", "split_role", "track", "baseline", "baseline_track",
              "selection_rule", "selection_split", "method", "row_track", "reference", "column", "domain_kind",
              "mean", "std", "n", "per_seed", "diff_mean", "diff_ci95_lo", "diff_ci95_hi", "p_paired_t",
              "p_wilcoxon", "p_holm", "significant_holm", "complete", "rank", "hparams", "trials", "sources",
              "row_kind", "compared_with", "epochs", "no_spread", "mixed_code"]


def to_csv(board: dict) -> str:
    """Long format: one line per (table, method, column); the tests are on the Total line only. Same-checkpoint rows
    (`row_kind` same-checkpoint, `compared_with` the parent, `epochs` the parent's) have their Total line only."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for t in board["tables"]:
        base = {"dataset": t["dataset"], "split_scheme": t["split_scheme"], "split": t["split"],
                "split_role": t["split_role"], "track": t["track"], "baseline": t["baseline"],
                "baseline_track": t["baseline_track"], "selection_rule": t["selection"]["rule"],
                "selection_split": t["selection"]["split"]}
        for r in t["rows"]:
            common = {**base, "method": r["method"], "row_track": r["track"], "reference": r["reference"],
                      "complete": r["complete"], "rank": r["rank"], "sources": json.dumps(r.get("sources", [])),
                      "row_kind": r.get("kind", "own-selection"), "epochs": json.dumps(r["epochs"]),
                      "compared_with": None if r["is_baseline"] else t["baseline"],
                      "mixed_code": json.dumps(r.get("mixed_code"))}
            for d in t["domains"]:
                c = r["domains"][d]
                w.writerow({**common, "column": d, "domain_kind": t["domain_kind"], "mean": c["mean"],
                            "std": c["std"], "n": c["n"], "per_seed": json.dumps(c["per_seed"])})
            ci = r["diff_ci95"] or [None, None]
            w.writerow({**common, "column": "Total", "domain_kind": "all", "mean": r["mean"], "std": r["std"],
                        "n": r["n"], "per_seed": json.dumps(r["per_seed"]), "diff_mean": r["diff_mean"],
                        "diff_ci95_lo": ci[0], "diff_ci95_hi": ci[1], "p_paired_t": r["p_paired_t"],
                        "p_wilcoxon": r["p_wilcoxon"], "p_holm": r["p_holm"],
                        "significant_holm": r["significant_holm"],
                        "hparams": json.dumps(r["hparams"], sort_keys=True), "trials": r["trials"],
                        "no_spread": r["no_spread"]})
        for r in t.get("same_checkpoint", []):
            ci = r["diff_ci95"] or [None, None]
            w.writerow({**base, "method": r["method"], "row_track": r["track"], "reference": False,
                        "column": "Total", "domain_kind": "all", "mean": r["mean"], "std": r["std"], "n": r["n"],
                        "per_seed": json.dumps(r["per_seed"]), "diff_mean": r["diff_mean"],
                        "diff_ci95_lo": ci[0], "diff_ci95_hi": ci[1], "p_paired_t": r["p_paired_t"],
                        "p_wilcoxon": r["p_wilcoxon"], "p_holm": r["p_holm"],
                        "significant_holm": r["significant_holm"], "complete": r["complete"], "rank": None,
                        "row_kind": r["kind"], "compared_with": r["parent"], "epochs": json.dumps(r["epochs"]),
                        "no_spread": r["no_spread"], "mixed_code": json.dumps(r.get("mixed_code"))})
    return buf.getvalue()


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts))


def acc_png(t: dict) -> str:
    return f"acc-{_slug(t['dataset'], t['split_scheme'], t['split'], t['track'])}.png"


def sweep_png(s: dict) -> str:
    return f"sweep-{_slug(s['dataset'], s['split_scheme'], s['split'], s['track'], s['parameter'])}.png"


def cd_png(o: dict) -> str:
    return f"cd-{_slug(o['track'])}.png"


def cost_png(c: dict) -> str:
    return f"cost-{_slug(c['dataset'], c['split_scheme'], c['track'])}.png"


def id_ood_pairs(board: dict) -> list[tuple[str, dict, dict]]:
    """(file name, ID table, OOD table) for every test split `id_X` whose `X` is also a test split."""
    tests = {(t["dataset"], t["split_scheme"], t["track"], t["split"]): t
             for t in board["tables"] if t["split_role"] == "test"}
    out = []
    for (ds, sc, tr, split), t in sorted(tests.items()):
        ood = tests.get((ds, sc, tr, split[3:])) if split.startswith("id_") else None
        if ood is not None:
            out.append((f"id-vs-ood-{_slug(ds, sc, tr, split[3:])}.png", t, ood))
    return out


def plot_names(board: dict) -> list[str]:
    """The PNG file names make_plots writes for `board`, without drawing them."""
    return ([acc_png(t) for t in board["tables"]] + [sweep_png(s) for s in board["sweeps"]]
            + [name for name, _, _ in id_ood_pairs(board)] + [cd_png(o) for o in board.get("overall", [])]
            + [cost_png(c) for c in board.get("cost", [])])


def make_plots(board: dict) -> dict[str, bytes]:
    """File name -> PNG: accuracy bars per table, accuracy vs sweep knob, ID vs OOD (split `id_X` vs `X`),
    a critical-difference diagram per overall ranking, accuracy vs cost per cost table."""
    out = {acc_png(t): plots.accuracy_bars(t) for t in board["tables"]}
    out.update({sweep_png(s): plots.sweep_lines(s) for s in board["sweeps"]})
    out.update({name: plots.id_ood_scatter(t, ood) for name, t, ood in id_ood_pairs(board)})
    out.update({cd_png(o): plots.cd_diagram(o) for o in board.get("overall", [])})
    out.update({cost_png(c): plots.accuracy_vs_cost(c) for c in board.get("cost", [])})
    return out


def _attrs(**kw) -> str:
    return "".join(f" data-{k.replace('_', '-')}='{html.escape(str(v), quote=True)}'" for k, v in kw.items())


def _html_table(head: list[str], body: list[list[str]], **attrs) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table{_attrs(**attrs)}><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
       "margin:.5em 0}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}td:nth-child(1),"
       "th:nth-child(1),td:nth-child(2),th:nth-child(2){text-align:left}th{background:#f2f2f2}img{max-width:100%}"
       "li{color:#444}section.track{border-top:3px solid #888;margin-top:2em}nav a{margin-right:1em}")


def _ul(notes: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>" if notes else ""


def to_html(board: dict, pngs: dict[str, bytes]) -> str:
    """One self-contained page (inline CSS, PNGs as data: URLs, no script, no external reference), so it works
    from the file system and as a mail attachment. Each track is its own <section data-track=...>: standard and
    tta methods are never in one table, plot or ranking."""
    md_intro = to_markdown(board).split("\n\n")[1]
    ids = source_ids(board)
    tracks = sorted({t["track"] for t in board["tables"]})
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>platebench leaderboard</title>"
             f"<style>{CSS}</style></head><body><h1>platebench leaderboard</h1><p>{html.escape(md_intro)}</p>"]
    if note := sources_note(board):
        parts.append(f"<p id='sources'>{html.escape(note)}</p>")
    if skipped := skipped_notes(board):
        parts.append(f"<section id='skipped-runs'><p>{html.escape(SKIPPED_HEAD)}</p>{_ul(skipped)}</section>")
    if diverged := diverged_notes(board):
        parts.append(f"<section id='diverged-runs'><p>{html.escape(DIVERGED_HEAD)}</p>{_ul(diverged)}</section>")
    parts.append("<nav>" + "".join(f"<a href='#track-{html.escape(_slug(tr))}'>{html.escape(tr)} track</a>"
                                   for tr in tracks) + "<a href='#hparams'>hyperparameters</a></nav>")

    def img(name: str, kind: str) -> str:
        b64 = base64.b64encode(pngs[name]).decode()
        return f"<img{_attrs(plot=kind)} alt='{html.escape(name)}' src='data:image/png;base64,{b64}'>"

    for tr in tracks:
        parts.append(f"<section class='track' id='track-{html.escape(_slug(tr))}'{_attrs(track=tr)}>"
                     f"<h2>{html.escape(tr)} track</h2>")
        for t in board["tables"]:
            if t["track"] != tr:
                continue
            where = dict(dataset=t["dataset"], split_scheme=t["split_scheme"], split=t["split"], track=tr)
            parts.append(f"<h3>{html.escape(plots.table_title(t))}</h3>"
                         f"{_html_table(*table_matrix(t, ids), table='leaderboard', **where)}"
                         f"{_ul(table_notes(t))}")
            if t.get("same_checkpoint"):
                parts.append(f"<h4>{html.escape(same_checkpoint_title(t))}</h4>"
                             f"{_html_table(*same_checkpoint_matrix(t), table='same-checkpoint', **where)}"
                             f"{_ul(same_checkpoint_notes(t))}")
            parts.append(img(acc_png(t), "accuracy"))
        for s in board["sweeps"]:
            if s["track"] != tr:
                continue
            parts.append(f"<h3>{html.escape(s['dataset'])} · {html.escape(s['split'])} · {html.escape(tr)}: accuracy "
                         f"vs {html.escape(s['parameter'])}</h3>"
                         f"{_html_table(*sweep_matrix(s), table='sweep', track=tr)}{img(sweep_png(s), 'sweep')}")
        scatters = [name for name, t, _ in id_ood_pairs(board) if t["track"] == tr]
        if scatters:
            parts.append("<h3>In-distribution vs out-of-distribution</h3>"
                         + "".join(img(n, "id-vs-ood") for n in scatters))
        for t in board.get("representation", []):
            if t["track"] == tr:
                parts.append(f"<h3>{html.escape(representation_title(t))}</h3>"
                             f"{_html_table(*representation_matrix(t), table='representation', track=tr)}")
        for o in board.get("overall", []):
            if o["track"] == tr:
                parts.append(f"<h3>{html.escape(overall_title(o))}</h3>"
                             f"{_html_table(*overall_matrix(o, ids), table='overall', track=tr)}"
                             f"{_ul(overall_notes(o))}{img(cd_png(o), 'critical-difference')}")
        for c in board.get("cost", []):
            if c["track"] == tr:
                parts.append(f"<h3>{html.escape(cost_title(c))}</h3>"
                             f"{_html_table(*cost_matrix(c, ids), table='cost', track=tr)}"
                             f"{_ul(cost_notes(c))}{img(cost_png(c), 'cost')}")
        parts.append("</section>")
    not_made = [*board["settings"].get("overall", {}).get("notes", []),
                *board["settings"].get("cost", {}).get("notes", [])]
    if not_made:
        parts.append("<section id='not-shown'><h2>Not shown</h2>" + _ul(not_made) + "</section>")
    parts.append(f"<section id='hparams'><h2>Selected hyperparameters</h2>"
                 f"{_html_table(HPARAM_HEAD, hparam_rows(board), table='hparams')}</section></body></html>")
    return "".join(parts)


def write_report(board: dict, out: str) -> list[str]:
    """Write every output under `out` (a local path or storage URL); returns the paths written."""
    fs, root = filesystem(out)
    pngs = make_plots(board)
    files = {"leaderboard.md": to_markdown(board).encode(), "leaderboard.csv": to_csv(board).encode(),
             "leaderboard.json": (json.dumps(board, indent=2, allow_nan=False) + "\n").encode(),
             "leaderboard.html": to_html(board, pngs).encode(), **pngs}
    written = {join(root, name): data for name, data in files.items()}

    def write():
        fs.makedirs(root, exist_ok=True)
        put_all_atomic(fs, written)  # on a disk, a failure (a full disk) leaves the previous leaderboard whole

    # Retried through a storage outage like every storage write; a full disk or a refusal is one line at once.
    with_retries(write, f"writing the leaderboard to {out}")
    return list(written)
