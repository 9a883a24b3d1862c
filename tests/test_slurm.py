"""deploy/slurm/meg.sbatch on a real one-node Slurm cluster (Debian's slurmctld, slurmd, munge).

The fixture starts munged, slurmctld and slurmd from a slurm.conf in a temporary folder (nothing in
/etc is touched) and stops them by PID at the end. The jobs run 2 tasks on the one node: two
"machines" whose accelerate launchers meet over gloo on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import set_up_venv, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
SBATCH_SCRIPT = ROOT / "deploy" / "slurm" / "meg.sbatch"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")
NODE = "megnode1"

pytestmark = pytest.mark.slow


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"({path} not readable)"


class SlurmCluster:
    """munged + slurmctld + slurmd in ``root``; clients find it through ``env`` (SLURM_CONF)."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for key in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
            if key != "SLURM_CONF":  # a test run inside a Slurm job must not leak its job here
                del self.env[key]

    def start(self) -> None:
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir(mode=0o755)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        socket_path = r / "munge" / "munge.socket"
        self._spawn(
            "munged",
            [
                _which("munged"),
                "-F",
                "--force",
                f"--key-file={key}",
                f"--socket={socket_path}",
                f"--pid-file={r / 'munge' / 'munged.pid'}",
                f"--seed-file={r / 'munge' / 'seed'}",
                f"--log-file={r / 'log' / 'munged.log'}",
            ],
        )
        self._wait_for(lambda: socket_path.exists(), "munged's socket", r / "log" / "munged.log")
        self.conf.write_text(f"""\
ClusterName=megtest
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path},cred_expire=10
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
GresTypes=gpu
NodeName={NODE} NodeAddr=127.0.0.1 CPUs=2 Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
        # One GPU that is /dev/null: Slurm can grant it (SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES), but
        # nothing on the node shows a GPU - the node whose GPUs are missing.
        (r / "gres.conf").write_text(f"NodeName={NODE} Name=gpu File=/dev/null\n")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", NODE, "-f", str(self.conf)])
        self._wait_for(self._node_ready, f"node {NODE} idle", r / "log" / "slurmd.log", timeout=30)

    def _spawn(self, name: str, argv: list[str]) -> None:
        # Own session: the daemon and whatever it forks (slurmstepd, job processes) share a process
        # group that stop() can signal by id.
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        log.close()

    def _wait_for(self, ready, what: str, log: Path, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}:\n{_tail(log)}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}:\n{_tail(log)}")

    def _node_ready(self) -> bool:
        out = self.run("sinfo", "-h", "-n", NODE, "-o", "%t", check=False).stdout.strip()
        return out in ("idle", "mix", "alloc")

    def run(self, *argv: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [_which(argv[0]) or argv[0], *argv[1:]],
            env=self.env,
            cwd=cwd,
            text=True,
            capture_output=True,
            check=check,
            timeout=120,
        )

    def job(self, job_id: int) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: int, timeout: float, until=None) -> dict[str, str]:
        """Polls until the job reaches a final state (or ``until(job)`` holds)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if (
                until(info)
                if until
                else info["JobState"]
                in (
                    "COMPLETED",
                    "FAILED",
                    "CANCELLED",
                    "TIMEOUT",
                    "NODE_FAIL",
                    "OUT_OF_MEMORY",
                    "BOOT_FAIL",
                )
            ):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info['JobState']} after {timeout}s")
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancels what still runs, then stops the daemons by PID (whole process groups)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--partition=debug", check=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None:
                continue
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            try:  # leftovers of the group (a slurmstepd that outlived slurmd)
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{_tail(f, 30)}" for f in sorted((self.root / "log").iterdir()))


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [b for b in BINARIES if _which(b) is None]
    if missing:
        msg = f"Slurm/munge binaries missing: {', '.join(missing)} (deploy/ci/install-system-packages.sh installs them)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg + "; in CI they must be there", pytrace=False)
        pytest.skip(msg)
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs its daemons as root (SlurmUser=root)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _trainer_args(tmp: Path, steps: int) -> list[str]:
    # Checkpoints every 20 steps, so that a preempted job has one to resume from.
    return ["--config", "toy_25gaussians", *tiny_overrides(tmp, steps), "checkpoint.every=20", "log.progress=false"]


# Two tasks on the one node stand for two nodes (the script runs one task per node).
TWO_TASKS = [
    "--parsable",
    "--nodes=1",
    "--ntasks=2",
    "--ntasks-per-node=2",
    "--cpus-per-task=1",
    "--gres=none",  # the node's one "GPU" is /dev/null (see start()): these jobs train on the CPU
    "--time=10",
]


