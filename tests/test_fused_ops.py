"""The fused ops of models/ops against their eager references.

- the Triton kernels (run by Triton's interpreter on a CPU: conftest sets TRITON_INTERPRET=1 when
  there is no GPU) against the PyTorch reference kernels, at tiny shapes;
- every custom autograd Function through gradcheck and gradgradcheck in fp64, with the reference
  kernels in the Triton kernels' slot;
- the penalty's parameter gradients, fused vs eager, on small copies of the four energy networks;
- an op trace: the fused double backward makes no zeros_like and no dilated weight-gradient conv;
- a third derivative through the fused penalty raises a clear error.

On a GPU machine the same tests run on CUDA with the compiled Triton kernels (bench/gpu_check.sh).
"""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck
from torch.utils._python_dispatch import TorchDispatchMode

from models.config import ModelConfig
from models.factory import build_networks
from models.objectives import energy_loss, gradient_penalty
from models.ops import EAGER, FUSED, TORCH_KERNELS, bias_leaky_relu, conv2d_gradfix, squared_norm_mean, use_kernels
from models.ops.penalty import THIRD_DERIVATIVE_ERROR
from tests.conftest import TEST_DEVICE

# Every Triton launch types its arguments as compiled Triton does (conftest): an fp64 kernel that took
# a Python float would fail its comparisons here, as it would on a GPU.
pytestmark = pytest.mark.usefixtures("no_tf32", "deterministic_cudnn", "compiled_triton_arguments")


def _triton_kernels():
    pytest.importorskip("triton", reason="triton is not installed (pip install triton; the dev extra has it)")
    from models.ops.kernels import kernels_for

    kernels = kernels_for(TEST_DEVICE)
    if kernels.name != "triton":
        pytest.skip("no CUDA device and TRITON_INTERPRET is not 1: Triton cannot run here")
    return kernels


KERNEL_SETS = ["torch", "triton"]


def _kernels(name: str):
    return TORCH_KERNELS if name == "torch" else _triton_kernels()


