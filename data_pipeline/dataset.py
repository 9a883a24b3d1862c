"""The training data a run's ``data`` section names, in one place: where it is (a folder with a
manifest, the manifest itself, or shards by pattern, list or URL), writing a toy data set on first
use, reading or indexing the manifest, and the rank's stream over it. The trainer hands over its
``data`` section and asks for a stream; it knows no URL.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import fsspec
import torch

from data_pipeline.cli import DataError
from data_pipeline.config import MAX_TOY_SAMPLES, DataConfig
from data_pipeline.convert import convert_toy
from data_pipeline.decode import DecodeSpec
from data_pipeline.shard_io import check_first_sample
from data_pipeline.shards import Manifest, looks_like_shards, manifest_url
from data_pipeline.storage import bounded
from data_pipeline.stream import ShardStream, open_data
from data_pipeline.toy import same_std, toy_spec

log = logging.getLogger(__name__)

WRITING_LOCK = ".writing.lock"  # in a toy data set's folder while write_toy_data writes it


@dataclass
class Dataset:
    """An opened data set: its manifest, and the rank's streams over it."""

    cfg: DataConfig
    manifest: Manifest

    @property
    def location(self) -> str:
        """What messages call the data: the shards as given, or the manifest a folder holds."""
        return self.cfg.url if looks_like_shards(self.cfg.url) else manifest_url(self.cfg.url)

    def describe(self) -> str:
        indexed = ", indexed now" if looks_like_shards(self.cfg.url) else ""
        return f"{self.location} ({self.manifest.num_samples} samples, {len(self.manifest.shards)} shards{indexed})"

    def stream(
        self,
        rank: int,
        world_size: int,
        seed: int,
        read_ahead: bool = True,
        pin: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> ShardStream:
        """Rank ``rank``'s share of every epoch (``data.batch_size`` is split over the ranks)."""
        cfg = self.cfg
        return ShardStream(
            self.manifest,
            rank,
            world_size,
            cfg.batch_size // world_size,
            cfg.num_workers,
            cfg.shuffle_buffer,
            seed,
            worker_type=cfg.worker_type,
            max_corrupt_share=cfg.max_corrupt_share,
            read_ahead=read_ahead,
            pin=pin,
        )


def write_toy_data(cfg: DataConfig, seed: int) -> None:
    """A toy preset writes its shards on first use, so the default job needs no download: only into a
    folder that does not exist yet or is empty, or that holds only what an interrupted write of the same
    data set left (its shards, no manifest), which is written again. Anything else (a manifest that is
    there but wrong or written with other data.toy settings, a missing shard, other files) is the user's
    data and is reported by open_dataset, not overwritten.
    One process writes (the trainer's rank 0; in a local folder a lock keeps other jobs out meanwhile);
    the others wait for it."""
    if not cfg.toy or looks_like_shards(cfg.url):
        return
    murl = manifest_url(cfg.url)
    # Bounded too: a store's file system connects when made (ftp://, sftp://), and a failure names the URL.
    fs, manifest = bounded(partial(fsspec.core.url_to_fs, murl), murl, "connection")
    if bounded(partial(fs.exists, manifest), murl, "lookup"):
        return
    folder = posixpath.dirname(manifest)
    if bounded(partial(fs.isfile, folder), folder, "lookup"):
        raise DataError(
            f"data.url={cfg.url} is a file: point it at the data set's folder (holding manifest.json), or at "
            "shards (a .tar, a brace pattern); a toy preset writes its data into a new folder there"
        )
    if cfg.toy_num_samples > MAX_TOY_SAMPLES:  # drawn in memory: said here, not met as a MemoryError
        raise DataError(
            f"data.toy_num_samples={cfg.toy_num_samples} is more than the {MAX_TOY_SAMPLES:,} points a toy data "
            "set is drawn with in memory: lower it"
        )
    with _writing_lock(fs, folder, cfg.url):
        if bounded(partial(fs.exists, manifest), murl, "lookup"):  # another job wrote it meanwhile
            return
        present = bounded(partial(_listing, fs, folder), folder, "listing")
        if present and not all(_from_interrupted_write(name, cfg.toy) for name in present):
            raise DataError(
                f"data.url={cfg.url} holds files but no manifest.json: not writing {cfg.toy} shards over them. "
                "Point data.url at an empty or new folder (or at the data's manifest)."
            )
        if present:
            log.warning("data.url=%s holds %d file(s) of a %s write that was interrupted: writing it again",
                        cfg.url, len(present), cfg.toy)  # fmt: skip
            for name in present:
                bounded(partial(fs.rm_file, posixpath.join(folder, name)), folder, "removal")
        log.info("writing %s shards to %s", cfg.toy, cfg.url)
        convert_toy(cfg.toy, cfg.url, cfg.toy_num_samples, cfg.toy_num_shards, seed=seed, std=cfg.toy_std)


@contextlib.contextmanager
def _writing_lock(fs, folder: str, url: str) -> Iterator[None]:
    """Held while a toy data set is written into a local ``folder``: another job asking for it then is
    told so, instead of taking the shards being written for an interrupted write's. (Stores: no lock.)"""
    if not ("file" in fs.protocol or "local" in fs.protocol):
        yield
        return
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, WRITING_LOCK)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(
                f"data.url={url} is being written by another process now: rerun once it has finished"
            ) from None
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _listing(fs, folder: str) -> list[str]:
    """The names in ``folder`` but the writing lock ([] where there is no folder)."""
    if not fs.exists(folder):
        return []
    names = (posixpath.basename(p.rstrip("/")) for p in fs.ls(folder, detail=False))
    return [name for name in names if name != WRITING_LOCK]


