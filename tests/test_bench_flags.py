"""The bench scripts refuse a bad flag value before any work (exit 2, one error line naming the flag, no
traceback, nothing written), and write their results under the repository, wherever they are run from."""

import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO_ROOT


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # bench_penalty's dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def _results_files() -> dict[str, int]:
    folder = REPO_ROOT / "bench" / "results"
    return {p.name: p.stat().st_size for p in folder.iterdir()} if folder.is_dir() else {}


REFUSALS = [
    ("bench_steps", ["--repeats", "-3"], "--repeats"),
    ("bench_steps", ["--repeats", "0"], "--repeats"),
    ("bench_epochs", ["--epochs", "1"], "--epochs"),
    ("bench_epochs", ["--repeats", "0"], "--repeats"),
    ("bench_epochs", ["--shards", "9", "--samples", "8"], "--shards"),
    ("bench_epochs", ["--step-ms", "-1"], "--step-ms"),
    ("bench_entropy", ["--from-results"], "--from-results"),
    ("bench_entropy", ["--steps", "0"], "--steps"),
    ("bench_entropy", ["--seeds", "-1"], "--seeds"),
    ("bench_penalty", ["--threads", "0"], "--threads"),
    ("bench_penalty", ["--repeats", "0"], "--repeats"),
    ("bench_penalty", ["--iterations", "0"], "--iterations"),
    ("bench_penalty", ["--out", "{tmp}"], "--out"),
    ("bench_stream", ["--repeats", "0"], "--repeats"),
    ("bench_stream", ["--shards", "0"], "--shards"),
    ("bench_stream", ["--workers", "-1"], "--workers"),
    ("bench_stream", ["--out", "{tmp}/file"], "--out"),
    ("bench_data_wait", ["--steps", "2"], "--steps"),
    ("bench_data_wait", ["--workers", "-1"], "--workers"),
    ("toy_mode_masses", ["--run", "{tmp}/run", "--samples", "0"], "--samples"),
    ("toy_mode_masses", ["--run", "{tmp}/run", "--samples", "1000000000"], "--samples"),
    ("toy_mode_masses", ["--run", "{tmp}/run", "--json", "{tmp}"], "--json"),
]


@pytest.mark.parametrize("script, argv, flag", REFUSALS, ids=[f"{s} {' '.join(a)}" for s, a, _ in REFUSALS])
def test_a_bad_flag_value_is_refused_before_any_work(tmp_path, monkeypatch, capsys, script, argv, flag):
    module = _load(script)
    if script == "bench_entropy":
        monkeypatch.setattr(module, "RESULTS", str(tmp_path / "results" / "entropy.jsonl"))  # none yet
    (tmp_path / "file").write_text("")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = _results_files()
    try:
        code = module.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "error: " in last and flag in last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "file"] and not any(cwd.iterdir())
    assert _results_files() == before


@pytest.mark.parametrize(
    "script, argv, written",
    [
        ("bench_steps", ["--only", "toy", "--repeats", "1"], "steps.jsonl"),
        ("bench_penalty", ["--tiny", "--only", "kdd", "--rows", "no penalty", "--repeats", "1", "--iterations", "1"],
         "penalty.jsonl"),
    ],
)  # fmt: skip
def test_results_go_under_the_repository_not_the_working_directory(tmp_path, monkeypatch, script, argv, written):
    module = _load(script)
    results = tmp_path / "repo" / "bench" / "results"
    monkeypatch.setattr(module, "RESULTS", str(results / "steps.jsonl" if script == "bench_steps" else results))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert module.main(argv) in (None, 0)
    assert not any(cwd.iterdir())
    assert [json.loads(line) for line in (results / written).read_text().splitlines()]
