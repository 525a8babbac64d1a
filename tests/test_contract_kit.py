"""The contract kit catches broken methods (each check fails with its message on a deliberately wrong class).

The broken classes are not registered, so they never appear in `registry.names()`.
"""

from __future__ import annotations

import pytest
import torch
from platebench.methods import testing
from platebench.methods.adabn import AdaBN
from platebench.methods.base import Batch, DataRequest, Needs, as_list, queries_with_labels
from platebench.methods.blocks.bn import batch_stats
from platebench.methods.erm import ERM
from platebench.methods.network import masked_cross_entropy


class StandardButBatchStats(ERM):
    """Claims the standard track but normalises with the test batch's statistics."""

    name = "kit-standard-batch-stats"

    def predict(self, batch):
        with batch_stats(self.network):
            return self.network(batch.images[batch.queries])


class TtaButRunningStats(AdaBN):
    """Claims tta but predicts with the running statistics (plain eval mode)."""

    name = "kit-tta-running-stats"

    def predict(self, batch):
        return self.network(batch.images[batch.queries])


class PredictUpdatesBuffers(AdaBN):
    name = "kit-predict-updates-buffers"

    def predict(self, batch):
        self.network.train()
        try:
            return self.network(batch.images[batch.queries])
        finally:
            self.network.eval()


class NoAllReduce(ERM):
    """Steps its optimiser directly, so ranks drift apart under DDP."""

    name = "kit-no-allreduce"

    def training_step(self, batches):
        batch = Batch.concat(as_list(batches))
        loss = masked_cross_entropy(self.network(batch.images), batch.labels, queries_with_labels(batch))
        opt = self.optimizers[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": float(loss)}


class NeverLearns(ERM):
    name = "kit-never-learns"

    def training_step(self, batches):
        return {"loss": 1.0}


class ControlsUndeclared(ERM):
    name = "kit-controls-undeclared"

    def data_request(self):
        return DataRequest(batch_size=8, plate_pure=False, n_controls=4)


class PredictsControls(ERM):
    """Returns logits for the control rows too."""

    name = "kit-predicts-controls"
    needs = Needs(plate_pure=False, controls=True)

    def data_request(self):
        return DataRequest(batch_size=8, plate_pure=False, eval_n_controls=4)

    def predict(self, batch):
        return self.network(batch.images)


class ForgetsHeadInCheckpoint(ERM):
    name = "kit-forgets-head"

    def load_checkpoint_state(self, state):
        state = {**state, "model": {k: v for k, v in state["model"].items() if "classifier" not in k}}
        self.load_state_dict(state["model"], strict=False)


class ClaimsErmTrainingButScalesLoss(AdaBN):
    """Declares that it trains as ERM (inherited from AdaBN) but doubles its loss."""

    name = "kit-false-shared-training"

    def training_step(self, batches):
        batch = Batch.concat(as_list(batches))
        loss = 2 * masked_cross_entropy(self.network(batch.images), batch.labels, queries_with_labels(batch))
        self.optimizer_step(self.optimizers[0], loss)
        return {"loss": float(loss)}


class UnseededNoise(ERM):
    """Scales its loss by noise from a generator seeded from the clock: two same-seed trainings differ."""

    name = "kit-unseeded-noise"

    def training_step(self, batches):
        import time

        batch = Batch.concat(as_list(batches))
        noise = torch.rand((), generator=torch.Generator().manual_seed(time.perf_counter_ns()))
        loss = (1 + noise) * masked_cross_entropy(self.network(batch.images), batch.labels, queries_with_labels(batch))
        self.optimizer_step(self.optimizers[0], loss)
        return {"loss": float(loss.detach())}


class PredictHparamThatTrains(ERM):
    """Keeps a training hyperparameter out of the training identity by calling it predict-only."""

    name = "kit-predict-hparam-unknown"
    predict_hparams = frozenset({"no_such_hparam"})


@pytest.mark.parametrize("cls,check,message", [
    (StandardButBatchStats, "track", "standard track.*changed with the rest of its batch"),
    (TtaButRunningStats, "track", r"tta track.*(does not depend on its batch|depends on BN running statistics)"),
    (PredictUpdatesBuffers, "track", "predict changed buffer"),
    (NeverLearns, "loss_decreases", "did not go down"),
    (ControlsUndeclared, "declarations", "asks for controls but needs.controls is False"),
    (PredictsControls, "predict_shape", r"predict gave \(9, 3\), expected \(5, 3\)"),
    (ForgetsHeadInCheckpoint, "checkpoint", "'network.classifier.weight' differs"),
    (ClaimsErmTrainingButScalesLoss, "shared_training", "declares trains_as='erm', but 'network.*' differs"),
    (UnseededNoise, "reproducible", "differs between two same-seed trainings"),
    (PredictHparamThatTrains, "shared_training", r"predict_hparams \['no_such_hparam'\] are not all"),
])
def test_kit_rejects_broken_methods(cls, check, message):
    with pytest.raises(AssertionError, match=message):
        testing.CHECKS[check](cls)


@pytest.mark.slow  # forks two gloo ranks
def test_kit_ddp_check_catches_missing_gradient_allreduce():
    with pytest.raises(Exception, match="parameters differ across ranks"):
        testing.check_ddp(NoAllReduce)


def test_synthetic_batches_follow_the_data_request():
    from platebench.methods.cs_arm_bn import CSARMBN

    method = testing.build(CSARMBN, {"batch_size": 6, "n_controls": 4, "plates_per_step": 3})
    batches = testing.training_batches(method, torch.Generator().manual_seed(0))
    assert len(batches) == 3
    for b in batches:
        assert len(b) == 10 and int(b.is_control.sum()) == 4 and b.domains["plate"].unique().numel() == 1
        assert bool((b.labels[b.is_control] == -1).all()) and bool((b.labels[~b.is_control] >= 0).all())
    assert len({b.plate for b in batches}) == 3
    mixed = testing.training_batches(testing.build(ERM), torch.Generator().manual_seed(0))
    assert isinstance(mixed, Batch) and mixed.domains["plate"].unique().numel() > 1
