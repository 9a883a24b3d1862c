"""The training step object (trainer/steps.py) as benches and tests build it: no stream, no logger."""

import copy
import os
import threading
import time

import pytest
import torch

from models.factory import build_networks
from models.objectives import energy_loss, generator_loss
from models.ops import EAGER, FUSED, TORCH_KERNELS, use_kernels
from trainer import steps as steps_module
from trainer.capture import capture_blocker
from trainer.checkpoint import Checkpoints
from trainer.config import ConfigError, GuardConfig, config_to_yaml, load_config
from trainer.ema import GeneratorEMA
from trainer.guard import DivergenceGuard
from trainer.meg_trainer import MEGTrainer
from trainer.metrics import MetricsLogger, MetricWindow
from trainer.runtime import DDPRuntime, DDPUpdate, ProcessGroup
from trainer.steps import build_steps


def _cfg(*extra):
    return load_config(
        "toy_25gaussians",
        ["model.hidden=[16,16]", "model.generator_hidden=[16,16]", "data.batch_size=32", "train.penalty_weight=1.0",
         *extra],
    )  # fmt: skip


def _steps(*extra, precision="no"):
    cfg = _cfg(f"train.mixed_precision={precision}", *extra)
    torch.manual_seed(0)
    return build_steps(cfg, DDPRuntime(precision), build_networks(cfg.model, (2,)))


@pytest.mark.parametrize("precision", ["no", "fp16"])
@pytest.mark.parametrize("negatives", ["generator", "mala"])
def test_every_tensor_of_a_step_and_the_metric_window_is_on_the_runtime_device(precision, negatives):
    # The runtime is on the CPU while new tensors default to the "meta" device: a tensor made without
    # the runtime's device (a skip flag, a loss scale, a guard bound) lands on meta and the step, the
    # metric window or the guard fails. On a GPU that bug was CUDA losses stacked with CPU skip flags.
    cfg = _cfg(f"train.mixed_precision={precision}", f"train.negatives={negatives}", "train.energy_steps=2")
    torch.manual_seed(0)
    runtime = DDPRuntime(precision)
    steps = build_steps(cfg, runtime, build_networks(cfg.model, (2,)))
    window = MetricWindow(runtime, DivergenceGuard(cfg.train.guard), samples_per_step=64)
    x = torch.randn(32, 2)
    torch.set_default_device("meta")
    try:
        for step in range(3):
            metrics = steps.iteration(step, lambda: x)
            assert {v.device.type for v in metrics.values()} == {"cpu"}
            window.record(metrics)
        out, _ = window.reduce(step=3, elapsed=1.0, stop=False)
    finally:
        torch.set_default_device(None)
    assert out["skipped_steps"] == 0 and out["penalty"] > 0


def test_outer_backward_gives_the_parameters_gradients_and_the_data_none():
    steps = _steps()
    x = torch.randn(8, 2, requires_grad=True)
    loss = steps.energy(x).mean() + steps.energy(x).pow(2).mean()
    steps.energy_update.backward(loss)
    assert x.grad is None
    assert all(p.grad is not None for p in steps.energy.parameters())


def test_energy_steps_metrics_are_averaged_over_the_iteration():
    x = torch.randn(32, 2)
    a, b = _steps("train.energy_steps=3"), _steps("train.energy_steps=3")
    torch.manual_seed(1)
    averaged = a.iteration(0, lambda: x)
    torch.manual_seed(1)  # the same draws in the same order: z per energy step, then z and perm for G
    energy = [b.energy_step(x, b.sample_z()) for _ in range(3)]
    generator = b.generator_step(b.sample_z())
    for key in ("energy_loss", "energy_gap", "penalty"):
        expected = torch.stack([m[key] for m in energy]).mean()
        torch.testing.assert_close(averaged[key], expected)
    torch.testing.assert_close(averaged["generator_loss"], generator["generator_loss"])
    assert averaged["penalty_steps"] == 3


