"""The cells, matrices, titles and notes of every leaderboard table, shared by the Markdown and HTML renderings
(harness/results/report.py) and the README block (harness/suite.py)."""

from __future__ import annotations

import json

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


def table_notes(t: dict) -> list[str]:
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


def hparam_rows(board: dict) -> list[list[str]]:
    seen = {}
    for t in board["tables"]:
        for r in t["rows"]:
            key = (t["dataset"], t["split_scheme"], r["method"], r["track"])
            c = r["hparams_choice"]
            seen[key] = [*key, json.dumps(r["hparams"], sort_keys=True), c["rule"], str(c["n_configs"]),
                         _pct(c["val_mean"]), str(r["trials"]) if r["trials"] is not None else MISSING]
    return [seen[k] for k in sorted(seen)]


HPARAM_HEAD = ["Dataset", "Scheme", "Method", "Track", "Hparams", "Chosen by", "Configs", "Val acc (%)", "Trials"]
