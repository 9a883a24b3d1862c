"""bench/penalty_flops.py: the FLOP count behind the README's arithmetic floor of the penalty."""

import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def penalty_flops():
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        import penalty_flops
    finally:
        sys.path.remove(str(REPO_ROOT / "bench"))
    return penalty_flops


def _penalty_loss(w1, w2, x):
    """A two-layer energy's loss with its gradient penalty: forward, input gradient, double backward."""
    x = x.requires_grad_(True)
    energy = torch.nn.functional.leaky_relu(x @ w1, 0.2) @ w2
    (grad,) = torch.autograd.grad(energy.sum(), x, create_graph=True)
    return energy.mean() + grad.pow(2).sum(1).mean()


def test_the_count_equals_torchs_own_through_a_double_backward(penalty_flops):
    w1 = torch.randn(6, 5, requires_grad=True)
    w2 = torch.randn(5, 1, requires_grad=True)
    x = torch.randn(4, 6)
    with FlopCounterMode(display=False) as reference:  # no modules: its module hooks stay out of the way
        torch.autograd.grad(_penalty_loss(w1, w2, x.clone()), [w1, w2])
    with penalty_flops.FlopCount() as ours:
        torch.autograd.grad(_penalty_loss(w1, w2, x.clone()), [w1, w2])
    assert ours.flops == reference.get_total_flops() > 0


def test_the_penalty_costs_less_arithmetic_than_the_step_before_issue_10(penalty_flops, capsys, monkeypatch):
    # The old step differentiated E over cat(real, fake): its penalty's input gradient and double
    # backward ran over twice the rows. A step that went back to that would show here.
    bench_penalty = sys.modules["bench_penalty"]
    monkeypatch.setattr(bench_penalty, "NETWORKS", dict(bench_penalty.NETWORKS))  # --tiny rewrites it
    penalty_flops.main(["--tiny", "--only", "toy", "--only", "stackedmnist"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| toy", "| stackedmnist"))]
    assert len(rows) == 2
    for row in rows:
        before, now = (float(cell.split("×")[0]) for cell in row.split("|")[4:6])
        assert 1.2 < now < 1.8 < before, row
