"""The MEG training step as a standalone object: n energy steps, then one generator + statistics step.

Built from a config, a runtime and the networks, with no stream, logger or signal handlers, so the
trainer, benches and tests drive the same code:

    steps = build_steps(cfg, runtime, nets)
    metrics = steps.iteration(step, next_batch)   # 0-dim tensors on runtime.device, no host sync

What makes it fast (bench/bench_penalty.py measures each piece):
- E runs on the real and the fake batch separately (models/objectives.py, energy_loss);
- the outer backward takes E's parameters only (no gradient into the data batch);
- fused Adam: one kernel for all parameters, and no host sync under fp16 loss scaling;
- ``model.kernels``: fused bias+LeakyReLU, gradfix convolutions and a one-kernel penalty reduction;
- ``train.penalty_every``: the penalty on every k-th energy step only, weighted k (lazy penalty);
- ``train.capture``: each step captured once as a CUDA graph and replayed (trainer/capture.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from models.entropy import dv_bound, infonce_bound, new_dv_state, nwj_bound, smile_bound, vera_entropy
from models.factory import MEGNetworks
from models.mala import latent_mala
from models.objectives import energy_loss, generator_loss, random_permutation
from models.ops import EAGER, FUSED, FusedOps, kernels_for
from models.ops.kernels import triton_available
from trainer.capture import GraphedStep, capture_blocker
from trainer.checkpoint import EMA_NETWORK
from trainer.config import ConfigError, OptimConfig, RunConfig
from trainer.ema import GeneratorEMA
from trainer.runtime import frozen


def resolve_kernels(cfg: RunConfig, runtime) -> FusedOps:
    """model.kernels for this run. auto: fused where the step is captured as a CUDA graph, eager
    elsewhere. The fused ops do not reduce the step's launches (counted on the four networks: about
    as many as eager), they add Python per launch, and on a CPU their reference kernels are slower
    than PyTorch's own; they pay inside a captured step, where launches and Python cost nothing per
    replay. fused: always (on a CPU the reference kernels run, Triton's under TRITON_INTERPRET=1)."""
    choice, device = cfg.model.kernels, runtime.device
    if choice == "eager":
        return EAGER
    if choice == "auto":
        return FUSED if capture_blocker(cfg, runtime) is None and triton_available() else EAGER
    if device.type == "cuda" and not triton_available():
        raise ConfigError("model.kernels=fused needs Triton on CUDA (pip install triton), or use model.kernels=auto")
    return FUSED


def make_optimizer(params, cfg: OptimConfig, device: torch.device, capturable: bool) -> torch.optim.Adam:
    """Adam with the fused kernel (one launch for every parameter; under fp16 it skips an overflowing
    step on the device, where the unfused path reads the overflow flag on the host). For a captured
    step the learning rate is a device tensor, so that a schedule can change it between replays."""
    lr = torch.tensor(cfg.lr, device=device) if capturable else cfg.lr
    return torch.optim.Adam(
        params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=True, capturable=capturable
    )


def lr_schedule(step: int, horizon: int, t) -> float:
    """The learning rates' factor at ``step``: 1, then linearly down to ``t.lr_final_factor`` over the
    last ``t.lr_decay_fraction`` of ``horizon`` steps, and that after it (``t``: the train config)."""
    decay_start = horizon * (1.0 - t.lr_decay_fraction)
    progress = min(max((step - decay_start) / max(horizon - decay_start, 1.0), 0.0), 1.0)
    return 1.0 + (t.lr_final_factor - 1.0) * progress


class MEGSteps:
    """The energy update (E) and the generator update (G and T on one optimizer) as step functions."""

    def __init__(
        self, cfg: RunConfig, runtime, energy_update, generator_update, ops: FusedOps, capture_blocked: str | None
    ):
        self.cfg, self.train_cfg, self.runtime, self.ops = cfg, cfg.train, runtime, ops
        self.energy_update, self.generator_update = energy_update, generator_update
        # The bare networks: for cross-network use (frozen), evaluation, and the rank-sync check.
        self.energy = energy_update.modules["energy"]
        self.generator = generator_update.modules["generator"]
        self.statistics = generator_update.modules["statistics"]
        # train.generator_ema: the average of G that evaluation reads (None: off), updated after each G step.
        self.ema = GeneratorEMA(self.generator, cfg.train.generator_ema) if cfg.train.generator_ema > 0 else None
        self.batch_per_rank = cfg.data.batch_size // runtime.world_size
        self.device = runtime.device
        # What the start-up line says: the fused ops in use and which kernels run them.
        self.kernel_status = ops.describe() + (f" ({kernels_for(runtime.device).name})" if ops != EAGER else "")
        self.capture = capture_blocked is None
        self.capture_status = "on (CUDA graphs)" if self.capture else f"off: {capture_blocked}"
        # autocast's weight-cast cache must be off in a CUDA graph (its casts would be captured once).
        self.autocast_cache = not self.capture
        # The entropy estimator's state (DV's moving average): device tensors updated in place inside
        # the step, so that a captured graph replays the update; TrainState saves and restores them.
        self.estimator = cfg.train.entropy_estimator
        self.entropy_state: dict[str, Tensor] = new_dv_state(self.device) if self.estimator == "dv" else {}
        if self.estimator == "infonce" and not cfg.train.entropy.infonce.negatives < self.batch_per_rank:
            raise ConfigError(
                f"train.entropy.infonce.negatives={cfg.train.entropy.infonce.negatives} must be below the batch "
                f"per rank ({self.batch_per_rank}): its negatives are the batch's other latents"
            )
        energy_fns = {flag: functools.partial(self._energy_step, penalty=flag) for flag in (True, False)}
        if self.capture:
            self._energy_fns = {
                flag: GraphedStep(fn, functools.partial(self._after_failed_capture, energy_update))
                for flag, fn in energy_fns.items()
            }
            self._generator_fn = GraphedStep(
                self._generator_step, functools.partial(self._after_failed_capture, generator_update)
            )
        else:
            self._energy_fns, self._generator_fn = energy_fns, self._generator_step

    # -- inputs -------------------------------------------------------------------------------

    def sample_z(self) -> Tensor:
        return torch.randn(self.batch_per_rank, self.cfg.model.z_dim, device=self.device)

    def sample_perm(self) -> Tensor:
        return random_permutation(self.batch_per_rank, self.device)

    def penalty_due(self, energy_step_index: int) -> bool:
        return energy_step_index % self.train_cfg.penalty_every == 0

    # -- the two updates ------------------------------------------------------------------------

    def negatives(self, z: Tensor) -> Tensor:
        if self.train_cfg.negatives == "mala":
            m = self.train_cfg.negatives_mala
            with frozen(self.energy, self.generator):  # MALA differentiates w.r.t. z only
                x = latent_mala(self.energy, self.generator, z, m.steps, m.step_size, m.temperature).x
        else:
            with torch.no_grad():
                x = self.generator(z)
        if self.estimator == "vera":  # VERA's generator is G(z) + sigma * noise
            with torch.no_grad():
                x = x + self.statistics()[0].to(x.dtype) * torch.randn_like(x)
        return x

    def energy_step(self, x_real: Tensor, z: Tensor, penalty: bool = True) -> dict[str, Tensor]:
        return self._energy_fns[penalty](x_real, z)

    def _energy_step(self, x_real: Tensor, z: Tensor, penalty: bool) -> dict[str, Tensor]:
        # G and T are frozen (DeepSpeed's hooks must see no gradient for another update's networks);
        # E's forward and its penalty go through ``nets``: the DDP wrapper, or the bare module under
        # DeepSpeed. ``scale`` is the fp16 loss scale, applied and removed around the inner grad.
        update, t = self.energy_update, self.train_cfg
        with frozen(self.generator, self.statistics), self.runtime.autocast(cache=self.autocast_cache):
            x_fake = self.negatives(z)
            loss, metrics = energy_loss(
                update.nets["energy"],
                x_real,
                x_fake,
                t.penalty_weight * t.penalty_every,
                scale=update.penalty_scale(),
                penalty=penalty,
                fused_penalty=self.ops.penalty,
            )
        update.zero_grad()
        update.backward(loss)
        metrics["skipped_steps"] = update.step()  # fp16: a step with inf/NaN gradients is not applied
        return metrics

    def generator_step(self, z: Tensor, perm: Tensor | None = None) -> dict[str, Tensor]:
        """``perm`` pairs the MI bound's negatives (drawn here when None)."""
        return self._generator_fn(z, self.sample_perm() if perm is None else perm)

    def _generator_step(self, z: Tensor, perm: Tensor) -> dict[str, Tensor]:
        # E is read through its bare module and frozen: it takes no gradient in this step.
        update = self.generator_update
        with frozen(self.energy), self.runtime.autocast(cache=self.autocast_cache):
            x_fake = update.nets["generator"](z)
            entropy = None
            if self.estimator == "vera":
                sigma, eta = update.nets["statistics"]()
                x_fake = x_fake + sigma.to(x_fake.dtype) * torch.randn_like(x_fake)
                entropy = functools.partial(self._vera, sigma=sigma, eta=eta)
            elif self.estimator != "jsd":
                entropy = functools.partial(self._mi_bound, statistics=update.nets["statistics"], perm=perm)
            loss, metrics = generator_loss(
                self.energy, update.nets["statistics"], x_fake, z, self.train_cfg.entropy_weight, perm, entropy
            )
        update.zero_grad()
        update.backward(loss)
        metrics["skipped_steps"] = update.step()
        return metrics

    def _mi_bound(self, x: Tensor, z: Tensor, statistics, perm: Tensor) -> tuple[Tensor, Tensor, None]:
        """The MI bound ``train.entropy_estimator`` names (jsd runs generator_loss's own path)."""
        e = self.train_cfg.entropy
        if self.estimator == "dv":
            reduce = self.runtime.mean_across_ranks if self.runtime.world_size > 1 else None
            objective, estimate = dv_bound(statistics, x, z, perm, self.entropy_state, e.dv.rate, reduce)
        elif self.estimator == "nwj":
            objective, estimate = nwj_bound(statistics, x, z, perm)
        elif self.estimator == "smile":
            objective, estimate = smile_bound(statistics, x, z, perm, e.smile.clip)
        else:
            objective, estimate = infonce_bound(statistics, x, z, e.infonce.negatives)
        return objective, estimate, None

    def _vera(self, x: Tensor, z: Tensor, sigma: Tensor, eta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # G(z) for the posterior's samples, with G's parameters detached: only eta (through the ELBO)
        # and the score take anything from them. Buffers are copies (BatchNorm's running statistics stay).
        generator = self.generator
        state = {k: v.detach() for k, v in generator.named_parameters()}
        state.update({k: v.clone() for k, v in generator.named_buffers()})

        def generator_mean(latent: Tensor) -> Tensor:
            return torch.func.functional_call(generator, state, (latent,))

        samples = self.train_cfg.entropy.vera.posterior_samples
        objective, estimate, posterior_loss = vera_entropy(generator_mean, x, z, sigma, eta, samples)
        # The ELBO's gradient only: the generator loss's value stays E - entropy_weight * H's estimate.
        return objective, estimate, posterior_loss - posterior_loss.detach()

    def iteration(self, step: int, next_batch: Callable[[], Tensor]) -> dict[str, Tensor]:
        """Generator step ``step`` + 1: its energy steps, then its generator step. Returns their
        metrics: the energy steps' averaged (the penalty over the steps that computed it), skipped
        steps summed, as 0-dim tensors on the device."""
        n = self.train_cfg.energy_steps
        total: dict[str, Tensor] = {}
        for i in range(n):
            metrics = self.energy_step(next_batch(), self.sample_z(), self.penalty_due(step * n + i))
            # A captured step's outputs are overwritten by its next replay: the first is copied.
            if not total:
                total = {k: v.clone() for k, v in metrics.items()}
            else:
                total = {k: total[k] + v for k, v in metrics.items()}
        out = {k: v / n for k, v in total.items() if k not in ("penalty", "penalty_steps", "skipped_steps")}
        out["penalty"] = total["penalty"] / total["penalty_steps"].clamp(min=1)
        out["penalty_steps"] = total["penalty_steps"]
        generator = self.generator_step(self.sample_z())
        if self.ema is not None:
            self.ema.update(self.generator)
        out.update({k: v for k, v in generator.items() if k != "skipped_steps"})
        out["skipped_steps"] = total["skipped_steps"] + generator["skipped_steps"]
        return out

    # -- schedule and state ---------------------------------------------------------------------

    def set_lr_factor(self, factor: float) -> None:
        """Every learning rate to its base value times ``factor`` (in place for a captured step)."""
        t = self.train_cfg
        for update, optim_cfg in ((self.energy_update, t.energy_optim), (self.generator_update, t.generator_optim)):
            for group in update.param_groups:
                lr = optim_cfg.lr * factor
                if isinstance(group["lr"], Tensor):
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr

    def _reset_graphs(self) -> None:
        """Drops the captured graphs: the next calls warm up and capture again (a step whose capture
        failed stays eager)."""
        for fn in (*self._energy_fns.values(), self._generator_fn):
            if isinstance(fn, GraphedStep):
                fn.reset()

    def _after_failed_capture(self, update) -> None:
        """Undoes the half-recorded step, and drops the graphs captured before it: they replay with the
        device generator's state from before the failure, which the failure replaced (see
        trainer/capture.py), so their random draws would repeat the eager ones' offsets and no longer
        follow torch.manual_seed or a checkpoint's generator state."""
        update.discard_step()
        self._reset_graphs()

    def after_checkpoint_load(self) -> None:
        """A loaded checkpoint replaced the optimizers' state tensors: captured graphs that point at
        the old ones are dropped (captured again after a warm-up). The param groups come back as
        they were saved, by a run that may have captured or not: a captured step needs capturable
        groups with device-tensor learning rates (Adam refuses capture otherwise, and the step would
        fall back to eager for the rest of the run), an eager one float learning rates."""
        self._reset_graphs()
        for update in (self.energy_update, self.generator_update):
            for group in update.param_groups:
                lr = float(group["lr"])
                group["lr"] = torch.tensor(lr, device=self.device) if self.capture else lr
                if "capturable" in group:  # torch's Adam; DeepSpeed's own optimizers have no such flag
                    group["capturable"] = self.capture

    def learning_rates(self) -> dict[str, float]:
        """The updates' current learning rates (read at log time: a captured step keeps them on the device)."""
        return {
            "lr_energy": float(self.energy_update.param_groups[0]["lr"]),
            "lr_generator": float(self.generator_update.param_groups[0]["lr"]),  # G's and T's
        }

    def modules(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return self.energy, self.generator, self.statistics

    def averaged(self) -> tuple[nn.Module, ...]:
        """The generator's EMA copy, when train.generator_ema keeps one (every rank's must agree)."""
        return () if self.ema is None else (self.ema.module,)

    def evaluation_generator(self) -> nn.Module:
        """What evaluation samples from: G's EMA when kept, else G's fp32 weights (a collective under DeepSpeed)."""
        return self.ema.module if self.ema is not None else self.runtime.for_evaluation(self.generator)

    def extra_weights(self) -> dict[str, dict[str, Tensor]]:
        """What a checkpoint saves beside E, G and T: the generator's average, when there is one."""
        return {} if self.ema is None else {EMA_NETWORK: self.ema.state_dict()}

    def load_extra_weights(self, weights: dict[str, dict[str, Tensor]]) -> str | None:
        """Restores the generator's average from a checkpoint's weights, just loaded into G; a
        checkpoint without one (EMA off when it was written) starts the average at G, with a warning
        (printed by the main process, and returned)."""
        if self.ema is None:
            return None
        if weights.get(EMA_NETWORK):
            self.ema.load_state_dict(weights[EMA_NETWORK])
            return None
        self.ema.load_state_dict(weights["generator"])
        warning = "the checkpoint holds no generator EMA (train.generator_ema was 0): the average starts at G"
        if self.runtime.is_main:
            print(f"warning: {warning}", flush=True)
        return warning


def build_steps(cfg: RunConfig, runtime, nets: MEGNetworks, ops: FusedOps | None = None) -> MEGSteps:
    """Optimizers, the runtime's two updates, and the steps over them. ``ops``: the fused ops the
    networks were built with (default: ``resolve_kernels(cfg, runtime)``,
    which is what the trainer builds them with); the penalty uses its reduction kernel if they do."""
    blocked = capture_blocker(cfg, runtime)
    capturable = blocked is None
    t = cfg.train
    energy_opt = make_optimizer(nets.energy.parameters(), t.energy_optim, runtime.device, capturable)
    generator_params = [*nets.generator.parameters(), *nets.statistics.parameters()]
    generator_opt = make_optimizer(generator_params, t.generator_optim, runtime.device, capturable)
    energy_update, generator_update = runtime.prepare_updates(
        nets.energy, nets.generator, nets.statistics, energy_opt, generator_opt
    )
    ops = ops if ops is not None else resolve_kernels(cfg, runtime)
    return MEGSteps(cfg, runtime, energy_update, generator_update, ops, blocked)
