"""The CLI wrapper: a user's mistake is one line naming the file or key (exit 2); anything else is a
bug and keeps its traceback."""

import contextlib
import errno
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline.cli import EXIT_USER_ERROR, CheckpointError, ConfigError, UserError, run_tool
from data_pipeline.shards import DataError, is_command_url
from tests.conftest import REPO_ROOT, set_up_venv, subprocess_env
from trainer.checkpoint import NETWORKS, STATE_FILE, write_export
from trainer.config import check_commands, config_to_yaml, load_config
from trainer.job import check_resumable


def _run(error: BaseException) -> tuple[int, str]:
    def body() -> int:
        raise error

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_tool(body, debug=False)
    return code, err.getvalue()


@pytest.mark.parametrize(
    "error, shown",
    [
        (ConfigError("train.steps=0 is out of range"), "error: train.steps=0 is out of range"),
        (DataError("shard x.tar is unreadable"), "error: shard x.tar is unreadable"),
        (CheckpointError("run/step_1/trainer_state.json: step -5"), "error: run/step_1/trainer_state.json: step -5"),
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "/no/such"),
            "No such file or directory: /no/such",
        ),
        (OSError(errno.ENOSPC, "No space left on device", "/full/disk/f"), "No space left on device: /full/disk/f"),
        # A write through a file object names no file: a full disk was a traceback (the lock file, a plot).
        (OSError(errno.ENOSPC, "No space left on device"), "error: No space left on device (free some space and"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "error: Disk quota exceeded (the disk quota is used up"),
        # A folder where a file belongs; a rename names its target, not its temporary source ("config.yaml.tmp-18555").
        (IsADirectoryError(errno.EISDIR, "Is a directory", "ref"), "Is a directory: ref (a folder is where a file"),
        (
            IsADirectoryError(errno.EISDIR, "Is a directory", "run/config.yaml.tmp-7", None, "run/config.yaml"),
            "error: Is a directory: run/config.yaml (a folder is where a file belongs: give a file's path",
        ),
        (pickle.UnpicklingError("Weights only load failed"), "error: UnpicklingError: Weights only load failed"),
    ],
)
def test_a_user_error_is_one_line_and_exit_2(error, shown):
    code, err = _run(error)
    assert code == EXIT_USER_ERROR and err.startswith("error: ") and shown in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_safetensors_error_is_a_user_error():
    from safetensors import SafetensorError

    code, err = _run(SafetensorError("Error while deserializing header: HeaderTooLarge"))
    assert code == EXIT_USER_ERROR and "SafetensorError: Error while deserializing header" in err


@pytest.mark.parametrize(
    "bug",
    [
        ValueError("an internal ValueError"),
        KeyError("an internal key"),
        TypeError("unsupported operand"),
        RuntimeError("a torch error"),
        OSError("a bare OSError with no errno or file"),
        FileNotFoundError("a message, not a file: no errno"),
        OSError(errno.ECONNRESET, "Connection reset by peer"),  # an errno, but no file
    ],
)
def test_any_other_exception_is_a_bug_and_keeps_its_traceback(bug):
    with pytest.raises(type(bug)):
        _run(bug)


def test_debug_keeps_the_traceback_of_a_user_error_too():
    def body() -> int:
        raise ConfigError("x")

    with pytest.raises(ConfigError):
        run_tool(body, debug=True)


def test_the_project_errors_are_user_errors_and_keep_their_old_bases():
    from trainer.config import DeepSpeedConfigError

    for cls, old in ((ConfigError, ValueError), (DataError, RuntimeError), (CheckpointError, ValueError)):
        assert issubclass(cls, UserError) and issubclass(cls, old)
    assert issubclass(DeepSpeedConfigError, UserError)


@pytest.mark.parametrize("url", ["pipe:cat x.tar", "PIPE:cat x.tar", "Pipe:cat x.tar", " pipe:cat x.tar", "SCP:host/x"])
def test_every_spelling_of_a_command_url_is_refused_at_start_up(url):
    assert is_command_url(url)
    cfg = load_config("toy_25gaussians", [f"data.url={url}"])
    with pytest.raises(ConfigError, match="--allow-pipe"):
        check_commands(cfg)


