"""Monitoring files in deploy/: the Prometheus config and alerts valid and their unit tests passing,
every Grafana query parsing, naming only metrics the trainer exports, and following the conventions
(the run in every legend, per-rank panels by rank, $__rate_interval), the provisioning files."""

import json
import os
import re
import shutil
import subprocess
import time

import pytest
import torch
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO_ROOT
from trainer.config import LogConfig
from trainer.prometheus import GPU_MEMORY, PrometheusExporter

DASHBOARD = REPO_ROOT / "deploy/grafana/dashboards/meg-training.json"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and os.environ.get("CI") != "true",
    reason="promtool not installed (deploy/ci/install-system-packages.sh installs it; CI requires it)",
)


def _dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(queries) >= 8 and dash["uid"] == "meg-training"
    return queries


def as_grafana_runs_it(query: str, rate_interval: str = "1m") -> str:
    """A panel query with Grafana's variables substituted, as Grafana would send it."""
    return query.replace("$run", ".*").replace("$__rate_interval", rate_interval)


@needs_promtool
def test_prometheus_config_and_alert_rules_are_valid():
    for args in (
        ["check", "config", "deploy/prometheus/prometheus.yml"],
        ["check", "rules", "deploy/prometheus/alerts.yml"],
        ["test", "rules", "deploy/prometheus/alerts_test.yml"],  # each alert fires when it should, and only then
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
                    {"record": f"dashboard:query_{i}", "expr": as_grafana_runs_it(q)}
                    for i, q in enumerate(_dashboard_queries())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([PROMTOOL or "promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def exported_names(tmp_path) -> set[str]:
    """Every series name a scrape of ranks 0 and 1 can hold (GPU memory only where CUDA is used)."""
    names = {f"meg_gpu_memory_{name}_bytes" for name in GPU_MEMORY}
    for rank in (0, 1):
        cfg = LogConfig(prometheus_port=0)
        exp = PrometheusExporter(cfg, "r", rank, rank, torch.device("cpu"), 10, 1, {"preset": "p"})
        exp.log(5, {"energy_loss": 1.0, "samples_per_s": 1.0, "eval_fid": 3.0, "lr_energy": 0.1})
        for name in ("energy_gap", "penalty", "mi_estimate", "sample_spread", "generator_loss"):
            exp.log(5, {name: 1.0})
        for line in generate_latest(exp.registry).decode().splitlines():
            if line.startswith("# TYPE"):
                _, _, name, kind = line.split()
                names.add(name)
                if kind == "histogram":
                    names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        exp.close()
    return names


def test_dashboard_and_alerts_only_query_metrics_the_trainer_exports(tmp_path):
    exported = exported_names(tmp_path) | {"up"}
    rules = yaml.safe_load((REPO_ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"][0]["rules"]
    for query in _dashboard_queries() + [r["expr"] for r in rules]:
        names = set(re.findall(r"\b(meg_[a-z_]+|up)\b(?=\s*[{\[)]|\s*$)", query))
        assert names, query
        assert names <= exported, (query, names - exported)


def exported_series(tmp_path) -> tuple[dict[str, str], set[str]]:
    """Every series name a scrape of ranks 0 and 1 can hold, with its family's type, and every label
    a series can carry: the exporter's own, the target file's and Prometheus's (instance, job)."""
    types = {f"meg_gpu_memory_{name}_bytes": "gauge" for name in GPU_MEMORY} | {"up": "gauge"}
    labels = {"instance", "job", "le"}
    for rank in (0, 1):
        cfg = LogConfig(prometheus_port=0, prometheus_targets=str(tmp_path / "targets"))
        exp = PrometheusExporter(cfg, "r", rank, rank, torch.device("cpu"), 10, 1, {"preset": "p"})
        exp.log(5, {"energy_loss": 1.0, "samples_per_s": 1.0, "eval_fid": 3.0, "lr_energy": 0.1})
        for name in ("energy_gap", "penalty", "mi_estimate", "sample_spread", "generator_loss"):
            exp.log(5, {name: 1.0})
        (entry,) = json.loads(open(exp.target_file).read())
        labels |= set(entry["labels"]) | {"slurm_job_id"}
        for family in text_string_to_metric_families(generate_latest(exp.registry).decode()):
            # A family with no series yet (a window gauge before its first value) is listed all the same.
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
            types |= {family.name + suffix: family.type for suffix in suffixes}
            for sample in family.samples:
                types[sample.name] = family.type
                labels |= set(sample.labels)
        exp.close()
    return types, labels


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}


def _promql_names(expr: str) -> tuple[list[str], set[str]]:
    """The series names and the label names an expression refers to (strings, durations and function
    names left out); enough PromQL for the shipped queries, digits and bare names included."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    labels = set(re.findall(r"\b([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*\"\"", bare))
    for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", bare):
        labels |= {name.strip() for name in group.split(",") if name.strip()}
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", bare)
    names = [n for n in re.findall(r"\b([a-zA-Z_:][\w:]*)\b(?!\s*\()", bare) if n not in PROMQL_WORDS]
    return names, labels


def _queries_and_texts() -> list[tuple[str, str, str]]:
    """(where, expression, the text that shows its labels: legend or annotations)."""
    dash = json.loads(DASHBOARD.read_text())
    rules = yaml.safe_load((REPO_ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"][0]["rules"]
    out = [(p["title"], t["expr"], t.get("legendFormat", "")) for p in dash["panels"] for t in p["targets"]]
    return out + [(r["alert"], r["expr"], " ".join(r.get("annotations", {}).values())) for r in rules]


def test_dashboard_and_alerts_use_each_metric_as_its_type_with_labels_it_carries(tmp_path):
    types, labels = exported_series(tmp_path)
    for where, expr, text in _queries_and_texts():
        names, used = _promql_names(expr)
        assert names and set(names) <= set(types), (where, expr, set(names) - set(types))
        # rate() and its kin only on counters (the *_total series) and histograms' *_bucket/_sum/_count.
        for name in re.findall(r"\b(?:rate|irate|increase)\s*\(\s*([a-zA-Z_:][\w:]*)", expr):
            assert types[name] in ("counter", "histogram"), (where, expr, name, types[name])
        for name in re.findall(r"histogram_quantile\s*\([^,]*,.*?\b(meg_\w+)", expr):
            assert types[name] == "histogram" and name.endswith("_bucket"), (where, expr, name)
        for name in re.findall(r"\b(?:deriv|delta|idelta|predict_linear)\s*\(\s*([a-zA-Z_:][\w:]*)", expr):
            assert types[name] == "gauge", (where, expr, name)
        used |= set(re.findall(r"\{\{\s*([a-zA-Z_]\w*)\s*\}\}", text)) | set(re.findall(r"\$labels\.(\w+)", text))
        assert used <= labels, (where, expr, used - labels)
    run_variable = next(v for v in json.loads(DASHBOARD.read_text())["templating"]["list"] if v["name"] == "run")
    metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", run_variable["query"]).groups()
    assert metric in types and label in labels


def test_dashboard_follows_the_conventions():
    dash = json.loads(DASHBOARD.read_text())
    stats = {p["title"] for p in dash["panels"] if p["type"] == "stat"}
    assert {"Step / target", "Samples/s", "Checkpoint age", "Last evaluation"} <= stats
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr, legend = target["expr"], target["legendFormat"]
            assert "{{run}}" in legend, (panel["title"], legend)  # several runs stay apart
            # Runs of a sweep share the name and differ in the folder: one line each, told apart.
            assert all("run_folder" in by for by in re.findall(r"by \(([^)]*)\)", expr)), (panel["title"], expr)
            assert "{{run_folder}}" in legend, (panel["title"], legend)
            assert 'rank="' not in expr, (panel["title"], expr)  # run-wide series exist once
            for window in re.findall(r"\[([^\]]+)\]", expr):
                assert window == "$__rate_interval", (panel["title"], expr)  # not empty at any scrape interval
            if "per rank" in panel["title"]:
                assert "{{rank}}" in legend, (panel["title"], legend)
            else:
                # Run-wide panels aggregate away the target's labels (instance, node, the
                # Pushgateway's copy): one line per run.
                assert re.match(r"^(max|sum|time\(\) - max|histogram_quantile)", expr), (panel["title"], expr)
    run_variable = next(v for v in dash["templating"]["list"] if v["name"] == "run")
    assert run_variable["query"] == "label_values(meg_run_info, run)" and run_variable["multi"]


def test_the_step_stat_shows_the_step_not_thousands_of_steps():
    # Grafana's "short" unit scales by 1000 (K, Mil): step 123456 of 150000 would read "123 K / 150 K".
    dash = json.loads(DASHBOARD.read_text())
    (panel,) = [p for p in dash["panels"] if p["title"] == "Step / target"]
    defaults = panel["fieldConfig"]["defaults"]
    assert defaults["unit"] == "none" and defaults.get("decimals") == 0, defaults


def test_grafana_provisioning_loads_the_dashboard_from_prometheus():
    source = yaml.safe_load((REPO_ROOT / "deploy/grafana/provisioning/datasources/meg-prometheus.yml").read_text())
    (datasource,) = source["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"].endswith(":9090")
    scrape = yaml.safe_load((REPO_ROOT / "deploy/prometheus/prometheus.yml").read_text())["global"]["scrape_interval"]
    assert datasource["jsonData"]["timeInterval"] == scrape  # $__rate_interval is derived from it
    provider = yaml.safe_load((REPO_ROOT / "deploy/grafana/provisioning/dashboards/meg.yml").read_text())
    assert provider["providers"][0]["type"] == "file" and provider["providers"][0]["options"]["path"]


# Every evaluation result the evaluators write (trainer/evaluation/), by the unit it is in; mala_ copies too.
EVAL_METRICS_BY_UNIT = {
    "short": ["modes_with_1", "modes_with_20", "modes_hit", "num_modes"],
    "percentunit": [
        "high_quality_share", "anomaly_share", "acceptance_rate", "density_mass_3sigma", "auroc", "auprc",
        "energy_f1", "energy_precision", "energy_recall", "energy_auroc", "energy_auprc", "grad_norm_f1",
        "grad_norm_precision", "grad_norm_recall", "grad_norm_auroc", "grad_norm_auprc",
    ],
    "nats": [
        "density_nll_tw", "density_nll_t1", "density_nll_best", "density_nll_true", "density_nll_uniform",
        "mode_kl_reverse", "kl_to_uniform",
    ],
    "log": ["fid", "kid", "mode_mass_ratio", "density_best_t"],
}  # fmt: skip
NOT_PLOTTED = ["test_samples", "energy_threshold", "grad_norm_threshold"]  # constants and raw score scales


def _panel_unit(panel: dict) -> str:
    defaults = panel["fieldConfig"]["defaults"]
    custom = defaults.get("custom", {})
    if custom.get("axisLabel") == "nats":
        return "nats"
    if custom.get("scaleDistribution", {}).get("type") == "log":
        return "log"
    return defaults["unit"]


def test_evaluation_panels_are_split_by_unit():
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] == "timeseries" and "meg_eval_result" in p["targets"][0]["expr"]]
    regexes = {}
    for panel in panels:
        (target,) = panel["targets"]
        (regex,) = re.findall(r'metric=~"([^"]+)"', target["expr"])
        regexes[panel["title"]] = (re.compile(regex), _panel_unit(panel))
    assert len(regexes) == 4
    for unit, names in EVAL_METRICS_BY_UNIT.items():
        for name in names + [f"mala_{n}" for n in names]:
            # PromQL's =~ is anchored at both ends: fullmatch. Each metric is drawn once, on its unit's axis.
            homes = [(title, u) for title, (rx, u) in regexes.items() if rx.fullmatch(name)]
            assert len(homes) == 1 and homes[0][1] == unit, (name, homes)
    for name in NOT_PLOTTED:
        assert not any(rx.fullmatch(name) for rx, _ in regexes.values()), name
    shares = next(p for p in panels if _panel_unit(p) == "percentunit")
    assert (shares["fieldConfig"]["defaults"]["min"], shares["fieldConfig"]["defaults"]["max"]) == (0, 1)


def test_dashboard_panels_do_not_overlap():
    cells = set()
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        g = panel["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert g["x"] + g["w"] <= 24 and not cells & mine, panel["title"]
        cells |= mine
    ids = [p["id"] for p in json.loads(DASHBOARD.read_text())["panels"]]
    assert len(ids) == len(set(ids))


def _node_launch(tmp_path, gpus_listed: int, env: dict) -> str:
    """deploy/slurm/meg-node.sh on a node whose nvidia-smi lists ``gpus_listed`` GPUs; the launcher
    it starts is a stand-in python that prints its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = "".join(f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n" for i in range(gpus_listed))
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{smi}")
    (bin_dir / "python").write_text('#!/bin/sh\necho "launch: $* ACCELERATE_USE_CPU=$ACCELERATE_USE_CPU"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    run_env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_PROCID": "0", "MEG_NUM_MACHINES": "1",
        "MEG_MAIN_ADDR": "127.0.0.1", "MEG_MAIN_PORT": "29500", **env,
    }  # fmt: skip
    result = subprocess.run(
        ["bash", "deploy/slurm/meg-node.sh", "--config", "toy_25gaussians"],
        cwd=REPO_ROOT, env=run_env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


@pytest.mark.parametrize(
    "env, processes",
    [
        ({"SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 4),  # --gres=gpu:4 on an 8-GPU node
        ({"CUDA_VISIBLE_DEVICES": "2,5"}, 2),  # granted without SLURM_GPUS_ON_NODE (older Slurm)
        ({}, 8),  # nothing says: every GPU the node lists
        ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, 1),  # a job given no GPU: one process, on the CPU
        ({"SLURM_GPUS_ON_NODE": "4", "MEG_PROCS_PER_NODE": "2"}, 2),  # the user's choice wins
    ],
)
def test_a_node_starts_one_process_per_gpu_granted_not_per_gpu_listed(tmp_path, env, processes):
    # Where the cluster does not confine devices, nvidia-smi lists the node's 8 GPUs to a job given 4:
    # 8 processes, and local ranks 4-7 fail at torch.cuda.set_device ("invalid device ordinal").
    out = _node_launch(tmp_path, 8, env)
    assert f"--num_processes {processes} " in out and f"{processes} process(es)" in out, out
    assert ("ACCELERATE_USE_CPU=1" in out) == (env.get("CUDA_VISIBLE_DEVICES") == "NoDevFiles"), out


def _batch_script(tmp_path, env: dict, srun_exit: int = 0, requeue: str = "") -> subprocess.CompletedProcess:
    """deploy/slurm/meg.sbatch on a stand-in Slurm: the srun it starts prints its arguments and the
    launchers' shutdown timeout, then exits ``srun_exit``; ``scontrol requeue`` (each call logged in
    tmp_path/requeues) succeeds unless ``requeue`` is the controller's refusal."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    refuse = f'echo "{requeue}" >&2; exit 1' if requeue else "exit 0"
    (bin_dir / "scontrol").write_text(
        f'#!/bin/sh\nif [ "$1" = requeue ]; then echo "$2" >>{tmp_path / "requeues"}; {refuse}; fi\n'
        '[ "$2" = hostnames ] && echo node1 || echo "NodeAddr=10.0.0.1"\n'
    )
    srun = f'#!/bin/sh\necho "srun: $* TIMEOUT=$TORCH_ELASTIC_SHUTDOWN_TIMEOUT"\nexit {srun_exit}\n'
    (bin_dir / "srun").write_text(srun)
    (bin_dir / "accelerate").write_text("#!/bin/sh\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    run_env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node1", "SLURM_NTASKS": "1",
        "MEG_ROOT": str(REPO_ROOT), "MEG_VENV": str(tmp_path / "no-venv"), **env,
    }  # fmt: skip
    return subprocess.run(
        ["bash", "deploy/slurm/meg.sbatch", "--config", "toy_25gaussians"],
        cwd=REPO_ROOT, env=run_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _batch_script_launch(tmp_path, env: dict) -> str:
    """The srun line of a batch script that ran to its end."""
    result = _batch_script(tmp_path, env)
    assert result.returncode == 0, result.stdout + result.stderr
    (srun,) = [line for line in result.stdout.splitlines() if line.startswith("srun: ")]
    return srun


def test_a_preempted_job_that_slurm_requeues_ends_0_and_one_it_cannot_requeue_fails(tmp_path):
    # A refused requeue (a job submitted with --no-requeue, a controller restarting) ended 0: Slurm
    # showed a run that had stopped halfway as COMPLETED, and nothing resumed it.
    requeued = _batch_script(tmp_path / "ok", {}, srun_exit=75)
    assert requeued.returncode == 0 and (tmp_path / "ok" / "requeues").read_text() == "7\n", requeued.stderr
    disabled = "Requested operation is presently disabled for job 7"
    refused = _batch_script(tmp_path / "refused", {}, srun_exit=75, requeue=disabled)
    assert refused.returncode == 75, refused.stdout + refused.stderr
    assert (tmp_path / "refused" / "requeues").read_text() == "7\n" * 3  # tried again: the controller may be back
    assert refused.stderr.splitlines()[-1] == (
        "meg.sbatch: requeue FAILED (above): the run stopped at its checkpoint; submit the same command again "
        "to resume from it"
    )


@pytest.mark.parametrize("job_id", ["7", "19547", "31999", "4000000"])
def test_the_rendezvous_port_from_the_job_id_stays_below_the_ephemeral_ports(tmp_path, job_id):
    # 20000 + id % 20000 reached 39999: an outgoing connection on the head node (32768-60999 on
    # Linux) could hold it, and the requeued job retried the same port.
    result = _batch_script(tmp_path, {"SLURM_JOB_ID": job_id})
    port = int(re.search(r" main 10\.0\.0\.1:(\d+);", result.stdout).group(1))
    assert 20000 <= port < 32768


@pytest.mark.parametrize("procs", ["0", "four", "1+1"])
def test_a_node_refuses_a_bad_processes_per_node_in_one_line_and_starts_nothing(tmp_path, procs):
    # "division by 0 (error token is ...)", then the launcher started with --num_processes 0 after the script ended.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f"#!/bin/sh\ntouch {tmp_path / 'launched'}\n")
    (bin_dir / "python").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_PROCID": "0", "MEG_NUM_MACHINES": "1",
           "MEG_MAIN_ADDR": "127.0.0.1", "MEG_MAIN_PORT": "29500", "MEG_PROCS_PER_NODE": procs}  # fmt: skip
    done = subprocess.run(["bash", "deploy/slurm/meg-node.sh", "--config", "toy_25gaussians"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == f"meg-node.sh: MEG_PROCS_PER_NODE wants a whole number from 1 to 9999 (got '{procs}')\n"
    time.sleep(0.5)
    assert not (tmp_path / "launched").exists()


@pytest.mark.parametrize("cpus_per_task", ["32", None])
def test_the_batch_script_gives_srun_the_cpus_per_task_slurm_no_longer_passes_on(tmp_path, cpus_per_task):
    # Slurm 22.05 to 23.02 do not hand sbatch's --cpus-per-task to srun: every process of a node on one CPU.
    srun = _batch_script_launch(tmp_path, {"SLURM_CPUS_PER_TASK": cpus_per_task} if cpus_per_task else {})
    if cpus_per_task:
        assert f" --cpus-per-task={cpus_per_task} " in srun, srun
    else:  # meg-node.sh shares the node's CPUs among its tasks
        assert "--cpus-per-task" not in srun, srun


def test_the_launchers_give_their_workers_the_warning_lead_time_less_the_requeue(tmp_path):
    # The agent used to kill its workers 25 s after the warning: a run whose next metric reduction
    # and save were further away lost its stop checkpoint, whatever the --signal lead time.
    script = (REPO_ROOT / "deploy/slurm/meg.sbatch").read_text()
    (lead,) = re.findall(r"^#SBATCH --signal=B:USR1@(\d+)$", script, re.MULTILINE)
    assert _batch_script_launch(tmp_path / "default", {}).endswith(f" TIMEOUT={int(lead) - 20}")
    assert _batch_script_launch(tmp_path / "raised", {"MEG_WARNING_S": "600"}).endswith(" TIMEOUT=580")
