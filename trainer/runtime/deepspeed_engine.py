"""The DeepSpeed runtime (ZeRO stages 0, 1, 2): one ``deepspeed.initialize`` per update (E; G and T in
one container), driven directly, on the shared process-group services (no accelerate).

What was verified here (DeepSpeed 0.19) and this module follows: the gradient penalty fails through
``engine(x)`` (DeepSpeed's hooks fire inside the inner autograd.grad), so every forward goes through
``engine.module``, and the networks not being updated are frozen (the steps do that). ZeRO-3 fails
under the penalty's double backward and is refused. Every rank saves (each owns optimizer shards).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from data_pipeline.cli import CheckpointError
from trainer.config import ZERO3_REFUSAL, DeepSpeedConfig, DeepSpeedConfigError
from trainer.runtime.group import ProcessGroup, join_process_group, refuse_accelerate_deepspeed


class GeneratorAndStatistics(nn.Module):
    """G and T as one module, so that one engine (one optimizer) updates both on one loss."""

    def __init__(self, generator: nn.Module, statistics: nn.Module):
        super().__init__()
        self.generator, self.statistics = generator, statistics

    def forward(self, *args):  # never called: the trainer calls the two networks directly
        raise RuntimeError("call .generator or .statistics")


class EngineUpdate:
    """One MEG update on one DeepSpeed engine (the ``trainer.runtime.Update`` protocol)."""

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

    def discard_step(self) -> None:
        self.engine.zero_grad()  # DeepSpeed's steps are never captured (trainer/capture.py)

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
            raise DeepSpeedConfigError(f"deepspeed.config_file={cfg.config_file!r}: {e}") from None
    zero = dict(ds.get("zero_optimization", {}))
    if zero.get("stage", cfg.zero_stage) == 3:
        raise DeepSpeedConfigError(f"{cfg.config_file} sets zero_optimization.stage=3: {ZERO3_REFUSAL}")
    if zero.get("stage", cfg.zero_stage) != cfg.zero_stage:
        raise DeepSpeedConfigError(
            f"{cfg.config_file} sets zero_optimization.stage={zero['stage']} but "
            f"deepspeed.zero_stage={cfg.zero_stage}: make them agree"
        )
    for key in ("bf16", "fp16"):
        if ds.get(key, {}).get("enabled") and mixed_precision != key:
            raise DeepSpeedConfigError(
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


class DeepSpeedRuntime(ProcessGroup):
    """DeepSpeed engines for the two updates, on a process group of torch.distributed's own."""

    def __init__(self, mixed_precision: str, cfg: DeepSpeedConfig, batch_size: int, collective_timeout: float = 600.0):
        refuse_accelerate_deepspeed()
        # The timeout bounds every collective, DeepSpeed's too (train.collective_timeout).
        device = join_process_group(collective_timeout)
        super().__init__(device, dist.get_rank(), dist.get_world_size(), mixed_precision)
        if batch_size % self.world_size:
            raise DeepSpeedConfigError(f"data.batch_size={batch_size} must be divisible by the {self.world_size} ranks")
        self.ds_config = deepspeed_config(cfg, mixed_precision, batch_size // self.world_size, self.world_size)
        self.engines: dict[str, object] = {}

    def prepare_updates(self, energy, generator, statistics, energy_opt, generator_opt):
        import deepspeed  # imported here: it is slow to import and only this engine needs it

        def engine(model, optimizer):
            # A copy per engine: DeepSpeed writes into the config dict it is given.
            eng, *_ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=copy.deepcopy(self.ds_config), dist_init_required=False
            )
            eng.checkpoint_engine = _weights_only_checkpoint_engine()
            return eng

        self.engines = {
            "energy": engine(energy, energy_opt),
            "generator": engine(GeneratorAndStatistics(generator, statistics), generator_opt),
        }
        return (
            EngineUpdate(self.engines["energy"], ["energy"]),
            EngineUpdate(self.engines["generator"], ["generator", "statistics"]),
        )

    def for_evaluation(self, module: nn.Module) -> nn.Module:
        """Under bf16/fp16 DeepSpeed keeps the module's weights in low precision (the fp32 masters live
        in the optimizer): evaluation runs on an fp32 copy holding the masters, the very weights the
        checkpoint exports. A collective: every rank calls it."""
        if next(module.parameters()).dtype == torch.float32:
            return module
        fp32 = copy.deepcopy(module).float()
        fp32.load_state_dict(_fp32_state(module))
        return fp32

    def fp32_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """E's, G's and T's weights in fp32 on the CPU: under bf16/fp16 the fp32 masters, gathered from
        the ZeRO partitions (a collective: every rank calls it)."""
        out = {}
        for engine in self.engines.values():
            module = engine.module
            names = ["generator", "statistics"] if isinstance(module, GeneratorAndStatistics) else ["energy"]
            for name in names:
                net = getattr(module, name) if len(names) > 1 else module
                out[name] = {key: value.cpu() for key, value in _fp32_state(net).items()}
        return out

    def save_engine_state(self, folder: str) -> None:
        # DeepSpeed's save meets the other ranks in barriers of its own, after each write: a rank whose write
        # failed and raised at once would wait in the ranks' agreement on the save (trainer/checkpoint.py)
        # while the others waited in such a barrier, until train.collective_timeout, its failure unsaid
        # (and under NCCL, where a barrier is an all-reduce, the two could even pair up). So every write's
        # failure is held until all engines are saved, all ranks through every barrier, then raised.
        failures: list[Exception] = []
        for name, eng in self.engines.items():
            with _writes_failing_later(eng, failures):
                eng.save_checkpoint(folder, tag=name, save_latest=False)  # collective: every rank writes its shards
        if failures:
            raise failures[0]

    def restore(self, folder: str, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        """The engines (weights, fp32 masters, optimizer shards) from DeepSpeed's own files."""
        for name, eng in self.engines.items():
            loaded, _ = eng.load_checkpoint(folder, tag=name)
            if loaded is None:
                raise CheckpointError(f"{folder}/{name}: no DeepSpeed checkpoint (was it saved by the ddp engine?)")

    def shutdown(self, meet: bool = True) -> None:
        self.engines.clear()  # the engines hold the process group
        super().shutdown(meet)


# Where DeepSpeed's save touches the file system: its checkpoint engine's writes, and the recovery
# scripts rank 0 copies beside its shard (shutil.copyfile, outside the checkpoint engine).
WRITES = (("checkpoint_engine", "makedirs"), ("checkpoint_engine", "save"), (None, "_copy_recovery_script"))


@contextlib.contextmanager
def _writes_failing_later(engine, failures: list[Exception]) -> Iterator[None]:
    """The DeepSpeed engine with its file operations (WRITES) recording their failures in ``failures``
    instead of raising them, for as long as the block runs."""

    def held(operation):
        def run(*args, **kwargs):
            try:
                return operation(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 (raised after the barriers: see save_engine_state)
                failures.append(e)

        return run

    owners = [(getattr(engine, owner) if owner else engine, name) for owner, name in WRITES]
    for obj, name in owners:
        setattr(obj, name, held(getattr(obj, name)))
    try:
        yield
    finally:
        for obj, name in owners:
            delattr(obj, name)  # the class's own again


def _fp32_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """``net``'s state dict in fp32 with every parameter's fp32 master in place of its own (low-precision)
    weight. ``safe_get_full_fp32_param`` assembles a master from the ZeRO partitions: a collective."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {n: safe_get_full_fp32_param(p) for n, p in net.named_parameters()}
    state = {}
    for key, value in net.state_dict().items():
        master = masters.get(key)
        state[key] = (master if master is not None else value).detach().float()
    return state


def _weights_only_checkpoint_engine():
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True``: its files hold tensors,
    numbers and containers, plus three small DeepSpeed types allowed by name. Its own loader unpickles
    anything (``weights_only=False``), so a tampered checkpoint could run code on resume."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            from trainer.checkpoint import load_tensors  # names the file it refuses

            with torch.serialization.safe_globals(allowed):
                return load_tensors(path, map_location=map_location)

    return WeightsOnlyCheckpointEngine()
