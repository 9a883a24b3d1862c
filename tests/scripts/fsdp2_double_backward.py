"""FSDP2 (fully_shard) and the gradient penalty's double backward: the smallest reproduction.

A 3-layer MLP sharded per layer + root on 2 gloo processes; loss = E(real).mean() - E(fake).mean()
+ lam * mean_i ||grad_x E(real_i)||^2 with the inner autograd.grad(create_graph=True). Each variant's
parameter gradients after the outer backward are compared with one process on the full batch:

    OMP_NUM_THREADS=1 python tests/scripts/fsdp2_double_backward.py [variant ...] [--json OUT]

What it shows on torch 2.13 CPU/gloo (tests/test_fsdp2.py asserts it):
- default settings: the outer backward raises "storage of size 0". The inner grad runs each
  layer's pre-backward (all-gather) and post-backward hook; the post-backward reshards (frees the
  all-gathered storage). The double-backward nodes saved those unsharded weights, and autograd runs
  them first in the outer backward (they were created last), before any pre-backward hook could
  all-gather again.
- kept unsharded after backward (``set_reshard_after_backward(False)``, with or without
  ``reshard_after_forward``): exact (rel. error 4e-7). The inner grad's post-backward hooks find no
  gradient (autograd.grad w.r.t. the input accumulates none) and reduce nothing; in the outer
  backward each parameter's AccumulateGrad runs once, with every contribution summed, and a
  post-backward hook (or the root's final callback, for a group whose pre-backward re-armed it)
  runs after it and reduce-scatters once.
- "the sharded weights have no gradient": an observation error. Left unsharded, a module's
  registered parameters are the plain unsharded tensors (grad None); the reduced gradients are on
  the sharded DTensors, registered again by ``reshard()`` (``full_grads``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard

WORLD, BATCH, DIM, HIDDEN, LAM = 2, 8, 4, 16, 10.0


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh()),
        nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh()),
        nn.Linear(HIDDEN, WORLD),  # the energy is the sum of the outputs: every dim 0 divides by 2
    )


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, DIM, generator=g), torch.randn(BATCH, DIM, generator=g)


def loss_of(energy, real: torch.Tensor, fake: torch.Tensor, penalty: bool = True) -> torch.Tensor:
    real = real.detach().requires_grad_(penalty)
    e_real = energy(real).sum(-1)
    loss = e_real.mean() - energy(fake).sum(-1).mean()
    if penalty:
        (g,) = torch.autograd.grad(e_real.sum(), real, create_graph=True)
        loss = loss + LAM * g.pow(2).sum(1).mean()
    return loss


def reference() -> list[torch.Tensor]:
    net = mlp()
    loss_of(net, *batch()).backward()
    return [p.grad.clone() for p in net.parameters()]


def shard(net: nn.Sequential, **kw) -> nn.Sequential:
    for layer in net:
        fully_shard(layer, **kw)
    fully_shard(net, **kw)
    return net


def local(x: torch.Tensor, rank: int) -> torch.Tensor:
    n = x.shape[0] // WORLD
    return x[rank * n : (rank + 1) * n]


# -- the variants: each returns the full (all-gathered) gradients, None where a .grad is None -----


def full_grads(net: nn.Module) -> list[torch.Tensor | None]:
    # Left unsharded (reshard_after_forward=False), a module's registered parameters are the plain
    # unsharded tensors, not the sharded DTensors that hold the reduced gradients: reshard first.
    for m in net.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return [None if p.grad is None else p.grad.full_tensor() for p in net.parameters()]


def v_naive(rank, real, fake):
    net = shard(mlp())
    loss_of(net, real, fake).backward()
    return full_grads(net)


def v_no_reshard(rank, real, fake):
    net = shard(mlp(), reshard_after_forward=False)
    net.set_reshard_after_backward(False)
    loss_of(net, real, fake).backward()
    return full_grads(net)


def v_no_penalty(rank, real, fake):
    """Control: without the penalty FSDP2 matches (compared against a penalty-free reference)."""
    net = shard(mlp())
    loss_of(net, real, fake, penalty=False).backward()
    return full_grads(net)


def v_sync_off_inner(rank, real, fake):
    """Gradient sync off around the inner grad, on for the outer backward."""
    net = shard(mlp(), reshard_after_forward=False)
    net.set_reshard_after_backward(False)
    real = real.detach().requires_grad_(True)
    net.set_requires_gradient_sync(False)
    net.set_is_last_backward(False)
    e_real = net(real).sum(-1)
    loss = e_real.mean() - net(fake).sum(-1).mean()
    (g,) = torch.autograd.grad(e_real.sum(), real, create_graph=True)
    loss = loss + LAM * g.pow(2).sum(1).mean()
    net.set_requires_gradient_sync(True)
    net.set_is_last_backward(True)
    loss.backward()
    return full_grads(net)


def v_unshard_explicit(rank, real, fake):
    """net.unshard() before the forward, no reshard anywhere."""
    net = shard(mlp(), reshard_after_forward=False)
    net.set_reshard_after_backward(False)
    for m in net.modules():
        if hasattr(m, "unshard"):
            m.unshard()
    loss_of(net, real, fake).backward()
    return full_grads(net)


def v_inspect(rank, real, fake):
    """Where do the gradients go? The unsharded parameters' .grad after the outer backward."""
    net = shard(mlp(), reshard_after_forward=False)
    net.set_reshard_after_backward(False)
    loss_of(net, real, fake).backward()
    report = []
    for m in net.modules():
        state = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
        group = state._fsdp_param_group if state is not None else None
        for fp in group.fsdp_params if group is not None else []:
            up = fp._unsharded_param if hasattr(fp, "_unsharded_param") else None
            report.append(
                (
                    fp._param_fqn,
                    "sharded.grad None" if fp.sharded_param.grad is None else "sharded.grad set",
                    "unsharded.grad None" if up is None or up.grad is None else "unsharded.grad set",
                )
            )
    if rank == 0:
        for line in report:
            print("  inspect:", *line, flush=True)
    return full_grads(net)


