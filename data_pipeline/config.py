"""The data section of a run's configuration, and the stream's position in it (what a checkpoint
keeps to resume the stream). Kept apart from the stream so that loading a configuration reads no data
code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

WorkerType = Literal["auto", "thread", "process"]
WORKER_TYPES: tuple[str, ...] = WorkerType.__args__


@dataclass
class DataConfig:
    # A folder holding manifest.json, or the manifest's URL; or WebDataset shards: a brace pattern
    # (data/x-{000000..000099}.tar), several joined by "::", one .tar(.gz) file, a pipe: command
    # (with --allow-pipe); any fsspec URL. Shards without a manifest are indexed at start.
    url: str = "data/25gaussians"
    prepare: str = ""  # the command that writes this data (shown when the shards are missing)
    batch_size: int = 256  # global: split evenly over the ranks
    num_workers: int = 1
    # thread: workers share the trainer's memory (no copies between processes; this project's shards
    # parse as numpy, outside the GIL); process: DataLoader worker processes, isolated, and parallel
    # for other tools' shards, whose decoding holds the GIL; auto: thread for this project's shards,
    # process for others.
    worker_type: WorkerType = "auto"
    shuffle_buffer: int = 2000
    # Toy data sets only: when there is no manifest at ``url``, write this data set there first.
    toy: str = ""
    toy_std: float = 0.0  # the toy modes' std (0: the data set's own)
    toy_num_samples: int = 102_400
    toy_num_shards: int = 8
    # Shards written by other tools (webdataset's ShardWriter, tarp, img2dataset): the sample's field
    # (the first of these it has; or .npy), its label (.cls; "" for unlabelled data), the images'
    # colour mode and size (> 0: centre-cropped to a square and resized). Not used for this project's
    # own shards, and an indexed data set's manifest keeps the values it was indexed with.
    image_key: str = "png;jpg;jpeg;webp"
    label_key: str = "cls"
    image_mode: Literal["rgb", "l"] = "rgb"
    image_size: int = 0
    # An epoch in which more than this share of a rank's shards is corrupt stops the run (as does one
    # that gives no batch at all): a data set that is mostly unreadable is not trained on.
    max_corrupt_share: float = 0.5
    # Seconds any one storage call (an open, a listing, a shard read) may take before it is tried
    # again (twice, after 1 and 2 s); then the run stops with an error naming the URL.
    io_timeout: float = field(default=60.0, metadata={"range": "(0, inf)"})

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if not 0 < self.max_corrupt_share <= 1:
            raise ValueError(f"data.max_corrupt_share must be in (0, 1], got {self.max_corrupt_share}")
        if not self.io_timeout > 0:  # NaN too
            raise ValueError(f"data.io_timeout must be > 0 seconds, got {self.io_timeout}")
        if self.image_size < 0:
            raise ValueError(f"data.image_size must be >= 0 (0: as stored), got {self.image_size}")

    def decode_spec(self):
        from data_pipeline.decode import DecodeSpec

        return DecodeSpec(self.image_key, self.label_key, self.image_mode, self.image_size)


@dataclass
class StreamPosition:
    epoch: int = 0
    batches_done: int = 0  # batches of this epoch already consumed by the trainer

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
