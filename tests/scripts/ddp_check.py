"""Run under `accelerate launch` (1 or N processes): checks DDP against a full-batch reference.

Writes JSON to argv[1]: the max relative error between the first energy step's gradients on N
ranks (each with its slice of one global batch) and one process on the whole batch, and whether
all ranks hold identical parameters after several real training steps.
"""

import json
import sys

import torch

from models.factory import build_networks
from models.objectives import energy_loss
from trainer.config import load_config
from trainer.runtime import DDPRuntime
from trainer.steps import build_steps


def main(out_path: str) -> None:
    cfg = load_config(
        "toy_25gaussians",
        ["model.hidden=[32,32]", "model.generator_hidden=[32,32]", "data.batch_size=64", "train.penalty_weight=1.0"],
    )
    runtime = DDPRuntime()
    runtime.seed(0, per_rank=False)
    nets = build_networks(cfg.model, (2,))
    runtime.seed(0, per_rank=True)
    reference = build_networks(cfg.model, (2,))
    reference.energy.load_state_dict(nets.energy.state_dict())
    reference.generator.load_state_dict(nets.generator.state_dict())
    steps = build_steps(cfg, runtime, nets)

    g = torch.Generator().manual_seed(123)
    x, z = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    per_rank = 64 // runtime.world_size
    mine = slice(runtime.rank * per_rank, (runtime.rank + 1) * per_rank)
    steps.energy_step(x[mine], z[mine])
    ddp_grads = [p.grad.clone() for p in steps.energy.parameters()]

    with torch.no_grad():
        fake = reference.generator(z)
    loss, _ = energy_loss(lambda v: reference.energy(v), x, fake, cfg.train.penalty_weight)
    loss.backward()
    ref_grads = [p.grad for p in reference.energy.parameters()]
    rel = max(((a - b).norm() / b.norm().clamp_min(1e-12)).item() for a, b in zip(ddp_grads, ref_grads))

    for _ in range(5):  # several real steps, then the parameters must agree on every rank
        for _ in range(cfg.train.energy_steps):
            steps.energy_step(torch.randn(per_rank, 2), steps.sample_z())
        steps.generator_step(steps.sample_z())
    in_sync = runtime.ranks_in_sync(*steps.modules())
    if runtime.is_main:
        with open(out_path, "w") as f:
            json.dump({"world_size": runtime.world_size, "grad_rel_error": rel, "in_sync": in_sync}, f)
    del steps  # the DDP wrappers hold the process group: release them before it is destroyed
    runtime.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
