"""Run under `accelerate launch` (2 processes): 3 MEG iterations of the conv networks (StackedMNIST
shapes, conv_width 8, the penalty at lambda 10) on random images under ``train.engine=ARGV[2]``.

Writes to argv[1] (torch.save): every network's fp32 weights export and whether the ranks agree.
"""

import sys

import torch

from models.factory import build_networks
from trainer.config import load_config
from trainer.runtime import build_runtime
from trainer.steps import build_steps


def main(out: str, engine: str) -> None:
    overrides = ["model.conv_width=8", "data.batch_size=8", f"train.engine={engine}", "train.penalty_weight=10.0"]
    cfg = load_config("stackedmnist_conv16", overrides)
    runtime = build_runtime(cfg)
    runtime.seed(0, per_rank=False)
    steps = build_steps(cfg, runtime, build_networks(cfg.model, (3, 28, 28)))
    runtime.seed(1, per_rank=True)
    for _ in range(3):
        steps.energy_step(torch.rand(steps.batch_per_rank, 3, 28, 28) * 2 - 1, steps.sample_z())
        steps.generator_step(steps.sample_z())
    weights = runtime.fp32_state_dicts()
    in_sync = runtime.ranks_in_sync(*steps.modules())
    if runtime.is_main:
        torch.save({"weights": weights, "in_sync": in_sync}, out)
    del steps  # the wrappers hold the process group
    runtime.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
