"""Checkpoints: one layout for every engine, written atomically, with an engine-free weights export.

    checkpoints/step_00001000/
        weights.safetensors    E, G and T in fp32 ("energy.", "generator.", "statistics." keys); its
                               metadata holds the sample shape, the data set and the package version
        config.yaml            the run's resolved configuration when this checkpoint was written
        trainer_state.json     step, every rank's stream position, learning-rate scale and horizon
        rng_rank<R>.pt         each rank's random generators (tensors and numbers only)
        engine/                what the engine needs to go on: optimizers and loss scalers (ddp), or
                               DeepSpeed's own files (one tag per engine)
        files.json             every other file's size and sha256, written last: a load checks them

Every rank writes into ``step_XXXXXXXX.partial``; the main process renames it when all ranks are done,
so a crash during a save never leaves a checkpoint that loads half (a ``.partial`` is ignored and
cleaned up later), then keeps the last ``checkpoint.keep``. A checkpoint whose files do not match
its files.json (truncated, missing, a flipped byte) is damaged: ``newest_intact`` says which file and
what is wrong, and picks the newest intact one. The sample, evaluate and FID tools read only
``weights.safetensors`` and ``config.yaml`` (``load_export``), so they work on any engine's run.
Nothing here unpickles: JSON, safetensors, and ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from importlib import metadata

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data_pipeline.cli import CheckpointError
from data_pipeline.config import StreamPosition

log = logging.getLogger(__name__)
CHECKPOINT_RE = re.compile(r"^step_(\d{8})$")
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.yaml"
STATE_FILE = "trainer_state.json"
ENGINE_DIR = "engine"
FILES_FILE = "files.json"
NETWORKS = ("energy", "generator", "statistics")


@dataclass
class CheckpointConfig:
    every: int = field(default=500, metadata={"range": "[1, 1e12]"})
    keep: int = field(default=3, metadata={"range": "[1, 1000000]"})
    resume: bool = True  # resume from the run folder's latest checkpoint when there is one

    def __post_init__(self) -> None:
        for key, value in (("checkpoint.every", self.every), ("checkpoint.keep", self.keep)):
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")


def package_version() -> str:
    try:
        return metadata.version("meg-ebm")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class TrainState:
    """What a checkpoint holds beyond networks, optimizers and generators. ``position`` is this rank's
    live stream position; ``rank_positions`` every rank's, gathered when a checkpoint is written (they
    differ once a corrupt shard has ended one rank's epoch early, and each rank resumes from its own)."""

    rank: int = 0
    world_size: int = 1
    step: int = 0
    position: StreamPosition = field(default_factory=StreamPosition)
    rank_positions: list[dict[str, int]] = field(default_factory=list)
    lr_scale: float = 1.0  # lowered by each divergence rollback, and kept across resumes
    lr_horizon: int = 0  # the learning-rate schedule's length, fixed when the run starts

    def to_json(self) -> dict:
        return {
            "step": self.step,
            "rank_positions": self.rank_positions or [self.position.state_dict()],
            "lr_scale": self.lr_scale,
            "lr_horizon": self.lr_horizon,
            "version": package_version(),
        }

    def load_json(self, state: dict) -> None:
        """Raises ValueError, KeyError or TypeError when ``state`` is not a trainer state (``load`` names
        the file): a negative step, position or horizon, or a learning-rate scale outside (0, 1]."""
        self.step = _natural(state["step"], "step")
        positions = state["rank_positions"]
        if not isinstance(positions, list) or not positions:
            raise ValueError(f"rank_positions must be a non-empty list, got {positions!r:.80}")
        for p in positions:
            for key in ("epoch", "batches_done"):
                _natural(p[key], f"rank_positions.{key}")
        # Another world size reshuffles the shards among ranks: every rank then takes rank 0's place.
        self.position.load_state_dict(positions[self.rank] if len(positions) == self.world_size else positions[0])
        self.lr_scale = float(state.get("lr_scale", 1.0))
        if not 0 < self.lr_scale <= 1:  # NaN too
            raise ValueError(f"lr_scale must be in (0, 1], got {self.lr_scale}")
        self.lr_horizon = _natural(state.get("lr_horizon", 0), "lr_horizon")


def _natural(value, key: str) -> int:
    """``value`` when it is a whole number >= 0 (JSON's 5 or 5.0), else ValueError naming ``key``."""
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())  # not NaN or inf
    if isinstance(value, bool) or not whole or value < 0:
        raise ValueError(f"{key} must be a whole number >= 0, got {value!r:.80}")
    return int(value)


def checkpoint_step(path: str) -> int:
    m = CHECKPOINT_RE.match(os.path.basename(path.rstrip("/")))
    if not m:
        raise ValueError(f"{path} is not a checkpoint folder (step_XXXXXXXX)")
    return int(m.group(1))


def list_checkpoints(folder: str) -> list[str]:
    """Complete checkpoints, oldest first."""
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if CHECKPOINT_RE.match(n)]


# -- random generators ---------------------------------------------------------------------------


