"""TensorBoard and Weights & Biases through accelerate's tracker API (``log.trackers``): the scalars
metrics.jsonl gets, the evaluation results, and the evaluation's figures as images. Main process only.

W&B runs offline (files under the run folder, nothing sent) unless the user set WANDB_MODE: this
trainer reaches no network of its own accord.
"""

from __future__ import annotations

import glob
import importlib.util
import math
import os
from typing import Any

import numpy as np

from data_pipeline.cli import ConfigError
from trainer.metrics import MetricSink

TRACKERS = ("tensorboard", "wandb")
# The package each tracker needs, and what to install.
PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard"), "wandb": ("wandb", "pip install wandb")}


def check_trackers(names: list[str]) -> None:
    """Refuses, before any work, a tracker whose package is not installed."""
    for name in names:
        module, install = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"log.trackers has {name}, but the {module} package is not installed: {install}")


class TrackerSink(MetricSink):
    """Each log window's and evaluation's numbers to every tracker; after an evaluation, its figures
    (``eval/*_step_XXXXXXXX.png``) as images."""

    def __init__(self, names: list[str], run_name: str, output_dir: str, config: dict[str, Any]):
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        check_trackers(names)
        self.eval_dir = os.path.join(output_dir, "eval")
        self.trackers = []
        for name in names:
            if name == "tensorboard":
                tracker = TensorBoardTracker(run_name, os.path.join(output_dir, "tensorboard"))
            else:
                os.environ.setdefault("WANDB_MODE", "offline")
                tracker = WandBTracker(run_name, dir=output_dir, config=config)
            tracker.start()
            self.trackers.append(tracker)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        scalars = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        }
        for tracker in self.trackers:
            if scalars:
                tracker.log(scalars, step=step)
        if any(k.startswith("eval_") for k in metrics):
            self._log_figures(step)

    def _log_figures(self, step: int) -> None:
        from PIL import Image

        suffix = f"_step_{step:08d}.png"
        figures = {}
        for path in sorted(glob.glob(os.path.join(self.eval_dir, f"*{suffix}"))):
            with Image.open(path) as image:
                figures[os.path.basename(path).removesuffix(suffix)] = np.asarray(image.convert("RGB"))
        if not figures:
            return
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({k: v[None] for k, v in figures.items()}, step=step, dataformats="NHWC")
            else:
                tracker.log_images({k: [v] for k, v in figures.items()}, step=step)

    def close(self, clean: bool = True) -> None:
        for tracker in self.trackers:
            tracker.finish()
