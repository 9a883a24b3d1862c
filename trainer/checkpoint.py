"""Checkpoints: one layout for every engine, written atomically, with an engine-free weights export.

    checkpoints/step_00001000/
        weights.safetensors    E, G and T in fp32 ("energy.", "generator.", "statistics." keys); its
                               metadata holds the sample shape, the data set and the package version
        config.yaml            the run's resolved configuration when this checkpoint was written
        trainer_state.json     step, every rank's stream position and the data settings it depends
                               on, learning-rate scale and horizon
        rng_rank<R>.pt         each rank's random generators (tensors and numbers only)
        engine/                what the engine needs to go on: optimizers and loss scalers (ddp), or
                               DeepSpeed's own files (one tag per engine)
        files.json             every other file's size and sha256, written last: a load checks them

Every rank writes into ``step_XXXXXXXX.partial``; the main process renames it when all ranks are done,
so a crash during a save never leaves a checkpoint that loads half (a ``.partial`` is ignored and
cleaned up later). Before the rename every file and folder of it is synced to disk (in the pass that
hashes them for files.json), and the rename is synced before older checkpoints are pruned: a power
loss right after a save leaves the new checkpoint whole, or the older ones still there. A checkpoint
already at that name is never overwritten: it is moved aside to ``step_XXXXXXXX.replaced``. Pruning
keeps the last ``checkpoint.keep`` of the checkpoints this run has verified (written, or read back
intact), always the newest intact one and the one just written, and step 0 while the divergence
guard may need it; nothing else is ever deleted.

A checkpoint whose files do not match its files.json (truncated, missing, a flipped byte), whose
trainer_state.json, config.yaml or safetensors header does not parse, or whose parameters are
non-finite or differ from the norms recorded at save time, is damaged: the message names the file,
and the one before it is used. A checkpoint without files.json that otherwise loads (an older
version's, or a copy without it) is used with a warning that it is unverified. The sample, evaluate
and FID tools read only ``weights.safetensors`` and ``config.yaml`` (``load_export``), so they work on
any engine's run. Nothing here unpickles: JSON, safetensors, and ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from data_pipeline.cli import CheckpointError, short_message
from data_pipeline.config import StreamPosition
from trainer.config import RunConfig, config_from_yaml
from trainer.nofollow import make_dir, write_replacing

log = logging.getLogger(__name__)
CHECKPOINT_RE = re.compile(r"^step_(\d{8})$")
WEIGHTS_FILE = "weights.safetensors"
# A checkpoint the divergence guard fled (trainer/guard.py) keeps its folder under this suffix: not
# listed, so neither a rollback, a restart nor pruning takes it, and nothing of it is deleted.
FLED_SUFFIX = ".fled"
# A checkpoint being pruned is renamed to this first, out of the listing (see Checkpoints._prune).
PRUNING_SUFFIX = ".pruning"
CONFIG_FILE = "config.yaml"
STATE_FILE = "trainer_state.json"
ENGINE_DIR = "engine"
FILES_FILE = "files.json"
NETWORKS = ("energy", "generator", "statistics")
EMA_NETWORK = "generator_ema"  # train.generator_ema's average of G: in the export only when it is on
NORM_TOLERANCE = 1e-4  # relative: a norm recomputed from the same fp32 weights agrees far closer


def package_version() -> str:
    try:
        return metadata.version("meg-ebm")
    except metadata.PackageNotFoundError:
        return "unknown"


def sample_order(cfg: RunConfig, world_size: int) -> dict[str, int]:
    """The settings that decide which samples a stream position's batches hold (data_pipeline/stream.py):
    a position resumes exactly under the settings it was saved with, and under no others."""
    return {
        "train.seed": cfg.train.seed,  # the stream's seed
        "data.batch_size": cfg.data.batch_size,
        "data.num_workers": cfg.data.num_workers,
        "data.shuffle_buffer": cfg.data.shuffle_buffer,
        "ranks": world_size,
    }


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
    param_norms: dict[str, float] = field(default_factory=dict)  # each network's, when last saved
    # The entropy estimator's state (DV's moving average), the same on every rank: MEGSteps' own device
    # tensors, read at a save (a host sync, at checkpoints only) and filled in place by a load.
    entropy_state: dict[str, torch.Tensor] = field(default_factory=dict)
    # This run's sample_order(), written beside the positions: Checkpoints fills it in before a save or
    # a load. Empty (a probe, or a checkpoint from before it was kept): positions load as saved.
    sample_order: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "step": self.step,
            "rank_positions": self.rank_positions or [self.position.state_dict()],
            "sample_order": self.sample_order,
            "lr_scale": self.lr_scale,
            "lr_horizon": self.lr_horizon,
            "param_norms": self.param_norms,
            "entropy_state": {k: float(v) for k, v in self.entropy_state.items()},  # fp32 round-trips
            "version": package_version(),
        }

    def load_json(self, state: dict) -> list[str]:
        """Returns the settings of this run's ``sample_order`` that differ from those ``state`` was saved
        with ("data.num_workers 1 → 2"); when there are any, every rank starts the epoch after the
        newest one begun. Raises ValueError, KeyError or TypeError when ``state`` is not a trainer state
        (``load`` names the file): a negative step, position or horizon, or a learning-rate scale
        outside (0, 1]."""
        self.step = _natural(state["step"], "step")
        positions = state["rank_positions"]
        if not isinstance(positions, list) or not positions:
            raise ValueError(f"rank_positions must be a non-empty list, got {positions!r:.80}")
        for p in positions:
            for key in ("epoch", "batches_done"):
                _natural(p[key], f"rank_positions.{key}")
        saved_order = state.get("sample_order") or {}
        if not isinstance(saved_order, dict):
            raise ValueError(f"sample_order must be a mapping, got {saved_order!r:.80}")
        changed = [
            f"{key} {saved_order.get(key)} → {value}"
            for key, value in self.sample_order.items()
            if saved_order and saved_order.get(key) != value
        ]
        if changed:
            # Under other settings a position's batches hold other samples: going on mid-epoch would
            # repeat some of the samples already seen and never show as many others. A fresh epoch
            # repeats none; the rest of the interrupted one is skipped.
            epoch = max(int(p["epoch"]) + (p["batches_done"] > 0) for p in positions)
            self.position.load_state_dict({"epoch": epoch, "batches_done": 0})
        else:
            # Another world size reshuffles the shards among ranks: every rank then takes rank 0's place
            # (only a checkpoint without sample_order gets here with another world size).
            self.position.load_state_dict(positions[self.rank] if len(positions) == self.world_size else positions[0])
        self.lr_scale = float(state.get("lr_scale", 1.0))
        if not 0 < self.lr_scale <= 1:  # NaN too
            raise ValueError(f"lr_scale must be in (0, 1], got {self.lr_scale}")
        self.lr_horizon = _natural(state.get("lr_horizon", 0), "lr_horizon")
        entropy = state.get("entropy_state", {})
        if not isinstance(entropy, dict):
            raise ValueError(f"entropy_state must be a mapping, got {entropy!r:.80}")
        values = {str(k): float(v) for k, v in entropy.items()}
        if not all(math.isfinite(v) for v in values.values()):
            raise ValueError(f"entropy_state must hold finite numbers, got {values}")
        for key, tensor in self.entropy_state.items():  # a key the checkpoint lacks: the fresh state, 0
            tensor.fill_(values.get(key, 0.0))
        return changed


def _natural(value, key: str) -> int:
    """``value`` when it is a whole number >= 0 (JSON's 5 or 5.0), else ValueError naming ``key``."""
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())  # not NaN or inf
    if isinstance(value, bool) or not whole or value < 0:
        raise ValueError(f"{key} must be a whole number >= 0, got {value!r:.80}")
    return int(value)


