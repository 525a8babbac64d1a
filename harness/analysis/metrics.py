"""Metrics on well profiles (pure functions of numpy arrays and pandas frames): biological signal with copairs
(phenotypic activity and consistency mAP, fraction retrieved), batch mixing (scib's batch silhouette and graph
connectivity, computed with scikit-learn and scipy; iLISI with harmonypy) and distances between feature statistics
(symmetric KL, MMD). harness/analysis/representation.py computes the profiles and statistics they are applied to.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

Q_THRESHOLD = 0.05  # JUMP's retrieval threshold on BH-corrected p-values
NULL_SIZE = 10_000  # copairs null samples per (positives, total) configuration: p-values down to 1e-4
MIXING_MAX_WELLS = 10_000  # silhouette and LISI are quadratic-ish: a seeded subsample above this
LISI_PERPLEXITY = 30  # harmonypy's default (Korsunsky et al. 2019)
LISI_DIMS = 32  # LISI on the profiles' leading principal components, as Harmony and scib compute it on PCs
GC_NEIGHBORS = 15  # graph connectivity's kNN graph: scanpy's pp.neighbors default, which scib's graph uses
_COPAIRS_CACHE = Path(tempfile.gettempdir()) / "platebench-copairs"  # its null distributions (default: ~/.copairs)


# ---------------------------------------------------------------------------------------------
def activity_map(meta, features: np.ndarray, null_size: int = NULL_SIZE, seed: int = 0
                 ) -> tuple[float, float, int] | None:
    """(mean activity mAP over perturbations, fraction retrieved at BH q < Q_THRESHOLD, perturbations scored).

    JUMP's phenotypic activity: positives are the query's replicate wells (same perturbation, any plate),
    negatives the negative-control wells on the query's plate; each control gets its own reference index so
    controls are never each other's positives. None without controls or replicates."""
    from copairs.map import mean_average_precision

    df = meta[["plate", "perturbation", "is_control"]].reset_index(drop=True).copy()
    controls = df["is_control"].to_numpy(bool)
    if not controls.any() or controls.all():
        return None
    df["reference"] = -1
    df.loc[controls, "reference"] = np.arange(int(controls.sum()))
    ap = average_precision(df, features, pos_sameby=["perturbation", "reference"], pos_diffby=[],
                           neg_sameby=["plate"], neg_diffby=["perturbation", "reference"])
    if ap is None:
        return None
    ap = ap[~ap["is_control"].to_numpy(bool)]
    if not (ap["n_pos_pairs"] > 0).any():
        return None
    _COPAIRS_CACHE.mkdir(parents=True, exist_ok=True)
    maps = mean_average_precision(ap, ["perturbation"], null_size=null_size, threshold=Q_THRESHOLD, seed=seed,
                                  progress_bar=False, cache_dir=_COPAIRS_CACHE)
    return (float(maps["mean_average_precision"].mean()), float(maps["below_corrected_p"].mean()), len(maps))


def consistency_map(meta, features: np.ndarray) -> float | None:
    """Mean over classes of the mAP of consensus profiles retrieving the profiles of their class made by OTHER
    perturbations (positives: same class, different perturbation) among profiles of other classes (negatives),
    by cosine similarity (copairs): JUMP's consistency, where a compound must find other compounds of its
    mechanism, so its own replicates (same perturbation) count neither way. A consensus profile is the mean of a
    perturbation's treated wells on one plate, as JUMP scores consistency on consensus profiles: it keeps the
    plate and batch structure the metric must see through while ranking ~50x fewer pairs than single wells
    (2.1 s of one core on a quickstart split). Only classes with two perturbations or more are scored. None
    without such a class, or with fewer than two classes."""
    import pandas as pd

    treated = ~meta["is_control"].to_numpy(bool) & (meta["label"].to_numpy() >= 0)
    if not treated.any():
        return None
    keys = meta.loc[treated, ["plate", "perturbation", "label"]].reset_index(drop=True)
    codes, uniques = pd.factorize(pd.MultiIndex.from_frame(keys))
    sums = np.zeros((len(uniques), features.shape[1]))
    np.add.at(sums, codes, np.asarray(features, dtype=np.float64)[treated])
    consensus = sums / np.bincount(codes)[:, None]
    df = pd.DataFrame({"perturbation": [u[1] for u in uniques], "label": [u[2] for u in uniques]})
    if df["label"].nunique() < 2:
        return None
    ap = average_precision(df, consensus, pos_sameby=["label"], pos_diffby=["perturbation"], neg_sameby=[],
                           neg_diffby=["label"])
    if ap is None:
        return None
    ap = ap[ap["n_pos_pairs"] > 0]
    return float(ap.groupby("label")["average_precision"].mean().mean()) if len(ap) else None