def test_lazy_penalty_runs_every_kth_energy_step_with_k_times_the_weight():
    steps = _steps("train.penalty_every=4", "train.energy_steps=2")
    x = torch.randn(32, 2)
    seen = []
    for step in range(4):  # energy steps 0..7: the penalty at 0 and 4, i.e. in iterations 0 and 2
        for i in range(2):
            penalty = steps.penalty_due(step * 2 + i)
            m = steps.energy_step(x, steps.sample_z(), penalty)
            seen.append(int(m["penalty_steps"]))
            gap = m["energy_real"] - m["energy_fake"]
            if penalty:
                assert m["penalty"] > 0
                torch.testing.assert_close(m["energy_loss"], gap + 4 * 1.0 * m["penalty"])
            else:
                assert m["penalty"] == 0
                torch.testing.assert_close(m["energy_loss"], gap)
    assert seen == [1, 0, 0, 0, 1, 0, 0, 0]


def test_an_iteration_runs_the_lazy_penalty_on_every_kth_energy_step_of_the_run():
    # Energy steps are counted across iterations: with 2 per iteration and the penalty every 4th,
    # iterations 0 and 2 compute it on their first step, iterations 1 and 3 not at all.
    steps = _steps("train.penalty_every=4", "train.energy_steps=2")
    x = torch.randn(32, 2)
    counts = [int(steps.iteration(step, lambda: x)["penalty_steps"]) for step in range(4)]
    assert counts == [1, 0, 1, 0]


def test_an_iterations_penalty_is_the_mean_over_the_energy_steps_that_computed_it():
    x = torch.randn(32, 2)
    lazy = ("train.penalty_every=2", "train.energy_steps=2")
    a, b = _steps(*lazy), _steps(*lazy)
    torch.manual_seed(1)
    averaged = a.iteration(0, lambda: x)
    torch.manual_seed(1)
    energy = [b.energy_step(x, b.sample_z(), penalty) for penalty in (True, False)]
    assert averaged["penalty_steps"] == 1 and energy[0]["penalty"] > 0
    torch.testing.assert_close(averaged["penalty"], energy[0]["penalty"])  # not halved by the step without it
    torch.testing.assert_close(averaged["energy_loss"], (energy[0]["energy_loss"] + energy[1]["energy_loss"]) / 2)


def test_each_update_applies_its_own_steps_gradient_only():
    # A step's gradients are this step's loss's, not summed with the previous step's (each update
    # zeroes them first): checked against autograd on copies of the networks taken before the step.
    steps = _steps()
    x = torch.randn(32, 2)
    weight = steps.train_cfg.penalty_weight * steps.train_cfg.penalty_every
    for _ in range(2):
        z = steps.sample_z()
        energy = copy.deepcopy(steps.energy)
        with torch.no_grad():
            x_fake = steps.generator(z)
        loss, _ = energy_loss(energy, x, x_fake, weight)
        expected = torch.autograd.grad(loss, list(energy.parameters()))
        steps.energy_step(x, z)
        for p, g in zip(steps.energy.parameters(), expected, strict=True):
            torch.testing.assert_close(p.grad, g)
    for _ in range(2):
        z, perm = steps.sample_z(), steps.sample_perm()
        generator, statistics = copy.deepcopy(steps.generator), copy.deepcopy(steps.statistics)
        energy = copy.deepcopy(steps.energy).requires_grad_(False)
        loss, _ = generator_loss(energy, statistics, generator(z), z, steps.train_cfg.entropy_weight, perm)
        trained = [*generator.parameters(), *statistics.parameters()]
        expected = torch.autograd.grad(loss, trained)
        steps.generator_step(z, perm)
        for p, g in zip([*steps.generator.parameters(), *steps.statistics.parameters()], expected, strict=True):
            torch.testing.assert_close(p.grad, g)


def test_metric_window_averages_the_penalty_over_the_steps_that_computed_it():
    window = MetricWindow(DDPRuntime(), DivergenceGuard(GuardConfig()), samples_per_step=64)

    def row(penalty, count):
        t = torch.tensor
        return {"energy_gap": t(1.0), "penalty": t(penalty), "penalty_steps": t(count), "skipped_steps": t(0.0)}

    for penalty, count in ((3.0, 1.0), (0.0, 0.0), (5.0, 1.0), (0.0, 0.0)):
        window.record(row(penalty, count))
    assert window.reduce(step=4, elapsed=1.0, stop=False)[0]["penalty"] == 4.0
    for _ in range(2):
        window.record(row(0.0, 0.0))
    out, _ = window.reduce(step=6, elapsed=1.0, stop=False)
    assert "penalty" not in out and "penalty_steps" not in out


