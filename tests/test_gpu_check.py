"""bench/gpu_check.sh: its dry run (every phase on the CPU at tiny sizes, tests/test_gpu.py's tests
included) in the suite, so that the one command a GPU machine gets cannot rot."""

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, subprocess_env

PHASES = ("gpu tests", "fused-op tests", "bench_penalty bf16", "bench_penalty fp32", "stackedmnist data",
          "stackedmnist run", "stackedmnist evaluation", "bench_penalty compile vs capture")  # fmt: skip


def _collected(test_file: str, env: dict) -> int:
    """How many tests the file holds as the dry run sees them (-m "": no marker filter)."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "", "-p", "no:cacheprovider", test_file],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return int(re.search(r"(\d+) tests? collected", result.stdout).group(1))


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_test_and_phase(tmp_path):
    env = subprocess_env()
    env.update(OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=2400,
    )  # fmt: skip
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert result.returncode == 0, summary + result.stderr[-3000:]
    assert "every phase passed" in summary and "FAILED" not in summary and "NOT RUN" not in summary
    # The plan first: one budget, a deadline per phase.
    assert "time budget 1800 s" in summary
    for phase in PHASES:
        assert re.search(rf"^- {re.escape(phase)}: by \d+ s", summary, re.M), phase
        assert f"- {phase}: ok" in summary, phase
    # Every test of both files ran and passed on the CPU: none deselected, none skipped.
    dry_env = {**subprocess_env(), "MEG_GPU_DRY_RUN": "1"}
    for test_file in ("tests/test_gpu.py", "tests/test_fused_ops.py"):
        line = re.search(rf"^  {test_file}: (.*)$", summary, re.M).group(1)
        counts = {word: int(n) for n, word in re.findall(r"(\d+) ([a-z]+)", line)}
        assert counts.get("passed") == _collected(test_file, dry_env), line
        assert set(counts) <= {"passed", "warning", "warnings"}, line
    # Tables row by row, the StackedMNIST run's speed and modes, and no more files than come back.
    fp32 = (tmp_path / "out" / "bench_penalty_fp32.md").read_text()
    for network in ("toy", "kdd", "stackedmnist", "cifar"):
        assert f"| {network} | + penalty kernel |" in fp32
        # A CPU has no captured rows, so only the eager overhead; on a GPU the captured and lazy follow.
        assert re.search(rf"^{network}: eager [0-9.]+x", fp32, re.M), fp32
    assert "samples/s" in summary and "modes_hit" in summary
    assert len(list((tmp_path / "out").iterdir())) <= 8


@pytest.mark.slow
def test_a_tests_phase_stopped_at_its_deadline_names_the_tests_that_did_not_finish(tmp_path):
    """On the GPU machine one attempt is all there is: a hang must name its suspects in the summary."""
    env = {**subprocess_env(), "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run", "--budget", "60"], cwd=REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert result.returncode == 1 and "- gpu tests: FAILED (stopped at its deadline" in summary, summary
    left = re.search(r"^  tests/test_gpu.py: (\d+) tests did not finish: (.*)$", summary, re.M)
    assert left, summary
    log = (tmp_path / "out" / "tests.log").read_text().split("## fused-op tests")[0]
    ended = set(re.findall(r"PASSED tests/test_gpu.py::(\S+)", log))
    named = [name for name in left.group(2).split(", ") if " more" not in name]
    dry_env = {**subprocess_env(), "MEG_GPU_DRY_RUN": "1"}
    assert int(left.group(1)) == _collected("tests/test_gpu.py", dry_env) - len(ended) > 0
    assert named and not ended & set(named)


def test_a_tests_phase_never_started_names_no_unfinished_tests(tmp_path):
    """A phase whose deadline had passed before it began (NOT RUN) was listed as every one of its tests
    not finished (a hang's suspects, of a phase that never ran), after a pytest --collect-only run past
    that deadline. gpu_check.sh's own functions, run with a deadline already spent."""
    script = (REPO_ROOT / "bench" / "gpu_check.sh").read_text()
    functions = [re.search(rf"(?ms)^{name}\(\) {{.*?^}}$", script).group(0)
                 for name in ("report", "phase", "unfinished_tests", "pytest_phase")]  # fmt: skip
    summary = tmp_path / "summary.md"
    harness = "\n".join([
        f"OUT={tmp_path}; summary={summary}; PYTHON={sys.executable}; xdist=(); failed=0; not_run=0",
        'declare -A NAME=([tests]="gpu tests")',
        "deadline() { echo $(( $(date +%s) + 2 )); }",  # under the 5 s a phase needs to start
        *functions,
        "pytest_phase tests tests/test_gpu.py",
    ])  # fmt: skip
    subprocess.run(["bash", "-c", harness], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, timeout=300)
    text = summary.read_text()
    assert "- gpu tests: NOT RUN" in text and "did not finish" not in text, text


@pytest.mark.parametrize(
    "args, message",
    [(["--budget", "10"], "at least 60"), (["--budget", "soon"], "whole seconds"), (["--fast"], "unknown option")],
)
def test_gpu_check_refuses_a_wrong_flag_before_any_work(tmp_path, args, message):
    env = {**subprocess_env(), "OUT": str(tmp_path / "out")}
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_check_refuses_an_interpreter_without_torch_before_any_work(tmp_path):
    """A fresh clone has no .venv: the system python3 there lacks torch, and every phase failed alone."""
    bare = tmp_path / "bare-python"
    bare.write_text('#!/bin/sh\nexec python3 -S -I "$@"\n')  # no site-packages: no torch, no pytest
    bare.chmod(0o755)
    env = {**subprocess_env(), "OUT": str(tmp_path / "out"), "PYTHON": str(bare)}
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2 and "cannot import torch" in result.stderr and "PYTHON=" in result.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_check_without_deepspeed_or_its_wheels_stops_before_any_work(tmp_path):
    """The GPU machine has no webdataset or deepspeed: the check installs the wheels --fetch put in .gpu/,
    and says so when they are not there (before, the dry run went on and two GPU tests failed on the import)."""
    blocked = tmp_path / "blocked" / "deepspeed"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('not on this machine')\n")
    python = tmp_path / "python-without-deepspeed"
    python.write_text(
        f'#!/bin/sh\nPYTHONPATH={blocked.parent}${{PYTHONPATH:+:$PYTHONPATH}} exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    env = {
        **subprocess_env(),
        "OUT": str(tmp_path / "out"),
        "PYTHON": str(python),
        "MEG_GPU_DIR": str(tmp_path / "gpu"),
    }
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr
    assert "lacks webdataset or deepspeed" in result.stderr and "--fetch" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_failed_bench_row_names_its_cause_in_one_line():
    # The compile row's error on the H200 (torch 2.11, triton 3.6): Inductor's message ends in advice;
    # the table's cell must show the kernel and the cause, on one line that keeps the table whole.
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        from bench_penalty import root_cause
    finally:
        sys.path.remove(str(REPO_ROOT / "bench"))
    message = (
        "SubprocException: An exception occurred in a subprocess:\n\nName=triton_per_fused_add_mean_mul_9\n"
        'Traceback (most recent call last):\n  File "compiler.py", line 316, in make_ttgir\n'
        "RuntimeError: PassManager::run failed\n\n\nSet TORCHDYNAMO_VERBOSE=1 for the internal stack trace"
    )
    cause = "Name=triton_per_fused_add_mean_mul_9; RuntimeError: PassManager::run failed"
    assert root_cause(Exception(message)) == cause
    assert root_cause(ValueError("a | b")) == "a | b"  # the caller turns | into / for the table


def test_the_penalty_overhead_divides_each_step_by_its_own_floor():
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        from bench_penalty import penalty_overheads
    finally:
        sys.path.remove(str(REPO_ROOT / "bench"))
    rows = {
        "no penalty": {"energy_ms": 4.0},
        "eager penalty": {"energy_ms": 7.0},  # also without backward(inputs=...) and fused Adam: not the pair
        "+ inputs/fused Adam": {"energy_ms": 6.0},
        "+ capture": {"energy_ms": 1.3},
        "no penalty + capture": {"energy_ms": 1.0},
        "lazy k=4": {"error": "failed: RuntimeError"},
    }
    assert penalty_overheads(rows) == "eager 1.50x, captured 1.30x"
    assert penalty_overheads({"+ capture": {"energy_ms": 1.3}}) == ""


def test_only_the_projects_own_rows_fail_the_bench():
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        from bench_penalty import failed_rows
    finally:
        sys.path.remove(str(REPO_ROOT / "bench"))
    compile_failed = {"network": "stackedmnist", "row": "compile", "error": "failed: RuntimeError"}
    capture_failed = {"network": "toy", "row": "+ capture", "error": "failed: RuntimeError"}
    fine = {"network": "toy", "row": "compile", "energy_ms": 1.0}
    assert failed_rows([compile_failed, fine]) == []
    assert failed_rows([compile_failed, capture_failed, fine]) == ["toy + capture"]
