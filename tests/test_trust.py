"""Nothing a run reads back runs code, damage is found and survived, one trainer per run folder.

A "payload" is a pickle whose unpickling runs ``touch <marker>``: a loader that unpickles anything
creates the marker. Every file a resume, a tool or a converter reads is tried with one.
"""

import contextlib
import io
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch

from data_pipeline import convert
from data_pipeline.shard_io import read_shard_bytes
from data_pipeline.shards import DataError
from tests.conftest import REPO_ROOT, run_trainer, subprocess_env, tiny_overrides
from tests.test_faults import _forge
from trainer.checkpoint import CheckpointError, Checkpoints, damage, set_rng_state
from trainer.classifier import load_classifier
from trainer.config import ConfigError, check_commands, load_config


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "payload-ran"
    yield path
    assert not path.exists(), "a payload ran"


def _torch_payload(path, marker):
    torch.save({"weights": {"w": torch.zeros(1)}, "state": Payload(marker)}, path)


# -- loaders, one by one ---------------------------------------------------------------------------


def test_rng_state_file_with_a_payload_is_refused(tmp_path, marker):
    _torch_payload(tmp_path / "rng_rank0.pt", marker)
    with pytest.raises(pickle.UnpicklingError):
        set_rng_state(torch.load(tmp_path / "rng_rank0.pt", weights_only=True), torch.device("cpu"))


def test_ddp_engine_state_with_a_payload_is_refused(tmp_path, marker):
    from trainer.runtime import DDPRuntime

    (tmp_path / "engine").mkdir()
    _torch_payload(tmp_path / "engine" / "ddp_state.pt", marker)
    with pytest.raises(CheckpointError, match="ddp_state.pt holds objects other than tensors") as caught:
        DDPRuntime().restore(str(tmp_path / "engine"), {})
    assert "weights_only=False" not in str(caught.value)


