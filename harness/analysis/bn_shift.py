"""BatchNorm statistics of a model's layer inputs, and their shift from a reference (ABRA's Fig. 8).

`BNCapture` hooks every BatchNorm layer and hands each embed's layer inputs (query rows only) to a `Moments`
accumulator: exact per-channel moments (pooled in float64) and a reservoir of up to MMD_SAMPLES per-image
pooled inputs. `Reference` merges the training plates' accumulators over ranks; `Reference.shift` scores one
test plate per layer: symmetric KL of the per-channel Gaussians and an RBF-kernel MMD of the pooled inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from platebench.methods import Batch, Method
from torch.nn.modules.batchnorm import _BatchNorm

from .metrics import kernel_mean, sq_dists, symmetric_kl

MMD_SAMPLES = 512  # images per side of the MMD (reservoir): bounds memory and the kernel's cost


class BNCapture:
    """Forward pre-hooks on every BatchNorm layer of a method: each embed hands the layers' inputs (query rows
    only) to an accumulator. A layer counts once per embed, at its first call holding the batch's rows (all of
    them, or just the queries), so a method's extra forwards (e.g. over the control context) are not mixed in."""

    def __init__(self, method: Method):
        self.layers = [(name, m) for name, m in method.named_modules() if isinstance(m, _BatchNorm)]
        self.names = [name for name, _ in self.layers]
        self.order: list[str] = []  # layer names in the order a forward first reaches them
        self._handles: list = []
        self._target: Moments | None = None
        self._rows = self._queries = 0
        self._done: set[int] = set()

    def __enter__(self) -> BNCapture:
        self._handles = [m.register_forward_pre_hook(self._hook(i)) for i, (_, m) in enumerate(self.layers)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, i: int):
        def hook(module, args):
            if self._target is None or i in self._done or not args or not torch.is_tensor(args[0]):
                return
            x = args[0]
            if x.shape[0] == self._rows:
                x = x[: self._queries]
            elif x.shape[0] != self._queries:
                return
            self._done.add(i)
            if len(self.order) < len(self.names) and self.names[i] not in self.order:
                self.order.append(self.names[i])
            self._target.add(i, x.detach())

        return hook

    def embed(self, method: Method, batch: Batch, target: Moments | None, n_queries: int) -> torch.Tensor:
        """`method.embed(batch)`; BN inputs of the first `n_queries` rows go to `target` (None: nowhere)."""
        if target is not None and n_queries:
            target.start_batch(n_queries)
        self._target = target if n_queries else None
        self._rows, self._queries, self._done = len(batch), n_queries, set()
        try:
            return method.embed(batch)
        finally:
            self._target = None


