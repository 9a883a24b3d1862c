"""bench/bench_stream.py with --url: shards behind a URL have no page cache to evict, so the bench runs warm
only, and --cache cold is refused before any work."""

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT, subprocess_env

SMALL = ["--samples", "200", "--shards", "2", "--batch", "50", "--repeats", "1", "--workers", "0", "--formats"]


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/bench_stream.py", *args], cwd=REPO_ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_a_url_is_benchmarked_warm_only(tmp_path):
    result = _bench("--url", "memory://bench-stream-test", "--out", str(tmp_path), *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = (tmp_path / "bench_stream.jsonl").read_text().splitlines()
    rows = json.loads(line)["rows"]
    assert rows and {r["cache"] for r in rows} == {"warm"}


def test_a_cold_cache_pass_of_a_url_is_refused_before_any_work(tmp_path):
    result = _bench("--url", "memory://bench-stream-test", "--cache", "cold", "--out", str(tmp_path / "out"), *SMALL)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("bench_stream.py: error: --cache cold")
    assert not (tmp_path / "out").exists()
