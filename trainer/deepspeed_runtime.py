"""The DeepSpeed engine (ZeRO stages 0, 1, 2) behind the same small interface as ``Runtime``:
one ``deepspeed.initialize`` per update (E; G and T in one container), driven directly.

What stack-notes verified and this module follows: the gradient penalty fails when it runs through
``engine(x)`` (DeepSpeed's hooks fire inside the inner autograd.grad), so every forward goes through
``engine.module``, and the networks not being updated are frozen (the trainer does that). ZeRO-3
fails under the penalty's double backward and is refused. accelerate still forms the process group
and does the reductions; DeepSpeed reuses that group. Every rank saves (each owns optimizer shards).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import random
import socket

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from trainer.config import ZERO3_REFUSAL, ConfigError, DeepSpeedConfig
from trainer.distributed import Runtime


class GeneratorAndStatistics(nn.Module):
    """G and T as one module, so that one engine (one optimizer) updates both on one loss."""

    def __init__(self, generator: nn.Module, statistics: nn.Module):
        super().__init__()
        self.generator, self.statistics = generator, statistics

    def forward(self, *args):  # never called: the trainer calls the two networks directly
        raise RuntimeError("call .generator or .statistics")


class EngineUpdate:
    """One MEG update on one DeepSpeed engine (same interface as ``distributed.Update``)."""

    def __init__(self, engine, names: list[str]):
        self.engine = engine
        # The update's own forward uses the bare modules too: see the module docstring.
        self.modules = {n: getattr(engine.module, n) for n in names} if len(names) > 1 else {names[0]: engine.module}
        self.nets = self.modules
        # The skip flag as a device tensor, like every metric (made once: a new one per step would
        # be a host-to-device copy).
        self._skipped = {flag: torch.tensor(float(flag), device=engine.device) for flag in (False, True)}

    @property
    def param_groups(self) -> list[dict]:
        return self.engine.optimizer.param_groups

    def penalty_scale(self) -> float:
        # DeepSpeed's fp16 optimizers multiply the loss by their dynamic scale inside backward(); the
        # penalty's inner gradient uses the same scale and divides it back out before the norm.
        return float(getattr(self.engine.optimizer, "loss_scale", 1.0)) if self.engine.fp16_enabled() else 1.0

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> torch.Tensor:
        self.engine.step()
        _broadcast_buffers(self.engine.module)  # DDP's behaviour (e.g. BatchNorm statistics of rank 0)
        return self._skipped[not self.engine.was_step_applied()]


def _broadcast_buffers(module: nn.Module) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def deepspeed_config(cfg: DeepSpeedConfig, mixed_precision: str, batch_per_rank: int, world_size: int) -> dict:
    """The JSON file's settings with the keys the trainer owns filled in (stage, precision, batch)."""
    ds: dict = {}
    if cfg.config_file:
        try:
            with open(cfg.config_file) as f:
                ds = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"deepspeed.config_file={cfg.config_file!r}: {e}") from None
    zero = dict(ds.get("zero_optimization", {}))
    if zero.get("stage", cfg.zero_stage) == 3:
        raise ConfigError(f"{cfg.config_file} sets zero_optimization.stage=3: {ZERO3_REFUSAL}")
    if zero.get("stage", cfg.zero_stage) != cfg.zero_stage:
        raise ConfigError(
            f"{cfg.config_file} sets zero_optimization.stage={zero['stage']} but "
            f"deepspeed.zero_stage={cfg.zero_stage}: make them agree"
        )
    for key in ("bf16", "fp16"):
        if ds.get(key, {}).get("enabled") and mixed_precision != key:
            raise ConfigError(
                f"{cfg.config_file} enables {key}; set train.mixed_precision={key} instead "
                "(precision is one setting, owned by the trainer config)"
            )
    zero["stage"] = cfg.zero_stage
    ds.update(
        {
            "train_micro_batch_size_per_gpu": batch_per_rank,
            "gradient_accumulation_steps": 1,
            "train_batch_size": batch_per_rank * world_size,
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,  # the trainer's own torch Adam
            "bf16": {**ds.get("bf16", {}), "enabled": mixed_precision == "bf16"},
            # Dynamic loss scaling (loss_scale 0) from 2**15 (see FP16_INIT_SCALE); overflowing steps are skipped.
            "fp16": {
                "loss_scale": 0,
                "initial_scale_power": 15,
                **ds.get("fp16", {}),
                "enabled": mixed_precision == "fp16",
            },
        }
    )
    ds.setdefault("steps_per_print", 10**9)
    return ds


class DeepSpeedRuntime(Runtime):
    """``Runtime`` with DeepSpeed engines for the two updates."""

    def __init__(self, mixed_precision: str, cfg: DeepSpeedConfig, batch_size: int):
        super().__init__(mixed_precision)
        if batch_size % self.world_size:
            raise ConfigError(f"data.batch_size={batch_size} must be divisible by the {self.world_size} ranks")
        if not dist.is_initialized():
            # One process (no launcher): DeepSpeed still wants a process group; a group of one.
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
                os.environ.setdefault(key, value)
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.ds_config = deepspeed_config(cfg, mixed_precision, batch_size // self.world_size, self.world_size)
        self.engines: dict[str, object] = {}
        self._registered: list = []

    def prepare_updates(self, energy, generator, statistics, energy_opt, generator_opt):
        import deepspeed  # imported here: it is slow to import and only this engine needs it

        def engine(model, optimizer):
            # A copy per engine: DeepSpeed writes into the config dict it is given.
            eng, *_ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=copy.deepcopy(self.ds_config), dist_init_required=False
            )
            return eng

        self.engines = {
            "energy": engine(energy, energy_opt),
            "generator": engine(GeneratorAndStatistics(generator, statistics), generator_opt),
        }
        return (
            EngineUpdate(self.engines["energy"], ["energy"]),
            EngineUpdate(self.engines["generator"], ["generator", "statistics"]),
        )

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def for_evaluation(self, module: nn.Module) -> nn.Module:
        # DeepSpeed's bf16/fp16 modes keep the module's weights in low precision (fp32 masters live in
        # the optimizer): evaluation and sampling run on an fp32 copy.
        low = next(module.parameters()).dtype != torch.float32
        return copy.deepcopy(module).float() if low else module

    def register_for_checkpointing(self, *objects) -> None:
        self._registered.extend(objects)

    def _save_state(self, folder: str) -> None:
        for name, eng in self.engines.items():
            eng.save_checkpoint(folder, tag=name, save_latest=False)  # collective: every rank writes its shards
        with open(os.path.join(folder, f"random_states_{self.rank}.pkl"), "wb") as f:
            pickle.dump(_rng_states(), f)
        if self.is_main:
            torch.save([o.state_dict() for o in self._registered], os.path.join(folder, "trainer_state.pt"))

    def load_checkpoint(self, path: str) -> None:
        for name, eng in self.engines.items():
            loaded, _ = eng.load_checkpoint(path, tag=name)
            if loaded is None:
                raise FileNotFoundError(f"{path}/{name}: no DeepSpeed checkpoint (was it saved by the ddp engine?)")
        states = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
        for obj, state in zip(self._registered, states, strict=True):
            obj.load_state_dict(state)
        rng = os.path.join(path, f"random_states_{self.rank}.pkl")
        if os.path.exists(rng):
            with open(rng, "rb") as f:
                _set_rng_states(pickle.load(f))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
