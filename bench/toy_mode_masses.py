"""Does G sample its energy's density? For a toy run's checkpoint, per mode: G's share of its samples
beside the probability mass of exp(-E/T) at T = the entropy weight w (the density G targets) and at
the evaluation's best T; and the energy's shape: its value at each centre, the plane fitted through
those values (a tilt of E across the modes sets their masses apart), and the barrier between
neighbouring centres (E at the midpoint minus the mean of the two centres).

    python bench/toy_mode_masses.py --run runs/toy_25gaussians [--checkpoint DIR] [--samples 2500] [--json OUT]

If G sampled exp(-E/w), its shares would follow the masses at T = w: their total variation distance
near 0 and the correlation of log share with log mass near 1 (both floored at half a sample, 0.5 /
--samples: a share below that is not measured). Each sample and each grid cell is counted for its
nearest centre.
"""

from __future__ import annotations

import argparse
import math
import sys

from data_pipeline.cli import ConfigError, add_debug_flag, check_output_file, int_between, run_tool
from trainer import strict_json

MAX_SAMPLES = 1_000_000  # G's samples are drawn and held at once


def neighbour_pairs(centres):
    """Index pairs of centres at the smallest distance between any two (a grid's neighbours)."""
    import numpy as np

    d = np.linalg.norm(centres[:, None] - centres[None], axis=2)
    nearest = d[d > 0].min()
    i, j = np.nonzero(np.triu(np.isclose(d, nearest, rtol=1e-6), k=1))
    return list(zip(i.tolist(), j.tolist(), strict=True))


def share_mass_agreement(share, mass, samples: int) -> tuple[float, float]:
    """How far G's mode shares are from the masses: (total variation distance, 0 when they are equal and
    1 when disjoint; Pearson correlation of log share with log mass, 1 when they are equal, NaN when
    either side is constant). Both are floored at half a sample (a share of 0 has no log; masses span
    many decades, so the correlation of linear shares with log masses is far from 1 even when equal)."""
    import numpy as np

    share, mass = np.asarray(share, dtype=float), np.asarray(mass, dtype=float)
    tv = 0.5 * float(np.abs(share - mass).sum())
    floor = 0.5 / samples
    log_share, log_mass = np.log(np.maximum(share, floor)), np.log(np.maximum(mass, floor))
    if np.std(log_share) == 0 or np.std(log_mass) == 0:
        return tv, math.nan
    return tv, float(np.corrcoef(log_share, log_mass)[0, 1])


def mode_anatomy(energy, generator, density, z_dim: int, entropy_weight: float, samples: int) -> dict:
    """The comparison for one energy and generator; ``density``: the toy evaluator's DensityReference."""
    import numpy as np
    import torch

    from trainer.scores import energy_values

    spec = density.spec
    centres = torch.from_numpy(spec.centres).float()
    grid_e = energy_values(energy, density.grid)  # once: the grid holds most of the points scored
    best_t = density.score(energy, entropy_weight, grid_e)["density_best_t"]
    mass_w, _ = density.mode_masses(grid_e, entropy_weight)
    mass_best, _ = density.mode_masses(grid_e, best_t)
    with torch.no_grad():
        x = torch.cat([generator(z).float().cpu() for z in torch.randn(samples, z_dim).split(1000)])
    share = np.bincount(torch.cdist(x, centres).argmin(1).numpy(), minlength=len(centres)) / samples

    e_centre = energy_values(energy, centres)
    plane = np.c_[spec.centres, np.ones(len(centres))]
    coef = np.linalg.lstsq(plane, e_centre, rcond=None)[0]
    pairs = neighbour_pairs(spec.centres)
    midpoints = torch.from_numpy(np.array([(spec.centres[i] + spec.centres[j]) / 2 for i, j in pairs])).float()
    barrier = energy_values(energy, midpoints) - np.array([(e_centre[i] + e_centre[j]) / 2 for i, j in pairs])
    tv, log_correlation = share_mass_agreement(share, mass_w, samples)
    return {
        "entropy_weight": entropy_weight,
        "best_t": best_t,
        "share_mass_tv": tv,
        "share_mass_log_correlation": log_correlation,
        "mass_ratio_tw": float(mass_w.max() / mass_w.min()) if mass_w.min() > 0 else math.inf,
        "mass_ratio_best": float(mass_best.max() / mass_best.min()) if mass_best.min() > 0 else math.inf,
        "share_ratio": float(share.max() / share.min()) if share.min() > 0 else math.inf,
        "centre_energy_range": float(e_centre.max() - e_centre.min()),
        "tilt": coef[:2].tolist(),  # the plane's gradient: energy per unit of x and y
        "tilt_residual_std": float(np.std(e_centre - plane @ coef)),
        "barrier_mean": float(barrier.mean()),
        "barrier_min": float(barrier.min()),
        "barrier_max": float(barrier.max()),
        "modes": [
            {
                "centre": c.tolist(),
                "g_share": float(s),
                "mass_tw": float(mw),
                "mass_best": float(mb),
                "energy": float(e),
            }
            for c, s, mw, mb, e in zip(spec.centres, share, mass_w, mass_best, e_centre, strict=True)
        ],
    }