def _submit(cluster: SlurmCluster, tmp: Path, steps: int, via_launch_sh: bool = False) -> tuple[int, Path]:
    out = tmp / "job.out"
    trainer = _trainer_args(tmp, steps)
    # The job runs with this interpreter's venv. launch.sh's set-up step finds it set up already
    # when the suite runs through ./launch.sh test (as .ci/run does).
    cluster.env.update({"MEG_ROOT": str(ROOT), "MEG_VENV": set_up_venv(tmp)})
    if via_launch_sh:
        argv = [
            str(ROOT / "launch.sh"),
            "--slurm",
            *(f"--sbatch={a}" for a in TWO_TASKS),
            f"--output={out}",
            *trainer,
        ]
    else:
        argv = ["sbatch", *TWO_TASKS, f"--output={out}", str(SBATCH_SCRIPT), *trainer]
    res = cluster.run(*argv, cwd=tmp)
    return int(res.stdout.strip().split(";")[0]), out


def _metrics(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]


def _checkpoints(tmp: Path) -> list[str]:
    return sorted(p.name for p in (tmp / "run" / "checkpoints").iterdir())


def test_sbatch_two_ranks_train_and_checkpoint(slurm, tmp_path):
    job_id, out = _submit(slurm, tmp_path, steps=40, via_launch_sh=True)
    info = slurm.wait_job(job_id, timeout=120)
    log = _tail(out, 80)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log}\n{slurm.logs()}"
    assert "2 process(es)" in log and "from scratch" in log, log
    assert re.search(r"machine_rank=0/2", log) and re.search(r"machine_rank=1/2", log), log
    # Periodic saves at 20 and 40 (the trainer may also keep a step-0 fallback).
    assert {"step_00000020", "step_00000040"} <= set(_checkpoints(tmp_path))
    assert _checkpoints(tmp_path)[-1] == "step_00000040"
    steps = [m["step"] for m in _metrics(tmp_path) if "energy_loss" in m]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]
    assert all(m["samples_per_s"] > 0 for m in _metrics(tmp_path) if "energy_loss" in m)


def test_preempted_job_requeues_and_resumes(slurm, tmp_path):
    """USR1 to the batch shell, as --signal=B:USR1@180 sends it: checkpoint, requeue, resume."""
    steps = 200
    job_id, out = _submit(slurm, tmp_path, steps=steps)
    metrics = tmp_path / "run" / "metrics.jsonl"

    def training(_info) -> bool:
        return metrics.exists() and any('"energy_loss"' in line for line in metrics.read_text().splitlines())

    slurm.wait_job(job_id, timeout=90, until=training)
    slurm.run("scancel", "--signal=USR1", "--batch", str(job_id))
    final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
    info = slurm.wait_job(job_id, timeout=60, until=lambda i: i["Restarts"] == "1" or i["JobState"] in final)
    assert info["Restarts"] == "1", f"{info}\n{_tail(out)}\n{slurm.logs()}"
    info = slurm.wait_job(job_id, timeout=120, until=lambda i: i["JobState"] in final)
    log = out.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{log}\n{slurm.logs()}"
    assert "preempted; requeueing" in log, log
    resumed = re.findall(r"resumed from step (\d+)", log)
    assert len(resumed) == 1, log
    resumed_step = int(resumed[0])
    assert 0 < resumed_step < steps, log
    # The stop checkpoint is where the ranks agreed to stop: a log boundary, not a periodic save.
    assert resumed_step % 5 == 0
    logged = [m["step"] for m in _metrics(tmp_path) if "energy_loss" in m]
    first_run, second_run = (
        logged[: logged.index(resumed_step) + 1],
        logged[logged.index(resumed_step) + 1 :],
    )
    assert first_run == list(range(5, resumed_step + 1, 5)), logged
    assert second_run == list(range(resumed_step + 5, steps + 1, 5)), logged
    assert _checkpoints(tmp_path)[-1] == f"step_{steps:08d}"


def test_a_node_given_gpus_that_shows_none_stops_instead_of_training_on_its_cpu(slurm, tmp_path):
    slurm.env.update({"MEG_ROOT": str(ROOT), "MEG_VENV": sys.prefix})
    out = tmp_path / "slurm.out"
    tasks = [a for a in TWO_TASKS if not a.startswith("--gres")]
    argv = ["sbatch", *tasks, "--gres=gpu:1", f"--output={out}", str(SBATCH_SCRIPT), *_trainer_args(tmp_path, 20)]
    job_id = int(slurm.run(*argv, cwd=tmp_path).stdout.strip().split(";")[0])
    info = slurm.wait_job(job_id, timeout=60, until=lambda i: i["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"))
    log = _tail(out)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", f"{info}\n{log}"
    assert "Slurm gave this job 1 GPU(s)" in log and "--gres=none" in log, log
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step trained


def test_the_batch_script_asks_for_gpus_and_cpus_itself():
    directives = [line.split()[1] for line in SBATCH_SCRIPT.read_text().splitlines() if line.startswith("#SBATCH ")]
    assert any(d.startswith(("--gres=gpu", "--gpus-per-node=")) for d in directives), directives
    assert any(d.startswith("--cpus-per-task=") for d in directives), directives