@pytest.mark.parametrize(
    "change, says",
    [
        ({"step": -5}, "step must be a whole number >= 0, got -5"),
        ({"step": 2.5}, "step must be a whole number >= 0"),
        ({"step": "30"}, "step must be a whole number >= 0"),
        ({"lr_horizon": -1}, "lr_horizon must be"),
        ({"lr_scale": float("nan")}, "lr_scale must be in (0, 1]"),
        ({"lr_scale": 0}, "lr_scale must be in (0, 1]"),
        ({"rank_positions": []}, "rank_positions must be a non-empty list"),
        ({"rank_positions": [{"epoch": -1, "batches_done": 0}]}, "rank_positions.epoch must be"),
        ({"rank_positions": [{"epoch": 0, "batches_done": float("inf")}]}, "rank_positions.batches_done must be"),
    ],
)
def test_an_out_of_range_trainer_state_is_a_damaged_checkpoint_naming_the_file(tmp_path, monkeypatch, change, says):
    import json

    from trainer.checkpoint import STATE_FILE, Checkpoints, TrainState

    state = {**TrainState(step=30).to_json(), **change}
    (tmp_path / STATE_FILE).write_text(json.dumps(state))

    class Runtime:  # what Checkpoints.load needs of the engine
        rank, world_size, is_main = 0, 1, True

        def restore(self, folder, weights):
            pass

    import trainer.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "load_export", lambda path: ({}, {}, ""))
    with pytest.raises(CheckpointError) as err:
        Checkpoints(str(tmp_path), 1, "", {}).load(str(tmp_path), Runtime(), TrainState())
    assert f"{tmp_path / STATE_FILE} is damaged" in str(err.value) and says in str(err.value)


def _checkpoint_of(tmp_path, overrides: list[str], ranks: int) -> str:
    """A checkpoint's export and trainer state as a run of ``ranks`` ranks with ``overrides`` writes them."""
    folder = tmp_path / "step_00000010"
    folder.mkdir()
    cfg = load_config("toy_25gaussians", overrides)
    weights = {net: {"w": torch.zeros(1)} for net in NETWORKS}
    write_export(str(folder), weights, config_to_yaml(cfg), {"sample_shape": [2], "dataset": "25gaussians", "step": 10})
    positions = [{"epoch": 0, "batches_done": 5}] * ranks
    (folder / STATE_FILE).write_text(json.dumps({"step": 10, "rank_positions": positions}))
    return str(folder)


@pytest.mark.parametrize(
    "saved, now, ranks, refused",
    [
        (["train.engine=fsdp"], ["train.engine=fsdp"], 1, "ranks: 2 wrote the checkpoint, 1 now"),
        (["train.engine=fsdp"], ["train.engine=fsdp"], 2, None),
        (["train.engine=deepspeed"], ["train.engine=deepspeed"], 4, "ranks: 2 wrote the checkpoint, 4 now (ZeRO's"),
        (["train.engine=deepspeed", "deepspeed.zero_stage=0"], ["train.engine=deepspeed", "deepspeed.zero_stage=0"],
         4, None),  # no shards
        (["train.engine=fsdp"], ["train.engine=ddp"], 2, "train.engine: 'fsdp' in the checkpoint, 'ddp' now"),
        (["train.engine=fsdp"], ["train.engine=fsdp", "train.mixed_precision=bf16"], 2, None),
        (["train.engine=deepspeed", "train.mixed_precision=bf16"], ["train.engine=deepspeed",
         "train.mixed_precision=fp16"], 2, "train.mixed_precision: 'bf16' in the checkpoint, 'fp16' now"),
        (["train.engine=deepspeed", "deepspeed.zero_stage=0"], ["train.engine=deepspeed", "deepspeed.zero_stage=2"],
         2, "deepspeed.zero_stage: 0 in the checkpoint, 2 now"),
        (["train.engine=deepspeed", "deepspeed.zero_stage=2"], ["train.engine=deepspeed", "deepspeed.zero_stage=0"],
         2, "deepspeed.zero_stage: 2 in the checkpoint, 0 now"),
        (["train.mixed_precision=bf16"], ["train.mixed_precision=fp16"], 1, None),  # ddp: a fresh loss scale
    ],
)  # fmt: skip
def test_a_resume_the_engine_cannot_do_is_refused_before_any_work(tmp_path, saved, now, ranks, refused):
    # Found only while loading, such a mismatch passed for damage: FSDP fell back checkpoint by
    # checkpoint, started from scratch and moved the trained ones aside; DeepSpeed silently kept the
    # checkpoint's loss scaler (a static scale of 1 in fp16 after bf16).
    checkpoint = _checkpoint_of(tmp_path, saved, ranks=2)
    cfg = load_config("toy_25gaussians", now)
    if refused is None:
        check_resumable(cfg, checkpoint, TOY_DATA, ranks)
        return
    with pytest.raises(ConfigError, match="cannot resume") as caught:
        check_resumable(cfg, checkpoint, TOY_DATA, ranks)
    assert refused in str(caught.value)


