"""The data section of a run's configuration, and the stream's position in it (what a checkpoint
keeps to resume the stream). Kept apart from the stream so that loading a configuration reads no data
code."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field, fields
from typing import Literal

WorkerType = Literal["auto", "thread", "process"]
WORKER_TYPES: tuple[str, ...] = WorkerType.__args__
ToyName = Literal["", "25gaussians", "8gaussians", "swissroll"]  # data_pipeline.toy's data sets ("": none)
# A toy data set is drawn in memory: a point costs about 40 bytes there (and 2 KB of shards), so 10,000,000
# (100 times the presets' 102,400) stays far from a MemoryError or the kernel's OOM kill.
MAX_TOY_SAMPLES = 10_000_000
MAX_IMAGE_SIZE = 8192  # data.image_size: 8192 x 8192 x 3 is 192 MiB per decoded image
DEFAULT_MAX_SAMPLE_BYTES = 256 << 20
# Schemes whose webdataset opener runs a program (pipe: a shell command; the others curl or ais).
COMMAND_SCHEMES = ("pipe", "ais", "htgs", "scp", "ftps")


# The metadata of a config field that names a file or folder: a leading ~ there is the home folder, as
# in a shell (which leaves data.url=~/x alone; fsspec expanded it where the OS did not, and a run wrote its
# data to one place and looked for it in another).
PATH_FIELD = {"path": True}


def expand_home(url: str) -> str:
    """``url`` with a leading ``~`` or ``~user`` of each ``::``-joined part made the home folder's path."""
    return "::".join(os.path.expanduser(part) if part.startswith("~") else part for part in url.split("::"))


@dataclass
class DataConfig:
    # A folder holding manifest.json, or the manifest's URL; or WebDataset shards: a brace pattern
    # (data/x-{000000..000099}.tar), several joined by "::", one .tar(.gz) file, a pipe: command
    # (with --allow-pipe); any fsspec URL. Shards without a manifest are indexed at start.
    url: str = field(default="data/25gaussians", metadata=PATH_FIELD)
    prepare: str = ""  # the command that writes this data (shown when the shards are missing)
    batch_size: int = field(default=256, metadata={"range": "[1, 16777216]"})  # global: split over the ranks
    num_workers: int = field(default=1, metadata={"range": "[0, 1024]"})
    # thread: workers share the trainer's memory (no copies between processes; this project's shards
    # parse as numpy, outside the GIL); process: DataLoader worker processes, isolated, and parallel
    # for other tools' shards, whose decoding holds the GIL; auto: thread for this project's shards,
    # process for others.
    worker_type: WorkerType = "auto"
    shuffle_buffer: int = field(default=2000, metadata={"range": "[0, 1073741824]"})
    # Toy data sets only: when there is no manifest at ``url``, write this data set there first.
    toy: ToyName = ""
    toy_std: float = field(default=0.0, metadata={"range": "[0, inf)"})  # the toy modes' std (0: the data set's own)
    # at most MAX_TOY_SAMPLES where the run writes them (write_toy_data): a saved run's larger count still loads
    toy_num_samples: int = field(default=102_400, metadata={"range": "[1, 1073741824]"})
    toy_num_shards: int = field(default=8, metadata={"range": "[1, 1048576]"})
    # Shards written by other tools (webdataset's ShardWriter, tarp, img2dataset): the sample's field
    # (the first of these it has; or .npy), its label (.cls; json:label for a field of a .json member,
    # dotted for a nested one; "" for unlabelled data), the images'
    # colour mode and size (> 0: centre-cropped to a square and resized). Not used for this project's
    # own shards, and an indexed data set's manifest keeps the values it was indexed with.
    image_key: str = "png;jpg;jpeg;webp"
    label_key: str = "cls"
    image_mode: Literal["rgb", "l"] = "rgb"
    image_size: int = field(default=0, metadata={"range": f"[0, {MAX_IMAGE_SIZE}]"})
    # An epoch in which more than this share of a rank's shards is corrupt stops the run (as does one
    # that gives no batch at all): a data set that is mostly unreadable is not trained on.
    max_corrupt_share: float = field(default=0.5, metadata={"range": "(0, 1]"})
    # The largest shard member (decompressed) or decoded sample accepted, in bytes; a larger one stops
    # the run naming the shard (decoding needs memory in proportion). 0: derived (sample_bytes_bound).
    max_sample_bytes: int = field(default=0, metadata={"range": "[0, 1099511627776]"})
    # Seconds a storage call (an open, a listing) may wait for an answer, and a shard read for its
    # next block, before it is tried again (twice, after 1 and 2 s); then the run stops with an error
    # naming the URL.
    io_timeout: float = field(default=60.0, metadata={"range": "(0, inf)"})

    def __post_init__(self) -> None:
        if not self.url.strip():
            raise ValueError("data.url is empty: give the data set's folder, its manifest.json, or shards")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if not 0 < self.max_corrupt_share <= 1:
            raise ValueError(f"data.max_corrupt_share must be in (0, 1], got {self.max_corrupt_share}")
        if not self.io_timeout > 0:  # NaN too
            raise ValueError(f"data.io_timeout must be > 0 seconds, got {self.io_timeout}")
        if self.image_size < 0:
            raise ValueError(f"data.image_size must be >= 0 (0: as stored), got {self.image_size}")
        label_key_problem = check_label_key(self.label_key)
        if label_key_problem:
            raise ValueError(f"data.label_key={self.label_key!r}: {label_key_problem}")

    def sample_bytes_bound(self) -> int:
        """``max_sample_bytes``, or when 0 a generous bound: 16 times a decoded image of ``image_size``
        (3 channels), and at least DEFAULT_MAX_SAMPLE_BYTES."""
        if self.max_sample_bytes:
            return self.max_sample_bytes
        return max(DEFAULT_MAX_SAMPLE_BYTES, 16 * 3 * self.image_size**2)