def report(a: dict) -> str:
    w = a["entropy_weight"]
    lines = [
        f"G's shares vs exp(-E/w)'s masses (w = {w:g}): total variation {a['share_mass_tv']:.3f} (0: equal), "
        f"correlation of log share with log mass {a['share_mass_log_correlation']:.2f} (1: equal)",
        f"largest / smallest: G's share {a['share_ratio']:.3g}, mass at T = w {a['mass_ratio_tw']:.3g}, "
        f"at the best T ({a['best_t']:.3g}) {a['mass_ratio_best']:.3g}",
        f"E at the centres spans {a['centre_energy_range']:.3f} ({a['centre_energy_range'] / w:.1f} w); "
        f"fitted plane's gradient ({a['tilt'][0]:.3f}, {a['tilt'][1]:.3f}) per unit, residual std "
        f"{a['tilt_residual_std']:.3f}",
        f"barrier between neighbouring centres: mean {a['barrier_mean']:.3f} ({a['barrier_mean'] / w:.1f} w), "
        f"min {a['barrier_min']:.3f}, max {a['barrier_max']:.3f}",
        "",
        "| centre | G's share | mass at T = w | mass at best T | E(centre) |",
        "|---|---|---|---|---|",
    ]
    for m in a["modes"]:
        x, y = m["centre"]
        lines.append(
            f"| ({x:+.2f}, {y:+.2f}) | {m['g_share']:.3f} | {m['mass_tw']:.4f} | {m['mass_best']:.4f} | "
            f"{m['energy']:.3f} |"
        )
    return "\n".join(lines)


def anatomy(args: argparse.Namespace) -> int:
    import torch

    from trainer.evaluation.toy import DensityReference, toy_references, written_std
    from trainer.run_folder import load_networks

    if args.json:
        check_output_file(args.json, "--json")  # before loading and sampling, not after
    cfg, nets, checkpoint, info = load_networks(args.run, args.checkpoint)
    dataset = info.get("dataset", "")
    spec, _, data = toy_references(dataset, cfg.data.url, cfg.eval.toy.std, written_std(cfg.data, dataset))
    if spec is None:
        raise ConfigError(
            f"{args.run} trained on {dataset or 'data'} without modes: this compares modes (25gaussians, 8gaussians)"
        )
    torch.manual_seed(args.seed)  # on the CPU, where load_networks leaves the networks: a few seconds
    density = DensityReference(dataset, spec, data, cfg.eval.toy)
    result = mode_anatomy(nets.energy, nets.generator, density, cfg.model.z_dim, cfg.train.entropy_weight, args.samples)
    print(f"{checkpoint} ({dataset}, {args.samples} samples of G, seed {args.seed})")
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            strict_json.dump({"checkpoint": checkpoint, **result}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/toy_mode_masses.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run", required=True, help="a toy run's folder")
    parser.add_argument("--checkpoint", help="a checkpoint folder of that run (default: the newest intact one)")
    parser.add_argument(
        "--samples", type=int_between(1, MAX_SAMPLES), default=2500, help="samples of G (default: 2500, PacGAN's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of G's latents (default: 0)")
    parser.add_argument("--json", help="also write the numbers here")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    return run_tool(lambda: anatomy(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