# -- the Triton kernels against the reference ------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 5, 6), (2, 3, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_triton_bias_leaky_relu_matches_reference(shape, dtype, with_bias):
    triton = _triton_kernels()
    torch.manual_seed(0)
    x = torch.randn(shape).to(TEST_DEVICE, dtype)
    bias = torch.randn(shape[1]).to(TEST_DEVICE, dtype) if with_bias else None
    expected = TORCH_KERNELS.bias_leaky_relu(x, bias, 0.2)
    got = triton.bias_leaky_relu(x, bias, 0.2)
    assert got.dtype == dtype and got.shape == x.shape
    # bf16: one rounding step apart at most (Triton's interpreter rounds fp32 to bf16 its own way).
    exact = dtype != torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0 if exact else 2**-7, atol=0 if exact else 1e-5)
    reference = F.leaky_relu(x.double() + (bias.double().view(1, -1, *[1] * (len(shape) - 2)) if with_bias else 0), 0.2)
    torch.testing.assert_close(got.double(), reference, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_triton_leaky_relu_grad_matches_reference(dtype):
    triton = _triton_kernels()
    torch.manual_seed(0)
    dy, y = torch.randn(3, 4, 5, 5).to(TEST_DEVICE, dtype), torch.randn(3, 4, 5, 5).to(TEST_DEVICE, dtype)
    torch.testing.assert_close(triton.leaky_relu_grad(dy, y, 0.1), TORCH_KERNELS.leaky_relu_grad(dy, y, 0.1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 64.0, "tensor"])
def test_triton_squared_norm_mean_and_its_gradient_match_reference(dtype, scale):
    triton = _triton_kernels()
    torch.manual_seed(0)
    # More elements than one reduction block, so the kernel's loop runs several times.
    g = torch.randn(6, 3, 30, 30).to(TEST_DEVICE, dtype)
    s = torch.tensor(32.0, device=TEST_DEVICE) if scale == "tensor" else scale
    up = torch.tensor(0.7, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=TEST_DEVICE)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    got, expected = triton.squared_norm_mean(g, s), TORCH_KERNELS.squared_norm_mean(g, s)
    assert got.dtype == expected.dtype and got.dim() == 0
    torch.testing.assert_close(got, expected, rtol=rtol, atol=0)
    got_grad = triton.squared_norm_mean_grad(g, up, s)
    expected_grad = TORCH_KERNELS.squared_norm_mean_grad(g, up, s)
    assert got_grad.dtype == dtype
    torch.testing.assert_close(got_grad, expected_grad, rtol=rtol if dtype != torch.float16 else 1e-3, atol=1e-7)


def test_compiled_argument_typing_is_in_force():
    # A float argument reaches a kernel as fp32, as compiled Triton passes it: the kernel below adds
    # it to an fp64 zero, so the stored value is 0.1 rounded to fp32 (not the double 0.1).
    _triton_kernels()
    import triton
    import triton.language as tl

    @triton.jit
    def add_float(out_ptr, value):
        tl.store(out_ptr, tl.load(out_ptr) + value)

    out = torch.zeros(1, dtype=torch.float64, device=TEST_DEVICE)
    add_float[(1,)](out, 0.1)
    assert out.item() == float(torch.tensor(0.1, dtype=torch.float32)) != 0.1


def test_squared_norm_reduction_with_several_blocks_per_program(monkeypatch):
    # Above BLOCK * MAX_PARTIALS elements each program sums several blocks (CHUNKS > 1); a small
    # MAX_PARTIALS takes that path at a size the interpreter runs quickly.
    triton = _triton_kernels()
    from models.ops import triton_kernels

    assert triton_kernels.reduction_layout(150_528) == (147, 1, 256)  # a StackedMNIST penalty gradient, batch 64
    monkeypatch.setattr(triton_kernels, "MAX_PARTIALS", 4)
    g = torch.randn(5, 3, 40, 40, dtype=torch.float64, device=TEST_DEVICE)  # 24,000 elements: 24 blocks
    programs, chunks, partials = triton_kernels.reduction_layout(g.numel())
    assert (programs, chunks, partials) == (4, 6, 4)
    expected = TORCH_KERNELS.squared_norm_mean(g, 2.0)
    torch.testing.assert_close(triton.squared_norm_mean(g, 2.0), expected, rtol=1e-12, atol=0)


# -- autograd wiring: gradcheck and gradgradcheck in fp64 -----------------------------------


def _double(*shape):
    return torch.randn(*shape, dtype=torch.float64, device=TEST_DEVICE, requires_grad=True)


@pytest.mark.parametrize("kernels", KERNEL_SETS)
# The 4-d shape's gradgradcheck through Triton's interpreter takes 10-20 s of CPU: slow tier (and the GPU check).
@pytest.mark.parametrize("shape", [(4, 5), pytest.param((2, 3, 4, 4), marks=pytest.mark.slow)])
def test_bias_leaky_relu_gradcheck_and_gradgradcheck(kernels, shape):
    torch.manual_seed(0)
    x, bias = _double(*shape), _double(shape[1])
    with use_kernels(_kernels(kernels)):
        assert gradcheck(lambda a, b: bias_leaky_relu(a, b, 0.2), (x, bias))
        assert gradgradcheck(lambda a, b: bias_leaky_relu(a, b, 0.2), (x, bias))


@pytest.mark.parametrize("stride, padding, kernel", [(1, 1, 3), (2, 2, 5), (2, 1, 4)])
def test_gradfix_conv_gradcheck_and_gradgradcheck(stride, padding, kernel):
    torch.manual_seed(0)
    x, w, b = _double(2, 3, 7, 7), _double(4, 3, kernel, kernel), _double(4)
    conv = lambda x_, w_, b_: conv2d_gradfix(x_, w_, b_, stride=stride, padding=padding)  # noqa: E731
    torch.testing.assert_close(conv(x, w, b), F.conv2d(x, w, b, stride=stride, padding=padding))
    assert gradcheck(conv, (x, w, b))
    assert gradgradcheck(conv, (x, w, b))


def test_gradfix_conv_third_order_matches_native():
    # The gradfix family is closed under differentiation: a third derivative is exact as well.
    torch.manual_seed(0)
    x, w = _double(2, 2, 6, 6), _double(3, 2, 3, 3)

    def third(conv):
        y = conv(x, w)
        (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        (gw,) = torch.autograd.grad(gx.pow(2).sum(), w, create_graph=True)
        return torch.autograd.grad(gw.pow(3).sum(), (x, w))

    fixed = third(lambda a, b: conv2d_gradfix(a, b, stride=2, padding=1))
    native = third(lambda a, b: F.conv2d(a, b, stride=2, padding=1))
    for a, b in zip(fixed, native):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernels", KERNEL_SETS)
@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_squared_norm_mean_gradcheck(kernels, scale):
    torch.manual_seed(0)
    g = _double(3, 2, 4)
    with use_kernels(_kernels(kernels)):
        assert gradcheck(lambda t: squared_norm_mean(t, scale), (g,))
        torch.testing.assert_close(squared_norm_mean(g, scale), (g / scale).pow(2).flatten(1).sum(1).mean())


def test_third_derivative_through_the_fused_penalty_raises_clearly():
    g = _double(3, 4)
    (dg,) = torch.autograd.grad(squared_norm_mean(g), g, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once") as err:
        torch.autograd.grad(dg.sum(), g)
    assert str(err.value) == THIRD_DERIVATIVE_ERROR


# -- the penalty's parameter gradients, fused vs eager, on the four energy networks ----------

NETWORKS = {
    "toy": (ModelConfig(arch="mlp", hidden=[16, 16, 16]), (2,)),
    "kdd": (ModelConfig(arch="mlp", hidden=[16, 8, 8], z_dim=4), (118,)),
    "conv28x3": (ModelConfig(arch="conv", conv_width=2, init_std=0.02), (3, 28, 28)),
    "conv32": (ModelConfig(arch="conv", conv_width=2, init_std=0.02), (3, 32, 32)),
}


def _penalty_step_gradients(name: str, ops, dtype: torch.dtype, batch: int = 3):
    cfg, shape = NETWORKS[name]
    torch.manual_seed(0)
    energy = build_networks(cfg, shape, ops).energy.to(TEST_DEVICE, dtype)
    x_real = torch.randn(batch, *shape, dtype=dtype, device=TEST_DEVICE)
    x_fake = torch.randn(batch, *shape, dtype=dtype, device=TEST_DEVICE)
    loss, metrics = energy_loss(energy, x_real, x_fake, 10.0, fused_penalty=ops.penalty)
    grads = torch.autograd.grad(loss, list(energy.parameters()))
    return loss, metrics["penalty"], grads


@pytest.mark.parametrize("name", list(NETWORKS))
@pytest.mark.parametrize("kernels", KERNEL_SETS)
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fused_penalty_gradients_match_eager(name, kernels, dtype, rtol):
    eager_loss, eager_penalty, eager_grads = _penalty_step_gradients(name, EAGER, dtype)
    with use_kernels(_kernels(kernels)):
        fused_loss, fused_penalty, fused_grads = _penalty_step_gradients(name, FUSED, dtype)
    assert eager_penalty > 0
    torch.testing.assert_close(fused_penalty, eager_penalty, rtol=rtol, atol=0)
    torch.testing.assert_close(fused_loss, eager_loss, rtol=rtol, atol=rtol * eager_penalty.item())
    for fused, eager in zip(fused_grads, eager_grads, strict=True):
        # relative to each gradient tensor's own size: entries near zero carry no relative meaning
        assert (fused - eager).abs().max() <= rtol * eager.abs().max(), (fused - eager).abs().max()


# -- what the fused double backward does not do ------------------------------------------------


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func is torch.ops.aten.convolution.default:
            name += "(transposed)" if args[6] else ("(dilated)" if any(d != 1 for d in args[5]) else "")
        self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _trace_penalty_step(ops) -> Counter:
    cfg, shape = NETWORKS["conv28x3"]
    torch.manual_seed(0)
    energy = build_networks(cfg, shape, ops).energy.to(TEST_DEVICE)
    x_real, x_fake = torch.randn(2, *shape, device=TEST_DEVICE), torch.randn(2, *shape, device=TEST_DEVICE)
    with use_kernels(TORCH_KERNELS), OpLog() as log:
        loss, _ = energy_loss(energy, x_real, x_fake, 1.0, fused_penalty=ops.penalty)
        loss.backward(inputs=list(energy.parameters()))
    return log.ops


def test_fused_double_backward_makes_no_zeros_and_no_generic_weight_gradient_conv():
    eager, fused = _trace_penalty_step(EAGER), _trace_penalty_step(FUSED)
    # The trace sees what eager does (so the assertions below can fail) ...
    assert eager["zeros_like"] == 4 and eager["convolution(dilated)"] == 4
    # ... and the fused step does none of it: every weight gradient is the weight-gradient kernel.
    assert fused["zeros_like"] == fused["zeros"] == 0
    assert fused["convolution(dilated)"] == fused["convolution(transposed)"] == 0
    assert fused["leaky_relu_backward"] == 0


def test_gradfix_inner_gradient_computes_no_weight_gradient():
    cfg, shape = NETWORKS["conv28x3"]
    energy = build_networks(cfg, shape, FUSED).energy.to(TEST_DEVICE)
    x = torch.randn(2, *shape, device=TEST_DEVICE)
    with use_kernels(TORCH_KERNELS), OpLog() as log:
        gradient_penalty(energy, x, fused=True)
    # 4 conv layers: 4 forward convs and 4 data gradients, and no weight gradient at all.
    assert log.ops["convolution"] == 4 and log.ops["convolution_backward"] == 4
