"""The FSDP2 runtime (``torch.distributed.fsdp.fully_shard``): E, G and T sharded per layer, mixed
precision through ``MixedPrecisionPolicy``, the gradient penalty's double backward exact.

What it takes for the penalty (tests/scripts/fsdp2_double_backward.py reproduces each case on 2
gloo ranks; tests/test_fsdp2.py asserts it):

- FSDP2's hooks per sharded layer: a forward pre-hook all-gathers (unshards) the layer, a post-hook
  reshards it (frees the all-gathered storage, ``reshard_after_forward``) and registers a tensor hook
  on its output (pre-backward: all-gather again); an autograd Function on its inputs fires the
  post-backward hook: reduce-scatter the gradients of the unsharded parameters into the sharded
  ones, then reshard (``reshard_after_backward``). The root queues a final callback at the end of
  every backward pass that runs the post-backward of any group whose hook did not fire.
- The inner ``autograd.grad(E(x).sum(), x, create_graph=True)`` is a backward pass: it fires
  every layer's pre- and post-backward hook and the final callback. The post-backward finds no
  gradient (autograd.grad w.r.t. x accumulates none into the parameters) and reduces nothing, but
  by default it reshards. The double-backward nodes it created saved the unsharded weights; autograd
  runs them first in the outer backward (created last, they come first in its order), before any
  pre-backward hook could all-gather again: "storage of size 0" (the issue's "no gradient at all"
  was an observation error: see ``_reshard``).
- So every layer stays unsharded after a backward (``set_reshard_after_backward(False)``), and E,
  whose outer backward runs the double-backward nodes, is not resharded after its forward either
  (``reshard_after_forward=False``: the fake batch's forward comes after the inner grad and would
  free the weights the penalty's nodes saved). Then each parameter's AccumulateGrad runs once in the
  outer backward, with every contribution (first-order and double-backward) summed, and the
  post-backward hook of its layer's last-run forward (or the final callback, for a layer whose
  pre-backward hook re-armed it) runs after it: one reduce-scatter of the complete gradient. Exact:
  rel. error 4e-7 against one process on the full batch (the reproduction).
- After every update's backward all three networks are resharded explicitly (``_reshard``), so
  between steps, and for the optimizer, the parameters are the sharded DTensors. ``frozen`` (group.py)
  reshards the networks it froze at its end: a gathered parameter takes its requires_grad from the
  shard when it is gathered, and E left gathered by MALA's frozen autograd.grad went into the energy
  step without gradients (1.5e-2 off DDP after 6 steps; now bit-identical).
- The reduced gradient of a layer is complete only because autograd accumulates a parameter's
  gradient once, after all its contributions, and the double-backward nodes (created last) run
  before the forward nodes whose hooks reduce: an ordering of autograd's engine (one ready queue per
  device, latest-created first), not a documented FSDP2 guarantee. tests/test_fsdp2.py would catch
  a change (it also runs E(fake) before E(real), and the fake batch with and without requires_grad).

Memory: gradients and Adam's state are always sharded, parameters between steps too; during the
energy step E is whole on every rank (the double-backward nodes need all its layers at once), G and
T are gathered one layer at a time. fp16 is refused (no loss scaler for sharded gradients here).

Engine state in a checkpoint: every rank writes its optimizer shards (``fsdp_rank{r}.pt``); the
networks come from the engine-free weights export, gathered from the shards (a collective).
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from data_pipeline.cli import CheckpointError
from trainer.runtime.group import AUTOCAST_DTYPES, ProcessGroup, join_process_group, refuse_accelerate_deepspeed


def shard_per_layer(net: nn.Module, policy: MixedPrecisionPolicy, reshard_after_forward: bool) -> nn.Module:
    """fully_shard every submodule that owns parameters (a layer), then the root; in place."""
    for module in list(net.modules()):
        if module is not net and any(True for _ in module.parameters(recurse=False)):
            fully_shard(module, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(net, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for module in net.modules():
        if isinstance(module, FSDPModule):
            module.set_reshard_after_backward(False)  # see the module docstring
    # FSDP2 fixes each group's gradient dtypes at its lazy init, from the parameters that require a
    # gradient then; left to the first forward, a network first called frozen (G in the energy step)
    # gets none, and its bf16 gradients then fail against the fp32 shards. Initialised now, unfrozen.
    net._get_fsdp_state()._lazy_init()
    return net


def _reshard(*nets: nn.Module) -> None:
    # Left unsharded, a layer's registered parameters are the plain all-gathered tensors (their .grad
    # None): the reduced gradients live on the sharded DTensors, registered again here.
    for net in nets:
        for module in net.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def full_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """``net``'s state dict with every shard gathered, in fp32 on the CPU (a collective)."""
    state = net.state_dict()
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().float().cpu() for k, v in state.items()}