TOY_DATA = {"sample_shape": [2], "dataset": "25gaussians"}  # the run's data, as trainer/job.py's train() has it


@pytest.mark.parametrize(
    "saved, now, processes, refused",
    [
        ([], ["model.hidden=[16,16]"], [], "model.hidden: [128, 128, 128] in the checkpoint, [16, 16] now"),
        ([], ["model.hidden=[16,16]", "checkpoint.resume=false"], [], None),  # starts over: nothing to resume
        (["train.engine=fsdp"], ["train.engine=fsdp"], ["--processes", "2"], "ranks: 1 wrote the checkpoint, 2 now"),
        (["train.engine=fsdp"], ["train.engine=fsdp"], [], None),  # the ranks are not known
    ],
)  # fmt: skip
def test_check_says_when_the_run_folders_checkpoint_cannot_resume_into_the_settings(
    tmp_path, saved, now, processes, refused
):
    # --check said "good" (and ./launch.sh --slurm submitted the job) for a run folder whose checkpoint the
    # job then refused on its nodes, after the queue and after writing its toy data.
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    checkpoint = _checkpoint_of(tmp_path / "run" / "checkpoints", saved, ranks=1)
    cmd = [sys.executable, "trainer/main.py", "--config", "toy_25gaussians", f"output_dir={tmp_path / 'run'}",
           f"data.url={tmp_path / 'data'}", *now, "--check", *processes]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    if refused is None:
        assert done.returncode == 0 and "the configuration and the files it names are good" in done.stdout, done.stderr
        return
    assert done.returncode == 2 and done.stderr.startswith(f"error: cannot resume {checkpoint}: "), done.stderr
    assert refused in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists()


def test_a_resume_on_another_data_set_of_the_same_shape_is_refused(tmp_path):
    # --config toy_8gaussians output_dir=<a 25 Gaussians run> resumed it on the 8 Gaussians without a word.
    checkpoint = _checkpoint_of(tmp_path, [], ranks=1)
    cfg = load_config("toy_8gaussians")
    with pytest.raises(ConfigError) as caught:
        check_resumable(cfg, checkpoint, {"sample_shape": [2], "dataset": "8gaussians"}, 1)
    assert "data set: '25gaussians' in the checkpoint, '8gaussians' in data.url now" in str(caught.value)
    check_resumable(load_config("toy_25gaussians"), checkpoint, TOY_DATA, 1)