def test_capture_is_off_on_a_cpu_and_says_why():
    cfg = _cfg()
    runtime = DDPRuntime()
    assert capture_blocker(cfg, runtime) == "CUDA graphs need a CUDA device, this run is on cpu"
    assert capture_blocker(_cfg("train.capture=off"), runtime) == "train.capture=off"
    steps = build_steps(cfg, runtime, build_networks(cfg.model, (2,)))
    assert not steps.capture and steps.capture_status.startswith("off: CUDA graphs need a CUDA device")
    # Without capture the learning rates are plain floats that the schedule assigns.
    steps.set_lr_factor(0.5)
    assert steps.energy_update.param_groups[0]["lr"] == cfg.train.energy_optim.lr * 0.5


@pytest.mark.parametrize("saved_by_capture", [False, True], ids=["saved-eager", "saved-captured"])
@pytest.mark.parametrize("capture", [False, True], ids=["resumed-eager", "resumed-captured"])
def test_a_checkpoint_load_gives_the_optimizers_the_resuming_runs_capture_settings(
    monkeypatch, saved_by_capture, capture
):
    # A checkpoint written by an eager run (a CPU, several processes, train.capture=off) and resumed
    # with capture brings back capturable=False param groups: Adam then refuses to be captured and the
    # resumed run quietly trains eagerly. Capture needs CUDA, so here the step object is told it captures.
    saved, resumed = _steps(), _steps()
    saved.iteration(0, lambda: torch.randn(32, 2))
    states = []
    for update in (saved.energy_update, saved.generator_update):
        state = update.optimizer.state_dict()
        for group in state["param_groups"]:
            group["capturable"] = saved_by_capture
            group["lr"] = torch.tensor(group["lr"]) if saved_by_capture else group["lr"]
        states.append(state)
    monkeypatch.setattr(resumed, "capture", capture)
    for update, state in zip((resumed.energy_update, resumed.generator_update), states):
        update.optimizer.load_state_dict(state)
    resumed.after_checkpoint_load()
    for update in (resumed.energy_update, resumed.generator_update):
        for group in update.param_groups:
            assert group["capturable"] is capture
            assert isinstance(group["lr"], torch.Tensor) is capture