def load_full_state(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copies full tensors into ``net``: each rank keeps its own shard (no communication)."""
    with torch.no_grad():
        for key, target in net.state_dict().items():
            if key not in state:
                raise CheckpointError(f"the weights export has no {key!r}")
            if isinstance(target, DTensor):
                full = state[key].to(target.device, target.dtype)
                mine = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
                target.to_local().copy_(mine.to_local())
            else:
                target.copy_(state[key])


class FSDPUpdate:
    """One MEG update over sharded networks (the ``trainer.runtime.Update`` protocol). ``nets`` and
    ``modules`` are the same sharded modules: FSDP2 shards in place and its hooks are the engine."""

    def __init__(self, nets: dict[str, nn.Module], everything: list[nn.Module], optimizer, device: torch.device):
        self.nets = self.modules = nets
        self.optimizer, self._everything = optimizer, everything
        self._not_skipped = torch.zeros((), device=device)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def penalty_scale(self) -> float:
        return 1.0

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def discard_step(self) -> None:
        self.zero_grad()  # FSDP2 steps are never captured (trainer/capture.py)

    def backward(self, loss: torch.Tensor) -> None:
        # No ``inputs=``: the graph holds the all-gathered parameters, not the sharded ones the
        # optimizer sees (the data batch's gradient, also computed, is dropped with the batch).
        loss.backward()
        _reshard(*self._everything)

    def step(self) -> torch.Tensor:
        self.optimizer.step()
        if dist.is_initialized() and dist.get_world_size() > 1:
            for net in self.nets.values():  # FSDP2 does not shard buffers: DDP's rank-0 buffers
                for buffer in net.buffers():
                    dist.broadcast(buffer, src=0)
        return self._not_skipped


class FSDPRuntime(ProcessGroup):
    """FSDP2 over torch.distributed's own process group (no accelerate)."""

    def __init__(self, mixed_precision: str = "no", collective_timeout: float = 600.0):
        refuse_accelerate_deepspeed()  # fp16 is refused earlier, by TrainConfig's check
        device = join_process_group(collective_timeout)
        super().__init__(device, dist.get_rank(), dist.get_world_size(), mixed_precision)
        dtype = AUTOCAST_DTYPES.get(mixed_precision)
        # Parameters all-gathered in bf16, gradients reduced in fp32 (the fp32 masters stay sharded).
        # The steps' autocast stays on as well, so that the ops autocast keeps in fp32 do so here too.
        self.policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
        self.updates: dict[str, FSDPUpdate] = {}
        self._plain: dict[str, nn.Module] = {}

    def prepare_updates(self, energy, generator, statistics, energy_opt, generator_opt):
        """Shards E, G and T in place; the optimizers, built on the unsharded parameters, are rebuilt
        on the sharded ones (same class and settings)."""
        nets = {"energy": energy, "generator": generator, "statistics": statistics}
        # for_evaluation's containers, on this rank's device: fully_shard moves only the sharded originals
        # (left on the CPU, evaluation ran there and ranks_in_sync's all-gather failed under NCCL).
        self._plain = {name: copy.deepcopy(net).to(self.device) for name, net in nets.items()}
        shard_per_layer(energy, self.policy, reshard_after_forward=False)  # see the module docstring
        shard_per_layer(generator, self.policy, reshard_after_forward=True)
        shard_per_layer(statistics, self.policy, reshard_after_forward=True)
        everything = list(nets.values())
        e_opt = _rebuilt(energy_opt, list(energy.parameters()))
        g_opt = _rebuilt(generator_opt, [*generator.parameters(), *statistics.parameters()])
        self.updates = {
            "energy": FSDPUpdate({"energy": energy}, everything, e_opt, self.device),
            "generator": FSDPUpdate({"generator": generator, "statistics": statistics}, everything, g_opt, self.device),
        }
        return self.updates["energy"], self.updates["generator"]

    def _name_of(self, module: nn.Module) -> str:
        for update in self.updates.values():
            for name, net in update.modules.items():
                if net is module:
                    return name
        raise ValueError("not one of this runtime's networks")

    def for_evaluation(self, module: nn.Module) -> nn.Module:
        """An unsharded fp32 copy holding the gathered weights (a collective: every rank calls it)."""
        plain = self._plain[self._name_of(module)]
        plain.load_state_dict(full_state(module))
        return plain

    def ranks_in_sync(self, *modules: nn.Module) -> bool:
        # Each rank holds other shards: the check runs on the gathered networks (buffers included).
        return super().ranks_in_sync(*(copy.deepcopy(self.for_evaluation(m)) for m in modules))

    def fp32_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: full_state(net) for u in self.updates.values() for name, net in u.modules.items()}

    def save_engine_state(self, folder: str) -> None:
        """Every rank writes its optimizer shards (the DTensor states as their local tensors)."""
        os.makedirs(folder, exist_ok=True)
        state = {"world_size": self.world_size}
        for name, u in self.updates.items():
            opt = u.optimizer.state_dict()
            opt["state"] = {
                i: {k: v.to_local() if isinstance(v, DTensor) else v for k, v in s.items()}
                for i, s in opt["state"].items()
            }
            state[name] = opt
        torch.save(state, os.path.join(folder, f"fsdp_rank{self.rank}.pt"))

    def restore(self, folder: str, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        from trainer.checkpoint import load_tensors  # trainer.checkpoint's tools need no runtime

        path = os.path.join(folder, f"fsdp_rank{self.rank}.pt")
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no fsdp engine state (was this checkpoint written with train.engine=fsdp?)")
        state = load_tensors(path, map_location="cpu" if self.device.type == "cpu" else self.device)
        if state["world_size"] != self.world_size:
            raise CheckpointError(
                f"{folder}: written by {state['world_size']} ranks, resumed on {self.world_size}: the optimizer "
                "shards are per rank (resume on the same number of ranks)"
            )
        for update in self.updates.values():
            for name, net in update.modules.items():
                load_full_state(net, weights[name])
        for name, update in self.updates.items():
            update.optimizer.load_state_dict(state[name])
            for group in update.optimizer.param_groups:
                for p in group["params"]:
                    s = update.optimizer.state.get(p, {})
                    for k, v in s.items():
                        if isinstance(p, DTensor) and not isinstance(v, DTensor) and v.shape == p.to_local().shape:
                            s[k] = DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())

    def shutdown(self, meet: bool = True) -> None:
        self.updates.clear()
        self._plain.clear()
        super().shutdown(meet)


def _rebuilt(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """``optimizer``'s class and settings (one param group, no state yet) over ``params``."""
    if len(optimizer.param_groups) != 1 or optimizer.state:
        raise ValueError("expects a fresh optimizer with one parameter group")
    settings = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    return type(optimizer)(params, **settings)
