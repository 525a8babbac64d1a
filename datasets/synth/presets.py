"""Presets of the synthetic plate generator: plain dataclasses, overridable by dotted keys.

A preset fixes everything that shapes a dataset (channels, layout of the plate hierarchy, biology, batch
effects, split scheme roles); the seed fixes the random draws. `get_preset("quickstart",
{"effects.blur": 2, "size": 64})` returns a modified copy; an unknown preset, an unknown key or a
value of the wrong type is an error naming it, so a typo never silently yields the default dataset.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any

from ..errors import DatasetError
from .stains import CELL_PAINTING, RXRX1, STAINS

CHANNELS = CELL_PAINTING  # the default channels


@dataclass(frozen=True)
class Layout:
    """The hierarchy source (lab) > batch > plate > well > site (2 sites per well, always)."""

    sources: int = 3
    batches_per_source: int = 6
    plates_per_batch: int = 3
    rows: int = 8
    cols: int = 12
    # Outer rings of wells left empty: RxRx1 images the inner 14 x 22 = 308 wells of its 16 x 24 plates.
    # Edge-well effects hit the plate's outermost ring, so with a border no imaged well has them.
    empty_border: int = 0
    control_wells: int = 16  # negative-control (DMSO) wells per plate, spread over the imaged wells
    cell_types: tuple[str, ...] = ("U2OS",)  # one per plate, cycling within each batch
    # Batch roles per source, taken from its last batches: the last `test_batches` are held out for
    # `new_batches`' test split, the `val_batches` before them for its selection split.
    val_batches: int = 1
    test_batches: int = 2
    lab_holdout: int = 1  # sources held out (the last ones) as `new_lab`'s test split


@dataclass(frozen=True)
class Biology:
    num_classes: int = 6
    perturbations_per_class: int = 2  # compounds sharing a class (mechanism), each with its own twist
    class_effect: float = 2.5  # size of a class's morphology change, in units of cell-to-cell variation
    features_per_class: int = 8  # how many morphology features each class moves
    compound_effect: float = 0.25  # compound-specific deviation from its class effect (same units)
    cells_per_site: float = 4.0
    max_cells: int = 8
    cell_variation: float = 1.0  # cell-to-cell variation multiplier
    cell_type_effect: float = 2.0  # how far cell types' baselines lie apart (same units)


@dataclass(frozen=True)
class Effects:
    """Batch-effect strengths. Every effect's spread at a level = strength x level x effect x base sd.

    Base sds live in `effects.PARAMS`; 1.0 everywhere is the calibrated default (quickstart).
    """

    strength: float = 1.0
    source: float = 1.0
    batch: float = 1.0
    plate: float = 1.0
    # per-effect multipliers (names match effects.PARAMS' controls)
    morphology: float = 1.0
    response: float = 1.0
    interaction: float = 1.0
    gain: float = 1.0
    offset: float = 1.0
    gamma: float = 1.0
    vignette: float = 1.0
    blur: float = 1.0
    noise: float = 1.0
    density: float = 1.0
    cell_size: float = 1.0
    permeabilisation: float = 1.0
    texture_scale: float = 1.0
    crosstalk: float = 1.0
    edge: float = 1.0
    # Dirichlet concentration of the class proportions on new_batches test plates (0 = balanced)
    label_shift_alpha: float = 0.0


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    size: int = 32
    channels: tuple[str, ...] = CHANNELS  # stains (stains.STAINS) in image-channel order
    # Images rendered together (0: the whole plate at once). A pass holds C x size^2 float32 per image
    # several times over, so large images need small passes; they draw from the plate's random stream in
    # turn, so this is part of what the seed reproduces.
    images_per_pass: int = 0
    layout: Layout = field(default_factory=Layout)
    biology: Biology = field(default_factory=Biology)
    effects: Effects = field(default_factory=Effects)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Calibrated (tests/test_synth_calibration.py, docs/datasets.md "Synthetic plates") so that ERM converges within the
# default benchmark's 2-core budget: a class signal strong enough to be learnt in a few epochs, batch effects
# strong enough to cost ERM >= 10 points on new batches and leave AdaBN a measurable gain. Two plates per batch,
# not three: an epoch is two thirds as long, so the suite affords the epochs ERM needs to converge.
_QUICK = Preset(
    name="quickstart",
    description="the default benchmark workload: 36 plates of 96 wells, 24 px, 3 labs, sized for a CPU run",
    size=24,
    layout=Layout(plates_per_batch=2),
    biology=Biology(class_effect=5.0, features_per_class=12),
    effects=Effects(strength=1.25, interaction=1.45, morphology=1.2),
)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny", description="unit tests: 6 plates of 24 wells, 16 px, 3 classes", size=16,
        layout=Layout(sources=2, batches_per_source=3, plates_per_batch=1, rows=4, cols=6, control_wells=4,
                      cell_types=("U2OS", "HepG2"), test_batches=1),
        biology=Biology(num_classes=3, max_cells=5),
    ),
    "quickstart": _QUICK,
    "strong-shift": replace(
        _QUICK, name="strong-shift",
        description="quickstart with batch effects twice as strong and two cell types",
        layout=replace(_QUICK.layout, cell_types=("U2OS", "HepG2")),
        effects=replace(_QUICK.effects, strength=2 * _QUICK.effects.strength),
    ),
    "label-shift": replace(
        _QUICK, name="label-shift",
        description="quickstart whose new_batches test plates have Dirichlet(0.5)-skewed class proportions",
        effects=replace(_QUICK.effects, label_shift_alpha=0.5),
    ),
    "large": Preset(
        name="large", description="throughput tests: 112 plates of 128 wells (256 images), 96 px, 4 labs", size=96,
        layout=Layout(sources=4, batches_per_source=7, plates_per_batch=4, rows=8, cols=16, control_wells=16,
                      cell_types=("U2OS", "HepG2")),
        biology=Biology(num_classes=12),
    ),
    # RxRx1's images and plate map (512 px, 6 channels, 308 imaged wells x 2 sites, 4 cell types, 4 plates an
    # experiment) for measuring the input path at the papers' size; few batches, so that it fits a disk
    # (cut further with --set layout.batches_per_source=3 --set layout.plates_per_batch=1: 6 plates). One
    # negative control per plate, as RxRx1's; RxRx1's 30 positive controls are treated wells here.
    "rxrx1-scale": Preset(
        name="rxrx1-scale", description="input-path tests at the papers' scale: 24 plates of 308 wells (616 images), "
                                        "6x512x512, RxRx1's channels and plate map, 4 cell types", size=512,
        channels=RXRX1, images_per_pass=16,
        layout=Layout(sources=2, batches_per_source=3, plates_per_batch=4, rows=16, cols=24, empty_border=1,
                      control_wells=1, cell_types=("HEPG2", "HUVEC", "RPE", "U2OS"), test_batches=1),
        biology=Biology(num_classes=12),
    ),
}


_NOT_OVERRIDABLE = ("name", "description")


def get_preset(name: str, overrides: Mapping[str, Any] | None = None) -> Preset:
    """The named preset with dotted-key overrides applied (e.g. {"layout.sources": 4, "size": 64})."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DatasetError(f"unknown synth preset {name!r}{hint} (presets: {', '.join(PRESETS)})")
    preset = PRESETS[name]
    for key, value in (overrides or {}).items():
        preset = _override(preset, key.split("."), value, key)
    validate(preset)
    return preset


