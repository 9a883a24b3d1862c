"""The layout keeps its promises: no import cycle, models and data code free of trainer concerns, a
configuration loader that reads no data code, a training loop and steps that each fit on a screen."""

import ast
import inspect
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from trainer.meg_trainer import MEGTrainer
from trainer.steps import MEGSteps

PACKAGES = ("trainer", "models", "data_pipeline")


def _module_name(path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_imports(lazy: bool = False) -> dict[str, set[str]]:
    """Each project module's project imports at module level, and with ``lazy`` also those inside
    functions (they cannot fail at import time, but a cycle through them is still a tangle)."""
    graph = {}
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            name, found = _module_name(path), set()
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree) if lazy else tree.body:
                targets = []
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                found |= {t for t in targets if t.split(".")[0] in PACKAGES}
            graph[name] = found
    return {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}


@pytest.mark.parametrize("lazy", [False, True], ids=["module-level", "with-lazy-imports"])
def test_no_import_cycle_between_project_modules(lazy):
    graph = _module_imports(lazy)
    state: dict[str, int] = {}

    def visit(module, path):
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_models_and_data_code_know_nothing_of_the_trainer():
    graph = _module_imports()
    for module, targets in graph.items():
        if module.startswith(("models", "data_pipeline")):
            assert not any(t.startswith("trainer") for t in targets), (module, targets)
        if module.startswith("models"):
            assert not any(t.startswith("data_pipeline") for t in targets), (module, targets)


def _modules_loaded_by(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code`` (whose last line it prints)."""
    code += "\nimport sys; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return set(out.stdout.splitlines()[-1].split())


def test_loading_a_configuration_reads_no_data_stream_code():
    loaded = _modules_loaded_by("import trainer.config")
    assert "data_pipeline.config" in loaded
    assert not loaded & {
        "data_pipeline.stream",
        "data_pipeline.reader_pool",
        "data_pipeline.shard_io",
        "data_pipeline.shards",
        "webdataset",
        "deepspeed",
        "matplotlib",
    }


# Every config section lives in a module that imports neither (models/config.py, trainer/config.py,
# data_pipeline/config.py, each evaluator's module): torch alone costs about 1.4 s of CPU, which
# --print-config and every check before a run would pay.
HEAVY = {"torch", "numpy"}


def test_loading_a_preset_with_overrides_imports_no_torch_or_numpy():
    loaded = _modules_loaded_by(
        "from trainer.config import config_to_yaml, load_config\n"
        "cfg = load_config('toy_25gaussians', ['train.steps=7', 'eval.kind=kdd', 'train.entropy_estimator=vera'])\n"
        "assert cfg.train.steps == 7 and cfg.eval.kdd.percentile == 80.0\n"
        "config_to_yaml(cfg, choices=True)"
    )
    assert "trainer.evaluation.toy" in loaded and not loaded & HEAVY, sorted(loaded & HEAVY)


def test_print_config_imports_no_torch_or_numpy():
    loaded = _modules_loaded_by(
        "from trainer.main import main\nassert main(['--config', 'toy_25gaussians', '--print-config']) == 0"
    )
    assert "trainer.config" in loaded and not loaded & HEAVY, sorted(loaded & HEAVY)


def test_the_loop_and_the_steps_each_fit_on_a_screen():
    assert len(inspect.getsource(MEGTrainer).splitlines()) <= 155
    for step in (MEGSteps._energy_step, MEGSteps._generator_step):
        assert len(inspect.getsource(step).splitlines()) <= 30, step.__name__