def test_deepspeed_checkpoint_file_with_a_payload_is_refused(tmp_path, marker):
    pytest.importorskip("deepspeed")
    from trainer.runtime.deepspeed_engine import _weights_only_checkpoint_engine

    _torch_payload(tmp_path / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt holds objects other than tensors"):
        _weights_only_checkpoint_engine().load(str(tmp_path / "mp_rank_00_model_states.pt"))


def test_classifier_checkpoint_with_a_payload_is_refused(tmp_path, marker):
    _torch_payload(tmp_path / "classifier.pt", marker)
    with pytest.raises(CheckpointError, match="classifier.pt holds objects other than tensors"):
        load_classifier(str(tmp_path / "classifier.pt"))


def test_fid_statistics_holding_pickled_objects_are_refused(tmp_path, marker):
    from trainer.fid import load_statistics

    np.save(tmp_path / "stats.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    os.replace(tmp_path / "stats.npy", tmp_path / "stats.npz")  # what np.load sees is the .npy pickle
    with pytest.raises(DataError, match="stats.npz is not an .npz of FID reference statistics"):
        load_statistics(str(tmp_path / "stats.npz"))


def test_a_yaml_config_with_a_python_tag_is_refused(tmp_path, marker):
    preset = tmp_path / "evil.yaml"
    preset.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError):
        load_config(str(preset))


def test_a_cifar_archive_with_a_payload_is_refused(tmp_path, marker):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        data = pickle.dumps({b"data": Payload(marker), b"labels": [0]}, protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (tmp_path / "c.tar.gz").write_bytes(out.getvalue())
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = convert.main(["cifar10", "--archive", str(tmp_path / "c.tar.gz"), "--out", str(tmp_path / "out")])
    assert code == 2 and "refused to load" in err.getvalue() and "system" in err.getvalue(), err.getvalue()


# -- commands only from the command line -------------------------------------------------------------


def test_pipe_urls_in_a_config_are_refused_unless_the_command_line_allows_them(marker):
    cfg = load_config("toy_25gaussians", [f"data.url=pipe:touch {marker}"])
    with pytest.raises(ConfigError, match="runs a program when it is opened.*--allow-pipe"):
        check_commands(cfg)
    check_commands(cfg, allow_pipe=True)  # the user said so on the command line
    check_commands(load_config("toy_25gaussians"))  # and the permission does not outlive that call
    with pytest.raises(DataError, match="--allow-pipe"):
        read_shard_bytes(f"pipe:touch {marker}")


def test_a_failing_pipe_is_one_clear_error(tmp_path):
    cfg = load_config("toy_25gaussians")
    check_commands(cfg, allow_pipe=True)
    try:
        with pytest.raises(DataError, match="failed"):
            read_shard_bytes("pipe:exit 3")
    finally:
        check_commands(cfg)


def test_a_torchscript_inception_loads_only_when_trusted_on_the_command_line():
    cfg = load_config("fashion_mnist_mlp", ["eval.fid.inception=/somewhere/net.pt"])
    with pytest.raises(ConfigError, match="--trust-inception"):
        check_commands(cfg)
    check_commands(cfg, trust_inception=True)
    check_commands(load_config("fashion_mnist_mlp"))


@pytest.mark.slow
def test_the_trainer_refuses_a_pipe_url_before_any_work(tmp_path, marker):
    result = run_trainer([*tiny_overrides(tmp_path), f"data.url=pipe:touch {marker}", "data.toy="], check=False)
    assert result.returncode == 2 and "--allow-pipe" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


SECRET = "S3CRET-TOKEN"


@pytest.mark.parametrize(
    "key, url",
    [
        ("data.url", f"http://alice:{SECRET}@store.example/d"),
        ("data.url", f"https://{SECRET}@store.example/d"),
        ("data.url", f"s3://bucket/d/manifest.json?X-Amz-Credential=AKIA&X-Amz-Signature={SECRET}"),
        ("data.url", f"data/a-{{0..1}}.tar::https://store.example/b.tar?sig={SECRET}"),
        ("log.pushgateway", f"http://ops:{SECRET}@gateway:9091"),
    ],
)
def test_a_url_with_a_credential_is_refused_without_showing_it(key, url):
    """A configuration is saved with the run and in every checkpoint, and logged."""
    with pytest.raises(ConfigError, match="carries a credential") as error:
        load_config("debug", [f"{key}={url}", "log.prometheus_port=0"])  # a pushgateway needs the exporter on
    assert SECRET not in str(error.value) and key in str(error.value) and "fsspec" in str(error.value)


@pytest.mark.parametrize(
    "url", ["ssh://alice@host/d", "s3://bucket/d", "memory://b/d", "https://host/d.tar?download=1", "data/x"]
)
def test_a_plain_url_is_not_taken_for_a_credential(url):
    assert load_config("debug", [f"data.url={url}"]).data.url == url


@pytest.mark.slow
def test_the_trainer_refuses_a_credential_in_the_data_url_before_any_work(tmp_path):
    url = f"http://alice:{SECRET}@127.0.0.1:9/d"
    result = run_trainer([*tiny_overrides(tmp_path), f"data.url={url}", "data.toy="], check=False)
    assert result.returncode == 2 and "carries a credential" in result.stderr, result.stderr[-2000:]
    assert SECRET not in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


# -- checkpoints: verified, and damage survived ----------------------------------------------------


def _damage_truncate(folder):
    path = folder / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    return "weights.safetensors has 100 bytes"


def _damage_flip(folder):
    path = folder / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))
    return "weights.safetensors has changed since it was written"


def _damage_delete_engine(folder):
    (folder / "engine" / "ddp_state.pt").unlink()
    return "engine/ddp_state.pt is missing"


def _damage_empty(folder):
    for item in folder.iterdir():
        shutil.rmtree(item) if item.is_dir() else item.unlink()
    return "files.json is missing"


def _damage_state(folder):
    (folder / "trainer_state.json").write_text("{")
    return "trainer_state.json has 1 bytes"


DAMAGE = [_damage_truncate, _damage_flip, _damage_delete_engine, _damage_empty, _damage_state]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    run_trainer(tiny_overrides(tmp, steps=20))
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("how", DAMAGE, ids=lambda f: f.__name__.removeprefix("_damage_"))
def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_resumes(finished_run, tmp_path, how):
    shutil.copytree(finished_run, tmp_path / "copy")
    args = tiny_overrides(tmp_path / "copy", steps=30)
    latest = tmp_path / "copy" / "run" / "checkpoints" / "step_00000020"
    message = how(latest)
    assert message in damage(str(latest))
    result = run_trainer(args)
    assert f"checkpoint {latest} is damaged: {message}" in result.stderr, result.stderr
    assert "resumed from step 10" in result.stdout and "finished:" in result.stdout