def average_precision(meta, features: np.ndarray, pos_sameby: list[str], pos_diffby: list[str],
                      neg_sameby: list[str], neg_diffby: list[str]):
    """copairs.map.average_precision (cosine) without its normalised AP, which nothing here reads and which costs
    most of the call (a pure-Python harmonic sum per profile): copairs' own pair finding, similarities, rank
    lists and AP. Returns `meta` with average_precision, n_pos_pairs, n_total_pairs; None without pairs."""
    from copairs import compute
    from copairs.map.average_precision import build_rank_lists
    from copairs.matching import find_pairs

    meta = meta.reset_index(drop=True).copy()
    pos = find_pairs(meta, sameby=pos_sameby, diffby=pos_diffby)
    neg = find_pairs(meta, sameby=neg_sameby, diffby=neg_diffby)
    if len(pos) == 0 or len(neg) == 0:
        return None
    feats = np.asarray(features, dtype=np.float64)
    similarity = compute.get_similarity_fn("cosine", progress_bar=False)
    ix, rel_k, counts = build_rank_lists(pos, neg, similarity(feats, pos, 20000), similarity(feats, neg, 20000))
    scores, confs = compute.ap_contiguous(rel_k, counts)
    meta["n_pos_pairs"], meta["n_total_pairs"] = 0, 0
    meta["average_precision"] = np.nan
    meta.loc[ix, "average_precision"] = scores
    meta.loc[ix, "n_pos_pairs"] = confs[:, 0]
    meta.loc[ix, "n_total_pairs"] = confs[:, 1]
    meta["normalized_average_precision"] = np.nan  # read (averaged) by copairs' mean_average_precision
    return meta


def silhouette_batch(features: np.ndarray, batches, labels, seed: int = 0) -> float | None:
    """Batch ASW as scib's `silhouette_batch` defines it (scale=True; Luecken et al. 2022, used by the JUMP
    batch-correction benchmark): for each biological label separately, the silhouette of its profiles against
    their batch labels (scikit-learn `silhouette_samples`, Euclidean), 1 - |s_i| per profile, averaged within
    the label, then over labels. 1 = batches mixed within every label, 0 = separated. Labels whose profiles sit
    in a single batch, or each in its own batch, are skipped (as scib does: no silhouette is defined there).
    Above MIXING_MAX_WELLS profiles a seeded subsample is scored. None when no label qualifies."""
    from sklearn.metrics import silhouette_samples

    batches, labels = np.asarray(batches), np.asarray(labels)
    x = np.asarray(features, dtype=np.float64)
    if len(labels) > MIXING_MAX_WELLS:
        keep = np.sort(np.random.default_rng(seed).choice(len(labels), MIXING_MAX_WELLS, replace=False))
        x, batches, labels = x[keep], batches[keep], labels[keep]
    per_label = []
    for label in np.unique(labels):
        members = labels == label
        n_batches = len(np.unique(batches[members]))
        if n_batches == 1 or n_batches == int(members.sum()):
            continue
        per_label.append(float(np.mean(1.0 - np.abs(silhouette_samples(x[members], batches[members])))))
    return float(np.mean(per_label)) if per_label else None