def _from_interrupted_write(name: str, dataset: str) -> bool:
    """Whether ``name`` is what write_toy_data leaves of ``dataset`` when stopped before its manifest: its
    shards (write_array_shards' names) and a shard still being written (mkstemp's .tar.partial)."""
    return bool(re.fullmatch(rf"{re.escape(dataset)}-train-\d{{6}}\.tar|tmp[\w-]+\.tar\.partial", name))


def open_dataset(cfg: DataConfig) -> Dataset:
    """The data set ``cfg`` names, its manifest read and checked (or its shards indexed); DataError
    naming the problem, and the command that writes this preset's data where it has one."""
    try:
        manifest = open_data(cfg.url, DecodeSpec.of(cfg), cfg.sample_bytes_bound())
    except DataError as e:
        raise DataError(f"{e}\nthis preset's data is written by: {cfg.prepare}" if cfg.prepare else str(e)) from None
    check_toy_settings(cfg, manifest)
    check_first_sample(manifest)
    return Dataset(cfg, manifest)


def check_toy_settings(cfg: DataConfig, manifest: Manifest) -> None:
    """Raises DataError when data.url already holds other data than the toy settings ask for: another
    data set, or one written with another data.toy_std, data.toy_num_samples or data.toy_num_shards.
    write_toy_data writes only where there is nothing, so the run would train on that data as if it
    were what it asked for. train.seed is not compared: runs of several seeds share one draw."""
    if not cfg.toy or looks_like_shards(cfg.url):
        return
    differences = []
    if manifest.name != cfg.toy:
        differences.append(f"data.toy={cfg.toy} (the data: {manifest.name})")
    # Only this project's toy writer records the std, and the swiss roll has none. Another data set asked
    # for with its own std (0) is one difference, said above.
    recorded_std = manifest.preprocessing.get("std")
    spec = toy_spec(cfg.toy)
    asked_std = cfg.toy_std or spec.std
    std_comparable = spec.centres is not None and (manifest.name == cfg.toy or cfg.toy_std > 0)
    if std_comparable and isinstance(recorded_std, (int, float)) and not same_std(asked_std, recorded_std):
        asked = f"{cfg.toy_std:g}" if cfg.toy_std else f"0, the published {asked_std:g}"
        differences.append(f"data.toy_std={asked} (the data: {recorded_std:g})")
    if manifest.num_samples != cfg.toy_num_samples:
        differences.append(f"data.toy_num_samples={cfg.toy_num_samples} (the data: {manifest.num_samples})")
    if len(manifest.shards) != min(cfg.toy_num_shards, cfg.toy_num_samples):
        differences.append(f"data.toy_num_shards={cfg.toy_num_shards} (the data: {len(manifest.shards)})")
    if differences:
        folder = posixpath.dirname(manifest_url(cfg.url))
        raise DataError(
            f"data.url={cfg.url} holds data written with other settings than this run's: {'; '.join(differences)}. "
            f"Give a new data.url to have the run's data written there, or delete {folder} to have it rewritten "
            "(or give the data's values to train on it as it is)"
        )