def _snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(before, module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


@pytest.mark.parametrize("negatives", ["generator", "mala"])
def test_each_step_changes_its_own_networks_only(negatives):
    steps = _steps(f"train.negatives={negatives}")
    x = torch.randn(32, 2)
    e, g, t = (_snapshot(m) for m in steps.modules())
    steps.energy_step(x, steps.sample_z())
    assert _changed(e, steps.energy) and not _changed(g, steps.generator) and not _changed(t, steps.statistics)
    e = _snapshot(steps.energy)
    steps.generator_step(steps.sample_z())
    assert not _changed(e, steps.energy) and _changed(g, steps.generator) and _changed(t, steps.statistics)


def test_mala_negatives_have_lower_energy_than_plain_samples():
    # Latent MALA samples exp(-E(G(z)) / T - |z|^2 / 2): at a low temperature its negatives sit lower
    # in E than G(z) itself. Were train.negatives=mala ignored, both would be equal.
    steps = _steps("train.negatives=mala", "train.negatives_mala.steps=20", "train.negatives_mala.temperature=0.05")
    torch.manual_seed(3)
    z = steps.sample_z()
    negatives = steps.negatives(z)  # MALA takes gradients with respect to z
    with torch.no_grad():
        plain = steps.energy(steps.generator(z)).mean()
        mala = steps.energy(negatives).mean()
    assert mala < plain


def test_lr_schedule_decays_over_its_horizon_and_extending_the_run_leaves_it_alone(tmp_path):
    cfg = _cfg("train.steps=100", "train.lr_final_factor=0.1", "train.lr_decay_fraction=0.3")
    runtime = DDPRuntime()
    steps = build_steps(cfg, runtime, build_networks(cfg.model, (2,)))
    checkpoints = Checkpoints(str(tmp_path / "ckpt"), 3, "", {})
    trainer = MEGTrainer(cfg, runtime, steps, None, MetricsLogger([]), checkpoints)
    assert trainer.resume_if_possible(None) is None and trainer.state.lr_horizon == 100
    base = cfg.train.energy_optim.lr

    def lr_at(step):
        trainer._set_lr(step)
        return steps.energy_update.param_groups[0]["lr"]

    assert lr_at(0) == lr_at(70) == base  # constant until the last 30%
    assert lr_at(85) == pytest.approx(base * 0.55)  # halfway down to 0.1
    assert lr_at(100) == pytest.approx(base * 0.1)
    # train.steps raised to 200 on a resumed run: the horizon stays 100, the past keeps its rates.
    trainer.cfg.train.steps = 200
    assert lr_at(85) == pytest.approx(base * 0.55) and lr_at(150) == pytest.approx(base * 0.1)
    trainer.state.lr_scale = 0.5  # a divergence rollback halves every rate
    assert lr_at(0) == pytest.approx(base * 0.5)


def test_stop_signals_set_the_event_and_give_the_handlers_back():
    import signal

    from trainer.main import stop_signals

    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    with stop_signals() as stop:
        assert not stop.is_set()
        signal.raise_signal(signal.SIGUSR1)
        assert stop.is_set()
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before


def test_a_sigint_the_process_was_started_ignoring_stays_ignored():
    """nohup and ``cmd &`` in a script start a process with SIGINT ignored: a Ctrl-C meant for the
    terminal's foreground job must not stop it."""
    import signal

    from trainer.main import stop_signals

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop_signals() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
            time.sleep(0.2)  # the watchdog thread would have seen it by now
            assert not stop.is_set()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


class _MetaRuntime(DDPRuntime):
    """The DDP runtime's updates on the meta device, with no accelerate (it would move the networks to
    its own device). Meta, like CUDA, refuses any operation that mixes its tensors with CPU tensors
    (beyond 0-dim ones), so a tensor the step makes on the CPU by mistake fails here as on a GPU.
    torch's FakeTensorMode can make fake CUDA tensors on a CPU-only build, but any autograd on them
    aborts the process (no CUDA device guard is compiled in), so it cannot run a step."""

    def __init__(self):
        ProcessGroup.__init__(self, torch.device("meta"), 0, 1, "no")
        self.updates = {}

    def prepare_updates(self, energy, generator, statistics, energy_opt, generator_opt):
        for name, nets, opt in (
            ("energy", {"energy": energy}, energy_opt),
            ("generator", {"generator": generator, "statistics": statistics}, generator_opt),
        ):
            self.updates[name] = DDPUpdate(nets, nets, opt, torch.amp.GradScaler("cpu", enabled=False), self.device)
        return self.updates["energy"], self.updates["generator"]


@pytest.mark.parametrize("ops", [EAGER, FUSED], ids=["eager", "fused"])
@pytest.mark.parametrize(
    "preset, shape, extra",
    [
        ("toy_25gaussians", (2,), ["train.negatives=mala", "train.negatives_mala.steps=2"]),
        ("kdd99", (118,), []),
        ("stackedmnist", (3, 28, 28), ["model.conv_width=2"]),
        ("cifar10", (3, 32, 32), ["model.conv_width=2", "train.mixed_precision=no"]),
    ],
    ids=["toy-mala", "kdd", "conv28", "conv32"],
)
def test_a_step_on_another_device_makes_no_cpu_tensor(monkeypatch, preset, shape, extra, ops):
    cfg = load_config(preset, [*extra, "data.batch_size=4", "train.energy_steps=2", "train.penalty_every=2"])
    torch.manual_seed(0)
    nets = build_networks(cfg.model, shape, ops)
    for net in (nets.energy, nets.generator, nets.statistics):
        net.to("meta")
    # Adam's fused kernel exists for real devices only; its foreach form takes the same path here.
    monkeypatch.setattr(
        steps_module, "make_optimizer", lambda params, c, device, capturable: torch.optim.Adam(params, lr=c.lr)
    )
    steps = build_steps(cfg, _MetaRuntime(), nets, ops=ops)
    x = torch.empty(4, *shape, device="meta")
    with use_kernels(TORCH_KERNELS):  # what a fused op runs off CUDA, minus Triton's interpreter
        for step in range(2):  # a penalty step and a lazy one
            metrics = steps.iteration(step, lambda: x)
            assert {v.device.type for v in metrics.values()} == {"meta"}


def test_the_runtimes_rng_fork_gives_every_generator_back():
    runtime = DDPRuntime("no")
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    with runtime.fork_rng(seed=7):
        seeded = torch.rand(100)
    assert torch.equal(seeded, torch.manual_seed(7) and torch.rand(100))
    torch.manual_seed(3)
    with runtime.fork_rng():
        torch.rand(100)
    assert torch.equal(torch.rand(4), expected)


def test_generator_ema_follows_the_generator_by_its_decay_and_leaves_training_alone():
    # train.generator_ema=0.5: after each iteration ema = 0.5 ema + 0.5 G, computed here by hand from
    # G's weights after each step; the raw networks train exactly as with the EMA off.
    x = torch.randn(32, 2)
    on, off = _steps("train.generator_ema=0.5"), _steps()
    assert off.ema is None and off.extra_weights() == {}
    expected = {k: v.clone() for k, v in on.generator.state_dict().items()}
    for step in range(3):
        torch.manual_seed(step)
        on.iteration(step, lambda: x)
        torch.manual_seed(step)
        off.iteration(step, lambda: x)
        expected = {k: 0.5 * expected[k] + 0.5 * v for k, v in on.generator.state_dict().items()}
    for a, b in zip(on.modules(), off.modules()):
        for (key, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), key
    saved = on.extra_weights()["generator_ema"]
    assert saved.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(saved[key], expected[key], rtol=0, atol=1e-6)
    assert any(not torch.allclose(saved[k], v) for k, v in on.generator.state_dict().items())  # it lags G
    # A checkpoint's weights restore it; one without it (EMA off when written) starts it at G.
    fresh = _steps("train.generator_ema=0.5")
    assert fresh.load_extra_weights({"generator": on.generator.state_dict(), "generator_ema": saved}) is None
    assert all(torch.equal(fresh.ema.state_dict()[k], saved[k]) for k in saved)
    warning = fresh.load_extra_weights({"generator": on.generator.state_dict()})
    assert "no generator EMA" in warning
    assert all(torch.equal(fresh.ema.state_dict()[k], v) for k, v in on.generator.state_dict().items())


def test_generator_ema_keeps_decay_of_the_average_and_takes_one_minus_decay_of_the_new_weights():
    # With decay 0.9 an update moves the average a tenth of the way to G (decay 0.5 cannot tell the two apart).
    generator = torch.nn.Linear(3, 2)
    ema = GeneratorEMA(generator, 0.9)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in generator.parameters():
            p.add_(1.0)
    ema.update(generator)
    for key, value in generator.state_dict().items():
        torch.testing.assert_close(ema.state_dict()[key], 0.9 * before[key] + 0.1 * value)


def test_generator_ema_decay_is_a_config_field_with_a_range():
    assert load_config("toy_25gaussians").train.generator_ema == 0.0  # off: today's runs unchanged
    assert load_config("toy_25gaussians", ["train.generator_ema=0.999"]).train.generator_ema == 0.999
    for bad in ("1", "1.5", "-0.1"):
        with pytest.raises(ConfigError, match="train.generator_ema"):
            load_config("toy_25gaussians", [f"train.generator_ema={bad}"])


def test_a_save_keeps_the_stop_watchdogs_heartbeat_beating_all_through(tmp_path, monkeypatch):
    """After a stop signal the watchdog ends a process that made no progress for MEG_STOP_GRACE_S:
    a save longer than that (a large model, a slow file system) must not be cut short."""
    cfg = _cfg()
    runtime = DDPRuntime()
    steps = build_steps(cfg, runtime, build_networks(cfg.model, (2,)))
    checkpoints = Checkpoints(str(tmp_path / "ckpt"), 3, config_to_yaml(cfg), {"sample_shape": [2]})
    beats: list[float] = []
    trainer = MEGTrainer(
        cfg, runtime, steps, None, MetricsLogger([]), checkpoints, heartbeat=lambda: beats.append(time.monotonic())
    )
    saving = {}
    real_save = Checkpoints.save

    def slow_save(self, *args, **kwargs):
        saving["start"] = time.monotonic()
        time.sleep(2.5)  # the heartbeat thread beats once a second
        saving["end"] = time.monotonic()
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Checkpoints, "save", slow_save)
    trainer._save()
    during = [t for t in beats if saving["start"] < t < saving["end"]]
    assert len(during) >= 2, (beats, saving)
    assert beats[-1] >= saving["end"] and checkpoints.list()


