"""bench/toy_protocol.py: N seeds trained and scored by the evaluate tool, and a table of their mean ± std."""

import contextlib
import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, subprocess_env, tiny_overrides

TOOL = [sys.executable, "bench/toy_protocol.py"]
_spec = importlib.util.spec_from_file_location("toy_protocol", REPO_ROOT / "bench" / "toy_protocol.py")
toy_protocol = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy_protocol)


def _protocol(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TOOL, *args], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@pytest.mark.slow
def test_the_table_is_the_mean_and_std_of_the_seeds_own_evaluations(tmp_path):
    out = tmp_path / "protocol"
    tiny = [o for o in tiny_overrides(tmp_path, steps=10) if not o.startswith("output_dir=")]
    result = _protocol("--seeds", "2", "--jobs", "2", "--samples", "400", "--out", str(out), "--label", "tiny",
                       *tiny, "eval.mala.steps=2")  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "seed 0: done" in result.stdout and "seed 1: done" in result.stdout
    # Each seed's own evaluation JSON, as the evaluate tool wrote it for the final checkpoint.
    evals = [json.loads((out / f"seed_{s}" / "eval" / "eval_step_00000010.json").read_text()) for s in (0, 1)]
    assert evals[0]["density_nll_t1"] != evals[1]["density_nll_t1"]  # two seeds, two runs: a std to check
    rows = json.loads((out / "rows.json").read_text())
    assert [r["seed"] for r in rows] == [0, 1] and all(r["num_samples"] == 400 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    table = (out / "table.md").read_text()
    assert table.strip() in result.stdout
    cells = next(line for line in table.splitlines() if line.startswith("| tiny |")).split(" | ")
    for key in ("modes_hit", "high_quality_share", "density_nll_tw", "density_nll_t1", "density_nll_best"):
        values = np.array([e[key] for e in evals], dtype=float)
        assert [r[key] for r in rows] == [e[key] for e in evals]
        mean, std = summary[key]
        assert mean == pytest.approx(values.mean(), rel=1e-12) and std == pytest.approx(values.std(ddof=1), rel=1e-12)
    # The markdown cells, as printed: NLL at T=1 with three decimals, the share in percent.
    nll = np.array([e["density_nll_t1"] for e in evals])
    assert f"{nll.mean():.3f} ± {nll.std(ddof=1):.3f}" in cells
    share = np.array([e["high_quality_share"] for e in evals])
    assert f"{share.mean():.1%} ± {share.std(ddof=1):.1%}" in cells
    assert math.isclose(summary["density_nll_true"][0], evals[0]["density_nll_true"])
    # --collect rebuilds the same table from the folder.
    collected = _protocol("--collect", str(out))
    row = next(line for line in table.splitlines() if line.startswith("| tiny |"))
    assert collected.returncode == 0 and row in collected.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["train.seed=3"], "the tool sets train.seed and output_dir itself"),
        (["--config", "toy_swissroll"], "has no modes"),
        (["--config", "kdd99"], "needs a toy preset"),
        (["train.steps=0"], "train.steps"),
    ],
)
def test_mistakes_are_refused_before_any_training(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) if args[0] == "train.seed=3" else contextlib.nullcontext():  # argparse exits
        assert toy_protocol.main(["--out", str(tmp_path / "p"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_overrides_may_come_before_and_after_flags():
    args = toy_protocol.parse_args(["train.steps=5", "--seeds", "2", "train.energy_steps=3", "--jobs", "1"])
    assert args.overrides == ["train.steps=5", "train.energy_steps=3"] and (args.seeds, args.jobs) == (2, 1)


# The tool with its first seed's trainer replaced by one that exits at once: a failure without training.
_FAILING_FIRST_SEED = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("toy_protocol", "bench/toy_protocol.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
commands = tool.run_seed_commands

def failing_first(args, seed, folder):
    train, evaluate = commands(args, seed, folder)
    if seed == args.first_seed:
        train = [sys.executable, "-c", "raise SystemExit('error: this seed is refused')"]
    return train, evaluate

tool.run_seed_commands = failing_first
sys.exit(tool.main(sys.argv[1:]))
"""


def test_a_failed_seed_ends_the_protocol_while_others_are_pending(tmp_path):
    out = tmp_path / "protocol"
    tiny = [o for o in tiny_overrides(tmp_path) if not o.startswith("output_dir=")]
    cmd = [sys.executable, "-c", _FAILING_FIRST_SEED, "--seeds", "3", "--jobs", "1", "--out", str(out), *tiny]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "error: seeds [0] failed" in result.stderr and "this seed is refused" in result.stdout
    assert "seed 1: started" not in result.stdout and not (out / "seed_1").exists()  # none starts after a failure


@pytest.mark.parametrize("value", ["-1", "x"])
def test_a_negative_first_seed_is_refused_by_the_parser(capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        toy_protocol.parse_args(["--first-seed", value])
    assert exit_info.value.code == 2 and "argument --first-seed" in capsys.readouterr().err


def test_collect_reads_back_a_summary_whose_nan_mean_was_written_as_null(tmp_path, capsys):
    # A NaN reverse KL (a seed with no sample near a mode) is written as null in summary.json: --collect
    # formatted that None and stopped with a TypeError, where the protocol's own table said nan.
    from trainer import strict_json

    rows = [{key: 1.0 for key, _, _ in toy_protocol.COLUMNS} for _ in range(2)]
    rows[0]["mode_kl_reverse"] = math.nan
    summary = toy_protocol.summarize(rows)
    (tmp_path / "summary.json").write_text(strict_json.dumps({"label": "nan", "seeds": [0, 1], **summary}))
    assert toy_protocol.collect([str(tmp_path)]) == 0
    assert capsys.readouterr().out == toy_protocol.table([("nan", 2, summary)]) + "\n\n"
