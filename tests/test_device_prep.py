"""uint8 to the device: the stream's host batches keep the stored dtype, and finishing them on the device (float,
standardisation, seeded augmentation) gives the numbers of converting on the host first, as the stream did
before (the reference below), so a run's weights and accuracy do not move."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from platebench.datasets.shards import open_dataset
from platebench.harness.data.augment import augment, self_standardize
from platebench.harness.data.batching import MEMORY_FORMAT, on_device
from platebench.harness.data.stream import StreamConfig
from platebench.harness.perf.plain import PlainPlateStream
from platebench.methods import TaskSpec, get_method
from platebench.methods.base import BatchShape


def host_converted(host, seed, policy, channel_stats):
    """The previous stream's conversion, all on the host before the copy: numpy float32 first, then the
    standardisation (the image's own statistics, or the given channel statistics), then the augmentation
    policy from one generator seeded with the batch's seed, shared by a step's plates in order; channels-last."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in host if isinstance(host, list) else [host]:
        x = torch.from_numpy(b.images.numpy().astype(np.float32))
        if channel_stats is None:
            x = self_standardize(x)
        else:
            mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in channel_stats)
            x = (x - mean) / std
        if policy:
            x = augment(x, policy, g)
        out.append(x.contiguous(memory_format=MEMORY_FORMAT))
    return out


def _config(policy, stats, plates_per_step=1):
    return StreamConfig(scheme="new_batches", split="train", shape=BatchShape(4, plates_per_step=plates_per_step),
                        train=True, seed=5, augment=policy, channel_stats=stats, keep_ids=True)


@pytest.mark.parametrize("policy,stats,plates", [("flip-rot90", None, 1), ("flip-rot90-crop", None, 2),
                                                 ("flip", ((10.0, 20.0, 30.0, 40.0, 50.0), (3.0, 4.0, 5.0, 6.0, 7.0)),
                                                  1)])
def test_device_finished_batches_equal_the_host_conversion(tiny_dataset, policy, stats, plates):
    ds = open_dataset(str(tiny_dataset))
    cfg = _config(policy, stats, plates)
    hosts = list(PlainPlateStream(ds, cfg, read_threads=1).host_epoch(1))
    finished = list(PlainPlateStream(ds, cfg, read_threads=1).epoch(1, "cpu"))
    assert len(hosts) == len(finished) > 0
    for (host, seed), batch in zip(hosts, finished):
        batches = batch if isinstance(batch, list) else [batch]
        assert all(b.images.dtype == torch.uint8 for b in (host if isinstance(host, list) else [host]))
        for got, want in zip(batches, host_converted(host, seed, policy, stats)):
            assert got.images.dtype == torch.float32 and got.images.is_contiguous(memory_format=MEMORY_FORMAT)
            assert torch.equal(got.images, want)


def test_host_batches_carry_a_quarter_of_float_bytes(tiny_dataset):
    ds = open_dataset(str(tiny_dataset))
    host, _ = next(iter(PlainPlateStream(ds, _config("flip", None), read_threads=1).host_epoch(0)))
    finished = next(iter(PlainPlateStream(ds, _config("flip", None), read_threads=1).epoch(0)))
    assert host.images.element_size() * 4 == finished.images.element_size()
    assert host.images.shape == finished.images.shape


def test_training_on_device_finished_batches_gives_the_host_converted_weights(tiny_dataset):
    """A few ERM steps from the device path and from the previous host conversion: identical weights and
    identical predictions (CPU, same seed)."""
    ds = open_dataset(str(tiny_dataset))
    m = ds.manifest
    task = TaskSpec(num_classes=3, channels=m.image_shape[0], image_size=m.image_shape[1:])
    cfg = _config("flip-rot90", None)
    finished = list(PlainPlateStream(ds, cfg, read_threads=1).epoch(0))[:3]
    reference = [replace(host, images=host_converted(host, seed, "flip-rot90", None)[0])
                 for host, seed in list(PlainPlateStream(ds, cfg, read_threads=1).host_epoch(0))[:3]]
    trained = []
    for batches in (finished, reference):
        torch.manual_seed(0)
        method = on_device(get_method("erm")(task, {"batch_size": 4}), "cpu")
        for b in batches:
            method.training_step(b)
        method.eval()
        trained.append((method.state_dict(), method.predict(finished[0])))
    (w1, p1), (w2, p2) = trained
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert torch.equal(p1, p2)