@pytest.mark.parametrize(
    "args, got",
    [
        (["--nproc", "--config", "debug"], "--config"),
        (["--nproc", "abc"], "abc"),
        (["--nproc", "0"], "0"),
        (["--nproc", "-2"], "-2"),
        (["--nproc=1.5"], "1.5"),
        (["--nproc", "99999999999999999999"], "99999999999999999999"),
        (["--config", "debug", "--nproc"], ""),
    ],
)
def test_launch_sh_refuses_a_bad_nproc_before_any_work(tmp_path, args, got):
    venv = tmp_path / "venv"  # the set-up would make it: it must not have started
    env = {**os.environ, "MEG_VENV": str(venv)}
    done = subprocess.run([str(REPO_ROOT / "launch.sh"), *args], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == f"launch.sh: --nproc wants a whole number >= 1 (got '{got}')\n"
    assert not venv.exists()


def fake_sbatch(tmp_path) -> dict[str, str]:
    """An environment for launch.sh with this venv set up and an sbatch that marks tmp_path/submitted."""

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$* MEG_WARNING_S=$MEG_WARNING_S" >{tmp_path / "submitted"}\n')
    (bin_dir / "sbatch").chmod(0o755)
    return {**os.environ, "MEG_VENV": set_up_venv(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.parametrize(
    "args, says",
    [
        # "launch.sh: line 73: $2: unbound variable"
        (["--slurm", "--nodes"], "launch.sh --slurm: --nodes needs a value"),
        (["--slurm", "--time", "--nodes", "2"], "launch.sh --slurm: --time needs a value"),
        # Submitted as it was: the job's log said it after its wait in the queue.
        (["--slurm", "--nodes", "2", "--config", "debug", "train.stepz=1"], "error: unknown config key 'train.stepz'"),
        # Every process said it, amid the launcher's warnings and torch-elastic's error report.
        (["--nproc", "2", "--config", "nope"], "error: no config file or preset 'nope'"),
        # The check did not know the number of processes: each of the 3 said it after its start-up.
        (["--nproc", "3", "--config", "debug"], "error: data.batch_size=64 must be divisible by the 3 ranks"),
        (["--nproc", "3", "--config", "debug", "--check"], "error: data.batch_size=64 must be divisible by the 3"),
    ],
)
def test_launch_sh_says_a_slurm_flag_without_its_value_or_a_bad_config_once_before_launching(tmp_path, args, says):
    env = fake_sbatch(tmp_path)
    done = subprocess.run([str(REPO_ROOT / "launch.sh"), *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1 and says in done.stderr, done.stderr
    assert not (tmp_path / "submitted").exists()


@pytest.mark.parametrize(
    "options, env, ranks",
    [
        (["--nodes", "3"], {}, 12),  # meg.sbatch's own --gres=gpu:4
        (["--nodes", "1", "--gres", "gpu:a100:3"], {}, 3),
        (["--nodes=5", "--gres=none"], {}, 5),  # CPU nodes: one process each
        (["--nodes", "3", "--gres", "none"], {"MEG_PROCS_PER_NODE": "2"}, 6),
    ],
)
def test_launch_sh_slurm_checks_the_configuration_as_the_jobs_ranks_before_submitting(tmp_path, options, env, ranks):
    # It checked as one rank: a batch the ranks cannot split was said in the job's log, after the queue.
    env = {**fake_sbatch(tmp_path), **env}
    done = subprocess.run([str(REPO_ROOT / "launch.sh"), "--slurm", *options, "--config", "debug"],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == f"error: data.batch_size=64 must be divisible by the {ranks} ranks\n"
    assert not (tmp_path / "submitted").exists()


@pytest.mark.parametrize("procs", ["0", "four", "2*3"])
def test_launch_sh_slurm_refuses_a_bad_processes_per_node_before_submitting(tmp_path, procs):
    env = {**fake_sbatch(tmp_path), "MEG_PROCS_PER_NODE": procs}
    done = subprocess.run([str(REPO_ROOT / "launch.sh"), "--slurm", "--config", "debug"],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == f"launch.sh --slurm: MEG_PROCS_PER_NODE wants a whole number from 1 to 9999 (got '{procs}')\n"
    assert not (tmp_path / "submitted").exists()


def test_launch_sh_slurm_says_when_it_cannot_tell_the_ranks_and_passes_the_warning_lead_time_on(tmp_path):
    env = fake_sbatch(tmp_path)
    env.pop("MEG_WARNING_S", None)
    launch = [str(REPO_ROOT / "launch.sh"), "--slurm", "--nodes", "2-4", "--sbatch=--signal=B:USR1@600"]
    done = subprocess.run([*launch, "--config", "debug"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr == (
        "launch.sh --slurm: the configuration is checked as for one rank "
        "(--nodes=2-4 leaves the job's rank count open)\n"
    )
    submitted = (tmp_path / "submitted").read_text()
    assert submitted.startswith("--nodes=2-4 --signal=B:USR1@600 ") and submitted.endswith(" MEG_WARNING_S=600\n")


@pytest.mark.parametrize("launch", [["--slurm", "--nodes", "2"], ["--nproc", "2"]])
@pytest.mark.parametrize("asks", ["--help", "--check", "--print-config"])
def test_launch_sh_answers_a_question_to_the_trainer_without_launching_anything(tmp_path, launch, asks):
    # --slurm submitted a job for each of these; --nproc started N processes, each answering.
    env = fake_sbatch(tmp_path)
    cmd = [str(REPO_ROOT / "launch.sh"), *launch, "--config", "debug", f"output_dir={tmp_path / 'run'}", asks]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and not done.stderr, done.stderr[-2000:]
    answer = {"--help": "usage: trainer/main.py", "--check": "debug: the configuration and the files it names are good",
              "--print-config": "output_dir: "}[asks]  # fmt: skip
    assert answer in done.stdout and not (tmp_path / "submitted").exists() and not (tmp_path / "run").exists()


def test_launch_sh_help_is_its_own_and_the_trainers(tmp_path):

    # By a relative path from another folder: the script reads itself after its cd to the checkout.
    where = Path(REPO_ROOT).name + "/launch.sh"  # from the checkout's parent folder
    done = subprocess.run(["bash", where, "--help"], env={**os.environ, "MEG_VENV": set_up_venv(tmp_path)},
                          cwd=Path(REPO_ROOT).parent, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("MEG: set up and run.\n"), done.stderr
    assert "./launch.sh --slurm --nodes 2" in done.stdout and "usage: trainer/main.py" in done.stdout
    assert "set -euo" not in done.stdout  # the usage ends where the script begins


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_an_output_dir_that_is_not_a_folder_is_named_before_any_work(tmp_path, where):
    # It was "Not a directory: <path>/.lock" from the run-folder lock, after the data set was opened.
    import threading

    from trainer.job import check_output_dir, run

    (tmp_path / "file").write_text("notes")
    folder = str(tmp_path / "file") if where == "file" else str(tmp_path / "file" / "run")
    says = f"output_dir={folder} is not a folder" if where == "file" else f"output_dir={folder}: {tmp_path / 'file'}"
    with pytest.raises(ConfigError, match="not a folder: choose another output_dir") as refused:
        run(load_config("toy_25gaussians", [f"output_dir={folder}"]), threading.Event())
    assert str(refused.value).startswith(says)
    check_output_dir(str(tmp_path / "new" / "run"), "data/toy")  # a folder still to be made is fine


@pytest.mark.slow
def test_an_architecture_that_cannot_take_the_data_is_refused_before_the_run_folder(tmp_path):
    # It was refused once the run folder held its lock file (and the step's networks were being built).
    from tests.conftest import run_trainer, tiny_overrides

    mlp_widths = ("model.hidden", "model.generator_hidden")
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith(mlp_widths)]
    result = run_trainer([*overrides, "model.arch=conv", "model.conv_width=4"], check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "error: model.arch=conv: the conv arch takes square (C, H, W) images, got shape (2,)" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_full_disk_while_writing_a_file_names_the_file(tmp_path, monkeypatch):
    # meg-evaluate's JSON, meg-sample's .npy and the plots go through write_replacing: a full disk
    # surfaced as a bare "[Errno 28] No space left on device" traceback after the whole evaluation.
    from trainer.nofollow import write_replacing

    target = tmp_path / "eval.json"
    target.write_text("the earlier result")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as error, write_replacing(str(target)) as f:
        monkeypatch.setattr(f, "write", full_disk)
        f.write("{}")
    code, err = _run(error.value)
    assert code == EXIT_USER_ERROR
    assert err == f"error: No space left on device: {target} (free some space and run again)\n"
    assert target.read_text() == "the earlier result" and os.listdir(tmp_path) == ["eval.json"]


@pytest.mark.parametrize("garbage", [b"hi\n", b"e", b"\x80\x02K\x01K\x02s."])
def test_a_torch_file_that_is_garbage_is_a_checkpoint_error_naming_it(tmp_path, garbage):
    # A text file or a few stray bytes given as eval.stackedmnist.classifier (or a damaged rng or
    # engine file of a checkpoint without files.json): torch's weights-only unpickler raised KeyError
    # or IndexError, and the evaluation (or the resume) ended in a traceback.
    from trainer.checkpoint import load_tensors
    from trainer.classifier import load_classifier

    path = tmp_path / "classifier.pt"
    path.write_bytes(garbage)
    with pytest.raises(CheckpointError, match=f"{path} is not a readable torch file"):
        load_tensors(str(path))
    with pytest.raises(CheckpointError, match=f"{path} is not a readable torch file.*python -m trainer.classifier"):
        load_classifier(str(path))