def override_keys(obj: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key an override may name."""
    obj = Preset if obj is None else obj
    keys = []
    for f in fields(obj):
        typ = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if is_dataclass(typ):
            keys += override_keys(type(typ), f"{prefix}{f.name}.")
        elif f.name not in _NOT_OVERRIDABLE:
            keys.append(prefix + f.name)
    return keys


def _override(obj: Any, path: list[str], value: Any, key: str) -> Any:
    names = {f.name: f for f in fields(obj)}
    head = path[0]
    if head not in names or head in _NOT_OVERRIDABLE:
        close = difflib.get_close_matches(key, override_keys(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DatasetError(f"unknown synth override key {key!r}{hint}")
    current = getattr(obj, head)
    if is_dataclass(current):
        if len(path) == 1:
            raise DatasetError(f"synth override key {key!r} names a group; name one of its fields")
        return replace(obj, **{head: _override(current, path[1:], value, key)})
    if len(path) > 1:
        raise DatasetError(f"unknown synth override key {key!r}")
    return replace(obj, **{head: _coerce(value, current, key)})


def _coerce(value: Any, current: Any, key: str) -> Any:
    try:
        if isinstance(current, bool):
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
                return value.lower() in ("1", "true", "yes")
            if isinstance(value, bool):
                return value
            raise ValueError
        if isinstance(current, int):
            as_float = float(value)
            if as_float != int(as_float):
                raise ValueError
            return int(as_float)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, tuple):
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(v).strip() for v in items if str(v).strip())
        if isinstance(current, str):
            return str(value)
    except (TypeError, ValueError):
        pass
    raise DatasetError(f"synth override {key!r}: expected a {type(current).__name__}, got {value!r}")


def validate(p: Preset) -> None:
    """Reject presets that cannot make a dataset, naming the field and value."""
    lay, bio, eff = p.layout, p.biology, p.effects
    imaged = (lay.rows - 2 * lay.empty_border) * (lay.cols - 2 * lay.empty_border)
    checks = [
        (p.size >= 8, "size", p.size, "at least 8"),
        (len(p.channels) >= 2 and len(set(p.channels)) == len(p.channels) and set(p.channels) <= set(STAINS),
         "channels", p.channels, f"at least 2 distinct stains of {', '.join(STAINS)}"),
        (p.images_per_pass >= 0, "images_per_pass", p.images_per_pass, "0 (the whole plate) or positive"),
        (lay.sources >= 2, "layout.sources", lay.sources, "at least 2 (new_lab holds one out)"),
        (1 <= lay.lab_holdout < lay.sources, "layout.lab_holdout", lay.lab_holdout, "between 1 and sources-1"),
        (lay.val_batches >= 1 and lay.test_batches >= 1, "layout.val_batches/test_batches",
         (lay.val_batches, lay.test_batches), "at least 1 each"),
        (lay.batches_per_source >= lay.val_batches + lay.test_batches + 1, "layout.batches_per_source",
         lay.batches_per_source, "more than val_batches + test_batches"),
        (lay.plates_per_batch >= 1, "layout.plates_per_batch", lay.plates_per_batch, "at least 1"),
        (lay.rows >= 2 and lay.cols >= 2 and lay.rows <= 26, "layout.rows/cols", (lay.rows, lay.cols),
         "2..26 rows and at least 2 columns"),
        (lay.empty_border >= 0 and min(lay.rows, lay.cols) - 2 * lay.empty_border >= 2, "layout.empty_border",
         lay.empty_border, "0 or more, leaving at least 2 imaged rows and columns"),
        (1 <= lay.control_wells <= imaged - bio.num_classes, "layout.control_wells",
         lay.control_wells, "at least 1 and leaving a well per class"),
        (len(lay.cell_types) >= 1, "layout.cell_types", lay.cell_types, "at least one name"),
        (bio.num_classes >= 2, "biology.num_classes", bio.num_classes, "at least 2"),
        (bio.features_per_class >= 1, "biology.features_per_class", bio.features_per_class, "at least 1"),
        (bio.perturbations_per_class >= 1, "biology.perturbations_per_class", bio.perturbations_per_class,
         "at least 1"),
        (bio.max_cells >= 1 and bio.cells_per_site > 0, "biology.max_cells/cells_per_site",
         (bio.max_cells, bio.cells_per_site), "positive"),
        (eff.label_shift_alpha >= 0, "effects.label_shift_alpha", eff.label_shift_alpha, "0 (off) or positive"),
    ]
    for ok, name, value, need in checks:
        if not ok:
            raise DatasetError(f"synth preset {p.name!r}: {name} = {value!r} is invalid (needs {need})")
    negative = [f.name for f in fields(eff) if getattr(eff, f.name) < 0]
    if negative:
        raise DatasetError(f"synth preset {p.name!r}: effects.{negative[0]} must be >= 0")