def is_checkpoint_folder(path: str) -> bool:
    """Whether ``path`` is a checkpoint's folder (it holds a trainer state or a weights export)."""
    return any(os.path.isfile(os.path.join(path, name)) for name in (STATE_FILE, WEIGHTS_FILE))


def run_folder_of(checkpoint: str) -> str:
    """The run folder a checkpoint folder lies in (``run/checkpoints/step_X``), else "the run folder holding it"."""
    parent = os.path.dirname(os.path.abspath(checkpoint.rstrip("/")))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else "the run folder holding it"


def checkpoint_step(path: str) -> int:
    m = CHECKPOINT_RE.match(os.path.basename(path.rstrip("/")))
    if not m:
        raise ValueError(f"{path} is not a checkpoint folder (step_XXXXXXXX)")
    return int(m.group(1))


def list_checkpoints(folder: str) -> list[str]:
    """Checkpoint folders (``step_XXXXXXXX``), oldest first; whether they are intact is damage()'s call."""
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if CHECKPOINT_RE.match(n)]


# -- random generators ---------------------------------------------------------------------------


def rng_state(device: torch.device) -> dict:
    """Python's, numpy's and torch's generators as tensors and numbers (loadable with weights_only),
    with the generator of this rank's ``device`` alone when it is a GPU: a resume may see other GPUs
    (another CUDA_VISIBLE_DEVICES, a smaller node), and each rank draws on its own only."""
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
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    p, n = state["python"], state["numpy"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or device.type != "cuda":
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    if isinstance(cuda, list):  # an older checkpoint's get_rng_state_all(): every GPU its writer saw
        if len(cuda) == 1:  # a writer that saw its own GPU only (one per process)
            cuda = cuda[0]
        elif index < len(cuda):
            cuda = cuda[index]
        else:
            return
    torch.cuda.set_rng_state(cuda, index)


# -- the weights export ----------------------------------------------------------------------------


def write_export(folder: str, weights: dict[str, dict[str, torch.Tensor]], config_yaml: str, info: dict) -> None:
    """weights.safetensors (E, G, T; ``info`` in its metadata, as JSON strings) and config.yaml."""
    nets = [*NETWORKS, EMA_NETWORK] if weights.get(EMA_NETWORK) else NETWORKS
    flat = {f"{net}.{key}": tensor.contiguous() for net in nets for key, tensor in weights[net].items()}
    meta = {"format": "meg-weights-1", "version": package_version(), **{k: json.dumps(v) for k, v in info.items()}}
    save_file(flat, os.path.join(folder, WEIGHTS_FILE), metadata=meta)
    with write_replacing(os.path.join(folder, CONFIG_FILE)) as f:
        f.write(config_yaml)


def load_export(checkpoint: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict, str]:
    """(E's, G's and T's state dicts, and G's average under "generator_ema" when the run kept one; the
    export's metadata; the config.yaml text) of a checkpoint."""
    path = os.path.join(checkpoint, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{checkpoint} has no {WEIGHTS_FILE}: not a checkpoint, or written by a version before the weights "
            "export (retrain, or sample it with that version)"
        )
    weights: dict[str, dict[str, torch.Tensor]] = {net: {} for net in (*NETWORKS, EMA_NETWORK)}
    try:
        with safe_open(path, framework="pt") as f:
            raw = f.metadata() or {}
            for name in f.keys():
                net, key = name.split(".", 1) if "." in name else ("", name)
                if net not in weights:
                    raise ValueError(f"a tensor {name!r} of no network ({', '.join(weights)})")
                weights[net][key] = f.get_tensor(name)
        info = {k: (v if k in ("format", "version") else json.loads(v)) for k, v in raw.items()}
    except (SafetensorError, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable weights file: {short_message(e)}") from None
    if not weights[EMA_NETWORK]:
        del weights[EMA_NETWORK]
    with open(os.path.join(checkpoint, CONFIG_FILE)) as f:
        return weights, info, f.read()


def load_tensors(path: str, map_location=None):
    """``torch.load(path, weights_only=True)``: a file holding anything but tensors, numbers and
    containers is refused naming the file (such a file is not unpickled, whatever it holds)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} holds objects other than tensors and numbers: refused (nothing in a checkpoint is unpickled)"
        ) from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable torch file: {short_message(e)}") from None
    except (KeyError, IndexError, AssertionError, TypeError, AttributeError, OverflowError, struct.error) as e:
        # What the weights-only unpickler raises on stray bytes (a text file, a damaged legacy file)
        raise CheckpointError(f"{path} is not a readable torch file ({type(e).__name__}: {short_message(e)})") from None


def parameter_norms(weights: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """Each network's norm over its floating-point tensors (fp32), as a checkpoint records it."""
    norms = {}
    for net, tensors in weights.items():
        parts = [t.detach().float().norm() for t in tensors.values() if t.is_floating_point()]
        norms[net] = float(torch.stack(parts).norm()) if parts else 0.0
    return norms


def weights_damage(weights: dict[str, dict[str, torch.Tensor]], recorded: dict, max_norm: float = 0.0) -> str | None:
    """What is wrong with loaded weights: a non-finite parameter, a norm past ``max_norm`` (0: no
    bound), or one that differs from the norm recorded when the checkpoint was saved."""
    for net, norm in parameter_norms(weights).items():
        if not math.isfinite(norm):
            return f"{WEIGHTS_FILE}: non-finite parameters in {net}"
        if max_norm > 0 and norm > max_norm:
            return f"{WEIGHTS_FILE}: {net}'s parameter norm {norm:.4g} is past train.guard.max_param_norm={max_norm:g}"
        saved = recorded.get(net) if isinstance(recorded, dict) else None
        if isinstance(saved, int | float) and abs(norm - saved) > NORM_TOLERANCE * max(1.0, abs(saved)):
            return f"{WEIGHTS_FILE}: {net}'s parameter norm is {norm:.6g}, {saved:.6g} when it was saved"
    return None


# -- what a checkpoint holds, and whether it still does ------------------------------------------


def _sha256(path: str, sync: bool = False) -> str:
    """``path``'s sha256; ``sync``: its contents synced to disk too, while it is open for hashing."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _sync_folder(path: str) -> None:
    """Syncs ``path``'s entries (files created, renamed or removed in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_list(folder: str) -> None:
    """files.json: the size and sha256 of every file in ``folder`` (written last, by the main process).
    Every file, files.json and every folder in ``folder`` are synced to disk when it returns: whoever
    wrote them (this module, torch.save, DeepSpeed), each file is synced in the pass that hashes it."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel != FILES_FILE:
                files[rel] = {"size": os.path.getsize(path), "sha256": _sha256(path, sync=True)}
        if root != folder:
            _sync_folder(root)
    with write_replacing(os.path.join(folder, FILES_FILE), sync=True) as f:
        json.dump({"version": package_version(), "files": dict(sorted(files.items()))}, f, indent=1)
    _sync_folder(folder)


MISSING_FILE_LIST = f"{FILES_FILE} is missing (an incomplete copy, or a checkpoint of an older version)"


def damage(folder: str) -> str | None:
    """What is wrong with a checkpoint folder (naming the file), or None when it is intact: every
    file as files.json lists it, and trainer_state.json, config.yaml and the weights' header readable."""
    try:
        with open(os.path.join(folder, FILES_FILE)) as f:
            files = json.load(f)["files"]
        files = {str(rel): (int(e["size"]), str(e["sha256"])) for rel, e in files.items()}
    except FileNotFoundError:
        problem = content_damage(folder)
        return MISSING_FILE_LIST + (f", and {problem}" if problem else "")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{FILES_FILE} is unreadable: {short_message(e)}"
    for rel, (size, sha256) in files.items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        found = os.path.getsize(path)
        if found != size:
            return f"{rel} has {found} bytes, {size} were written"
        if _sha256(path) != sha256:
            return f"{rel} has changed since it was written (its sha256 differs)"
    return content_damage(folder)


def content_damage(folder: str) -> str | None:
    """What keeps a checkpoint's own files from loading (naming the file), files.json aside: its
    trainer_state.json (a step that matches the folder's name), config.yaml and the weights' header."""
    import yaml

    try:
        with open(os.path.join(folder, STATE_FILE)) as f:
            saved = json.load(f)
        probe = TrainState()
        probe.load_json(saved)
        if probe.step < 0 or (CHECKPOINT_RE.match(os.path.basename(folder)) and probe.step != checkpoint_step(folder)):
            return f"{STATE_FILE} says step {probe.step}, the folder's name another"
        if not (math.isfinite(probe.lr_scale) and probe.lr_scale > 0):
            return f"{STATE_FILE} holds lr_scale {probe.lr_scale}"
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        return f"{STATE_FILE} is unreadable: {short_message(e)}"
    try:
        with open(os.path.join(folder, CONFIG_FILE)) as f:
            config_from_yaml(f.read(), CONFIG_FILE)  # a mapping: an empty file or a list was a traceback
    except FileNotFoundError:
        return f"{CONFIG_FILE} is missing"
    except (OSError, ValueError, TypeError, RecursionError, yaml.YAMLError) as e:
        return f"{CONFIG_FILE} is unreadable: {short_message(e)}"
    try:
        with safe_open(os.path.join(folder, WEIGHTS_FILE), framework="pt") as f:
            raw = f.metadata() or {}
            names = list(f.keys())
        json.loads(raw.get("sample_shape", "null"))
        if not names or any(name.split(".", 1)[0] not in (*NETWORKS, EMA_NETWORK) for name in names):
            return f"{WEIGHTS_FILE} does not hold the three networks' tensors"
    except FileNotFoundError:
        return f"{WEIGHTS_FILE} is missing"
    except (SafetensorError, OSError, ValueError) as e:
        return f"{WEIGHTS_FILE} is unreadable: {short_message(e)}"
    return None


# -- saving and loading ----------------------------------------------------------------------------


class Checkpoints:
    """The run's checkpoint folder. ``save`` and ``load`` are collective: every rank calls them.
    ``rejected``: checkpoints this process found damaged."""

    def __init__(
        self, folder: str, keep: int, config_yaml: str, info: dict, max_norm: float = 0.0, keep_first: bool = False
    ):
        self.folder, self.keep, self.config_yaml, self.info = folder, keep, config_yaml, info
        self.max_norm, self.keep_first = max_norm, keep_first  # keep_first: keep step 0 for the guard
        self.verified: dict[str, bool] = {}  # path: intact as its files.json says (checked once)
        self.rejected: set[str] = set()

    def list(self) -> list[str]:
        return list_checkpoints(self.folder)

    def newest_intact(self, runtime) -> str | None:
        """The newest checkpoint whose files are as written (or, without files.json, that loads), or
        None; the main process checks (newest first, naming what is wrong with each damaged one) and
        every rank gets its answer."""
        found, chosen = self.list(), -1
        if runtime.is_main:
            for i in range(len(found) - 1, -1, -1):
                if found[i] in self.rejected:
                    continue
                problem = damage(found[i])
                self.verified[found[i]] = problem is None
                if problem == MISSING_FILE_LIST:
                    log.warning(
                        "checkpoint %s has no %s, so its files cannot be verified: using it unverified "
                        "(it is never pruned or overwritten)",
                        found[i],
                        FILES_FILE,
                    )
                if problem is None or problem == MISSING_FILE_LIST:
                    chosen = i
                    break
                log.warning("checkpoint %s is damaged: %s; trying the one before it", found[i], problem)
        if runtime.world_size > 1:
            chosen = int(runtime.sum_across_ranks(torch.tensor([chosen + 1], device=runtime.device)).item()) - 1
        return found[chosen] if chosen >= 0 else None

    def none_intact(self) -> CheckpointError:
        """The error of a resume that found checkpoints but none it could load: starting from scratch
        beside them would spend the run's compute again unasked (a requeued job, over and over)."""
        return CheckpointError(
            f"every checkpoint in {self.folder} is damaged (the warnings above say what is wrong with each): "
            "restore one, or start over with checkpoint.resume=false, which moves them to previous-<UTC time>/"
        )

    def save(self, runtime, state: TrainState, extra: dict[str, dict[str, torch.Tensor]] | None = None) -> str:
        """Writes ``step_XXXXXXXX`` (a folder already there is moved aside, never overwritten), then
        prunes. ``extra``: weights the trainer keeps beside the engines' (the generator's EMA). A full
        disk or another OSError is a CheckpointError naming the folder; the partial folder is removed
        and the older checkpoints stay as they were."""
        final = os.path.join(self.folder, f"step_{state.step:08d}")
        partial = final + ".partial"
        # Every rank's stream position, in rank order.
        mine = torch.tensor([state.position.epoch, state.position.batches_done], device=runtime.device)
        state.rank_positions = [{"epoch": e, "batches_done": b} for e, b in runtime.all_gather(mine).tolist()]
        state.sample_order = self._sample_order(runtime.world_size)
        weights = {**runtime.fp32_state_dicts(), **(extra or {})}  # a collective under DeepSpeed

        def prepare() -> None:
            state.param_norms = parameter_norms(weights)
            make_dir(self.folder)
            _remove(partial)  # a killed save's leftover
            for name in os.listdir(self.folder):  # a killed prune's (see _prune): its space, before ours is taken
                if name.endswith(PRUNING_SUFFIX) and CHECKPOINT_RE.match(name.removesuffix(PRUNING_SUFFIX)):
                    _remove(os.path.join(self.folder, name))
            os.mkdir(partial)

        def write_part() -> None:
            # The engine's first: DeepSpeed's save is collective, and every rank must reach it (see
            # DeepSpeedRuntime.save_engine_state); a failure of this rank's own files is agreed on after.
            runtime.save_engine_state(os.path.join(partial, ENGINE_DIR))
            torch.save(rng_state(runtime.device), os.path.join(partial, f"rng_rank{runtime.rank}.pt"))
            if runtime.is_main:
                write_export(partial, weights, self.config_yaml, {**self.info, "step": state.step})
                with write_replacing(os.path.join(partial, STATE_FILE)) as f:
                    json.dump(state.to_json(), f, indent=2)

        def publish() -> None:
            write_file_list(partial)  # after every rank's files
            self._publish(partial, final)

        # Each stage ends with the ranks agreeing that every one of them succeeded (in place of a
        # barrier): a rank whose write failed raises while the others would pass a barrier on its
        # way out (Runtime.shutdown's), and the checkpoint would be published without its files.
        for stage, everyone in ((prepare, False), (write_part, True), (publish, False)):
            failure = _write_failure_of(stage) if everyone or runtime.is_main else None
            failed = runtime.sum_across_ranks(torch.tensor([float(failure is not None)], device=runtime.device))
            if failed.item():
                if runtime.is_main:
                    _remove(partial)
                raise _save_error(final, failure)
        if runtime.is_main:
            self._prune(final)
        runtime.barrier()
        return final

    def set_aside_fled(self, runtime, path: str) -> None:
        """Renames the checkpoint ``path`` the guard fled to ``path.fled`` (``.fled2``, ... when taken)
        on the main process, then meets the other ranks (their listings must agree after it)."""
        if runtime.is_main:
            aside, n = path + FLED_SUFFIX, 1
            while os.path.lexists(aside):
                n += 1
                aside = f"{path}{FLED_SUFFIX}{n}"
            os.rename(path, aside)
            _sync_folder(self.folder)
            self.verified.pop(path, None)
            log.warning("checkpoint %s diverges again at the next step: kept as %s, which no resume takes", path, aside)
        runtime.barrier()

    def _publish(self, partial: str, final: str) -> None:
        """``partial`` renamed to ``final``; a folder already at ``final`` (a checkpoint of another
        trajectory, or one without files.json) is kept as ``final.replaced`` (then .replaced2, ...)."""
        aside = None
        if os.path.lexists(final):
            aside, n = final + ".replaced", 1
            while os.path.lexists(aside):
                n += 1
                aside = f"{final}.replaced{n}"
            os.rename(final, aside)
            log.warning("checkpoint %s was already there: kept as %s", final, aside)
        try:
            os.rename(partial, final)
        except OSError:
            if aside is not None:
                os.rename(aside, final)
            raise
        _sync_folder(self.folder)  # the rename on disk before _prune deletes any older checkpoint
        self.verified[final] = True
        self.rejected.discard(final)

    def _prune(self, written: str) -> None:
        """Keeps the newest ``keep`` of the checkpoints found intact (files.json and all), the one just
        written and, with ``keep_first``, step 0; deletes only the other intact ones. Each is renamed to
        ``step_N.pruning`` before it is deleted: a prune cut short (the process killed) leaves no
        half-deleted checkpoint among the listed ones (damaged, it was never pruned again, and a restart
        could take it for an older version's); the next save deletes what is left of it before it writes."""
        intact = [p for p in self.list() if p not in self.rejected and self._intact(p)]
        keep = set(intact[-self.keep :]) | {written}
        if self.keep_first and intact and checkpoint_step(intact[0]) == 0:
            keep.add(intact[0])
        for old in intact:
            if old not in keep:
                try:
                    os.rename(old, old + PRUNING_SUFFIX)
                except OSError:  # kept: pruning frees space, it is never the reason a run stops
                    continue
                self.verified.pop(old, None)
                shutil.rmtree(old + PRUNING_SUFFIX, ignore_errors=True)

    def _sample_order(self, world_size: int) -> dict[str, int]:
        """This run's sample_order, from the configuration it writes into its checkpoints."""
        return sample_order(config_from_yaml(self.config_yaml, "the run's configuration"), world_size)

    def _intact(self, path: str) -> bool:
        if path not in self.verified:
            self.verified[path] = damage(path) is None
        return self.verified[path]

    def load(self, path: str, runtime, state: TrainState, restore_extra=None) -> None:
        """Restores ``path``. Everything is read and checked first (the weights finite and as large
        as when they were saved): a damaged checkpoint is a CheckpointError naming the file, on every
        rank, and nothing of it is restored; an engine file that one rank cannot restore is a
        CheckpointError on every rank too (whatever the others restored, the next load replaces).
        ``restore_extra(weights)``: restores what ``save``'s ``extra`` held."""
        problem, rng, saved = None, None, {}
        try:
            weights, _, _ = load_export(path)
            state_file = os.path.join(path, STATE_FILE)
            with open(state_file) as f:
                saved = json.load(f)
            try:
                TrainState().load_json(saved)  # validated before anything is restored
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{state_file} is damaged: {type(e).__name__}: {short_message(e)}") from None
            problem = weights_damage(weights, saved.get("param_norms", {}), self.max_norm)
            rng_path = os.path.join(path, f"rng_rank{runtime.rank}.pt")
            if os.path.isfile(rng_path):  # absent when the run grew: the new ranks keep their fresh seeds
                rng = load_tensors(rng_path)
        except CheckpointError as e:
            problem = str(e)
        except (OSError, ValueError, AttributeError) as e:
            problem = f"{STATE_FILE} is unreadable: {short_message(e)}"
        _agree_on(runtime, path, problem, "another rank could not read it")
        # Restoring reads the engine's files (on each node, which may see another copy): a rank that
        # fails alone would try the checkpoint before it while the others trained on, each side
        # waiting for the other in its next collective. Every rank takes the same way instead.
        problem = None
        try:
            runtime.restore(os.path.join(path, ENGINE_DIR), weights)
            if restore_extra is not None:
                restore_extra(weights)
        except CheckpointError as e:
            problem = str(e)
        _agree_on(runtime, path, problem, "another rank could not restore it")
        if rng is not None:
            set_rng_state(rng, runtime.device)
        state.sample_order = self._sample_order(runtime.world_size)
        changed = state.load_json(saved)
        if changed and runtime.is_main:
            log.warning(
                "checkpoint %s was saved with other data settings (%s): its stream position does not carry "
                "over, so the stream starts epoch %d afresh (nothing seen twice; the rest of an interrupted "
                "epoch is skipped). Set them back to resume exactly where it stopped",
                path, ", ".join(changed), state.position.epoch,
            )  # fmt: skip

    def load_newest(self, runtime, state: TrainState, path: str | None, restore_extra=None) -> str | None:
        """Loads ``path`` or, when it turns out damaged, the newest intact checkpoint before it;
        returns the one loaded (None: none could be)."""
        while path is not None:
            try:
                self.load(path, runtime, state, restore_extra)
                return path
            except CheckpointError as e:
                if runtime.is_main:
                    log.warning("%s; trying the one before it", e)
                self.rejected.add(path)
                path = self.newest_intact(runtime)
        return None


def _agree_on(runtime, path: str, problem: str | None, elsewhere: str) -> None:
    """Raises the CheckpointError of ``path`` on every rank when ``problem`` is not None on any
    (``elsewhere``: what the ranks without a problem of their own say)."""
    if runtime.world_size > 1:
        failed = runtime.sum_across_ranks(torch.tensor([float(problem is not None)], device=runtime.device))
        if failed.item() and problem is None:
            problem = elsewhere
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")


def _remove(path: str) -> None:
    """Removes a folder of this module's own (a partial save): a link is unlinked, never followed."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


def _write_failure_of(write: Callable[[], None]) -> BaseException | None:
    """Runs ``write``; returns the failure of a write (an OSError, a safetensors or torch writer
    error), None when it succeeded. Any other error is raised."""
    try:
        write()
    except (OSError, SafetensorError) as e:
        return e
    except RuntimeError as e:
        if not _write_failure(e):
            raise
        return e
    return None


def _save_error(final: str, error: BaseException | None) -> CheckpointError:
    """The CheckpointError of a save that failed with ``error`` here (None: on another rank)."""
    if error is None:
        cause = "another rank could not write its part (its error says why)"
    elif isinstance(error, OSError) and error.strerror:
        cause = f"{error.strerror} ({error.filename})" if error.filename else error.strerror
    elif isinstance(error, RuntimeError):  # torch's writer says neither which file nor why
        cause = "torch could not write a file (a full disk, a quota or a file size limit?)"
    else:
        cause = short_message(error)
    hint = "; free some space and rerun to resume" if error is not None and _is_disk_full(error) else ""
    return CheckpointError(f"could not write checkpoint {final}: {cause}; the older checkpoints are as they were{hint}")


def _is_disk_full(error: BaseException) -> bool:
    return getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error)


def _write_failure(error: RuntimeError) -> bool:
    """torch.save's error for a failed write (a full disk, a file size limit): a RuntimeError from its
    C++ zip writer (inline_container.cc), which names neither the file nor the cause."""
    text = str(error)
    markers = ("PytorchStreamWriter", "inline_container", "file write failed")
    return any(m in text for m in markers) or _is_disk_full(error)