def graph_connectivity(features: np.ndarray, labels, n_neighbors: int = GC_NEIGHBORS, seed: int = 0
                       ) -> float | None:
    """Graph connectivity as scib's `graph_connectivity` defines it (Luecken et al. 2022; reported by the JUMP
    batch-correction benchmark): on the kNN graph of all profiles (Euclidean; `n_neighbors` counting the
    profile itself, as scanpy's `pp.neighbors` does; edges made undirected, as scanpy's connectivities are),
    for each label the size of the largest connected component of the subgraph of that label's profiles over
    the label's size, averaged over labels. 1 = every label's profiles form one connected neighbourhood (its
    batches joined), lower = a label split into pieces (e.g. one per batch). scib needs scanpy's graph and
    scib-metrics pulls jax, so the formula is computed here with scikit-learn and scipy. Above
    MIXING_MAX_WELLS profiles a seeded subsample is scored. None with fewer than two profiles."""
    from scipy.sparse.csgraph import connected_components
    from sklearn.neighbors import kneighbors_graph

    labels = np.asarray(labels)
    x = np.asarray(features, dtype=np.float64)
    if len(labels) > MIXING_MAX_WELLS:
        keep = np.sort(np.random.default_rng(seed).choice(len(labels), MIXING_MAX_WELLS, replace=False))
        x, labels = x[keep], labels[keep]
    if len(labels) < 2:
        return None
    knn = kneighbors_graph(x, min(n_neighbors - 1, len(labels) - 1), mode="connectivity", include_self=False)
    graph = (knn + knn.T).tocsr()
    shares = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        _, component = connected_components(graph[members][:, members], directed=False)
        shares.append(np.bincount(component).max() / len(members))
    return float(np.mean(shares))


def ilisi(features: np.ndarray, batches, perplexity: float = LISI_PERPLEXITY, seed: int = 0) -> float | None:
    """Mean integration LISI over wells (harmonypy's compute_lisi, Euclidean kNN), rescaled to [0, 1] by
    (LISI - 1) / (batches - 1): 0 = each neighbourhood holds one batch, 1 = all batches in equal parts.
    Profiles wider than LISI_DIMS are projected on their leading principal components first. The perplexity is
    capped at (wells - 1) / 3 (LISI looks at 3 * perplexity neighbours). None with one batch."""
    import pandas as pd
    from harmonypy import compute_lisi

    labels = np.asarray(batches).astype(str)
    n_batches = len(np.unique(labels))
    if n_batches < 2:
        return None
    x = np.asarray(features, dtype=np.float64)
    if len(labels) > MIXING_MAX_WELLS:
        keep = np.sort(np.random.default_rng(seed).choice(len(labels), MIXING_MAX_WELLS, replace=False))
        x, labels = x[keep], labels[keep]
    perplexity = min(perplexity, (len(labels) - 1) // 3)
    if perplexity < 1:
        return None
    if x.shape[1] > LISI_DIMS:  # its exact kNN is O(n^2 D): 7x faster on 32 PCs, same value to 0.002 here
        centred = x - x.mean(0)
        x = centred @ np.linalg.svd(centred, full_matrices=False)[2][:LISI_DIMS].T
    lisi = compute_lisi(x, pd.DataFrame({"batch": labels}), ["batch"], perplexity=perplexity)[:, 0]
    return (float(np.mean(lisi)) - 1.0) / (n_batches - 1)


def symmetric_kl(mean_p, var_p, mean_q, var_q) -> np.ndarray:
    """KL(p||q) + KL(q||p) of univariate Gaussians, elementwise (per channel):
    0.5 * (var_p / var_q + var_q / var_p - 2 + (mean_p - mean_q)^2 * (1 / var_p + 1 / var_q))."""
    mp, vp, mq, vq = (np.asarray(a, dtype=np.float64) for a in (mean_p, var_p, mean_q, var_q))
    return 0.5 * (vp / vq + vq / vp - 2.0 + (mp - mq) ** 2 * (1.0 / vp + 1.0 / vq))


def mmd(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """Biased (V-statistic) MMD with the kernel exp(-|a - b|^2 / bandwidth): 0 exactly when the two samples
    have the same empirical distribution."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    value = kernel_mean(x, x, bandwidth) + kernel_mean(y, y, bandwidth) - 2.0 * kernel_mean(x, y, bandwidth)
    return math.sqrt(max(value, 0.0))


def kernel_mean(a: np.ndarray, b: np.ndarray, bandwidth: float) -> float:
    return float(np.exp(-sq_dists(a, b) / bandwidth).mean())


def sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