def check_url(url: str) -> str | None:
    """What keeps fsspec from opening ``url`` (each part of a ``::``-joined list): a scheme it does not know
    (a typo), or one whose package is not installed; None when there is nothing. The schemes that run a
    program (pipe:, ...) are the shard reader's, not fsspec's. Checked where the data is about to be read
    or written (a saved run's configuration still loads where its storage's package is missing)."""
    for part in url.split("::"):
        scheme = part.strip().split("://", 1)[0].lower() if "://" in part else ""
        if not scheme or scheme in COMMAND_SCHEMES:
            continue
        import fsspec

        try:
            fsspec.get_filesystem_class(scheme)
        except ValueError:
            return (
                f"unknown scheme {scheme!r}: a local path, or a URL fsspec knows "
                "(file://, s3://, gs://, http(s)://, memory://, ...; fsspec.available_protocols() lists them)"
            )
        except ImportError as e:
            return f"{scheme}:// needs a package that is not installed: {e}"
    return None


# How shards' samples are decoded: the data section's keys and meg-convert index's flags for them.
DECODE_FLAGS = {"data.image_key": "--image-key", "data.label_key": "--label-key", "data.image_mode": "--image-mode",
                "data.image_size": "--image-size", "data.max_sample_bytes": "--max-sample-bytes"}  # fmt: skip


def decode_flags(cfg: DataConfig) -> str:
    """meg-convert index's flags for ``cfg``'s decoding where it differs from the defaults (shell-quoted): an
    index of a run's shards decodes them as the run did (mode and size)."""
    defaults = {f.name: f.default for f in fields(DataConfig)}
    parts = []
    for key, flag in DECODE_FLAGS.items():
        name = key.removeprefix("data.")
        if getattr(cfg, name) != defaults[name]:
            parts.append(f" {flag} {shlex.quote(str(getattr(cfg, name)))}")
    return "".join(parts)


def check_label_key(label_key: str) -> str | None:
    """What is wrong with a label key, or None: a member's name (``cls``), ``json:FIELD`` (a field of
    the ``.json`` member, dotted for a nested one) or "" (unlabelled)."""
    member, colon, path = label_key.partition(":")
    if not colon:
        return None
    if member.strip().lower() != "json":
        return "only a .json member has fields; use a member's name (cls), json:FIELD, or '' for unlabelled data"
    if not path.strip() or any(not part.strip() for part in path.split(".")):
        return "json: needs the label's field, e.g. json:label or json:meta.class"
    return None


@dataclass
class StreamPosition:
    epoch: int = 0
    batches_done: int = 0  # batches of this epoch already consumed by the trainer

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])
