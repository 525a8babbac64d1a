"""A training's checkpoints in storage: `<storage>/trainings/<training_id>/` (harness/results/layout.py).

- `weights/epoch-NNNNN.pt`: the model's weights after every epoch. Every protocol that shares the training is
  evaluated from them (its test splits at the epochs a selection rule can choose, its TTA sweeps), and a
  protocol added after the training finished is evaluated from them without training again.
- `state.pt`: what resuming needs (model, optimisers, the method's extra state; epochs done, history, MLflow
  run ids), one file so that it is replaced at once. Written after the epoch's records, so a crash in
  between only repeats the epoch.
- `done.json`: the training finished every epoch.

Files hold tensors and plain data only and are read with `torch.load(weights_only=True)`: a checkpoint in a
shared bucket is data, never code (a pickle that would run code is refused with an error naming the file).
Every file is written atomically (datasets/storage.put_atomic), so a crash never leaves a half-written one, and
storage errors are retried with backoff for a bounded time.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field

import torch
from platebench.datasets.storage import StorageOptions, filesystem, join, put_atomic, with_retries

from ..errors import HarnessError
from ..results.layout import DONE_FILE, training_dir


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    history: list[dict] = field(default_factory=list)  # per-epoch training summary (loss, seconds, ...)
    mlflow_runs: dict[str, str] = field(default_factory=dict)  # "training" and each run id -> MLflow run id
    mlflow_gaps: list[str] = field(default_factory=list)


class TrainingStore:
    """Reads and writes one training's checkpoint files."""

    def __init__(self, storage: str, options: StorageOptions | None, training_id: str):
        self.storage, self.options, self.training_id = storage, options, training_id
        self.fs, root = filesystem(storage, options)
        self.root = training_dir(root, training_id)
        self.url = training_dir(storage, training_id)

    # -- plain files ----------------------------------------------------------------------------
    def _write(self, name: str, data: bytes) -> None:
        path = join(self.root, name)

        def write():
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            put_atomic(self.fs, path, data)

        with_retries(write, f"writing {join(self.url, name)}")

    def _read(self, name: str) -> bytes | None:
        path = join(self.root, name)
        return with_retries(lambda: self.fs.cat_file(path) if self.fs.exists(path) else None,
                            f"reading {join(self.url, name)}")

    def write_json(self, name: str, payload) -> None:
        self._write(name, json.dumps(payload, indent=1, default=list).encode())

    def read_json(self, name: str):
        data = self._read(name)
        return None if data is None else json.loads(data)

    def _save_tensors(self, name: str, obj) -> None:
        buf = io.BytesIO()
        torch.save(obj, buf)
        self._write(name, buf.getvalue())

    def _load_tensors(self, name: str, map_location):
        data = self._read(name)
        if data is None:
            return None
        try:
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, ...: all mean "not ours"
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise HarnessError(f"{join(self.url, name)}: not a tensors-only checkpoint, refusing to load it "
                               f"({first}); delete the training's folder to train it again") from None

    # -- weights per epoch ----------------------------------------------------------------------
    def save_weights(self, epoch: int, state_dict: dict) -> None:
        self._save_tensors(f"weights/epoch-{epoch:05d}.pt", {k: v.detach().cpu() for k, v in state_dict.items()})

    def load_weights(self, epoch: int, map_location="cpu") -> dict:
        weights = self._load_tensors(f"weights/epoch-{epoch:05d}.pt", map_location)
        if weights is None:
            raise HarnessError(f"{self.url}: no weights of epoch {epoch} (weights/epoch-{epoch:05d}.pt)")
        return weights

    def weight_epochs(self) -> list[int]:
        files = with_retries(lambda: self.fs.glob(join(self.root, "weights", "epoch-?????.pt")),
                             f"listing {self.url}/weights")
        return sorted(int(f.rsplit("-", 1)[1][:5]) for f in files)

    # -- resume state ---------------------------------------------------------------------------
    def save_state(self, method_state: dict, train: TrainState) -> None:
        self._save_tensors("state.pt", {"method": method_state, "train": asdict(train)})

    def load_state(self, map_location="cpu") -> tuple[dict, TrainState] | None:
        blob = self._load_tensors("state.pt", map_location)
        if blob is None:
            return None
        return blob["method"], TrainState(**blob["train"])

    # -- completion -----------------------------------------------------------------------------
    def read_done(self) -> dict | None:
        return self.read_json(DONE_FILE)

    def write_done(self, payload: dict) -> None:
        self.write_json(DONE_FILE, payload)
