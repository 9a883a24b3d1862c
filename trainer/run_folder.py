"""Reading a run back for the sample and evaluate tools: a checkpoint's engine-free weights export
and the configuration it was written with (trainer/checkpoint.py), whatever engine trained it."""

from __future__ import annotations

import os

from models import MEGNetworks, build_networks
from trainer.checkpoint import list_checkpoints, load_export
from trainer.config import RunConfig, _build, parse_yaml


def resolve_checkpoint(run_dir: str, checkpoint: str | None = None) -> str:
    """``checkpoint`` if given, else the run's latest complete checkpoint."""
    if checkpoint is not None:
        return checkpoint
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir} is not a run folder (no such folder)")
    found = list_checkpoints(os.path.join(run_dir, "checkpoints"))
    if not found:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint yet (checkpoints/step_XXXXXXXX)")
    return found[-1]


def load_networks(run_dir: str, checkpoint: str | None = None) -> tuple[RunConfig, MEGNetworks, str, dict]:
    """The checkpoint's config, its networks (eager kernels, eval mode, CPU), the checkpoint folder
    used, and the export's metadata (sample_shape, dataset, step, version)."""
    checkpoint = resolve_checkpoint(run_dir, checkpoint)
    weights, info, config_yaml = load_export(checkpoint)
    cfg = _build(RunConfig, parse_yaml(config_yaml))
    nets = build_networks(cfg.model, tuple(info["sample_shape"]))
    for name in ("energy", "generator", "statistics"):
        module = getattr(nets, name)
        module.load_state_dict(weights[name])
        module.eval()
    return cfg, nets, checkpoint, info
