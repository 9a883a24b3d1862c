"""Observability: the Prometheus exporter (names, labels, counters across a resume, target files,
a taken port, the advertised host, runs sharing a name, pushes, promtool's lint), the live endpoint
of a real run, and the progress line."""

import fnmatch
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch
from prometheus_client import generate_latest

from tests.conftest import REPO_ROOT, run_trainer, subprocess_env, tiny_overrides
from trainer import prometheus, trackers
from trainer.config import ConfigError, LogConfig, load_config
from trainer.metrics import MetricsLogger, ProgressSink, RankStats
from trainer.prometheus import PrometheusExporter

EXPECTED = [
    "meg_energy_loss",
    "meg_generator_loss",
    "meg_energy_gap",
    "meg_gradient_penalty",
    "meg_mi_estimate",
    "meg_sample_spread",
    "meg_samples_total",
    "meg_step_duration_seconds_bucket",
    "meg_steps_total",
    "meg_step",
    "meg_target_steps",
    "meg_run_info",
    "meg_data_wait_seconds_total",
    "meg_process_resident_memory_bytes",
]
WINDOW = {
    "energy_loss": -0.5,
    "generator_loss": 1.0,
    "energy_gap": 0.1,
    "penalty": 0.3,
    "mi_estimate": 0.2,
    "sample_spread": 0.9,
    "lr_energy": 1e-3,
    "lr_generator": 2e-3,
    "skipped_steps": 1.0,
    "samples_per_s": 100.0,
    "step_time_s": 0.01,
}


def exporter(tmp_path, rank=0, folder="run", **log) -> PrometheusExporter:
    """Run r1 writing to tmp_path/``folder``, its targets in tmp_path/targets."""
    cfg = LogConfig(prometheus_port=0, prometheus_targets=str(tmp_path / "targets"), **log)
    info = {"preset": "toy", "engine": "ddp", "precision": "no", "world_size": "2", "version": "0"}
    return PrometheusExporter(cfg, "r1", rank, rank, torch.device("cpu"), 1000, 64, info, str(tmp_path / folder))


def target_names(tmp_path) -> list[str]:
    """What file_sd's targets/*.json reads: Go's glob, whose * also matches a leading dot (unlike glob.glob)."""
    return sorted(fnmatch.filter(os.listdir(tmp_path / "targets"), "*.json"))


def samples(exp: PrometheusExporter) -> dict[str, float]:
    """Series (name{labels}) -> value, from what a scrape returns."""
    out = {}
    for line in generate_latest(exp.registry).decode().splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


def test_counters_count_from_the_resumed_step_so_a_restart_shows_no_spike(tmp_path):
    exp = exporter(tmp_path)
    try:
        exp.resumed_at(600)  # the checkpoint this process resumed from
        exp.log(625, WINDOW)
        exp.rank_stats(RankStats(data_wait_s=0.5, corrupt_shards=2, step_durations=[0.01] * 25))
        got = samples(exp)
        assert got['meg_steps_total{run="r1"}'] == 25  # not 625: Prometheus sees a reset, not a jump
        assert got['meg_step{run="r1"}'] == 625 and got['meg_target_steps{run="r1"}'] == 1000
        assert got['meg_samples_total{run="r1"}'] == 25 * 64
        assert got['meg_skipped_steps_total{run="r1"}'] == 1
        assert got['meg_gradient_penalty{run="r1"}'] == 0.3
        assert got['meg_step_duration_seconds_count{run="r1"}'] == 25
        assert got['meg_data_wait_seconds_total{rank="0",run="r1"}'] == 0.5
        assert got['meg_corrupt_shards_total{rank="0",run="r1"}'] == 2
        exp.rank_stats(RankStats(data_wait_s=0.25, corrupt_shards=3))  # the shard count is cumulative
        exp.log(700, {"event": "rollback", "nonfinite": True, "to_step": 600})
        exp.log(600, {"event": "rollback", "nonfinite": False, "to_step": 600})
        got = samples(exp)
        assert got['meg_corrupt_shards_total{rank="0",run="r1"}'] == 3
        assert got['meg_rollbacks_total{run="r1"}'] == 2 and got['meg_nonfinite_events_total{run="r1"}'] == 1
        assert got['meg_step{run="r1"}'] == 600
        assert not any(k.startswith(("meg_eval_", "meg_last_eval")) for k in got)  # none yet
        exp.log(1000, {"eval_high_quality_share": 0.9, "eval_modes": 25.0})
        got = samples(exp)
        assert got['meg_eval_result{metric="high_quality_share",run="r1"}'] == 0.9
        assert got['meg_eval_step{run="r1"}'] == 1000
    finally:
        exp.close()


