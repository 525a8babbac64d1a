"""What one Ray Train worker keeps across the jobs of its lane: its rank, device, MLflow writer, the
dataset's parts in memory and the opened datasets (a lane pays for them once, not once per job)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from platebench.datasets.shards import ShardDataset, open_dataset

from ..data.stream import PartCache
from .tracking import BackgroundTracker


@dataclass
class Lane:
    name: str
    launch: object  # runner.Launch (not imported: the runner starts the lanes)
    rank: int
    world: int
    device: torch.device
    tracker: BackgroundTracker
    cache: PartCache
    datasets: dict[str, ShardDataset] = field(default_factory=dict)

    def dataset(self, url: str) -> ShardDataset:
        if url not in self.datasets:
            self.datasets[url] = open_dataset(url, self.launch.options)
        return self.datasets[url]