def rng_state() -> dict:
    """Python's, numpy's and torch's generators as tensors and numbers (loadable with weights_only)."""
    version, python, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(python, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },  # fmt: skip
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    p, n = state["python"], state["numpy"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- the weights export ----------------------------------------------------------------------------


def write_export(folder: str, weights: dict[str, dict[str, torch.Tensor]], config_yaml: str, info: dict) -> None:
    """weights.safetensors (E, G, T; ``info`` in its metadata, as JSON strings) and config.yaml."""
    flat = {f"{net}.{key}": tensor.contiguous() for net in NETWORKS for key, tensor in weights[net].items()}
    meta = {"format": "meg-weights-1", "version": package_version(), **{k: json.dumps(v) for k, v in info.items()}}
    save_file(flat, os.path.join(folder, WEIGHTS_FILE), metadata=meta)
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        f.write(config_yaml)


def load_export(checkpoint: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict, str]:
    """(E's, G's and T's state dicts, the export's metadata, the config.yaml text) of a checkpoint."""
    path = os.path.join(checkpoint, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{checkpoint} has no {WEIGHTS_FILE}: not a checkpoint, or written by a version before the weights "
            "export (retrain, or sample it with that version)"
        )
    weights: dict[str, dict[str, torch.Tensor]] = {net: {} for net in NETWORKS}
    with safe_open(path, framework="pt") as f:
        raw = f.metadata() or {}
        for name in f.keys():
            net, key = name.split(".", 1)
            weights[net][key] = f.get_tensor(name)
    info = {k: (v if k in ("format", "version") else json.loads(v)) for k, v in raw.items()}
    with open(os.path.join(checkpoint, CONFIG_FILE)) as f:
        return weights, info, f.read()


# -- what a checkpoint holds, and whether it still does ------------------------------------------


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_file_list(folder: str) -> None:
    """files.json: the size and sha256 of every file in ``folder`` (written last, by the main process)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel != FILES_FILE:
                files[rel] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    with open(os.path.join(folder, FILES_FILE), "w") as f:
        json.dump({"version": package_version(), "files": dict(sorted(files.items()))}, f, indent=1)


def damage(folder: str) -> str | None:
    """What is wrong with a checkpoint folder (naming the file), or None when it is intact."""
    try:
        with open(os.path.join(folder, FILES_FILE)) as f:
            files = json.load(f)["files"]
    except FileNotFoundError:
        return f"{FILES_FILE} is missing (an incomplete copy, or a checkpoint of an older version)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{FILES_FILE} is unreadable: {e}"
    for rel, expected in files.items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        size = os.path.getsize(path)
        if size != expected["size"]:
            return f"{rel} has {size} bytes, {expected['size']} were written"
        if _sha256(path) != expected["sha256"]:
            return f"{rel} has changed since it was written (its sha256 differs)"
    return None


# -- saving and loading ----------------------------------------------------------------------------


class Checkpoints:
    """The run's checkpoint folder. ``save`` and ``load`` are collective: every rank calls them."""

    def __init__(self, folder: str, keep: int, config_yaml: str, info: dict):
        self.folder, self.keep, self.config_yaml, self.info = folder, keep, config_yaml, info

    def list(self) -> list[str]:
        return list_checkpoints(self.folder)

    def newest_intact(self, runtime) -> str | None:
        """The newest checkpoint whose files are as written, or None; the main process checks (newest
        first, naming what is wrong with each damaged one) and every rank gets its answer."""
        found, chosen = self.list(), -1
        if runtime.is_main:
            for i in range(len(found) - 1, -1, -1):
                problem = damage(found[i])
                if problem is None:
                    chosen = i
                    break
                log.warning("checkpoint %s is damaged: %s; trying the one before it", found[i], problem)
        if runtime.world_size > 1:
            chosen = int(runtime.sum_across_ranks(torch.tensor([chosen + 1], device=runtime.device)).item()) - 1
        return found[chosen] if chosen >= 0 else None

    def save(self, runtime, state: TrainState) -> str:
        final = os.path.join(self.folder, f"step_{state.step:08d}")
        partial = final + ".partial"
        # Every rank's stream position, in rank order.
        mine = torch.tensor([state.position.epoch, state.position.batches_done], device=runtime.device)
        state.rank_positions = [{"epoch": e, "batches_done": b} for e, b in runtime.all_gather(mine).tolist()]
        weights = runtime.fp32_state_dicts()  # a collective under DeepSpeed
        if runtime.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
        runtime.barrier()
        torch.save(rng_state(), os.path.join(partial, f"rng_rank{runtime.rank}.pt"))
        runtime.save_engine_state(os.path.join(partial, ENGINE_DIR))
        if runtime.is_main:
            write_export(partial, weights, self.config_yaml, {**self.info, "step": state.step})
            with open(os.path.join(partial, STATE_FILE), "w") as f:
                json.dump(state.to_json(), f, indent=2)
        runtime.barrier()
        if runtime.is_main:
            write_file_list(partial)  # after every rank's files
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in self.list()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        runtime.barrier()
        return final

    def load(self, path: str, runtime, state: TrainState) -> None:
        weights, _, _ = load_export(path)
        runtime.restore(os.path.join(path, ENGINE_DIR), weights)
        rng = os.path.join(path, f"rng_rank{runtime.rank}.pt")
        if os.path.isfile(rng):  # absent when the run grew: the new ranks keep their fresh seeds
            set_rng_state(torch.load(rng, weights_only=True))
        state_file = os.path.join(path, STATE_FILE)
        try:
            with open(state_file) as f:
                state.load_json(json.load(f))
        except (ValueError, KeyError, TypeError) as e:  # JSON's errors are ValueErrors
            raise CheckpointError(f"{state_file} is damaged: {type(e).__name__}: {e}") from None