def test_the_steps_redone_after_a_rollback_count_again(tmp_path):
    # meg_steps_total is the work done: 100 steps, a rollback to step 50, 50 steps again to 100 make 150
    # (rate() would otherwise show the run idle while it redoes them).
    exp = exporter(tmp_path)
    try:
        exp.resumed_at(0)
        exp.log(100, WINDOW)
        exp.log(50, {"event": "rollback", "nonfinite": False, "to_step": 50})
        exp.log(100, WINDOW)
        got = samples(exp)
        assert got['meg_steps_total{run="r1"}'] == 150 and got['meg_samples_total{run="r1"}'] == 150 * 64
        assert got['meg_step{run="r1"}'] == 100
    finally:
        exp.close()


def test_an_evaluation_holds_the_stall_alert_and_restarts_its_clock_when_it_ends(tmp_path):
    # MEGTrainingStalled paged during every evaluation longer than 15 minutes (FID of 50k samples).
    main, other = exporter(tmp_path, rank=0), exporter(tmp_path, rank=1)
    try:
        assert samples(main)['meg_evaluating{run="r1"}'] == 0
        main.evaluating(True)
        other.evaluating(True)
        assert samples(main)['meg_evaluating{run="r1"}'] == 1
        assert not any(k.startswith("meg_evaluating") for k in samples(other))  # run-wide: rank 0's alone
        before = time.time()
        main.evaluating(False)
        got = samples(main)
        assert got['meg_evaluating{run="r1"}'] == 0 and got['meg_last_step_timestamp_seconds{run="r1"}'] >= before
    finally:
        main.close()
        other.close()


def test_the_trainer_says_when_an_evaluation_starts_and_ends_even_when_it_fails(tmp_path, monkeypatch):
    from trainer.evaluation.base import Evaluator
    from trainer.job import run

    said: list = []
    monkeypatch.setattr(MetricsLogger, "evaluating", lambda self, running: said.append(running))

    def evaluation(self, step, energy, generator, tag=None):
        said.append(step)
        if step == 10:
            raise RuntimeError("the evaluation failed")
        return {"score": 1.0}

    monkeypatch.setattr(Evaluator, "__call__", evaluation)
    with pytest.raises(RuntimeError, match="the evaluation failed"):
        run(load_config("toy_25gaussians", [*tiny_overrides(tmp_path, steps=20), "eval.every=5"]), threading.Event())
    assert said == [True, 5, False, True, 10, False]


def test_run_wide_values_come_from_rank_zero_only_and_per_rank_ones_carry_the_rank(tmp_path):
    main, other = exporter(tmp_path, rank=0), exporter(tmp_path, rank=1)
    try:
        for exp in (main, other):
            exp.log(25, WINDOW)
            exp.rank_stats(RankStats(data_wait_s=1.0))
        on_main, on_other = samples(main), samples(other)
        run_wide = [k for k in on_main if k.startswith(("meg_energy_loss", "meg_steps_total", "meg_run_info"))]
        assert len(run_wide) == 3 and all('rank="' not in k for k in run_wide)
        assert not any(k.startswith(("meg_energy_loss", "meg_steps_total", "meg_step{")) for k in on_other)
        assert on_other['meg_data_wait_seconds_total{rank="1",run="r1"}'] == 1.0
        assert 'meg_process_resident_memory_bytes{rank="1",run="r1"}' in on_other
        assert on_main['meg_process_cpu_seconds_total{rank="0",run="r1"}'] > 0
        info = next(k for k in on_main if k.startswith("meg_run_info"))
        for label in ('preset="toy"', 'engine="ddp"', 'precision="no"', 'world_size="2"', 'version="0"'):
            assert label in info
    finally:
        main.close()
        other.close()


