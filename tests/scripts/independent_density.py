"""An independent check of the evaluator's density NLL on a run's checkpoint: Z_T by plain Monte Carlo over
the box (16M uniform points, no grid), on the evaluator's test draw (seed 2024).

    python tests/scripts/independent_density.py RUN_FOLDER RUN_FOLDER/eval/latest.json
"""

import json
import math
import sys

import numpy as np
import torch

from data_pipeline.toy import sample_toy
from trainer.run_folder import load_networks

run, record = sys.argv[1], json.load(open(sys.argv[2]))
cfg, nets, ckpt, info = load_networks(run)
torch.manual_seed(99)
lim = 2.0
u = (torch.rand(16_000_000, 2) * 2 - 1) * lim
with torch.no_grad():
    e = torch.cat([nets.energy(c).double() for c in u.split(65536)]).numpy()
    test, _ = sample_toy("25gaussians", 20000, seed=2024, std=0.05 / 2.828)
    et = nets.energy(torch.from_numpy(test)).double().mean().item()
for key, t in (
    ("density_nll_t1", 1.0),
    ("density_nll_tw", cfg.train.entropy_weight),
    ("density_nll_best", record["density_best_t"]),
):
    a = -e / t
    log_z = a.max() + math.log(np.exp(a - a.max()).mean()) + math.log((2 * lim) ** 2)
    estimate = et / t + log_z
    print(f"{key}: evaluator {record[key]:.4f}  Monte Carlo {estimate:.4f}  diff {abs(record[key] - estimate):.4f}")
