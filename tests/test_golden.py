"""A golden loss curve: the debug preset's 20 steps must keep giving the recorded losses.

Anything that changes what a step computes (the objective, the networks, the optimizer, the order of
random draws, the data stream) moves these numbers; a change that should not, must not. When a change
is meant to move them, record the new curve with `python tests/test_golden.py --record` and say why
in the commit. The tolerance allows for another CPU's rounding, not for another computation.
"""

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, run_trainer

GOLDEN = REPO_ROOT / "tests" / "golden" / "debug.json"
KEYS = ("energy_loss", "generator_loss", "energy_gap", "penalty", "mi_estimate", "sample_spread")


def debug_curve(tmp_path: Path) -> list[dict]:
    run_trainer([f"output_dir={tmp_path / 'run'}", f"data.url={tmp_path / 'data'}"], preset="debug")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], **{k: r[k] for k in KEYS}} for r in records if "energy_loss" in r]


@pytest.mark.slow
def test_debug_preset_follows_the_golden_loss_curve(tmp_path):
    expected = json.loads(GOLDEN.read_text())
    got = debug_curve(tmp_path)
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [5, 10, 15, 20]
    for a, b in zip(got, expected):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), (a["step"], key, a[key], b[key])


if __name__ == "__main__" and "--record" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(debug_curve(Path(tmp)), indent=2) + "\n")
        print(f"wrote {GOLDEN}")
