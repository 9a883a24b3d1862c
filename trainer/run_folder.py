"""Reading a finished or running run folder back: its config, data shape and networks."""

from __future__ import annotations

import json
import os

from safetensors.torch import load_file

from models import MEGNetworks, build_networks
from trainer.config import RunConfig, _build, parse_yaml
from trainer.distributed import list_checkpoints

RUN_INFO = "run_info.json"
# accelerate names the prepared models' weights in the order they were prepared: E, G, T.
WEIGHT_FILES = ("model.safetensors", "model_1.safetensors", "model_2.safetensors")


def write_run_info(output_dir: str, sample_shape: list[int], data_url: str, dataset: str) -> None:
    with open(os.path.join(output_dir, RUN_INFO), "w") as f:
        json.dump({"sample_shape": sample_shape, "data_url": data_url, "dataset": dataset}, f, indent=2)


def load_run_config(run_dir: str) -> RunConfig:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir} is not a run folder: it has no config.yaml")
    with open(path) as f:
        return _build(RunConfig, parse_yaml(f))


def load_networks(run_dir: str, checkpoint: str | None = None) -> tuple[RunConfig, MEGNetworks, str]:
    """The run's config, its networks (eval mode, CPU) with weights from ``checkpoint`` (default:
    the latest), and the checkpoint folder used."""
    cfg = load_run_config(run_dir)
    with open(os.path.join(run_dir, RUN_INFO)) as f:
        info = json.load(f)
    if checkpoint is None:
        found = list_checkpoints(os.path.join(run_dir, "checkpoints"))
        if not found:
            raise FileNotFoundError(f"{run_dir} has no complete checkpoint yet")
        checkpoint = found[-1]
    nets = build_networks(cfg.model, tuple(info["sample_shape"]))
    for module, name in zip((nets.energy, nets.generator, nets.statistics), WEIGHT_FILES):
        module.load_state_dict(load_file(os.path.join(checkpoint, name)))
        module.eval()
    return cfg, nets, checkpoint
