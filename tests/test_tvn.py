"""TVN: the per-plate transform's invariances and the method around it."""

from __future__ import annotations

import pytest
import torch
from platebench.methods import MethodError
from platebench.methods.blocks.tvn import fit_tvn, pca_components, project, standardise_on, tvn_transform
from platebench.methods.testing import TASK, build, synthetic_batch
from platebench.methods.tvn import TVN

RIDGE = 0.5


def _plate(seed: int, n_queries: int = 20, n_controls: int = 30, d: int = 8):
    """float64 embeddings of one plate: a plate-specific offset/mixing plus class shifts for the queries."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
    offset = 2 * torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(n_queries + n_controls, d, generator=g, dtype=torch.float64)
    x[:n_queries, 0] += 3.0
    controls = torch.arange(n_queries + n_controls) >= n_queries
    return x @ mixing + offset, controls


def _fit(seeds=(1, 2, 3)):
    contexts = []
    for s in seeds:
        emb, controls = _plate(s)
        contexts.append(emb[controls])
    return fit_tvn(contexts, RIDGE)


def test_plate_constant_shift_leaves_the_output_unchanged():
    fit = _fit()
    emb, controls = _plate(7)
    shift = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(8), dtype=torch.float64) * 10
    out = tvn_transform(fit, emb, controls, RIDGE)
    assert torch.allclose(tvn_transform(fit, emb + shift, controls, RIDGE), out, atol=1e-6, rtol=0)
    assert not torch.allclose(tvn_transform(fit, emb + shift * (controls.double()[:, None]), controls, RIDGE),
                              out, atol=1e-3)  # shifting the controls alone does change it


def test_transformed_controls_have_zero_mean_per_plate():
    fit = _fit()
    for seed in (7, 9):
        emb, controls = _plate(seed)
        out = tvn_transform(fit, emb, controls, RIDGE)
        assert out[controls].mean(0).abs().max() < 1e-10
        assert out[~controls].mean(0).abs().max() > 0.1  # queries keep their (class) signal


def test_rescaling_one_pca_coordinate_of_a_plate_leaves_the_output_unchanged():
    fit = _fit()
    emb, controls = _plate(7)
    z = project(fit, emb)
    z[:, 2] *= 5.0
    rescaled = z @ fit.components.T * fit.scale + fit.mean  # back to embedding space
    assert torch.allclose(tvn_transform(fit, rescaled, controls, RIDGE), tvn_transform(fit, emb, controls, RIDGE),
                          atol=1e-6, rtol=0)


def test_fit_components_are_orthonormal_by_decreasing_variance_and_target_matches_definition():
    contexts = [_plate(s)[0][_plate(s)[1]] for s in (1, 2, 3)]
    fit = fit_tvn(contexts, RIDGE)
    d = fit.components.shape[0]
    assert torch.allclose(fit.components.T @ fit.components, torch.eye(d, dtype=torch.float64), atol=1e-10)
    variances = project(fit, torch.cat(contexts)).var(0)
    assert bool((variances[:-1] >= variances[1:] - 1e-10).all())
    per_plate = torch.cat([standardise_on(project(fit, c), torch.ones(len(c), dtype=torch.bool)) for c in contexts])
    target = torch.cov(per_plate.T) + RIDGE * torch.eye(d, dtype=torch.float64)
    assert torch.allclose(fit.target_sqrt @ fit.target_sqrt, target, atol=1e-8)


def test_pca_sign_convention_is_deterministic():
    x = _plate(4)[0]
    a, b = pca_components(x), pca_components(x.flip(0))  # same data, other row order
    assert torch.allclose(a, b, atol=1e-8)


def test_a_plate_context_needs_two_controls():
    fit = _fit()
    emb, controls = _plate(7, n_controls=1)
    with pytest.raises(ValueError, match="at least 2 control"):
        tvn_transform(fit, emb, controls, RIDGE)


# ---- the method ----------------------------------------------------------------------------------
def _batches(n_plates=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [synthetic_batch(TASK, p, 6, 8, g) for p in range(n_plates)]


def test_method_is_shift_invariant_per_plate_through_its_transform():
    method = build(TVN, {"n_controls": 8, "eval_n_controls": 8})
    method.training_step(_batches()[0])
    batch = _batches(seed=1)[1]
    emb = method.encode(batch.images).double()
    shift = torch.randn(emb.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 5
    out = method.transform(emb, batch.is_control)
    assert out.dtype == torch.float64
    assert torch.allclose(method.transform(emb + shift, batch.is_control), out, atol=1e-6, rtol=0)


def test_encoder_is_frozen_in_eval_mode_and_only_the_head_trains():
    method = build(TVN, {"n_controls": 8, "lr": 0.1})
    encoder = {k: v.clone() for k, v in method.encoder.state_dict().items()}
    head = method.classifier.weight.clone()
    method.train()
    assert not method.encoder.training and method.classifier.training
    for batch in _batches():
        method.training_step(batch)
    assert all(torch.equal(v, encoder[k]) for k, v in method.encoder.state_dict().items())
    assert not torch.equal(method.classifier.weight, head)


def test_refits_at_powers_of_two_and_epoch_starts_from_training_controls_only():
    method = build(TVN, {"n_controls": 8})
    batch = _batches()[0]
    for _ in range(5):
        method.training_step(batch)
    assert int(method.fits_done) == 3  # steps 1, 2, 4
    method.on_epoch_start(1, 3)
    method.training_step(batch)
    assert int(method.fits_done) == 4
    controls = method.encode(batch.images[batch.is_control]).double()
    assert torch.allclose(method.mean.double(), controls.mean(0), atol=1e-5)  # bank = this plate's controls


def test_bank_is_capped_by_max_fit_controls():
    method = build(TVN, {"n_controls": 8, "max_fit_controls": 20})
    for batch in _batches(4):
        method.training_step(batch)
    assert sum(len(c) for c in method._bank) == 16


def test_predict_needs_the_plates_controls():
    method = build(TVN, {"n_controls": 8})
    batch = synthetic_batch(TASK, 1, 5, 1, torch.Generator().manual_seed(3))
    with pytest.raises(MethodError, match=r"at least 2 negative-control rows.*eval_n_controls.*'P1' has 1"):
        method.predict(batch)


def test_invalid_hyperparameters_are_named():
    with pytest.raises(MethodError, match=r"n_controls must be >= 2.*got 1"):
        build(TVN, {"n_controls": 1})
    with pytest.raises(MethodError, match=r"ridge must be > 0, got 0.0"):
        build(TVN, {"ridge": 0})
