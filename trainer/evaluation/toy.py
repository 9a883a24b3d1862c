"""2D toy data (25 Gaussians, 8 Gaussians, swiss roll): the VEEGAN/PacGAN mode protocol on the
samples, the energy as a density (its NLL by quadrature), and pictures of both.

The density p_T(x) = exp(-E(x) / T) / Z_T is scored at three temperatures: T = the entropy weight w
(the density MEG's generator targets), T = 1, and the T that fits a separate validation draw best
(``density_best_t``). Z_T is a midpoint-rule quadrature over the box [-lim, lim]^2 that holds the
data, so mass an energy puts outside the box is not counted; the box's uniform density
(``density_nll_uniform``) and the mixture's own NLL (``density_nll_true``) are the yardsticks.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from data_pipeline.cli import ConfigError, DataError, short_message
from trainer.evaluation.base import Evaluator

if TYPE_CHECKING:  # numpy, torch and the scores are imported where they are used (see REGISTRY)
    import numpy as np

    from data_pipeline.toy import ToySpec

# The temperatures searched for density_best_t, np.geomspace's arguments: 0.001 .. 10, twenty per decade.
TEMPERATURE_SEARCH = (1e-3, 10.0, 81)
TEST_SEED, VALIDATION_SEED = 2024, 2025  # fresh draws, neither the plots' (12345) nor the training data's

log = logging.getLogger(__name__)


@dataclass
class ToyEvalConfig:
    # The modes' std for the 3-sigma quality rule (0: the training data's, as its manifest records).
    std: float = field(default=0.0, metadata={"range": "[0, inf)"})
    density: bool = True  # score the energy as a density (adds about a second per evaluation on a CPU)
    density_points: int = field(default=20000, metadata={"range": "[100, 10000000]"})  # each of test and validation
    # The quadrature's cell side (0: a quarter of the modes' std; 0.01 without modes).
    density_cell: float = field(default=0.0, metadata={"range": "[0, 1]"})


def toy_reference(dataset: str, std: float) -> tuple[ToySpec | None, np.ndarray | None]:
    """The data set's modes (None when it has none, e.g. the swiss roll) and 2,000 points of it;
    ``std``: the modes' std the data was drawn with (0: the data set's published one)."""
    from data_pipeline.toy import TOY_SPECS, ToySpec, sample_toy

    if dataset not in TOY_SPECS:
        return None, None
    base = TOY_SPECS[dataset]
    spec = ToySpec(base.name, base.centres, std or base.std)
    data, _ = sample_toy(dataset, 2000, seed=12345, std=spec.std)
    return (spec if spec.centres is not None else None), data


def written_std(data_cfg, dataset: str) -> float:
    """The modes' std a run drew its own toy data with (``data_cfg``: its data section; data.toy_std, 0:
    the published one), which the trainer held the data at data.url to (data_pipeline.dataset's
    check_toy_settings); 0 where the run read data it did not write (shards, data.toy unset or another
    data set) or the data set has no modes."""
    from data_pipeline.shards import looks_like_shards
    from data_pipeline.toy import TOY_SPECS

    if data_cfg.toy != dataset or dataset not in TOY_SPECS or looks_like_shards(data_cfg.url):
        return 0.0
    return 0.0 if TOY_SPECS[dataset].centres is None else data_cfg.toy_std or TOY_SPECS[dataset].std


def training_data_std(data_url: str, dataset: str, written: float = 0.0) -> float:
    """The modes' std the training data at ``data_url`` was drawn with: ``written`` where the run wrote that
    data itself (written_std: the trainer held the data to it, and a relative data.url, as every preset's,
    read from another folder, or data moved or replaced since, may hold other data now); else as its
    manifest records; else 0 (the data set's published std), with a warning."""
    from data_pipeline.shards import read_manifest
    from data_pipeline.toy import toy_spec

    if written:
        return written
    try:
        manifest = read_manifest(data_url, check_shards=False)
    except (DataError, OSError, ValueError) as e:
        problem = f"its manifest cannot be read: {short_message(e, 200)}"
    else:
        std = manifest.preprocessing.get("std")
        if manifest.name == dataset and isinstance(std, (int, float)) and std > 0:
            return float(std)
        problem = f"it holds {manifest.name}" if manifest.name != dataset else "its manifest records no std"
    log.warning(
        "the toy evaluation scores against the published std of %s, %g: data.url=%s does not tell the std of the data "
        "the run trained on (%s); meg-evaluate takes data.url=... where that data has moved",
        dataset, toy_spec(dataset).std, data_url, problem,
    )  # fmt: skip
    return 0.0


def toy_references(
    dataset: str, data_url: str, rule_std: float, written: float = 0.0
) -> tuple[ToySpec | None, ToySpec | None, np.ndarray | None]:
    """What a toy evaluation scores against: the modes as the training data at ``data_url`` was drawn
    (with ``written``, where the run wrote it: training_data_std),
    the modes with the 3-sigma quality rule's std (``rule_std``, eval.toy.std; 0: the data's), both
    None for data without modes, and 2,000 points drawn like the data (None for an unknown data set)."""
    from data_pipeline.toy import TOY_SPECS, ToySpec, same_std

    if dataset not in TOY_SPECS:
        return None, None, None
    data_std = training_data_std(data_url, dataset, written) if TOY_SPECS[dataset].centres is not None else 0.0
    spec, data = toy_reference(dataset, data_std)
    if spec is None:
        return None, None, data
    if rule_std and not same_std(rule_std, spec.std):
        log.warning(
            "eval.toy.std=%g is not the std the training data was drawn with (%g): samples count as high quality "
            "within 3 x %g of a mode centre, not within the data's 3 sigma; eval.toy.std=0 takes the data's",
            rule_std, spec.std, rule_std,
        )  # fmt: skip
    return spec, ToySpec(spec.name, spec.centres, rule_std or spec.std), data


class DensityReference:
    """What scoring an energy as a density needs, made once per run: the box and its grid, a test
    and a validation draw, each grid cell's nearest mode, and the true mixture's NLL (``spec``: the
    modes with the training data's std; ``section.std``, where set, is only the 3-sigma rule's)."""

    def __init__(self, dataset: str, spec: ToySpec | None, data: np.ndarray, section: ToyEvalConfig):
        import torch

        from data_pipeline.toy import sample_toy, true_log_density
        from trainer.scores import square_grid

        reach = float(abs(spec.centres).max() + 4 * spec.std) if spec is not None else float(abs(data).max())
        self.lim = (
            math.ceil(2 * 1.25 * reach) / 2
        )  # a half-unit box with a quarter of margin: [-2, 2]^2 for both mixtures
        cell = section.density_cell or (spec.std / 4 if spec is not None else 0.01)
        self.grid, side = square_grid(self.lim, cell)
        self.cell_area = side * side
        std = spec.std if spec is not None else 0.0
        self.test, _ = sample_toy(dataset, section.density_points, seed=TEST_SEED, std=std)
        self.validation, _ = sample_toy(dataset, section.density_points, seed=VALIDATION_SEED, std=std)
        self.spec = spec
        self.results: dict[str, float] = {"density_nll_uniform": math.log((2 * self.lim) ** 2)}
        if spec is not None:
            self.results["density_nll_true"] = float(-true_log_density(self.test, spec).mean())
            centres = torch.from_numpy(spec.centres).float()
            distance = torch.cdist(self.grid, centres)
            self.grid_mode = distance.argmin(dim=1).numpy()
            self.within_3sigma = (distance.min(dim=1).values <= 3 * (section.std or spec.std)).numpy()

    def score(self, energy, entropy_weight: float, grid_e: np.ndarray | None = None) -> dict[str, float]:
        """``grid_e``: the energy on ``self.grid`` when the caller has it already (else computed)."""
        import numpy as np
        import torch

        from trainer.scores import energy_values, log_partition

        grid_e = energy_values(energy, self.grid) if grid_e is None else grid_e
        test_e = energy_values(energy, torch.from_numpy(self.test)).mean()
        val_e = energy_values(energy, torch.from_numpy(self.validation)).mean()

        def nll(mean_energy: float, t: float) -> float:
            return float(mean_energy / t + log_partition(grid_e, self.cell_area, t))

        temperatures = np.geomspace(*TEMPERATURE_SEARCH)
        best_t = float(temperatures[int(np.argmin([nll(val_e, t) for t in temperatures]))])
        results = {
            **self.results,
            "density_nll_tw": nll(test_e, entropy_weight),
            "density_nll_t1": nll(test_e, 1.0),
            "density_nll_best": nll(test_e, best_t),
            "density_best_t": best_t,
        }
        if self.spec is not None:
            mass, p = self.mode_masses(grid_e, best_t)
            results["mode_mass_ratio"] = float(mass.max() / mass.min()) if mass.min() > 0 else math.inf
            results["density_mass_3sigma"] = float(p[self.within_3sigma].sum())
        return results

    def mode_masses(self, grid_e: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Each mode's probability mass under exp(-E/t) (the grid cells nearest to it), and each
        cell's; ``grid_e``: the energy on ``self.grid``."""
        import numpy as np

        a = -grid_e / t
        p = np.exp(a - a.max())
        p /= p.sum()
        return np.bincount(self.grid_mode, weights=p, minlength=len(self.spec.centres)), p


class ToyEvaluator(Evaluator):
    kind = "toy"
    config = ToyEvalConfig

    @classmethod
    def check_samples(cls, cfg, sample_shape: list[int]) -> None:
        if list(sample_shape) != [2]:
            raise ConfigError(
                f"eval.kind=toy scores and draws 2-D points; this data's samples are {tuple(sample_shape)}: "
                "choose another eval.kind (samples draws pictures of images and 2-D points)"
            )

    def __init__(self, eval_cfg, section: ToyEvalConfig, ctx):
        super().__init__(eval_cfg, section, ctx)
        # spec: the modes as the data was drawn (the density's yardsticks); rule: the 3-sigma rule's std.
        self.spec, self.rule, self.data = toy_references(ctx.dataset, ctx.data_url, section.std, ctx.toy_std)
        self._density: DensityReference | None = None

    def score_energy(self, energy) -> dict[str, float]:
        if not self.section.density or self.data is None:
            return {}
        if self._density is None:
            self._density = DensityReference(self.ctx.dataset, self.spec, self.data, self.section)
        return self._density.score(energy, self.ctx.entropy_weight)

    def score_samples(self, samples) -> dict[str, float]:
        from data_pipeline.toy import mode_metrics

        return mode_metrics(samples.cpu().numpy(), self.rule) if self.rule is not None else {}

    def plot(self, tag, step, energy, plain, refined, results) -> None:
        from trainer.plots import energy_landscape, scatter_2d  # matplotlib: imported when a picture is drawn

        out = self.ctx.out_dir
        lim = float(abs(self.data).max() * 1.25) if self.data is not None else float(plain.abs().max() * 1.1)
        for name, samples, prefix, label in (
            ("samples", plain, "", ""),
            ("samples_mala", refined, "mala_", ", latent MALA"),
        ):
            if samples is None:
                continue
            hq = results.get(f"{prefix}high_quality_share")
            title = f"step {step}{label}" + (
                f": {hq:.1%} high quality, {results[f'{prefix}modes_with_20']} modes with >= 20"
                if hq is not None
                else ""
            )
            scatter_2d(os.path.join(out, f"{name}_{tag}.png"), samples.cpu().numpy(), self.data, title, lim)
        energy_landscape(
            os.path.join(out, f"energy_{tag}.png"), energy, lim, f"learned energy, step {step}", self.ctx.entropy_weight
        )
