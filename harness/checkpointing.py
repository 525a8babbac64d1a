"""What a run checkpoints each epoch, and how it comes back after a failure or a restart."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch
from platebench.methods import Method

STATE_FILE = "state.pt"


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    best_epoch: int = 0  # 1-based epoch with the best validation accuracy so far (0: none yet)
    best_val: float = float("-inf")
    best_model: dict | None = None  # state_dict of the best epoch (for the TTA sweeps)
    history: list[dict] = field(default_factory=list)  # per-epoch summary metrics
    mlflow_run_id: str | None = None
    mlflow_gaps: list[str] = field(default_factory=list)

    def improve(self, epoch: int, val: float | None, method: Method) -> bool:
        """Keep the model of the best validation epoch (ties keep the earlier epoch, as selection does)."""
        if val is None or val <= self.best_val:
            return False
        self.best_epoch, self.best_val = epoch, val
        self.best_model = {k: v.detach().to("cpu", copy=True) for k, v in method.state_dict().items()}
        return True


def save(directory: str, method: Method, state: TrainState) -> str:
    path = os.path.join(directory, STATE_FILE)
    torch.save({"method": method.checkpoint_state(), "train": copy.copy(state).__dict__}, path)
    return path


def load(directory: str, method: Method, device) -> TrainState:
    blob = torch.load(os.path.join(directory, STATE_FILE), map_location=device, weights_only=False)
    method.load_checkpoint_state(blob["method"])
    return TrainState(**blob["train"])
