"""Plan and generate a synthetic plate dataset, one plate at a time, deterministically from a seed.

`plan(preset, seed)` draws everything shared across plates (class effects, cell types, source and
batch deviations, label-shift proportions) and lists the plates; `generate_plate(plan, spec)` is a
pure function of (seed, plate index), so plates can be made in any order, in parallel, and give
the same bytes; `manifest_for(plan, parts)` assembles the manifest once every plate is written.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ..manifest import Manifest, Part, SplitScheme
from ..predicates import all_of, eq, isin
from ..shards import make_table
from . import biology, effects, render, stains
from .presets import Preset, get_preset

GENERATOR_VERSION = 1
# Independent random streams derived from the seed: the label-shift proportions have their own, so
# `label-shift` differs from `quickstart` (same seed) in its test plates' layouts and nothing else.
_PLAN, _BIOLOGY, _PLATE, _LABELS = 0, 1, 2, 3
WELL_SD = 0.25  # well-to-well variation (shared by a well's sites), in feature scales
IMAGE_SD = 0.5  # site-to-site variation of the image-level features (textures, density)


@dataclass(frozen=True)
class PlateSpec:
    index: int
    plate: str
    source: str
    batch: str
    cell_type: str
    role: str  # the plate's batch in new_batches: train | val | test
    class_weights: tuple[float, ...] | None  # None = balanced layout
    effects: dict[str, list[float]]  # resolved batch-effect parameters (effects.PARAMS)


@dataclass(frozen=True)
class Plan:
    preset: Preset
    seed: int
    plates: list[PlateSpec]
    perturbations: biology.Perturbations
    cell_types: dict[str, np.ndarray]
    split_schemes: dict[str, SplitScheme]
    wells: list[str] = field(default_factory=list)
    control_wells: list[int] = field(default_factory=list)
    # batch -> [num_classes, F]: how this lab and batch bend each class's response (feature offsets)
    interactions: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def image_nbytes(self) -> int:
        return len(self.preset.channels) * self.preset.size ** 2

    @property
    def features(self) -> biology.FeatureSpace:
        return biology.feature_space(self.preset.channels)

    def well_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """Plate row and column of every imaged well, in well order."""
        lay = self.preset.layout
        rows, cols = np.divmod(np.arange(len(self.wells)), lay.cols - 2 * lay.empty_border)
        return rows + lay.empty_border, cols + lay.empty_border

    @property
    def images_per_plate(self) -> int:
        return 2 * len(self.wells)


def plan(preset: Preset | str, seed: int) -> Plan:
    preset = get_preset(preset) if isinstance(preset, str) else preset
    lay = preset.layout
    rng = np.random.default_rng(np.random.SeedSequence([seed, _PLAN]))
    bio_rng = np.random.default_rng(np.random.SeedSequence([seed, _BIOLOGY]))
    label_rng = np.random.default_rng(np.random.SeedSequence([seed, _LABELS]))
    space, effect_params = biology.feature_space(preset.channels), effects.params_for(preset.channels)
    perts = biology.perturbations(preset.biology, space, bio_rng)
    cell_types = biology.cell_type_offsets(lay.cell_types, preset.biology, space, bio_rng)
    e = lay.empty_border
    wells = [f"{string.ascii_uppercase[r]}{c + 1:02d}" for r in range(e, lay.rows - e) for c in range(e, lay.cols - e)]
    # Controls at fixed, evenly spread positions (a plate map, like DMSO columns), corners included.
    controls = sorted({int(round(i)) for i in np.linspace(0, len(wells) - 1, lay.control_wells)})
    n_test_start = lay.batches_per_source - lay.test_batches
    n_val_start = n_test_start - lay.val_batches
    plates, index, interactions = [], 0, {}
    inter_shape = (preset.biology.num_classes, len(space.names))
    for s in range(lay.sources):
        source = f"S{s + 1}"
        source_draws = effects.level_draws(rng, effect_params)
        source_inter = rng.standard_normal(inter_shape)
        for b in range(lay.batches_per_source):
            batch = f"{source}B{b + 1}"
            role = "test" if b >= n_test_start else "val" if b >= n_val_start else "train"
            batch_draws = effects.level_draws(rng, effect_params)
            interactions[batch] = effects.interaction(preset.effects, source_inter, rng.standard_normal(inter_shape)
                                                      ) * space.scales
            for p in range(lay.plates_per_batch):
                plate_draws = effects.level_draws(rng, effect_params)
                weights = None
                if role == "test" and preset.effects.label_shift_alpha > 0:
                    alpha = preset.effects.label_shift_alpha
                    weights = tuple(float(w) for w in label_rng.dirichlet([alpha] * preset.biology.num_classes))
                params = effects.resolve(preset.effects, {"source": source_draws, "batch": batch_draws,
                                                          "plate": plate_draws})
                plates.append(PlateSpec(
                    index=index, plate=f"{batch}P{p + 1}", source=source, batch=batch,
                    cell_type=lay.cell_types[p % len(lay.cell_types)], role=role, class_weights=weights,
                    effects=params))
                index += 1
    return Plan(preset=preset, seed=seed, plates=plates, perturbations=perts, cell_types=cell_types,
                split_schemes=_split_schemes(plates, lay.sources - lay.lab_holdout), wells=wells,
                control_wells=controls, interactions=interactions)


def _split_schemes(plates: list[PlateSpec], n_train_sources: int) -> dict[str, SplitScheme]:
    batches = {r: sorted({p.batch for p in plates if p.role == r}) for r in ("train", "val", "test")}
    sources = sorted({p.source for p in plates})
    train_sources, lab_sources = sources[:n_train_sources], sources[n_train_sources:]
    lab_fit = sorted({p.batch for p in plates if p.source in train_sources and p.role != "val"})
    lab_val = sorted({p.batch for p in plates if p.source in train_sources and p.role == "val"})
    why = ("selection on held-out batches (never the test ones), i.e. out-of-distribution validation as in "
           "WILDS: it rewards robustness to unseen batch effects, which validation on the training batches "
           "(training-domain validation) cannot see")
    return {
        "new_batches": SplitScheme(
            description=("generalise to unseen experimental batches of known labs. train = site 1 of the "
                         "training batches; val = held-out batches (selection split; " + why + "); id_test = site "
                         "2 of the training plates (same plates, unseen images); test = held-out batches of every "
                         "lab"),
            splits={"train": all_of(isin("batch", batches["train"]), eq("site", 1)),
                    "val": isin("batch", batches["val"]),
                    "id_test": all_of(isin("batch", batches["train"]), eq("site", 2)),
                    "test": isin("batch", batches["test"])},
            selection_split="val", selection_rule="ood-validation"),
        "new_lab": SplitScheme(
            description=(f"generalise to an unseen lab (source {', '.join(lab_sources)}). train = site 1 of the "
                         "other labs' batches except their validation batches; val = those held-out batches "
                         "(selection split; " + why + "); id_test = site 2 of the training plates; test = every "
                         "plate of the held-out lab"),
            splits={"train": all_of(isin("batch", lab_fit), eq("site", 1)),
                    "val": isin("batch", lab_val),
                    "id_test": all_of(isin("batch", lab_fit), eq("site", 2)),
                    "test": isin("source", lab_sources)},
            selection_split="val", selection_rule="ood-validation"),
    }


def _well_classes(plan: Plan, spec: PlateSpec, rng: np.random.Generator) -> np.ndarray:
    """Class index of every well (-1 for controls): balanced, or Dirichlet-weighted for label shift."""
    k = plan.preset.biology.num_classes
    treated = [i for i in range(len(plan.wells)) if i not in set(plan.control_wells)]
    weights = np.full(k, 1.0 / k) if spec.class_weights is None else np.asarray(spec.class_weights)
    exact = weights * len(treated)
    counts = np.floor(exact).astype(int)
    # largest remainder, ties broken at random so no class is favoured across plates
    order = np.lexsort((rng.random(k), -(exact - counts)))
    counts[order[: len(treated) - counts.sum()]] += 1
    labels = rng.permutation(np.repeat(np.arange(k), counts))
    out = np.full(len(plan.wells), -1)
    out[treated] = labels
    return out


def generate_plate(plan: Plan, spec: PlateSpec) -> pa.Table:
    """All images of one plate (2 sites per well, well order) as a part table. Pure in (seed, spec.index)."""
    preset, bio = plan.preset, plan.preset.biology
    rng = np.random.default_rng(np.random.SeedSequence([plan.seed, _PLATE, spec.index]))
    labels = _well_classes(plan, spec, rng)
    compound = np.zeros(len(labels), dtype=int)
    for k in range(bio.num_classes):
        idx = np.flatnonzero(labels == k)
        compound[idx] = np.arange(len(idx)) % bio.perturbations_per_class
    rows, cols = plan.well_positions()
    edge = (rows == 0) | (rows == preset.layout.rows - 1) | (cols == 0) | (cols == preset.layout.cols - 1)
    severity = np.exp(spec.effects["edge"][0])
    # position effects on intensity: edge wells (evaporation) and a gradient across the columns
    col_pos = cols / max(1, preset.layout.cols - 1) - 0.5
    well_gain = np.repeat(effects.EDGE_GAIN * severity * edge + spec.effects["gradient"][0] * col_pos, 2)

    image_means = np.repeat(_well_means(plan, spec, labels, compound, severity * edge, rng), 2, axis=0)
    n = len(image_means)
    step = preset.images_per_pass or n
    images = np.empty((n, len(preset.channels), preset.size, preset.size), dtype=np.uint8)
    for start in range(0, n, step):  # one pass: the plate's random stream continues where the last one left it
        sl = slice(start, start + step)
        images[sl] = _images(plan, spec, image_means[sl], well_gain[sl].astype(np.float32), rng)
    return make_table(_metadata(plan, spec, labels, compound), images)


def _images(plan: Plan, spec: PlateSpec, image_means: np.ndarray, well_gain: np.ndarray,
            rng: np.random.Generator) -> np.ndarray:
    """uint8 images [N, C, H, W] of the sites whose mean features are `image_means` [N, F]."""
    preset, bio, space = plan.preset, plan.preset.biology, plan.features
    level = space.image_level  # textures and density also vary from site to site
    image_means[:, level] += rng.standard_normal((len(image_means), int(level.sum()))) * (
        IMAGE_SD * space.scales[level])
    feats, active = biology.sample_cells(image_means, bio.max_cells, bio.cells_per_site, bio.cell_variation, space,
                                         rng)
    magnification = np.full(len(image_means), np.exp(spec.effects["magnification"][0]))
    fluor = render.render(feats, active, preset.size, magnification, space, rng)
    return effects.microscope(fluor, spec.effects, well_gain, rng, preset.channels)


def _well_means(plan: Plan, spec: PlateSpec, labels: np.ndarray, compound: np.ndarray, edge: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
    """Mean morphology features of every well [wells, F]: cell type + biological batch effects +
    perturbation (scaled by the plate's responsiveness, bent by the batch's interaction) + position."""
    fx, space = spec.effects, plan.features
    idx = space.index
    plate = plan.cell_types[spec.cell_type] + np.asarray(fx["morphology"]) * space.scales
    # a larger magnification shows fewer cells per field of view
    plate[idx["density"]] += fx["density"][0] - 2 * fx["magnification"][0]
    plate[idx["cell_size"]] += fx["cell_size"][0]
    for ch in space.channels:  # a permeant dye (Hoechst) reaches the nucleus whatever the permeabilisation
        if not stains.STAINS[ch].permeant:
            plate[idx[f"int_nuc_{ch}"]] += fx["permeabilisation"][0]
    means = np.tile(plate, (len(labels), 1))
    treated = labels >= 0
    means[treated] += np.exp(fx["response"][0]) * plan.perturbations.effects[labels[treated], compound[treated]]
    means[treated] += plan.interactions[spec.batch][labels[treated]]
    means[:, idx["density"]] += effects.EDGE_DENSITY * edge
    return means + rng.standard_normal(means.shape) * (WELL_SD * space.scales)


def _metadata(plan: Plan, spec: PlateSpec, labels: np.ndarray, compound: np.ndarray) -> dict:
    n = 2 * len(labels)
    wells = np.repeat(plan.wells, 2)
    sites = np.tile([1, 2], len(labels))
    names = [biology.CONTROL if lab < 0 else plan.perturbations.compounds[lab][c] for lab, c in zip(labels, compound)]
    image_labels = np.repeat(labels, 2)
    return {
        "image_id": [f"{spec.plate}-{w}-s{s}" for w, s in zip(wells, sites)],
        "source": [spec.source] * n, "batch": [spec.batch] * n, "plate": [spec.plate] * n,
        "well": wells.tolist(), "site": sites.astype(np.int32), "cell_type": [spec.cell_type] * n,
        "perturbation": np.repeat(names, 2).tolist(), "label": image_labels.astype(np.int64),
        "is_control": image_labels < 0,
    }


def manifest_for(plan: Plan, parts: list[Part]) -> Manifest:
    """The dataset's manifest, once every plate's parts are written."""
    preset = plan.preset
    return Manifest(
        name=f"synth-{preset.name}", version=f"seed-{plan.seed}", channels=list(preset.channels), height=preset.size,
        width=preset.size, dtype="uint8", classes=list(plan.perturbations.classes),
        negative_control={"description": "DMSO wells: no perturbation (label -1, is_control true), "
                                         f"{len(plan.control_wells)} fixed wells on every plate",
                          "column": "perturbation", "values": [biology.CONTROL]},
        split_schemes=plan.split_schemes,
        plates={p.plate: {"source": p.source, "batch": p.batch, "cell_type": p.cell_type} for p in plan.plates},
        parts=sorted(parts, key=lambda p: p.path),
        provenance={
            "builder": "platebench synth", "generator_version": GENERATOR_VERSION, "seed": plan.seed,
            "preset": preset.to_dict(),
            "plate_effects": {p.plate: {"role": p.role, "class_weights": p.class_weights, **p.effects}
                              for p in plan.plates},
        },
    )