@pytest.mark.skipif(
    shutil.which("promtool") is None and os.environ.get("CI") != "true", reason="promtool not installed"
)
def test_a_scrape_passes_promtool_check_metrics(tmp_path):
    exp = exporter(tmp_path)
    try:
        exp.log(25, WINDOW)
        exp.log(25, {"eval_fid": 12.5})
        exp.rank_stats(RankStats(data_wait_s=1.0, step_durations=[0.02]))
        body = urllib.request.urlopen(f"http://127.0.0.1:{exp.port}/metrics", timeout=5).read()
    finally:
        exp.close()
    result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    assert b"meg_eval_result" in body and b"meg_step_duration_seconds_bucket" in body


def test_target_file_registers_each_rank_and_goes_with_a_clean_exit_but_stays_after_a_crash(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURMD_NODENAME", raising=False)
    first, second = exporter(tmp_path, rank=0), exporter(tmp_path, rank=1)
    files = [tmp_path / "targets" / name for name in target_names(tmp_path)]
    assert [f.name for f in files] == [os.path.basename(first.target_file), os.path.basename(second.target_file)]
    assert [f.name.endswith(f"-rank{r}.json") for r, f in enumerate(files)] == [True, True]
    entry = json.loads(files[1].read_text())
    assert entry[0]["targets"] == [f"127.0.0.1:{second.port}"]
    folder = str(tmp_path / "run")
    node = socket.gethostname()
    assert entry[0]["labels"] == {"run": "r1", "run_folder": folder, "rank": "1", "node": node, "job": "meg"}
    assert oct(files[1].stat().st_mode & 0o777) == "0o644"  # Prometheus may run as another user
    first.close(clean=True)
    second.close(clean=False)  # crashed: Prometheus must see the target go down, not vanish
    assert target_names(tmp_path) == [files[1].name]


def test_runs_sharing_a_name_keep_their_own_target_files_and_pushed_groups(tmp_path, monkeypatch):
    pushed = []
    monkeypatch.setattr(prometheus, "push_to_gateway", lambda *a, grouping_key, **kw: pushed.append(grouping_key))
    # A sweep: the same name (the preset's), one output folder per run.
    lr1, lr2 = (exporter(tmp_path, folder=f, pushgateway="http://127.0.0.1:9091") for f in ("lr1", "lr2"))
    try:
        assert lr1.target_file != lr2.target_file and len(target_names(tmp_path)) == 2
        assert json.loads(open(lr2.target_file).read())[0]["labels"]["run_folder"] == str(tmp_path / "lr2")
        lr1.close()  # a clean end of one run leaves the other scraped
        assert target_names(tmp_path) == [os.path.basename(lr2.target_file)]
        lr2.push()
        assert pushed == [
            {"run": "r1", "run_folder": str(tmp_path / "lr1")},
            {"run": "r1", "run_folder": str(tmp_path / "lr2")},
        ]
        requeued = exporter(tmp_path, folder="lr2")  # same folder: replaces its own file, not another's
        assert requeued.target_file == lr2.target_file
        requeued.close()
    finally:
        lr2.close()


def test_the_target_file_is_never_readable_half_written(tmp_path, monkeypatch):
    exp = exporter(tmp_path)
    written = target_names(tmp_path)

    def killed_before_the_rename(src, dst):
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", killed_before_the_rename)
    try:
        with pytest.raises(OSError, match="killed"):
            exp._write_target()  # leaves its temporary file behind
        monkeypatch.undo()
        assert len(os.listdir(tmp_path / "targets")) == 2
        assert target_names(tmp_path) == written  # Prometheus reads the complete file only
    finally:
        exp.close()


def test_a_wildcard_exporter_advertises_the_node_name_and_warns_when_it_is_loopback(tmp_path, monkeypatch, capsys):
    # A container's /etc/hosts: the hostname is 127.0.0.1, and getfqdn() answers localhost.
    monkeypatch.setattr(socket, "getfqdn", lambda name="": "localhost")
    monkeypatch.setenv("SLURMD_NODENAME", "gpu-node-7")
    resolve = socket.getaddrinfo
    resolved = {"gpu-node-7": "127.0.0.1", "gpu-node-8": "10.0.0.8"}

    def node_addresses(host, *args, **kwargs):
        if host in resolved:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (resolved[host], 0))]
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", node_addresses)
    exp = exporter(tmp_path, prometheus_addr="0.0.0.0")
    exp.close(clean=False)
    (entry,) = json.loads(open(exp.target_file).read())
    assert entry["targets"] == [f"gpu-node-7:{exp.port}"] and entry["labels"]["node"] == "gpu-node-7"
    warning = capsys.readouterr().err
    assert "gpu-node-7 resolves to 127.0.0.1" in warning and "log.prometheus_addr" in warning
    monkeypatch.setenv("SLURMD_NODENAME", "gpu-node-8")  # a reachable name: no warning
    exporter(tmp_path, prometheus_addr="0.0.0.0").close()
    assert "warning" not in capsys.readouterr().err