def test_a_stop_during_an_evaluation_is_honoured_after_it_with_a_checkpoint_of_its_step(tmp_path, monkeypatch):
    """The watchdog took a running evaluation for a blocked wait: it ended the process MEG_STOP_GRACE_S
    after the signal, losing every step since the newest periodic checkpoint."""
    from tests.conftest import tiny_overrides
    from trainer.evaluation.base import Evaluator
    from trainer.job import run
    from trainer.meg_trainer import Preempted

    stop, beats, evaluating = threading.Event(), [], {}

    def slow_evaluation_signalled_midway(self, step, energy, generator, tag=None):
        evaluating["start"] = time.monotonic()
        stop.set()
        time.sleep(2.5)  # the heartbeat thread beats once a second
        evaluating["end"] = time.monotonic()
        return {"score": 1.0}

    monkeypatch.setattr(Evaluator, "__call__", slow_evaluation_signalled_midway)
    overrides = [*tiny_overrides(tmp_path, steps=40), "checkpoint.every=20", "eval.every=15"]
    with pytest.raises(Preempted, match="during the evaluation; checkpoint at step 15, rerun to resume"):
        run(load_config("toy_25gaussians", overrides), stop, heartbeat=lambda: beats.append(time.monotonic()))
    during = [t for t in beats if evaluating["start"] < t < evaluating["end"]]
    assert len(during) >= 2, (beats, evaluating)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step_00000000", "step_00000015"]


