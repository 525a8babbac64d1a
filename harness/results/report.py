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

from platebench.datasets.storage import describe_error, filesystem, join

from . import plots

MISSING = "—"
NO_SPREAD = "no spread"  # every seed's paired difference equal: the t-test is undefined (stats.no_spread)
MIXED_CODE_MARK = "§"


def _pct(x: float | None, digits: int = 1) -> str:
    return MISSING if x is None else f"{100 * x:.{digits}f}"


def _cell(mean, std, n) -> str:
    if mean is None:
        return MISSING
    return f"{_pct(mean)} ± {_pct(std) if std is not None else '?'} ({n})"


def _p(p: float | None) -> str:
    return MISSING if p is None else f"{p:.3g}"


def _p_t(r: dict) -> str:
    return NO_SPREAD if r.get("no_spread") else _p(r["p_paired_t"])


def _diff(r: dict) -> str:
    if r["diff_mean"] is None:
        return MISSING
    if r.get("no_spread"):
        return f"{100 * r['diff_mean']:+.1f} ({NO_SPREAD})"
    ci = r["diff_ci95"]
    ci_s = f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else ""
    return f"{100 * r['diff_mean']:+.1f}{ci_s}"


def _method(r: dict) -> str:
    name = r["method"]
    if r.get("reference"):
        return f"{name} ({r['track']} track, baseline)"
    if r.get("is_baseline"):
        name += " (baseline)"
    if r.get("mixed_code"):
        name += f" {MIXED_CODE_MARK}"
    return name if r["complete"] else name + " †"


def _holm(r: dict) -> str:
    return {True: "*", False: "", None: MISSING}[r["significant_holm"]]