class Moments:
    """Per BN layer: the per-channel count, mean and sum of squared deviations of the input over images and
    pixels (kept per batch, pooled exactly in float64 by `state`), and a reservoir of up to MMD_SAMPLES per-image
    pooled inputs, the same images for every layer."""

    def __init__(self, n_layers: int, seed: int):
        self.groups: list[list[tuple[int, torch.Tensor, torch.Tensor]]] = [[] for _ in range(n_layers)]
        self.pooled: list[np.ndarray | None] = [None] * n_layers
        self.seen = 0
        self.rng = np.random.default_rng([seed, 17])
        self._rows = self._slots = np.zeros(0, dtype=np.int64)

    def start_batch(self, n: int) -> None:
        rows, slots = [], []
        for r in range(n):  # reservoir sampling (algorithm R) over the images, decided once for all layers
            if self.seen < MMD_SAMPLES:
                rows.append(r)
                slots.append(self.seen)
            else:
                j = int(self.rng.integers(0, self.seen + 1))
                if j < MMD_SAMPLES:
                    rows.append(r)
                    slots.append(j)
            self.seen += 1
        self._rows, self._slots = np.asarray(rows, dtype=np.int64), np.asarray(slots, dtype=np.int64)

    def add(self, i: int, x: torch.Tensor) -> None:
        x = x.float()
        pooled = x.flatten(2).mean(2) if x.dim() > 2 else x  # per image [n, C]; every image has as many pixels
        mean = pooled.mean(0)
        # two passes (exact; 20x faster than torch.var_mean on CPU here), squaring the centred copy in place
        m2 = (x - mean.view(1, -1, *([1] * (x.dim() - 2)))).square_().sum([0, *range(2, x.dim())])
        self.groups[i].append((x.numel() // x.shape[1], mean, m2))
        if len(self._rows):
            if self.pooled[i] is None:
                self.pooled[i] = np.zeros((MMD_SAMPLES, x.shape[1]), dtype=np.float32)
            self.pooled[i][self._slots] = pooled[torch.as_tensor(self._rows, device=x.device)].cpu().numpy()

    def state(self) -> dict:
        moments = [pool_moments([(n, m.double().cpu().numpy(), q.double().cpu().numpy()) for n, m, q in g])
                   if g else None for g in self.groups]
        kept = min(self.seen, MMD_SAMPLES)
        return {"moments": moments, "pooled": [None if p is None else p[:kept] for p in self.pooled]}

    @staticmethod
    def stats(moments: tuple[int, np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray] | None:
        """(mean, biased variance) per channel."""
        return None if moments is None else (moments[1], moments[2] / moments[0])


def pool_moments(groups: list[tuple[int, np.ndarray, np.ndarray]]) -> tuple[int, np.ndarray, np.ndarray]:
    """Groups (count, mean, sum of squared deviations) pooled into one, exactly (Chan et al.'s formula)."""
    counts = np.array([n for n, _, _ in groups], dtype=np.float64)
    means = np.stack([m for _, m, _ in groups])
    total = counts.sum()
    mean = counts @ means / total
    m2 = np.stack([q for _, _, q in groups]).sum(0) + counts @ (means - mean) ** 2
    return int(total), mean, m2


@dataclass
class Reference:
    """The training plates' statistics per BN layer, merged over ranks."""

    names: list[str]
    eps: list[float]
    stats: list[tuple[np.ndarray, np.ndarray] | None]
    centre: list[np.ndarray | None]  # pooled-feature standardisation
    scale: list[np.ndarray | None]
    sample: list[np.ndarray | None]  # standardised pooled features (<= MMD_SAMPLES)
    bandwidth: list[float]
    self_kernel: list[float]  # mean kernel within the sample (the MMD's constant term)

    @classmethod
    def merge(cls, states: list[dict], capture: BNCapture, seed: int) -> Reference:
        n = len(capture.names)
        moments: list[list] = [[] for _ in range(n)]
        pooled: list[list[np.ndarray]] = [[] for _ in range(n)]
        for st in states:
            for i in range(n):
                if st["moments"][i] is not None:
                    moments[i].append(st["moments"][i])
                    pooled[i].append(st["pooled"][i])
        ref = cls(names=capture.names, eps=[float(m.eps) for _, m in capture.layers], stats=[], centre=[], scale=[],
                  sample=[], bandwidth=[], self_kernel=[])
        rng = np.random.default_rng([seed, 29])
        for i in range(n):
            ref.stats.append(Moments.stats(pool_moments(moments[i]) if moments[i] else None))
            x = np.concatenate(pooled[i]).astype(np.float64) if pooled[i] else np.zeros((0, 0))
            centre = scale = z = None
            bandwidth = self_kernel = float("nan")
            if len(x) >= 2:
                if len(x) > MMD_SAMPLES:  # every rank kept a reservoir: one seeded subsample of their union
                    x = x[np.sort(rng.choice(len(x), MMD_SAMPLES, replace=False))]
                centre, scale = x.mean(0), x.std(0)
                scale = np.where(scale > 1e-12, scale, 1.0)  # a constant channel stays centred
                z = (x - centre) / scale
                median = float(np.median(sq_dists(z, z)[np.triu_indices(len(z), 1)]))
                bandwidth = median if median > 0 else 1.0
                self_kernel = kernel_mean(z, z, bandwidth)
            ref.centre.append(centre)
            ref.scale.append(scale)
            ref.sample.append(z)
            ref.bandwidth.append(bandwidth)
            ref.self_kernel.append(self_kernel)
        return ref

    def shift(self, moments: Moments) -> dict:
        """Per layer: symmetric KL (mean over channels) and MMD of one plate against the reference."""
        state = moments.state()
        kl, mmds = [], []
        for i in range(len(self.names)):
            ref, plate = self.stats[i], Moments.stats(state["moments"][i])
            if ref is None or plate is None:
                kl.append(None)
                mmds.append(None)
                continue
            eps = self.eps[i]
            kl.append(float(np.mean(symmetric_kl(ref[0], ref[1] + eps, plate[0], plate[1] + eps))))
            y = state["pooled"][i]
            if self.sample[i] is None or y is None or len(y) == 0:
                mmds.append(None)
                continue
            z = (y.astype(np.float64) - self.centre[i]) / self.scale[i]
            b = self.bandwidth[i]
            value = self.self_kernel[i] + kernel_mean(z, z, b) - 2.0 * kernel_mean(self.sample[i], z, b)
            mmds.append(math.sqrt(max(value, 0.0)))
        return {"layers": list(self.names), "kl": kl, "mmd": mmds}


__all__ = ["MMD_SAMPLES", "BNCapture", "Moments", "Reference", "pool_moments"]