def v_reshard_fwd_only(rank, real, fake):
    """Resharded after forward (the default), kept unsharded after backward."""
    net = shard(mlp())
    net.set_reshard_after_backward(False)
    loss_of(net, real, fake).backward()
    return full_grads(net)


def v_trace(rank, real, fake):
    """The recipe (no_reshard), printing each group's pre/post-backward and what its post-backward finds."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    phase = ["forward"]
    pre, post = FSDPParamGroup.pre_backward, FSDPParamGroup.post_backward

    def log(group, what):
        grads = [
            "set"
            if getattr(fp, "_unsharded_param", None) is not None and fp._unsharded_param.grad is not None
            else "None"
            for fp in group.fsdp_params
        ]
        if rank == 0:
            print(f"  trace: {phase[0]:6s} {what:13s} {group._module_fqn or 'root':4s} unsharded grads {grads}")

    def traced_pre(self, *a):
        log(self, "pre_backward")
        return pre(self, *a)

    def traced_post(self, *a):
        log(self, "post_backward")
        return post(self, *a)

    FSDPParamGroup.pre_backward, FSDPParamGroup.post_backward = traced_pre, traced_post
    try:
        net = shard(mlp(), reshard_after_forward=False)
        net.set_reshard_after_backward(False)
        real = real.detach().requires_grad_(True)
        e_real = net(real).sum(-1)
        loss = e_real.mean() - net(fake).sum(-1).mean()
        phase[0] = "inner"
        (g,) = torch.autograd.grad(e_real.sum(), real, create_graph=True)
        loss = loss + LAM * g.pow(2).sum(1).mean()
        phase[0] = "outer"
        loss.backward()
    finally:
        FSDPParamGroup.pre_backward, FSDPParamGroup.post_backward = pre, post
    return full_grads(net)


def v_steps(rank, real, fake):
    """The recipe over 3 SGD steps (a fresh batch each), resharding after each step; returns the
    parameters' error against the same 3 steps on one process (gradients leaking between steps or
    lost would show here)."""
    ref = mlp()
    net = shard(mlp(), reshard_after_forward=False)
    net.set_reshard_after_backward(False)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        r, f = torch.randn(BATCH, DIM, generator=g), torch.randn(BATCH, DIM, generator=g)
        opt_ref.zero_grad()
        loss_of(ref, r, f).backward()
        opt_ref.step()
        opt.zero_grad()
        loss_of(net, local(r, rank), local(f, rank)).backward()
        full_grads(net)  # reshard: the optimizer must step the sharded parameters
        opt.step()
    got = [p.full_tensor() for p in net.parameters()]
    want = [p.detach() for p in ref.parameters()]
    rel = max(((a - b).norm() / b.norm()).item() for a, b in zip(got, want))
    return f"params after 3 steps: max rel error {rel:.3e}"


def _fake_first(net, real, fake, fake_requires_grad: bool):
    real = real.detach().requires_grad_(True)
    e_fake = net(fake.detach().requires_grad_(fake_requires_grad)).sum(-1)
    e_real = net(real).sum(-1)
    (g,) = torch.autograd.grad(e_real.sum(), real, create_graph=True)
    (e_real.mean() - e_fake.mean() + LAM * g.pow(2).sum(1).mean()).backward()
    return full_grads(net)


def v_fake_first(rank, real, fake):
    """The recipe with E(fake) computed before E(real): the real path's post-backward hooks then fire
    before the fake path's contributions reach the gradients, and the first layer has no
    post-backward hook on the fake path (its input needs no gradient)."""
    net = shard(mlp(), reshard_after_forward=False)
    net.set_reshard_after_backward(False)
    return _fake_first(net, real, fake, False)


def v_fake_first_rg(rank, real, fake):
    """fake_first, with the fake batch requiring grad (every forward registers post-backward hooks)."""
    net = shard(mlp(), reshard_after_forward=False)
    net.set_reshard_after_backward(False)
    return _fake_first(net, real, fake, True)


VARIANTS = {
    "naive": v_naive,
    "no_reshard": v_no_reshard,
    "no_penalty": v_no_penalty,
    "sync_off_inner": v_sync_off_inner,
    "unshard_explicit": v_unshard_explicit,
    "reshard_fwd_only": v_reshard_fwd_only,
    "inspect": v_inspect,
    "trace": v_trace,
    "steps": v_steps,
    "fake_first": v_fake_first,
    "fake_first_rg": v_fake_first_rg,
}


def compare(got, want) -> str:
    if isinstance(got, str):
        return got
    missing = sum(g is None for g in got)
    if missing:
        return f"{missing}/{len(got)} parameter gradients are None"
    rel = max(((a - b).norm() / b.norm().clamp_min(1e-12)).item() for a, b in zip(got, want))
    return f"max rel error {rel:.3e}"


def worker(rank: int, names: list[str], port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    real, fake = batch()
    want = reference()
    net = mlp()
    loss_of(net, real, fake, penalty=False).backward()
    want_plain = [p.grad.clone() for p in net.parameters()]
    results = {}
    for name in names:
        try:
            got = VARIANTS[name](rank, local(real, rank), local(fake, rank))
            results[name] = compare(got, want_plain if name == "no_penalty" else want)
        except Exception as e:  # a variant that raises is a result too
            results[name] = f"raised {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            if rank == 0:
                traceback.print_exc()
        if rank == 0:
            print(f"{name:18s} {results[name]}", flush=True)
        dist.barrier()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--json")
    parser.add_argument("--port", type=int, default=29517)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.json or os.path.join(tmp, "out.json")
        mp.spawn(worker, args=(args.variants, args.port, out), nprocs=WORLD)
        with open(out) as f:
            return json.load(f)


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
