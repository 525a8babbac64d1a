"""The synthetic plate generator (no Ray): determinism, layout, controls, splits, label shift, presets, effects."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
from platebench.datasets.errors import DatasetError
from platebench.datasets.shards import decode_images, open_dataset
from platebench.datasets.synth import CHANNELS, generate_plate, get_preset, plan, write_dataset
from platebench.datasets.synth import effects as fx


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synth") / "tiny")
    manifest = write_dataset(plan("tiny", 7), root)
    return root, manifest


def test_same_seed_same_bytes_in_any_order_and_other_seed_differs(tiny, tmp_path):
    root, manifest = tiny
    again = write_dataset(plan("tiny", 7), str(tmp_path / "again"))
    assert [(p.path, p.sha256) for p in again.parts] == [(p.path, p.sha256) for p in manifest.parts]
    assert again.checksum() == manifest.checksum()
    # plates are pure in (seed, plate index): generating them in reverse order changes nothing
    p = plan("tiny", 7)
    forward = [generate_plate(p, s) for s in p.plates]
    backward = [generate_plate(p, s) for s in reversed(p.plates)][::-1]
    assert all(a.equals(b) for a, b in zip(forward, backward))
    other = write_dataset(plan("tiny", 8), str(tmp_path / "other"))
    assert other.checksum() != manifest.checksum()
    assert not {p.sha256 for p in other.parts} & {p.sha256 for p in manifest.parts}


def test_manifest_describes_cell_painting_images(tiny):
    root, manifest = tiny
    ds = open_dataset(root)
    m = ds.manifest
    assert m.channels == list(CHANNELS) == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert (m.dtype, m.height, m.width) == ("uint8", 16, 16)
    assert m.num_classes == 3 and m.rows == 6 * 24 * 2
    table = ds.read_part(m.parts[0], verify=True)
    images = ds.images(table)
    assert images.shape == (48, 5, 16, 16)
    # rendered cells, not noise: every channel has dark background and bright structure in most images
    assert (images.max(axis=(2, 3)) > 3 * np.median(images, axis=(2, 3)) + 10).mean() > 0.8


def test_every_plate_has_controls_labelled_minus_one(tiny):
    root, manifest = tiny
    meta = open_dataset(root).metadata()
    nc = manifest.negative_control
    assert nc["column"] == "perturbation" and nc["values"] == ["DMSO"]
    for plate in manifest.plates:
        rows = meta.filter(pc.equal(meta["plate"], plate))
        ctrl = np.asarray(rows["is_control"])
        labels = np.asarray(rows["label"])
        pert = np.asarray(rows["perturbation"].to_pylist())
        assert ctrl.sum() == 2 * 4  # 4 control wells x 2 sites
        assert (labels[ctrl] == -1).all() and (pert[ctrl] == "DMSO").all()
        assert ((labels[~ctrl] >= 0) & (labels[~ctrl] < 3)).all() and (pert[~ctrl] != "DMSO").all()
    sites = meta.group_by(["plate", "well"]).aggregate([("site", "count")])
    assert set(sites["site_count"].to_pylist()) == {2}


def test_split_predicates_select_what_they_claim(tiny):
    root, manifest = tiny
    ds = open_dataset(root)

    def rows(scheme, split):
        t = ds.split_metadata(scheme, split)
        return {c: t[c].to_pylist() for c in ("image_id", "plate", "batch", "source", "site")}

    nb = {s: rows("new_batches", s) for s in ("train", "val", "id_test", "test")}
    plates = {s: set(v["plate"]) for s, v in nb.items()}
    assert not plates["train"] & plates["test"] and not plates["train"] & plates["val"]
    assert not plates["val"] & plates["test"]
    assert plates["id_test"] == plates["train"]
    assert set(nb["train"]["site"]) == {1} and set(nb["id_test"]["site"]) == {2}
    assert not set(nb["train"]["image_id"]) & set(nb["id_test"]["image_id"])
    # tiny: 3 batches per source -> roles train, val, test; every source contributes to each split
    assert set(nb["test"]["batch"]) == {"S1B3", "S2B3"} and set(nb["val"]["batch"]) == {"S1B2", "S2B2"}
    assert len(nb["test"]["image_id"]) == 2 * 48
    lab = {s: rows("new_lab", s) for s in ("train", "val", "id_test", "test")}
    assert set(lab["test"]["source"]) == {"S2"} and len(lab["test"]["image_id"]) == 3 * 48
    assert set(lab["train"]["source"]) == set(lab["val"]["source"]) == {"S1"}
    assert set(lab["train"]["batch"]) == {"S1B1", "S1B3"} and set(lab["val"]["batch"]) == {"S1B2"}
    for scheme in ("new_batches", "new_lab"):
        s = manifest.scheme(scheme)
        assert s.selection_split == "val" and s.selection_rule == "ood-validation"


def test_label_shift_skews_only_test_plates():
    preset = get_preset("label-shift", {"size": 8, "biology.max_cells": 2})
    p = plan(preset, 0)
    k, uniform = preset.biology.num_classes, 1 / preset.biology.num_classes
    test_plates = [s for s in p.plates if s.role == "test"]
    assert test_plates and all(s.class_weights is not None for s in test_plates)
    assert all(s.class_weights is None for s in p.plates if s.role != "test")
    maxima = []
    for spec in test_plates[:3] + [next(s for s in p.plates if s.role == "train")]:
        labels = np.asarray(generate_plate(p, spec)["label"])
        frac = np.bincount(labels[labels >= 0], minlength=k) / (labels >= 0).sum()
        if spec.class_weights is None:
            assert frac.max() - frac.min() <= 2 / (labels >= 0).sum() * 2  # balanced up to rounding
        else:
            np.testing.assert_allclose(frac, spec.class_weights, atol=2 / (labels >= 0).sum())
            maxima.append(frac.max())
    assert np.mean(maxima) > 2 * uniform
    # the proportions have their own random stream: training plates are those of quickstart, byte for byte
    q = plan(get_preset("quickstart", {"size": 8, "biology.max_cells": 2}), 0)
    assert generate_plate(q, q.plates[0]).equals(generate_plate(p, p.plates[0]))


def test_effects_follow_the_hierarchy_and_strength_zero_removes_them():
    # no plate-level spread: plates of one batch are identical, batches of one source are not
    p = plan(get_preset("quickstart", {"effects.plate": 0}), 0)
    a, b = p.plates[0], p.plates[1]
    c = next(s for s in p.plates if s.source == a.source and s.batch != a.batch)
    assert a.batch == b.batch and a.effects == b.effects
    assert a.effects["blur"] != c.effects["blur"] and a.effects["gamma"] != c.effects["gamma"]
    # no batch- or plate-level spread: one set of parameters per source
    p = plan(get_preset("quickstart", {"effects.plate": 0, "effects.batch": 0}), 0)
    by_source = {}
    for s in p.plates:
        by_source.setdefault(s.source, []).append(s.effects)
    assert all(all(e == es[0] for e in es) for es in by_source.values())
    assert by_source["S1"][0] != by_source["S2"][0]
    flat = plan(get_preset("quickstart", {"effects.strength": 0}), 0)
    bases = {n: [p.base] * p.dims for n, p in fx.PARAMS.items()}
    assert all(s.effects == bases for s in flat.plates)
    assert all(not v.any() for v in flat.interactions.values())


def _standardised(images):
    x = images.astype(np.float64)
    return (x - x.mean(axis=(2, 3), keepdims=True)) / (x.std(axis=(2, 3), keepdims=True) + 1e-6)


def test_gain_is_undone_by_self_standardisation_but_gamma_and_blur_are_not():
    rng = np.random.default_rng(0)
    fluor = np.zeros((16, 5, 32, 32), np.float32)
    yy, xx = np.mgrid[:32, :32]
    for i in range(16):
        cy, cx = rng.uniform(8, 24, 2)
        fluor[i] += (np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 20) * rng.uniform(0.5, 1.0, (5, 1, 1))).astype(
            np.float32)
    base = {n: [p.base] * p.dims for n, p in fx.PARAMS.items()}
    base["noise"] = [-6.0]  # plenty of photons: compare the deterministic part

    def image(**changes):
        params = {**base, **{k: [v] * fx.PARAMS[k].dims for k, v in changes.items()}}
        return _standardised(fx.microscope(fluor.copy(), params, np.zeros(16, np.float32),
                                           np.random.default_rng(1), CHANNELS))

    ref = image()
    err = {name: np.abs(image(**{name: value}) - ref).mean() for name, value in
           [("gain", -0.5), ("gamma", 0.5), ("blur", 1.0)]}
    assert err["gain"] < 0.05 and err["gamma"] > 3 * err["gain"] and err["blur"] > 3 * err["gain"]


def test_unknown_preset_and_override_keys_are_named():
    with pytest.raises(DatasetError, match="unknown synth preset 'quickstrat'.*did you mean 'quickstart'"):
        get_preset("quickstrat")
    with pytest.raises(DatasetError, match="unknown synth override key 'effects.blurr'.*'effects.blur'"):
        get_preset("tiny", {"effects.blurr": 2})
    with pytest.raises(DatasetError, match="unknown synth override key 'colour'"):
        get_preset("tiny", {"colour": 1})
    with pytest.raises(DatasetError, match="'layout.sources': expected a int, got 'many'"):
        get_preset("tiny", {"layout.sources": "many"})
    with pytest.raises(DatasetError, match="layout.sources = 1 is invalid"):
        get_preset("tiny", {"layout.sources": 1})
    assert get_preset("tiny", {"size": "24", "effects.strength": "0.5"}).size == 24


def test_size_override_changes_image_shape_only():
    p = plan(get_preset("tiny", {"size": 24}), 7)
    table = generate_plate(p, p.plates[0])
    assert decode_images(table["image"], (5, 24, 24), "uint8").shape == (48, 5, 24, 24)
    base = generate_plate(plan("tiny", 7), plan("tiny", 7).plates[0])
    assert table.drop_columns(["image"]).equals(base.drop_columns(["image"]))
