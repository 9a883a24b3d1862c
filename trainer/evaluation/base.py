"""What every evaluator shares: draw samples from G (plain and after latent MALA), score them the
experiment's way, draw pictures, and write ``eval/<tag>.json`` (and, for the trainer's own
evaluations, ``eval/latest.json``).

Imports no torch at module level: every evaluator module subclasses ``Evaluator``, and the registry
imports them all whenever a configuration loads (trainer/evaluation/__init__.py says why)."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, is_dataclass
from typing import TYPE_CHECKING

from trainer import strict_json
from trainer.nofollow import make_dir, write_replacing

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch


@dataclass
class EvalContext:
    """What an evaluator knows of the run besides its own config section."""

    sample_shape: list[int]
    z_dim: int
    dataset: str  # the manifest's name of the training data (e.g. "25gaussians")
    out_dir: str  # where the JSON and pictures go
    entropy_weight: float = 1.0  # the generator targets p ∝ exp(-E / entropy_weight)
    data_url: str = ""  # the training data: real images beside the samples in the pictures
    toy_std: float = 0.0  # the std the run drew its own toy data with (toy.written_std; 0: not known)


def written_with_the_data(cfg, source: str) -> str:
    """How a test split that ``python -m data_pipeline.convert SOURCE`` writes is made (for a missing
    file's message): the run's data.prepare where that is the command (another kind's, e.g. eval.kind=kdd
    on a fashion_mnist run, named a command that writes no such split)."""
    if f"data_pipeline.convert {source} " in f"{cfg.data.prepare} ":
        return f"it is written with the training data by: {cfg.data.prepare}"
    return (
        f"write it with python -m data_pipeline.convert {source} ... --out FOLDER, which writes FOLDER/train and "
        "FOLDER/test (its --help says what it reads)"
    )


# Results named in the image grids' captions, where an evaluation has them.
CAPTIONED = ("fid", "kid", "modes_hit", "kl_to_uniform")


class Evaluator:
    """Base: subclasses score samples (``score_samples``), the energy itself (``score_energy``), and
    may draw their own pictures (``plot``; the base draws image grids)."""

    kind = "samples"
    config: type | None = None  # its section, eval.<kind>: a dataclass of its settings (None: it has none)

    @classmethod
    def requirements(cls, cfg) -> list[tuple[str, str, str]]:
        """(key, path, how to make it) for every file this evaluation reads (``cfg``: a RunConfig);
        checked before a run or an evaluation starts."""
        return []

    @classmethod
    def check(cls, cfg) -> None:
        """Raises ConfigError for settings this evaluation cannot work with (DataError for a file it
        reads that is not what it should be), before any work; its files exist by then."""

    @classmethod
    def check_samples(cls, cfg, sample_shape: list[int]) -> None:
        """Raises ConfigError when this evaluation cannot score samples of ``sample_shape`` (the data's,
        known once the data set is open: before any training; ``cfg``: the RunConfig)."""

    @classmethod
    def extra_evaluation_steps(cls, cfg, stream) -> set[int]:
        """Steps to evaluate besides every ``eval.every``-th and the last (``stream``: the run's ShardStream)."""
        return set()

    def __init__(self, eval_cfg, section, ctx: EvalContext):
        self.cfg, self.section, self.ctx = eval_cfg, section, ctx
        self._real: torch.Tensor | None = None

    def real_images(self, num: int) -> torch.Tensor | None:
        """The first ``num`` images of the training data (read once), or None when it cannot be read or
        holds other samples than the run's (a relative data.url read from another folder)."""
        if self._real is None and self.ctx.data_url:
            import torch

            from data_pipeline.shards import DataError, read_manifest
            from data_pipeline.stream import read_split

            self._real = torch.empty(0)
            try:
                manifest = read_manifest(self.ctx.data_url)
                if list(manifest.sample_shape) == list(self.ctx.sample_shape):
                    self._real = read_split(manifest, limit=num)["x"]
                else:
                    log.warning(
                        "data.url=%s holds samples of shape %s, not the run's %s: the pictures show no real images "
                        "(meg-evaluate takes data.url=... where the training data is now)",
                        self.ctx.data_url, tuple(manifest.sample_shape), tuple(self.ctx.sample_shape),
                    )  # fmt: skip
            except (DataError, OSError, ValueError):  # e.g. a list of shard URLs: the pictures go without
                pass
        return self._real[:num] if self._real is not None and len(self._real) else None

    def score_energy(self, energy) -> dict[str, float]:
        return {}

    def score_samples(self, samples: torch.Tensor) -> dict[str, float]:
        return {}

    def plot(self, tag: str, step: int, energy, plain, refined, results: dict) -> None:
        """Image grids of images, scatters of 2-D points; other samples (e.g. KDD's vectors) have no picture."""
        from trainer.plots import image_grid, scatter_2d  # matplotlib: imported when a picture is drawn

        if plain.dim() == 2 and plain.shape[1] == 2:
            lim = float(plain.abs().max() * 1.1)
            for name, samples, how in (("samples", plain, "G(z)"), ("samples_mala", refined, "latent MALA")):
                if samples is not None:
                    title = f"{self.ctx.dataset}, step {step}: {how}"
                    scatter_2d(
                        os.path.join(self.ctx.out_dir, f"{name}_{tag}.png"), samples.cpu().numpy(), None, title, lim
                    )
            return
        if plain.dim() != 4:
            return
        real = self.real_images(64)
        shown = ", ".join(f"{k} {results[k]:.4g}" for k in CAPTIONED if isinstance(results.get(k), (int, float)))
        for name, samples, how in (("samples", plain, "G(z)"), ("samples_mala", refined, "G(z) after latent MALA")):
            if samples is None:
                continue
            caption = f"{self.ctx.dataset}, step {step}: {min(len(samples), 64)} samples of {how}" + (
                " (right) beside real training images (left)" if real is not None else ""
            )
            caption += f"\n{shown}" if shown and name == "samples" else ""
            image_grid(os.path.join(self.ctx.out_dir, f"{name}_{tag}.png"), samples[:64], real=real, caption=caption)

    def settings(self) -> dict:
        """What the numbers depend on besides the checkpoint: the draws' seed, their count, MALA's settings
        and this kind's section (a file rewritten under other settings tells which gave it)."""
        settings = {"seed": self.cfg.seed, "num_samples": self.cfg.num_samples, "mala": asdict(self.cfg.mala)}
        if is_dataclass(self.section):  # as the configuration has it: eval.<kind>
            settings[self.kind] = asdict(self.section)
        return settings

    def has_result(self, step: int) -> bool:
        """Whether the evaluation at ``step`` finished (its JSON was written)."""
        return os.path.exists(os.path.join(self.ctx.out_dir, f"step_{step:08d}.json"))

    def __call__(self, step: int, energy, generator, tag: str | None = None) -> dict[str, float]:
        from trainer.evaluation.sampling import generate

        make_dir(self.ctx.out_dir)
        results = dict(self.score_energy(energy))
        plain, refined, acceptance = generate(energy, generator, self.cfg.num_samples, self.ctx.z_dim, self.cfg.mala)
        results.update(self.score_samples(plain))
        if refined is not None:
            results.update({f"mala_{k}": v for k, v in self.score_samples(refined).items()})
            results["mala_acceptance_rate"] = acceptance
        own, tag = tag is None, tag or f"step_{step:08d}"
        if self.cfg.plots:
            self.plot(tag, step, energy, plain, refined, results)
        record = {"step": step, "kind": self.kind, **results, "settings": self.settings()}
        # latest.json is the run's own result (the trainer reports it): another tag (e.g. the evaluation
        # tool's, under other settings) writes only its own file.
        for name in (f"{tag}.json", "latest.json") if own else (f"{tag}.json",):
            with write_replacing(os.path.join(self.ctx.out_dir, name)) as f:
                strict_json.dump(record, f, indent=2)
        return results
