"""Monitoring files in deploy/: Prometheus config and alerts valid, every Grafana query parses."""

import json
import os
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO_ROOT

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and os.environ.get("CI") != "true",
    reason="promtool not installed (deploy/ci/install-system-packages.sh installs it; CI requires it)",
)


def _dashboard_queries() -> list[str]:
    dash = json.loads((REPO_ROOT / "deploy/grafana/meg-training.json").read_text())
    queries = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(queries) >= 8 and dash["uid"] == "meg-training"
    return queries


@needs_promtool
def test_prometheus_config_and_alert_rules_are_valid():
    for args in (
        ["check", "config", "deploy/prometheus/prometheus.yml"],
        ["check", "rules", "deploy/prometheus/alerts.yml"],
    ):
        result = subprocess.run([PROMTOOL or "promtool", *args], cwd=REPO_ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_every_dashboard_query_parses(tmp_path):
    # Grafana's $run variable becomes a concrete regex, as Grafana would substitute it.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": q.replace("$run", ".*")}
                    for i, q in enumerate(_dashboard_queries())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([PROMTOOL or "promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_only_queries_metrics_the_trainer_exports():
    from tests.test_metrics import EXPECTED

    exported = set(EXPECTED) | {
        "meg_steps_total",
        "meg_eval_high_quality_share",
        "meg_eval_mala_high_quality_share",
        "meg_corrupt_shards",
    }
    for query in _dashboard_queries():
        names = {tok for tok in query.replace("(", " ").replace("{", " ").split() if tok.startswith("meg_")}
        assert names <= exported, (query, names - exported)
