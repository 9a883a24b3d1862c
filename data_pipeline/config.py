"""The data section of a run's configuration, and the stream's position in it (what a checkpoint
keeps to resume the stream). Kept apart from the stream so that loading a configuration reads no data
code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

WorkerType = Literal["thread", "process"]
WORKER_TYPES: tuple[str, ...] = WorkerType.__args__


@dataclass
class DataConfig:
    url: str = "data/25gaussians"  # a folder holding manifest.json, or the manifest's URL (any fsspec URL)
    prepare: str = ""  # the command that writes this data (shown when the shards are missing)
    batch_size: int = 256  # global: split evenly over the ranks
    num_workers: int = 1
    # thread: workers share the trainer's memory (no copies between processes; the parsing is numpy,
    # which runs outside the GIL); process: DataLoader worker processes, isolated.
    worker_type: WorkerType = "thread"
    shuffle_buffer: int = 2000
    # Toy data sets only: when there is no manifest at ``url``, write this data set there first.
    toy: str = ""
    toy_std: float = 0.0  # the toy modes' std (0: the data set's own)
    toy_num_samples: int = 102_400
    toy_num_shards: int = 8

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class StreamPosition:
    epoch: int = 0
    batches_done: int = 0  # batches of this epoch already consumed by the trainer

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
