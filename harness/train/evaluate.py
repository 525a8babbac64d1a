"""Evaluation of a method on the splits of a scheme, per domain, under the run's protocol.

`standard` methods predict in eval mode on plate-pure batches of a fixed size; `tta` methods adapt on
plate-pure test batches of their own batch size (plus controls when they use them) and are also
measured across test batch sizes and numbers of controls (the sweeps, run once on the selected model).
The validation splits are evaluated after every epoch, the test splits only at the epochs a selection
rule can choose (the training loop, harness/train/). Each rank evaluates its own plates; per-plate counts are
gathered so every rank holds the same result.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from platebench.datasets.manifest import DOMAIN_KINDS
from platebench.datasets.shards import ShardDataset
from platebench.methods import Method
from platebench.methods.distributed import all_gather_objects
from platebench.methods.precision import autocast

from ..data.stream import PartCache, PlateStream, StreamConfig
from .runspec import RunSpec


@dataclass
class PlateCounts:
    plate: str
    correct: int
    n: int
    loss_sum: float


class Evaluator:
    def __init__(self, ds: ShardDataset, spec: RunSpec, method: Method, rank: int = 0, world: int = 1,
                 device: torch.device | str = "cpu", cache: PartCache | None = None, channel_stats=None):
        self.ds, self.spec, self.rank, self.world, self.device = ds, spec, rank, world, device
        self.cache, self.channel_stats = cache, channel_stats
        self.scheme = ds.manifest.scheme(spec.split_scheme)
        self.splits = [s for s in self.scheme.splits if s != "train"]
        self.val_splits = [s for s in self.splits if self.scheme.role(s) == "val"]
        self.test_splits = [s for s in self.splits if self.scheme.role(s) == "test"]
        self.track = type(method).track
        if self.track == "tta":  # the main protocol: tta methods' own test batches, else the run's fixed size
            main = method.data_request().evaluation_shape()
            self.main_batch, self.main_controls = main.batch_size, main.n_controls
        else:
            self.main_batch, self.main_controls = spec.eval.standard_batch_size, 0
        self._streams: dict[tuple, PlateStream] = {}

    def stream(self, split: str, batch_size: int | None = None, n_controls: int | None = None) -> PlateStream:
        """This rank's evaluation stream of `split` (any split of the scheme, "train" included) with batches of
        `batch_size` rows and `n_controls` controls (None: the main protocol's); built once, then kept."""
        batch_size = self.main_batch if batch_size is None else batch_size
        n_controls = self.main_controls if n_controls is None else n_controls
        key = (split, batch_size, n_controls)
        if key not in self._streams:
            cfg = StreamConfig.for_evaluation(self.spec.split_scheme, split, batch_size, n_controls,
                                              seed=self.spec.seed, channel_stats=self.channel_stats)
            self._streams[key] = PlateStream(self.ds, cfg, self.rank, self.world, self.cache)
        return self._streams[key]

    def warm(self, splits: list[str]) -> None:
        """The parts of `splits` into the part cache before the first evaluation (see PlateStream.warm)."""
        for split in splits:
            self.stream(split).warm()

    @torch.no_grad()
    def counts(self, method: Method, split: str, batch_size: int, n_controls: int) -> list[PlateCounts]:
        method.eval()
        per_plate: dict[str, PlateCounts] = {}
        for batch in self.stream(split, batch_size, n_controls).epoch(0, self.device):
            with autocast(self.spec.precision, self.device):  # the run's precision, as in training
                logits = method.predict(batch)
            labels = batch.labels[batch.queries]
            c = per_plate.setdefault(batch.plate, PlateCounts(batch.plate, 0, 0, 0.0))
            c.correct += int((logits.argmax(1) == labels).sum())
            c.n += int(labels.numel())
            c.loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        return all_gather_objects(list(per_plate.values()))

    def rows(self, counts: list[PlateCounts], epoch: int, split: str, batch_size: int, n_controls: int,
             protocol: str) -> list[dict]:
        meta = self.stream(split).domains.plate_meta
        groups: dict[tuple[str, str], list[PlateCounts]] = defaultdict(list)
        for c in counts:
            groups[("all", "all")].append(c)
            for kind in DOMAIN_KINDS:
                groups[(kind, meta[c.plate][kind])].append(c)
        base = {"run_id": self.spec.run_id, "dataset": self.spec.dataset,
                "dataset_checksum": self.spec.dataset_checksum, "split_scheme": self.spec.split_scheme,
                "method": self.spec.method, "track": self.track, "seed": self.spec.seed,
                "hparams": self.spec.hparams_json, "epoch": epoch, "split": split,
                "split_role": self.scheme.role(split), "eval_batch_size": batch_size, "n_controls": n_controls,
                "protocol": protocol, "code": self.spec.code_label}
        out = []
        for (kind, domain), cs in sorted(groups.items()):
            n = sum(c.n for c in cs)
            if n == 0:
                continue
            out.append({**base, "domain_kind": kind, "domain": domain, "metric": "accuracy",
                        "value": sum(c.correct for c in cs) / n, "n": n})
            if kind == "all":
                out.append({**base, "domain_kind": kind, "domain": domain, "metric": "loss",
                            "value": sum(c.loss_sum for c in cs) / n, "n": n})
        return out

    def main(self, method: Method, epoch: int, splits: list[str]) -> list[dict]:
        """The leaderboard's protocol on `splits` (the model as it is after `epoch` epochs)."""
        rows = []
        for split in splits:
            counts = self.counts(method, split, self.main_batch, self.main_controls)
            rows += self.rows(counts, epoch, split, self.main_batch, self.main_controls, "main")
        return rows

    def sweeps(self, method: Method, epoch: int) -> list[dict]:
        """TTA methods on the out-of-distribution test splits across test batch sizes and numbers of controls.

        In-distribution test splits (`id_*`) are left out: the question is how adaptation behaves on new
        batches. Batch sizes at or above the largest plate equal the whole-plate point (0) and are skipped;
        control counts above what every test plate has would only re-sample the same controls, so the
        controls sweep stops at the smallest plate's control count.
        """
        if self.track != "tta":
            return []
        rows = []
        tests = [s for s in self.test_splits if not s.startswith("id_")] or self.test_splits
        for split in tests:
            stream = self.stream(split)
            largest = max(stream.plate_rows.values())
            for bs in self.spec.eval.tta_batch_sizes:
                if bs == self.main_batch or (bs and bs >= largest):
                    continue
                rows += self.rows(self.counts(method, split, bs, self.main_controls), epoch, split, bs,
                                  self.main_controls, "batch-size-sweep")
            if self.main_controls:
                available = min(self._controls_per_plate(p) for p in stream.plate_rows)
                for m in self.spec.eval.control_counts:
                    if m == self.main_controls or m > available:
                        continue
                    rows += self.rows(self.counts(method, split, self.main_batch, m), epoch, split,
                                      self.main_batch, m, "controls-sweep")
        return rows

    def _controls_per_plate(self, plate: str) -> int:
        return sum(p.controls for p in self.ds.manifest.parts_of(plate))


__all__ = ["Evaluator", "PlateCounts"]
