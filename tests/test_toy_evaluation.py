"""The toy evaluation scores against the data the run trained on: the std its manifest records, not
the published one (nor a preset's eval.toy.std), through the evaluator that the trainer and
meg-evaluate build alike."""

import json
import logging
import math

import pytest
import torch

from data_pipeline.convert import convert_toy
from data_pipeline.shards import write_array_shards
from data_pipeline.toy import TOY_SPECS, sample_toy
from tests.test_density import ConstantEnergy
from trainer.config import load_config
from trainer.evaluation import build_evaluator

WIDE = 0.05  # about three times the published std 0.0177: the modes stay apart (spacing 0.707)


def _evaluator(tmp_path, *overrides):
    cfg = load_config(
        "debug",
        # data.toy= : data the run read, written by another tool (the debug preset's run writes its own)
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.url={tmp_path / 'data'}",
            "data.toy=",
            "eval.toy.density_points=1000",
            *overrides,
        ],
    )
    return build_evaluator(cfg, [2], "25gaussians")


def _like_the_data(std):
    return torch.from_numpy(sample_toy("25gaussians", 2000, seed=7, std=std)[0])


def _true_nll(std):
    """The mixture's NLL where its modes are far apart: log 25 + log(2 pi std^2) + 1 (a 2-D Gaussian's entropy)."""
    return math.log(25) + math.log(2 * math.pi * std**2) + 1


def test_the_evaluation_takes_the_std_the_data_was_drawn_with(tmp_path):
    """Was the preset's eval.toy.std (or, at 0, the published std): 43% high quality and the NLL of
    another mixture for samples exactly like the data."""
    convert_toy("25gaussians", str(tmp_path / "data"), 256, 1, seed=0, std=WIDE)
    evaluator = _evaluator(tmp_path, "eval.toy.std=0")
    assert evaluator.score_samples(_like_the_data(WIDE))["high_quality_share"] == pytest.approx(0.989, abs=0.01)
    density = evaluator.score_energy(ConstantEnergy())
    assert density["density_nll_true"] == pytest.approx(_true_nll(WIDE), abs=0.1)
    assert evaluator.spec.std == evaluator.rule.std == WIDE


def test_the_presets_leave_the_quality_rule_to_the_data(tmp_path):
    convert_toy("25gaussians", str(tmp_path / "data"), 256, 1, seed=0, std=WIDE)
    assert _evaluator(tmp_path).rule.std == WIDE


def test_an_eval_toy_std_other_than_the_datas_sets_only_the_quality_rule_and_is_said(tmp_path, caplog):
    convert_toy("25gaussians", str(tmp_path / "data"), 256, 1, seed=0, std=WIDE)
    published = TOY_SPECS["25gaussians"].std
    with caplog.at_level(logging.WARNING, logger="trainer.evaluation.toy"):
        evaluator = _evaluator(tmp_path, f"eval.toy.std={published}")
    assert [r.getMessage() for r in caplog.records] == [
        f"eval.toy.std={published:g} is not the std the training data was drawn with ({WIDE:g}): samples count as "
        f"high quality within 3 x {published:g} of a mode centre, not within the data's 3 sigma; eval.toy.std=0 "
        "takes the data's"
    ]
    # 3 x the published std around each centre holds 1 - exp(-(3 x 0.0177)^2 / (2 x 0.05^2)) = 43% of the data.
    assert evaluator.score_samples(_like_the_data(WIDE))["high_quality_share"] == pytest.approx(0.43, abs=0.03)
    # The yardsticks stay the data's.
    assert evaluator.score_energy(ConstantEnergy())["density_nll_true"] == pytest.approx(_true_nll(WIDE), abs=0.1)


def test_data_that_records_no_std_is_scored_against_the_published_one_with_a_warning(tmp_path, caplog):
    points, modes = sample_toy("25gaussians", 256, seed=0)
    write_array_shards(str(tmp_path / "data"), "25gaussians", "train", points, modes, 1)  # another tool's: no record
    with caplog.at_level(logging.WARNING, logger="trainer.evaluation.toy"):
        evaluator = _evaluator(tmp_path, "eval.toy.std=0")
    assert evaluator.spec.std == TOY_SPECS["25gaussians"].std
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("the toy evaluation scores against the published std of 25gaussians, 0.0176803: ")
    assert message.endswith(
        f"data.url={tmp_path / 'data'} does not tell the std of the data the run trained on (its manifest records no "
        "std); meg-evaluate takes data.url=... where that data has moved"
    )


def test_data_gone_since_the_run_is_said_and_scored_against_the_published_std(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="trainer.evaluation.toy"):
        evaluator = _evaluator(tmp_path, "eval.toy.std=0")
    assert evaluator.spec.std == TOY_SPECS["25gaussians"].std
    (message,) = [r.getMessage() for r in caplog.records]
    assert "(its manifest cannot be read: no manifest at" in message
    assert message.endswith("meg-evaluate takes data.url=... where that data has moved")


def test_data_the_run_wrote_and_that_is_gone_since_is_scored_against_the_std_the_run_wrote_it_with(tmp_path, caplog):
    # A relative data.url (every preset's) read from another folder, or data moved: its config.yaml tells
    # the std, which the trainer held the data to. meg-sample, with no data.url to give, scored the
    # published one (a 3-sigma share 40x too low).
    with caplog.at_level(logging.WARNING, logger="trainer.evaluation.toy"):
        evaluator = _evaluator(tmp_path, "eval.toy.std=0", "data.toy=25gaussians", f"data.toy_std={WIDE}")
    assert evaluator.spec.std == evaluator.rule.std == WIDE and not caplog.records
    shards = _evaluator(tmp_path, "data.toy=25gaussians", f"data.toy_std={WIDE}", f"data.url={tmp_path}/d-{{0..1}}.tar")
    assert shards.spec.std == TOY_SPECS["25gaussians"].std  # shards: data the run read, did not write
    # Other data there now (from another folder, or replaced): the run's own std, which the trainer held its data to.
    convert_toy("25gaussians", str(tmp_path / "data"), 256, 1, seed=0, std=0.3)
    assert _evaluator(tmp_path, "data.toy=25gaussians", f"data.toy_std={WIDE}").spec.std == WIDE


class FarAway(torch.nn.Module):
    """A generator whose samples all land far from every mode: no mode histogram, so a NaN reverse KL."""

    def __init__(self):
        super().__init__()
        self.offset = torch.nn.Parameter(torch.full((2,), 10.0))

    def forward(self, z):
        return self.offset.expand(len(z), 2)


def test_a_nan_score_is_written_as_null_in_strict_json(tmp_path):
    # Python writes a NaN as a bare NaN, which JavaScript (Grafana's JSON sources), jq and strict parsers refuse.
    convert_toy("25gaussians", str(tmp_path / "data"), 256, 1, seed=0, std=WIDE)
    evaluator = _evaluator(tmp_path, "eval.num_samples=50", "eval.mala.steps=0", "eval.plots=false")
    results = evaluator(3, ConstantEnergy(), FarAway())
    assert math.isnan(results["mode_kl_reverse"])

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    for name in ("step_00000003.json", "latest.json"):
        record = json.loads((tmp_path / "run" / "eval" / name).read_text(), parse_constant=refuse)
        assert record["mode_kl_reverse"] is None and record["high_quality_share"] == 0.0