def table_matrix(t: dict, source_ids: dict[str, str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and body cells of one leaderboard table (shared by Markdown and HTML). With `source_ids`
    (several sources merged) a last column names the sources of each row's runs."""
    base = t["baseline"]
    head = ["Rank", "Method", *t["domains"], "Total", f"Δ vs {base} (pp) [95% t-CI]", "p (paired t)",
            "p (Wilcoxon)", "Holm"] + (["Sources"] if source_ids else [])
    body = []
    for r in t["rows"]:
        doms = [_cell(**{k: r["domains"][d][k] for k in ("mean", "std", "n")}) for d in t["domains"]]
        body.append([str(r["rank"]) if r["rank"] is not None else MISSING, _method(r), *doms,
                     _cell(r["mean"], r["std"], r["n"]), _diff(r), _p_t(r), _p(r["p_wilcoxon"]),
                     _holm(r)] + ([_sources(r, source_ids)] if source_ids else []))
    return head, body


def same_checkpoint_matrix(t: dict) -> tuple[list[str], list[list[str]]]:
    """The same-checkpoint rows of one table: a method that trains as another minus that parent, per seed, both
    read at the parent's selected epoch (harness/results/same_checkpoint.py)."""
    head = ["Method", "Same checkpoint as", "Epochs (seed: parent's selected epoch)", "Total at those epochs",
            "Parent's Total", "Δ vs parent (pp) [95% t-CI]", "p (paired t)", "p (Wilcoxon)", "Holm", "Missing seeds"]
    body = []
    for r in t.get("same_checkpoint", []):
        name = r["method"] + (f" {MIXED_CODE_MARK}" if r.get("mixed_code") else "") + ("" if r["complete"] else " †")
        body.append([name, r["parent"], ", ".join(f"{s}: {e}" for s, e in r["epochs"].items()) or MISSING,
                     _cell(r["mean"], r["std"], r["n"]), _cell(r["parent_mean"], r["parent_std"], r["n"]),
                     _diff(r), _p_t(r), _p(r["p_wilcoxon"]), _holm(r),
                     ", ".join(sorted(r["missing_seeds"], key=int)) or MISSING])
    return head, body


def same_checkpoint_title(t: dict) -> str:
    return f"Same checkpoint · {plots.table_title(t)}"


def same_checkpoint_notes(t: dict) -> list[str]:
    notes = ["Same checkpoint: each method here trains as its parent (one training, one set of weights); the "
             "difference is taken per seed with both read at the parent's selected epoch for that seed, so epoch "
             "selection does not enter it (the table above reads each at its own selected epoch). Holm over this "
             "table's complete same-checkpoint rows."]
    notes += [f"† {r['method']} seed {s}: {why}." for r in t.get("same_checkpoint", [])
              for s, why in sorted(r["missing_seeds"].items(), key=lambda x: int(x[0]))]
    notes += _spread_and_code_notes(t.get("same_checkpoint", []))
    return notes


def _spread_and_code_notes(rows: list[dict]) -> list[str]:
    notes = [f"{r['method']}: {NO_SPREAD}: every seed's difference is the same, so the paired t-test is undefined "
             "(no p-value, not in Holm's family)." for r in rows if r.get("no_spread")]
    notes += [f"{MIXED_CODE_MARK} {r['method']}: runs of different code identities ({', '.join(r['mixed_code'])}), "
              "allowed by --allow-mixed-code." for r in rows if r.get("mixed_code")]
    return notes


def _num3(x: float | None) -> str:
    return MISSING if x is None else f"{x:.3g}"


def representation_matrix(t: dict) -> tuple[list[str], list[list[str]]]:
    """One representation-metric table: values in the metric's own units (3 significant digits)."""
    head = ["Rank", "Method", *t["domains"], "Total", f"Δ vs {t['baseline']} [95% t-CI]", "p (paired t)", "Holm"]
    body = []
    for r in t["rows"]:
        doms = [f"{_num3(r['domains'][d]['mean'])} ± {_num3(r['domains'][d]['std'])}" for d in t["domains"]]
        ci = r["diff_ci95"]
        diff = MISSING if r["diff_mean"] is None else f"{r['diff_mean']:+.3g}" + (
            f" ({NO_SPREAD})" if r.get("no_spread") else f" [{ci[0]:+.3g}, {ci[1]:+.3g}]" if ci else "")
        body.append([str(r["rank"]) if r["rank"] is not None else MISSING, _method(r), *doms,
                     f"{_num3(r['mean'])} ± {_num3(r['std'])} ({r['n']})", diff, _p_t(r), _holm(r)])
    return head, body


def representation_title(t: dict) -> str:
    better = "higher is better" if t["higher_is_better"] else "lower is better"
    return f"{t['dataset']} · {t['split_scheme']} · {t['split']} · {t['track']} track · {t['metric']} ({better})"


def source_ids(board: dict) -> dict[str, str] | None:
    """{source label: "S1", ...} when the leaderboard merges several sources, else None (nothing to tell apart)."""
    labels = board["settings"].get("sources") or []
    return {label: f"S{i + 1}" for i, label in enumerate(labels)} if len(labels) > 1 else None


def _sources(r: dict, ids: dict[str, str] | None) -> str:
    return ", ".join(ids.get(s, s) for s in r.get("sources", [])) or MISSING if ids else ""


def sources_note(board: dict) -> str | None:
    labels = board["settings"].get("sources") or []
    if len(labels) == 1:
        return f"Runs from {labels[0]}."
    if labels:
        ids = source_ids(board)
        return ("Runs merged from " + "; ".join(f"{ids[x]} = {x}" for x in labels)
                + ". The Sources column names where each row's runs came from (runs found in several sources with "
                "identical records count once).")
    return None


def _num(x: float | None, fmt: str) -> str:
    return MISSING if x is None else format(x, fmt)


def _mean_std(c: dict, fmt: str) -> str:
    if c["mean"] is None:
        return MISSING
    return _num(c["mean"], fmt) + (f" ± {format(c['std'], fmt)}" if c["std"] is not None else "")


def overall_matrix(o: dict, ids: dict[str, str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Average ranks over the blocks: one column per block holding the method's rank (its accuracy %)."""
    head = ["Method", "Average rank", *o["block_labels"]] + (["Sources"] if ids else [])
    body = [[r["method"], f"{r['average_rank']:.2f}",
             *[f"{r['ranks'][b]:g} ({_pct(r['accuracy'][b])})" for b in o["block_labels"]]]
            + ([_sources(r, ids)] if ids else []) for r in o["rows"]]
    return head, body


def overall_notes(o: dict) -> list[str]:
    fr = o["friedman"]
    notes = [f"Blocks: {len(o['blocks'])} (dataset/scheme/test split); cells are the method's rank in the block "
             "(1 = best, ties averaged) and its mean Total accuracy (%)."]
    if fr:
        verdict = "the methods differ" if fr["significant"] else "no difference shown"
        notes.append(f"Friedman test (scipy.stats.friedmanchisquare): χ² = {_num(fr['statistic'], '.3g')}, "
                     f"p = {_p(fr['p'])} (k = {fr['k']} methods, N = {fr['n_blocks']} blocks): {verdict} at "
                     f"α = {o['alpha']}.")
    else:
        notes.append(o["friedman_note"] + ".")
    pairs = [f"{r['method']} vs {m} (p = {p:.3g})" for i, r in enumerate(o["rows"])
             for m, p in r["nemenyi_p"].items() if o["methods"].index(m) > i and p <= o["alpha"]]
    notes.append(f"Nemenyi critical difference (Demšar 2006) at α = {o['alpha']}: {o['critical_difference']:.3f} "
                 f"ranks; pairs it separates: {', '.join(pairs) if pairs else 'none'}.")
    notes += [f"Left out of the ranking: {x['method']} (no ranked row in {', '.join(x['missing'])})."
              for x in o["left_out"]]
    return notes


def cost_matrix(c: dict, ids: dict[str, str] | None = None) -> tuple[list[str], list[list[str]]]:
    head = ["Method", f"{c['split']} accuracy (%)", "Runs", "Train images/s", "Wall time/run (s)",
            "Core-hours/run", "GPU-hours/run", "Core-hours total", "Device", "Workers × CPUs (GPUs)"]
    head += ["Sources"] if ids else []
    body = []
    for r in c["rows"]:
        res = ", ".join(f"{w:g} × {cp:g} ({g:g})" for w in r["workers"] for cp in r["cpus_per_worker"]
                        for g in r["gpus_per_worker"])
        body.append([r["method"] + (" ‡" if r["shared"] else ""), _pct(r["accuracy"]), str(r["n_runs"]),
                     _mean_std(r["images_per_s"], ".1f"), _mean_std(r["wall_s"], ".1f"),
                     _mean_std(r["core_hours"], ".3g"), _mean_std(r["gpu_hours"], ".3g"),
                     _num(r["core_hours"]["total"], ".3g"), ", ".join(r["devices"]), res]
                    + ([_sources(r, ids)] if ids else []))
    return head, body


def cost_notes(c: dict) -> list[str]:
    notes = ["Per run, mean ± std over the row's seeds, from each run's done.json: images/s = training images / "
             "training time; wall time = setup + training + evaluation; core-hours = (training + evaluation) × "
             "workers × CPUs per worker; GPU-hours likewise with GPUs per worker."]
    notes += [f"‡ {r['method']}: shares its training with {', '.join(r['shared_with'])}; the training is counted "
              "in full for each method." for r in c["rows"] if r["shared"]]
    return notes


def cost_title(c: dict) -> str:
    return f"Cost · {c['dataset']} · {c['split_scheme']} · {c['track']} track"


def overall_title(o: dict) -> str:
    return f"Overall ranking · {o['track']} track"


def sweep_matrix(s: dict) -> tuple[list[str], list[list[str]]]:
    xs = plots.knob_values(s)
    head = ["Method", *[plots.knob_label(x, s["parameter"]) for x in xs]]
    body = []
    for r in s["rows"]:
        pts = {p["value"]: p for p in r["points"]}
        body.append([r["method"], *[_cell(pts[x]["mean"], pts[x]["std"], pts[x]["n"])
                                    + (" [main]" if pts[x].get("main") else "") if x in pts else MISSING
                                    for x in xs]])
    return head, body


def md_table(head: list[str], body: list[list[str]]) -> list[str]:
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
    notes += _spread_and_code_notes(t["rows"])
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
             "correction over the table's complete rows. † = incomplete: no rank, no Holm decision. "
             f"`{NO_SPREAD}` = every seed's difference is the same: no p-value, not in Holm's family. "
             f"{MIXED_CODE_MARK} = runs of different code identities (--allow-mixed-code). A method that trains as "
             "another also gets a same-checkpoint table: both read at the parent's selected epoch.", ""]
    ids = source_ids(board)
    if note := sources_note(board):
        lines += [note, ""]
    for t in board["tables"]:
        lines += [f"## {plots.table_title(t)}", ""]
        lines += md_table(*table_matrix(t, ids))
        lines += ["", *[f"- {n}" for n in _table_notes(t)], ""]
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
    lines += md_table(HPARAM_HEAD, _hparam_rows(board))
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
                         f"{_ul(_table_notes(t))}")
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
                 f"{_html_table(HPARAM_HEAD, _hparam_rows(board), table='hparams')}</section></body></html>")
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
