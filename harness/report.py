"""Render a leaderboard (leaderboard.build_leaderboard's dict) to files: leaderboard.md, .csv, .json,
a self-contained .html (inline CSS, plots embedded as base64) and the PNG plots themselves."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re

from platebench.datasets.storage import describe_error, filesystem, join

from . import plots

MISSING = "—"


def _pct(x: float | None, digits: int = 1) -> str:
    return MISSING if x is None else f"{100 * x:.{digits}f}"


def _cell(mean, std, n) -> str:
    if mean is None:
        return MISSING
    return f"{_pct(mean)} ± {_pct(std) if std is not None else '?'} ({n})"


def _p(p: float | None) -> str:
    return MISSING if p is None else f"{p:.3g}"


def _diff(r: dict) -> str:
    if r["diff_mean"] is None:
        return MISSING
    ci = r["diff_ci95"]
    ci_s = f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else ""
    return f"{100 * r['diff_mean']:+.1f}{ci_s}"


def _method(r: dict) -> str:
    name = r["method"]
    if r.get("reference"):
        return f"{name} ({r['track']} track, baseline)"
    if r.get("is_baseline"):
        name += " (baseline)"
    return name if r["complete"] else name + " †"


def _holm(r: dict) -> str:
    return {True: "*", False: "", None: MISSING}[r["significant_holm"]]


def table_matrix(t: dict) -> tuple[list[str], list[list[str]]]:
    """Header and body cells of one leaderboard table (shared by Markdown and HTML)."""
    base = t["baseline"]
    head = ["Rank", "Method", *t["domains"], "Total", f"Δ vs {base} (pp) [95% t-CI]", "p (paired t)",
            "p (Wilcoxon)", "Holm"]
    body = []
    for r in t["rows"]:
        doms = [_cell(**{k: r["domains"][d][k] for k in ("mean", "std", "n")}) for d in t["domains"]]
        body.append([str(r["rank"]) if r["rank"] is not None else MISSING, _method(r), *doms,
                     _cell(r["mean"], r["std"], r["n"]), _diff(r), _p(r["p_paired_t"]), _p(r["p_wilcoxon"]),
                     _holm(r)])
    return head, body


def sweep_matrix(s: dict) -> tuple[list[str], list[list[str]]]:
    xs = sorted({p["value"] for r in s["rows"] for p in r["points"]},
                key=lambda x: (x == 0 and s["parameter"] == "eval_batch_size", x))
    head = ["Method", *[plots._knob_label(x, s["parameter"]) for x in xs]]
    body = []
    for r in s["rows"]:
        pts = {p["value"]: p for p in r["points"]}
        body.append([r["method"], *[_cell(pts[x]["mean"], pts[x]["std"], pts[x]["n"])
                                    + (" [main]" if pts[x].get("main") else "") if x in pts else MISSING
                                    for x in xs]])
    return head, body


def _md_table(head: list[str], body: list[list[str]]) -> list[str]:
    esc = [[c.replace("|", "\\|") for c in row] for row in [head, *body]]
    return ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(head), *["| " + " | ".join(r) + " |" for r in esc[1:]]]


def _table_notes(t: dict) -> list[str]:
    sel = t["selection"]
    sel_s = f"rule `{sel['rule']}`" + (f" on split `{sel['split']}`" if sel["split"] else "")
    cols = f"per {t['domain_kind']}" if t["domain_kind"] else "Total only (no domain kind has two values)"
    notes = [f"Split role: {t['split_role']}. Selection: {sel_s}. Columns: {cols}. "
             f"Baseline seeds: {', '.join(map(str, t['seeds']))}."]
    if t["baseline_track"] != t["track"]:
        notes.append(f"This track has no `{t['baseline']}` run: the baseline is `{t['baseline']}` from the "
                     f"{t['baseline_track']} track on the same split and seeds (reference row, unranked).")
    if t["split_role"] == "val" and sel["rule"] == "val":
        notes.append("Validation accuracy at the epoch it selected: optimistic by construction.")
    notes += [f"† {r['method']}: {'; '.join(r['incomplete_reasons'])}." for r in t["rows"] if not r["complete"]]
    return notes


def _hparam_rows(board: dict) -> list[list[str]]:
    seen = {}
    for t in board["tables"]:
        for r in t["rows"]:
            key = (t["dataset"], t["split_scheme"], r["method"], r["track"])
            c = r["hparams_choice"]
            seen[key] = [*key, json.dumps(r["hparams"], sort_keys=True), c["rule"], str(c["n_configs"]),
                         _pct(c["val_mean"]), str(r["trials"]) if r["trials"] is not None else MISSING]
    return [seen[k] for k in sorted(seen)]


HPARAM_HEAD = ["Dataset", "Scheme", "Method", "Track", "Hparams", "Chosen by", "Configs", "Val acc (%)", "Trials"]


def to_markdown(board: dict) -> str:
    s = board["settings"]
    lines = ["# platebench leaderboard", "",
             f"Accuracy (%) at each run's selected epoch (selection `{s['selection']}`), mean ± std (ddof=1) "
             f"over seeds (n). Each row is compared with `{s['baseline']}` on the same seeds: Δ = mean paired "
             f"difference in percentage points with its {s['interval']['method']} {s['interval']['confidence']:.0%} "
             f"interval, two-sided paired t-test, "
             f"two-sided Wilcoxon signed-rank test. Holm: `*` = significant at α = {s['alpha']} after Holm "
             "correction over the table's complete rows. † = incomplete: no rank, no Holm decision.", ""]
    for t in board["tables"]:
        lines += [f"## {plots.table_title(t)}", ""]
        lines += _md_table(*table_matrix(t))
        lines += ["", *[f"- {n}" for n in _table_notes(t)], ""]
    for sw in board["sweeps"]:
        what = "test batch size" if sw["parameter"] == "eval_batch_size" else "number of controls"
        lines += [f"## {sw['dataset']} · {sw['split_scheme']} · {sw['split']} · {sw['track']} track: "
                  f"accuracy vs {what}", ""]
        lines += _md_table(*sweep_matrix(sw))
        lines += ["", f"Protocol `{sw['protocol']}`, Total accuracy at each run's selected epoch, "
                  "mean ± std (n seeds); `[main]` = the method's main evaluation (its own setting's point).", ""]
    if board.get("sweeps_left_out"):
        lines += ["Sweeps left out (recorded at another epoch than the selected one):", ""]
        lines += [f"- {x['method']} seed {x['seed']} ({x['run_id']}): selected epoch {x['selected_epoch']}, sweeps at "
                  f"epoch(s) {', '.join(map(str, x['sweep_epochs']))}" for x in board["sweeps_left_out"]]
        lines += [""]
    lines += ["## Selected hyperparameters", ""]
    lines += _md_table(HPARAM_HEAD, _hparam_rows(board))
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["dataset", "split_scheme", "split", "split_role", "track", "baseline", "baseline_track",
              "selection_rule", "selection_split", "method", "row_track", "reference", "column", "domain_kind",
              "mean", "std", "n", "per_seed", "diff_mean", "diff_ci95_lo", "diff_ci95_hi", "p_paired_t",
              "p_wilcoxon", "p_holm", "significant_holm", "complete", "rank", "hparams", "trials"]


def to_csv(board: dict) -> str:
    """Long format: one line per (table, method, column); the tests are on the Total line only."""
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
                      "complete": r["complete"], "rank": r["rank"]}
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
                        "hparams": json.dumps(r["hparams"], sort_keys=True), "trials": r["trials"]})
    return buf.getvalue()


def _slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts))


def make_plots(board: dict) -> dict[str, bytes]:
    """File name -> PNG: accuracy bars per table, accuracy vs sweep knob, ID vs OOD (split `id_X` vs `X`)."""
    out = {}
    for t in board["tables"]:
        out[f"acc-{_slug(t['dataset'], t['split_scheme'], t['split'], t['track'])}.png"] = plots.accuracy_bars(t)
    for s in board["sweeps"]:
        name = _slug(s["dataset"], s["split_scheme"], s["split"], s["track"], s["parameter"])
        out[f"sweep-{name}.png"] = plots.sweep_lines(s)
    tests = {(t["dataset"], t["split_scheme"], t["track"], t["split"]): t
             for t in board["tables"] if t["split_role"] == "test"}
    for (ds, sc, tr, split), t in sorted(tests.items()):
        ood = tests.get((ds, sc, tr, split[3:])) if split.startswith("id_") else None
        if ood is not None:
            out[f"id-vs-ood-{_slug(ds, sc, tr, split[3:])}.png"] = plots.id_ood_scatter(t, ood)
    return out


def _html_table(head: list[str], body: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
       "margin:.5em 0}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}td:nth-child(2),"
       "th:nth-child(2){text-align:left}th{background:#f2f2f2}img{max-width:100%}li{color:#444}")


def to_html(board: dict, pngs: dict[str, bytes]) -> str:
    md_intro = to_markdown(board).split("\n\n")[1]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>platebench leaderboard</title>"
             f"<style>{CSS}</style></head><body><h1>platebench leaderboard</h1><p>{html.escape(md_intro)}</p>"]

    def img(name: str) -> str:
        b64 = base64.b64encode(pngs[name]).decode()
        return f"<img alt='{html.escape(name)}' src='data:image/png;base64,{b64}'>"

    for t in board["tables"]:
        parts.append(f"<h2>{html.escape(plots.table_title(t))}</h2>{_html_table(*table_matrix(t))}<ul>")
        parts += [f"<li>{html.escape(n)}</li>" for n in _table_notes(t)]
        parts.append("</ul>" + img(f"acc-{_slug(t['dataset'], t['split_scheme'], t['split'], t['track'])}.png"))
    for s in board["sweeps"]:
        name = f"sweep-{_slug(s['dataset'], s['split_scheme'], s['split'], s['track'], s['parameter'])}.png"
        parts.append(f"<h2>{html.escape(s['dataset'])} · {html.escape(s['split'])} · {html.escape(s['track'])}: "
                     f"accuracy vs {html.escape(s['parameter'])}</h2>{_html_table(*sweep_matrix(s))}{img(name)}")
    scatters = sorted(n for n in pngs if n.startswith("id-vs-ood-"))
    if scatters:
        parts.append("<h2>In-distribution vs out-of-distribution</h2>" + "".join(img(n) for n in scatters))
    parts.append(f"<h2>Selected hyperparameters</h2>{_html_table(HPARAM_HEAD, _hparam_rows(board))}</body></html>")
    return "".join(parts)


def write_report(board: dict, out: str) -> list[str]:
    """Write every output under `out` (a local path or storage URL); returns the paths written."""
    fs, root = filesystem(out)
    pngs = make_plots(board)
    files = {"leaderboard.md": to_markdown(board).encode(), "leaderboard.csv": to_csv(board).encode(),
             "leaderboard.json": (json.dumps(board, indent=2, allow_nan=False) + "\n").encode(),
             "leaderboard.html": to_html(board, pngs).encode(), **pngs}
    written = []
    try:
        fs.makedirs(root, exist_ok=True)
        for name, data in files.items():
            path = join(root, name)
            fs.pipe_file(path, data)
            written.append(path)
    except OSError as exc:
        raise describe_error(exc, f"writing the leaderboard to {out}") from exc
    return written