def test_the_pushed_step_follows_a_resume_and_a_rollback(tmp_path, monkeypatch):
    # The dashboard shows max(live, pushed) step: a pushed step from before a rollback or from a
    # process that crashed after its last checkpoint would hide where the run really is.
    pushed = []
    monkeypatch.setattr(
        prometheus,
        "push_to_gateway",
        lambda *a, registry, **kw: pushed.append(registry.get_sample_value("meg_step", {"run": "r1"})),
    )
    exp = exporter(tmp_path, pushgateway="http://127.0.0.1:9091")
    try:
        exp.resumed_at(600)
        exp.log(1000, {"eval_fid": 12.5})
        exp.log(900, {"event": "rollback", "nonfinite": False, "to_step": 900})
        assert pushed == [600, 1000, 900]
        rolled_back_at = exp.final.get_sample_value("meg_last_rollback_timestamp_seconds", {"run": "r1"})
        assert time.time() - rolled_back_at < 60
        assert exp.final.get_sample_value("meg_last_nonfinite_timestamp_seconds", {"run": "r1"}) == 0
        exp.log(800, {"event": "rollback", "nonfinite": True, "to_step": 800})
        assert time.time() - exp.final.get_sample_value("meg_last_nonfinite_timestamp_seconds", {"run": "r1"}) < 60
    finally:
        exp.close()


def test_a_gateway_that_answers_garbage_never_stops_training(tmp_path, capsys):
    # A gateway address where another service answers (an SSH port): http.client's BadStatusLine is no
    # OSError; it escaped push(), ended the run at its start, and in close() turned a requeue stop
    # (exit 75) into a crash (exit 1).
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def answer_garbage():
        for _ in range(3):
            conn, _ = server.accept()
            conn.recv(65536)
            conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            conn.close()

    answering = threading.Thread(target=answer_garbage, daemon=True)
    answering.start()
    exp = exporter(tmp_path, pushgateway=f"http://127.0.0.1:{server.getsockname()[1]}")
    try:
        exp.resumed_at(0)
        exp.log(10, {"eval_fid": 12.5})
    finally:
        exp.close()
        server.close()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "could not push" in line]
    assert len(warnings) == 1 and "BadStatusLine" in warnings[0]  # once per distinct error
    assert target_names(tmp_path) == []  # close() went on to remove the target file


