"""The pictures a run writes: files that exist, at a readable size, with what they promise drawn."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.evaluation.base import EvalContext, Evaluator
from trainer.plots import energy_landscape, image_grid, loss_curves


def _size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def test_image_grid_is_readable_and_puts_real_images_beside_the_samples(tmp_path):
    samples, real = torch.rand(64, 1, 28, 28) * 2 - 1, -torch.ones(64, 1, 28, 28)
    image_grid(str(tmp_path / "alone.png"), samples, caption="samples only")
    image_grid(str(tmp_path / "beside.png"), samples, real=real, caption="real | samples")
    (w1, h1), (w2, h2) = _size(tmp_path / "alone.png"), _size(tmp_path / "beside.png")
    assert w1 >= 600 and h1 >= 600  # the old grid was 274 px: 2+ screen pixels per image pixel now
    assert w2 >= 2 * w1 - 50 and abs(h2 - h1) < 50  # a second panel of the same size
    with Image.open(tmp_path / "beside.png") as im:
        left = np.asarray(im.convert("L"))[:, : w2 // 2]
    assert (left < 10).mean() > 0.3  # the all-black real images are drawn on the left


@pytest.mark.parametrize(
    "name, magic", [("f.png", b"\x89PNG"), ("f.PDF", b"%PDF"), ("f.svg", b"<?xml"), ("f", b"\x89PNG")]
)
def test_a_figure_is_written_in_the_format_its_name_asks_for(tmp_path, name, magic):
    image_grid(str(tmp_path / name), torch.zeros(4, 1, 8, 8), caption="zeros")
    assert (tmp_path / name).read_bytes().startswith(magic)


class Wells(torch.nn.Module):
    """Two quadratic wells on a tilt: a density with structure over several decades."""

    def __init__(self):
        super().__init__()
        self.tilt = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        wells = torch.stack([((x - c) ** 2).sum(1) for c in (torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 0.0]))])
        return 4 * wells.min(0).values + self.tilt * x[:, 0]


def test_energy_landscape_has_two_colour_bars_and_a_log_density(tmp_path):
    path = tmp_path / "energy.png"
    energy_landscape(str(path), Wells(), 2.0, "two wells", temperature=0.5)
    w, h = _size(path)
    assert w >= 1200 and h >= 500


def test_loss_curves_from_metrics_jsonl(tmp_path):
    rows = [
        {"step": s, "energy_loss": -0.01 * s, "generator_loss": 0.5, "energy_gap": 0.1, "penalty": 1e-3 / s}
        for s in range(25, 501, 25)
    ]
    rows.append({"step": 500, "eval_high_quality_share": 0.8, "eval_modes_with_20": 25})
    lines = [json.dumps(r) for r in rows] + ['{"step": 525, "energy_lo']  # a line still being written
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    loss_curves(str(tmp_path / "curves.png"), str(tmp_path / "metrics.jsonl"), "run x")
    w, h = _size(tmp_path / "curves.png")
    assert w >= 1200 and h >= 700


def test_evaluator_grid_reads_real_images_from_the_training_data(tmp_path, caplog):
    from data_pipeline.shards import write_array_shards

    digits = np.zeros((80, 1, 28, 28), np.uint8)
    write_array_shards(str(tmp_path / "data"), "digits", "train", digits, np.zeros(80, np.int64), 2)
    ctx = EvalContext([1, 28, 28], 4, "digits", str(tmp_path / "eval"), data_url=str(tmp_path / "data"))
    evaluator = Evaluator(None, None, ctx)
    real = evaluator.real_images(64)
    assert real is not None and real.shape == (64, 1, 28, 28) and float(real.max()) == -1.0
    (tmp_path / "eval").mkdir()
    evaluator.plot("t", 7, None, torch.ones(64, 1, 28, 28), None, {"fid": 12.5})
    assert _size(tmp_path / "eval" / "samples_t.png")[0] >= 1200
    missing = Evaluator(None, None, EvalContext([1, 28, 28], 4, "x", str(tmp_path), data_url=str(tmp_path / "none")))
    assert missing.real_images(64) is None
    # Another data set there (a relative data.url from another folder): its images were shown as the training data's.
    other = Evaluator(None, None, EvalContext([3, 32, 32], 4, "x", str(tmp_path), data_url=str(tmp_path / "data")))
    with caplog.at_level(logging.WARNING, logger="trainer.evaluation.base"):
        assert other.real_images(64) is None
    assert "holds samples of shape (1, 28, 28), not the run's (3, 32, 32)" in caplog.text


@pytest.mark.parametrize("n", [3, 256])
def test_image_grid_any_count(tmp_path, n):
    image_grid(str(tmp_path / "g.png"), torch.zeros(n, 3, 32, 32), nrow=16)
    assert _size(tmp_path / "g.png")[0] >= 600


def test_the_curve_figure_is_redrawn_at_each_evaluation(tmp_path):
    from trainer.metrics import CurvesSink, JsonlSink, MetricsLogger

    figure, jsonl = tmp_path / "curves.png", tmp_path / "metrics.jsonl"
    logger = MetricsLogger([JsonlSink(str(jsonl)), CurvesSink(str(jsonl), str(figure), "run t")])
    logger.log(25, {"energy_loss": 0.1, "generator_loss": 0.2})
    assert not figure.exists()  # training lines alone: no redraw
    logger.log(50, {"eval_high_quality_share": 0.5})
    first = figure.stat().st_mtime_ns
    logger.log(75, {"energy_loss": 0.05, "generator_loss": 0.25})
    logger.log(100, {"eval_high_quality_share": 0.7})
    assert figure.stat().st_mtime_ns > first and _size(figure)[0] >= 1200
    logger.close()


def test_the_curves_leave_out_steps_a_restart_logged_again(tmp_path, monkeypatch):
    """A process killed past its last checkpoint had logged steps its restart logs again (and a rollback
    too): each was drawn twice, the curve running back to the checkpoint's step and on once more."""
    import matplotlib.axes

    from trainer.metrics import JsonlSink

    jsonl = tmp_path / "metrics.jsonl"
    killed = JsonlSink(str(jsonl))
    killed.resumed_at(0)
    for step in (5, 10, 15):  # checkpoint at 10; killed after logging step 15
        killed.log(step, {"energy_loss": 1.0})
    killed.close()
    restarted = JsonlSink(str(jsonl))
    restarted.resumed_at(10)
    for step in (15, 20, 25):
        restarted.log(step, {"energy_loss": 2.0})
    restarted.log(20, {"event": "rollback", "to_step": 20})  # diverged at 25, back to the checkpoint of 20
    restarted.log(25, {"energy_loss": 3.0})
    restarted.close()
    drawn = {}
    plot = matplotlib.axes.Axes.plot

    def recorded(self, *args, label=None, **kwargs):
        if label == "energy_loss":
            drawn["steps"], drawn["values"] = list(args[0]), list(args[1])
        return plot(self, *args, label=label, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recorded)
    loss_curves(str(tmp_path / "curves.png"), str(jsonl))
    assert drawn == {"steps": [5, 10, 15, 20, 25], "values": [1.0, 1.0, 2.0, 2.0, 3.0]}, drawn