def test_a_save_beats_for_the_collective_timeout_at_most():
    """A save still going after train.collective_timeout (a hung mount) is taken as hung: the heartbeat
    stops, so that the stop watchdog can end the process."""
    from trainer.meg_trainer import beating

    beats: list[float] = []
    with beating(lambda: beats.append(time.monotonic()), limit=0.35, every=0.1):
        time.sleep(1.2)
        during = len(beats)
    assert 2 <= during <= 5, beats  # the first, then about three until the limit; none after it


@pytest.mark.parametrize("resumed", [False, True])
def test_a_stop_before_training_leaves_one_checkpoint_of_the_state(tmp_path, resumed):
    """A stop during start-up saves the state unless a checkpoint holds it already (just resumed, or
    the guard's step 0): each preemption in start-up copied the resumed checkpoint aside before."""
    from trainer.meg_trainer import Preempted

    cfg = _cfg()
    runtime = DDPRuntime()
    steps = build_steps(cfg, runtime, build_networks(cfg.model, (2,)))
    checkpoints = Checkpoints(str(tmp_path / "ckpt"), 3, config_to_yaml(cfg), {"sample_shape": [2]})
    stop = threading.Event()
    trainer = MEGTrainer(cfg, runtime, steps, None, MetricsLogger([]), checkpoints, stop=stop)
    if resumed:
        trainer.state.step = 30
        trainer._save()
        trainer.resume_if_possible(checkpoints.newest_intact(runtime))
    stop.set()
    with pytest.raises(Preempted, match="before training"):
        trainer.train()
    assert sorted(os.listdir(tmp_path / "ckpt")) == (["step_00000030"] if resumed else ["step_00000000"])