def test_a_taken_port_moves_and_the_target_file_says_where(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    cfg = LogConfig(prometheus_port=taken, prometheus_targets=str(tmp_path / "targets"))
    exp = PrometheusExporter(cfg, "r1", 0, 0, torch.device("cpu"), 10, 1, {})
    try:
        assert exp.moved_from == taken and exp.port != taken
        entry = json.loads(open(exp.target_file).read())
        assert entry[0]["targets"] == [f"127.0.0.1:{exp.port}"]
        urllib.request.urlopen(exp.url, timeout=5).read()
    finally:
        exp.close()
        holder.close()


@pytest.mark.parametrize(
    "override, message",
    [
        ("log.pushgateway=ftp://gw:9091", r"is not an http\(s\) address"),
        ("log.pushgateway=gw:-1", "the port must be a number in 0-65535"),  # was accepted, failing at each push
        ("log.pushgateway=http://gw:99999", "the port must be a number in 0-65535"),
        ("log.pushgateway=gw:9091 log.prometheus_port=-1", "log.prometheus_port=-1 turns the exporter off"),
        ("log.prometheus_port=70000", "log.prometheus_port=70000 is out of range"),
    ],
)
def test_bad_monitoring_settings_are_refused_up_front(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("toy_25gaussians", override.split())


def test_accelerate_launch_mixed_precision_is_refused_unless_it_matches_the_trainers():
    from trainer.config import check_launcher_precision

    cfg = load_config("toy_25gaussians", [])
    check_launcher_precision(cfg, {})  # not launched through accelerate
    check_launcher_precision(cfg, {"ACCELERATE_MIXED_PRECISION": "no"})
    with pytest.raises(ConfigError, match="pass train.mixed_precision=bf16 to trainer/main.py"):
        check_launcher_precision(cfg, {"ACCELERATE_MIXED_PRECISION": "bf16"})
    check_launcher_precision(
        load_config("toy_25gaussians", ["train.mixed_precision=bf16"]), {"ACCELERATE_MIXED_PRECISION": "bf16"}
    )


@pytest.mark.slow
def test_running_job_serves_prometheus_metrics(tmp_path):
    args = [o for o in tiny_overrides(tmp_path, steps=2000) if not o.startswith("log.prometheus")]
    cmd = [
        sys.executable,
        "trainer/main.py",
        "--config",
        "toy_25gaussians",
        *args,
        "log.prometheus_port=0",
        "name=promtest",
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        url = None
        for line in proc.stdout:
            if line.startswith("prometheus metrics: "):
                url = line.split(": ", 1)[1].strip()
                break
        assert url and url.startswith("http://127.0.0.1:")
        deadline, body = time.time() + 120, ""
        while time.time() < deadline:
            body = urllib.request.urlopen(url, timeout=5).read().decode()
            if all(f"\n{name}{{" in body for name in EXPECTED):
                break
            time.sleep(0.5)
        for name in EXPECTED:
            assert f"\n{name}{{" in body, f"no {name} series in:\n{body[:2000]}"
        assert 'meg_energy_loss{run="promtest"}' in body
        steps = float(next(line.split()[-1] for line in body.splitlines() if line.startswith("meg_steps_total{")))
        assert steps >= 5
    finally:
        proc.kill()
        proc.wait()


def test_progress_line_shows_step_losses_throughput_and_eta():
    out = io.StringIO()
    sink = ProgressSink(total_steps=100, stream=out)
    sink.log(50, {"energy_loss": -0.5, "generator_loss": 1.25, "samples_per_s": 1234.0, "step_time_s": 2.0})
    line = out.getvalue()
    assert "step 50/100" in line and "energy_loss=-0.5" in line and "1234 samples/s" in line
    assert "ETA 0:01:40" in line


@pytest.mark.slow
def test_a_run_with_tensorboard_writes_the_losses_the_evaluation_and_its_figures(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = [o for o in tiny_overrides(tmp_path, steps=10) if not o.startswith(("eval.every", "eval.plots"))]
    run_trainer([*overrides, "log.trackers=[tensorboard]", "eval.every=10", "eval.plots=true", "eval.mala.steps=0"])
    (events,) = (tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["energy_loss"]) for r in records if "energy_loss" in r]
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("energy_loss")] == losses
    evaluation = next(r for r in records if "eval_num_modes" in r)
    assert [(e.step, e.value) for e in acc.Scalars("eval_num_modes")] == [(10, evaluation["eval_num_modes"])]
    images = acc.Tags()["images"]
    assert any(tag.startswith("energy") for tag in images) and any(tag.startswith("samples") for tag in images), images
    png = acc.Images(images[0])[0]
    assert png.step == 10 and png.width > 100 and png.height > 100


def test_trackers_are_checked_before_any_work(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="log.trackers takes tensorboard and wandb"):
        LogConfig(trackers=["mlflow"])
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)  # nothing installed
    with pytest.raises(ConfigError, match="the wandb package is not installed: pip install wandb"):
        trackers.check_trackers(["wandb"])
    monkeypatch.undo()
    result = run_trainer([*tiny_overrides(tmp_path), "log.trackers=[wandb]"], check=False)
    if importlib.util.find_spec("wandb") is None:  # the trainer refuses it at start, with the fix
        assert result.returncode == 2 and "pip install wandb" in result.stderr, result.stderr
        assert not (tmp_path / "run").exists()


def test_an_address_that_is_not_this_nodes_is_a_config_error_naming_the_key(tmp_path):
    """192.0.2.1 (TEST-NET-1) is no interface of this machine: binding it was an OSError traceback (and
    the exporter then tried another port at the same address, which fails the same way)."""
    cfg = LogConfig(prometheus_port=9556, prometheus_addr="192.0.2.1", prometheus_targets=str(tmp_path / "targets"))
    with pytest.raises(ConfigError, match=r"log.prometheus_addr=192.0.2.1: cannot serve metrics there on port 9556 \("):
        PrometheusExporter(cfg, "r1", 0, 0, torch.device("cpu"), 10, 1, {})


def test_a_targets_file_in_place_of_the_folder_is_a_config_error_naming_the_key(tmp_path):
    (tmp_path / "targets").write_text("")  # was: "error: File exists: .../targets"
    cfg = LogConfig(prometheus_port=0, prometheus_targets=str(tmp_path / "targets"))
    with pytest.raises(
        ConfigError, match=f"log.prometheus_targets={tmp_path / 'targets'} is a file: it names the folder"
    ):
        PrometheusExporter(cfg, "r1", 0, 0, torch.device("cpu"), 10, 1, {})


@pytest.mark.parametrize("code, withdrawn", [(75, True), (130, True), (1, False)])
def test_a_process_that_exits_at_once_withdraws_its_target_file_when_stopped_on_request(tmp_path, code, withdrawn):
    # The stop watchdog's exit (a rank blocked in a wait) skipped the exporter's close: the target file
    # stayed and MEGTargetDown fired for a run that was only requeued. A crash keeps it, as close() does.
    script = (
        "import sys, torch\n"
        "from trainer.config import LogConfig\n"
        "from trainer.main import exit_now\n"
        "from trainer.prometheus import PrometheusExporter\n"
        f"cfg = LogConfig(prometheus_port=0, prometheus_targets={str(tmp_path / 'targets')!r})\n"
        "PrometheusExporter(cfg, 'r1', 0, 0, torch.device('cpu'), 10, 1, {})\n"
        f"exit_now({code})\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == code, done.stderr[-2000:]
    assert len(target_names(tmp_path)) == (0 if withdrawn else 1)


def test_metrics_jsonl_writes_a_nan_as_null_and_the_protocol_readers_average_it_as_nan(tmp_path):
    import math

    from trainer import strict_json
    from trainer.evaluation.anomaly import mean_std
    from trainer.metrics import JsonlSink

    sink = JsonlSink(str(tmp_path / "metrics.jsonl"))
    sink.log(5, {"eval_mode_kl_reverse": float("nan"), "loss": float("inf"), "nested": [1.5, float("-inf")]})
    sink.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    row = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in {line}"))
    assert row["eval_mode_kl_reverse"] is None and row["loss"] is None and row["nested"] == [1.5, None]
    records = [strict_json.nan_for_null({"f1": 0.5, "kl": None}), {"f1": 0.7, "kl": 0.1}]
    averaged = mean_std(records)
    assert averaged["f1"]["mean"] == pytest.approx(0.6) and math.isnan(averaged["kl"]["mean"])