def _files(folder) -> dict[str, bytes]:
    """Every file under ``folder`` but the run lock (which holds its last holder's PID)."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock")
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


@pytest.mark.slow
@pytest.mark.parametrize("found", ["listed", "loading"])
def test_a_resume_whose_every_checkpoint_is_damaged_stops_and_changes_nothing(finished_run, tmp_path, found):
    """Not a new run from scratch beside them: a requeued job would spend its compute again unasked."""
    shutil.copytree(finished_run, tmp_path / "copy")
    run = tmp_path / "copy" / "run"
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert len(checkpoints) >= 2
    for checkpoint in checkpoints:
        if found == "listed":  # the file list tells
            _damage_flip(checkpoint)
        else:  # the file list agrees: only the parameter check after each load tells
            _forge(str(checkpoint), lambda t: torch.full_like(t, float("nan")))
    before = _files(run)
    result = run_trainer(tiny_overrides(tmp_path / "copy", steps=30), check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"every checkpoint in {run / 'checkpoints'} is damaged" in errors[0], result.stderr
    assert "checkpoint.resume=false" in errors[0] and "Traceback" not in result.stderr
    assert _files(run) == before
    # The fix the error names: the damaged ones set aside, a new run beside nothing.
    result = run_trainer([*tiny_overrides(tmp_path / "copy", steps=10), "checkpoint.resume=false"])
    assert "from scratch" in result.stdout and "finished:" in result.stdout
    (aside,) = run.glob("previous-*")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == [p.name for p in checkpoints]


@pytest.mark.slow
def test_a_resume_past_train_steps_says_there_is_nothing_to_train(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "copy")
    checkpoints = tmp_path / "copy" / "run" / "checkpoints"
    before = sorted(p.name for p in checkpoints.iterdir())
    result = run_trainer(tiny_overrides(tmp_path / "copy", steps=10))
    assert "the run is at step 20 and train.steps=10: nothing to train (train.steps does not take a run back)" in (
        result.stderr
    ), result.stderr
    assert "resumed from step 20" in result.stdout and sorted(p.name for p in checkpoints.iterdir()) == before


@pytest.mark.slow
def test_sample_tool_skips_a_damaged_latest_checkpoint(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "copy")
    _damage_flip(tmp_path / "copy" / "run" / "checkpoints" / "step_00000020")
    result = subprocess.run(
        [sys.executable, "-m", "trainer.sample", "--run", str(tmp_path / "copy" / "run"), "--num", "50"],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "step_00000020 is damaged" in result.stderr and "step_00000010" in result.stdout


def test_checkpoints_record_and_verify_every_file(finished_run):
    folder = finished_run / "run" / "checkpoints" / "step_00000020"
    listed = json.loads((folder / "files.json").read_text())["files"]
    assert {"weights.safetensors", "config.yaml", "trainer_state.json", "rng_rank0.pt", "engine/ddp_state.pt"} <= set(
        listed
    )
    assert damage(str(folder)) is None
    assert Checkpoints(str(folder.parent), 3, "", {}).list()[-1] == str(folder)


@pytest.mark.slow
def test_resuming_with_another_model_fails_before_the_run_folder_changes(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "copy")
    config = tmp_path / "copy" / "run" / "config.yaml"
    before = config.read_text()
    result = run_trainer([*tiny_overrides(tmp_path / "copy", steps=30), "model.hidden=[16,16]"], check=False)
    assert result.returncode == 2 and "cannot resume" in result.stderr and "model.hidden" in result.stderr
    assert config.read_text() == before


# -- one writer, nothing skipped -------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_trainer_on_the_same_run_folder_stops_at_once(tmp_path):
    args = tiny_overrides(tmp_path, steps=100_000)
    cmd = [sys.executable, "trainer/main.py", "--config", "toy_25gaussians", *args]
    first = subprocess.Popen(cmd, cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.exists() and metrics.read_text()):
            time.sleep(0.2)
        second = run_trainer(args, check=False)
        assert second.returncode == 2
        assert "is in use by another trainer" in second.stderr and f"pid {first.pid}" in second.stderr
        assert first.poll() is None  # the first one trains on
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_a_restart_runs_a_final_evaluation_that_never_finished(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "copy")
    final = tmp_path / "copy" / "run" / "eval" / "step_00000020.json"
    final.unlink()  # as if the process was killed during the final evaluation
    result = run_trainer(tiny_overrides(tmp_path / "copy", steps=20))
    assert "resumed from step 20" in result.stdout and final.is_file()
    assert json.loads(final.read_text())["step"] == 20


@pytest.mark.slow
@pytest.mark.parametrize("data_ready", [True, False])
def test_a_stop_request_during_start_up_ends_with_the_requeue_code(tmp_path, data_ready):
    """With the data there, the run sets up and saves its step-0 checkpoint; with its toy data still to
    write, it stops before writing (that data is written again by the next run: a large set took
    minutes, past the stop watchdog's 20 s)."""
    overrides = tiny_overrides(tmp_path, steps=1000)
    if data_ready:
        from data_pipeline import write_toy_data

        cfg = load_config("toy_25gaussians", overrides)
        write_toy_data(cfg.data, cfg.train.seed)
    cmd = [sys.executable, "trainer/main.py", "--config", "toy_25gaussians", *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.5)  # the handlers are in; the heavy imports and the set-up are still going on
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err.decode()[-2000:]
    checkpoint = (tmp_path / "run" / "checkpoints" / "step_00000000" / "weights.safetensors").is_file()
    if data_ready:
        assert checkpoint
    else:  # the signal lands in the imports, before the write; on a slow machine the write may be done
        assert checkpoint or "stop signal received while writing the toy data" in err.decode(), err.decode()[-2000:]


@pytest.mark.slow
def test_a_toy_preset_leaves_a_damaged_data_folder_unchanged(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text('{"shards": [')  # a user's manifest, damaged
    (data / "mine-000000.tar").write_bytes(b"user data")
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    result = run_trainer(tiny_overrides(tmp_path), check=False)
    assert result.returncode == 2 and "is not valid JSON" in result.stderr and "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before


@pytest.mark.slow
def test_the_rendezvous_store_listens_on_loopback_only(tmp_path):
    from tests.conftest import accelerate_launcher

    launcher, env = accelerate_launcher(2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher[launcher.index("--main_process_port") + 1] = str(port)
    args = [*tiny_overrides(tmp_path, steps=100_000)]
    cmd = [*launcher, "trainer/main.py", "--config", "toy_25gaussians", *args]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, found = time.time() + 120, set()
        while time.time() < deadline and not found:
            for table in ("/proc/net/tcp", "/proc/net/tcp6"):
                for line in open(table).read().splitlines()[1:]:
                    local, state = line.split()[1], line.split()[3]
                    if state == "0A" and int(local.split(":")[1], 16) == port:  # 0A: LISTEN
                        found.add(local.split(":")[0])
            time.sleep(0.2)
        assert found == {"0100007F"}, found  # 127.0.0.1, and not 0.0.0.0 or ::
    finally:
        proc.kill()
        proc.wait()
        # Workers still in the rendezvous sit in C++ and run no Python signal handler: SIGTERM would not end them.
        subprocess.run(["pkill", "-KILL", "-f", str(tmp_path)], check=False)


@pytest.mark.slow
def test_an_unwritable_output_folder_is_one_clear_error(tmp_path):
    # /proc refuses new files even to root: what a read-only or full filesystem looks like to a tool.
    result = run_trainer([*tiny_overrides(tmp_path), "output_dir=/proc/meg-run"], check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: " in result.stderr and "/proc/meg-run" in result.stderr
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = convert.main(["toy", "--num-samples", "64", "--out", "/proc/meg-data"])
    assert code == 2 and err.getvalue().startswith("error: ") and "/proc/meg-data" in err.getvalue()


def test_converted_files_get_the_mode_the_umask_gives(tmp_path):
    old = os.umask(0o022)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assert convert.main(["toy", "--num-samples", "64", "--num-shards", "2", "--out", str(tmp_path / "d")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "d").iterdir()}
    assert set(modes.values()) == {0o644}, modes
