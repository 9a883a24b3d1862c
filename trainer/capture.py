"""Whole-step capture: an energy or generator step recorded once as a CUDA graph, then replayed.

At batch 64 these networks are small, and an eager step on a GPU is bound by its ~200 kernel
launches and the Python around them, not by arithmetic. A replayed graph launches the whole step
(forward, the penalty's inner gradient, the double backward, the optimizer) at once.

How a step is captured (the recipe of PyTorch's "whole network capture"):
- the first ``warmup`` calls run eagerly on a side stream: real training steps, which also create
  the optimizer state, the loss scale and the kernels' workspaces before capture;
- then the step is captured once with static input buffers (nothing runs during capture), and
  every call copies its inputs in, replays, and returns the graph's static output tensors, which
  the next replay overwrites (the caller reads or copies them first);
- the optimizers are capturable with device-tensor learning rates (trainer/steps.py), autocast's
  weight-cast cache is off, and every random draw that should differ per step is either an input
  (z, the MI permutation) or made on the device by the graph-safe default generator (MALA's noise).

Loading a checkpoint replaces the optimizers' state tensors, so ``reset()`` drops the graph and the
next calls warm up and capture again. A capture that fails falls back to eager with one line, after
``on_failure`` has undone what the half-recorded step left behind (gradients, a GradScaler that
believes it stepped) and dropped the graphs captured before it (they hold the device generator's
state that the failure replaced). Capture runs in thread-local error mode: a CUDA call another
thread makes meanwhile (the metrics exporter reads the allocator's statistics) does not spoil it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

StepFn = Callable[..., dict[str, Tensor]]
WARMUP_CALLS = 3


def capture_blocker(cfg, runtime) -> str | None:
    """Why this run cannot capture its steps (a one-line reason), or None when it can."""
    if cfg.train.capture == "off":
        return "train.capture=off"
    if runtime.device.type != "cuda":
        return f"CUDA graphs need a CUDA device, this run is on {runtime.device.type}"
    if cfg.train.engine == "deepspeed":
        return "DeepSpeed's engine step synchronises with the host"
    if cfg.train.engine != "ddp":
        return f"train.engine={cfg.train.engine} is not captured (ddp only)"
    if runtime.world_size > 1:
        return "the gradient all-reduce of several processes is not captured (one process only)"
    return None


class GraphedStep:
    """``fn`` eagerly for ``warmup`` calls, then as a replayed CUDA graph."""

    def __init__(self, fn: StepFn, on_failure: Callable[[], None] = lambda: None, warmup: int = WARMUP_CALLS):
        self.fn, self.on_failure, self.warmup = fn, on_failure, warmup
        self.failed = False
        self.reset()

    def reset(self) -> None:
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0
        self.static_inputs: tuple[Tensor, ...] = ()
        self.static_outputs: dict[str, Tensor] = {}

    def __call__(self, *inputs: Tensor) -> dict[str, Tensor]:
        if self.graph is None and not self.failed:
            if self.calls < self.warmup:
                self.calls += 1
                return self._eager_on_side_stream(inputs)
            self._capture(inputs)
        if self.graph is None:  # the capture failed: eager from now on
            return self.fn(*inputs)
        for static, value in zip(self.static_inputs, inputs, strict=True):
            static.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.static_outputs

    def _eager_on_side_stream(self, inputs: tuple[Tensor, ...]) -> dict[str, Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, inputs: tuple[Tensor, ...]) -> None:
        static_inputs = tuple(x.clone() for x in inputs)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_outputs = self.fn(*static_inputs)
        except Exception as e:  # noqa: BLE001 - any failure means: run this step eagerly
            self.failed = True
            torch.cuda.synchronize()
            # torch.cuda.graph's exit raises in capture_end before it restores the stream: without
            # this, everything after would run on the capture's side stream.
            torch.cuda.set_stream(stream)
            _release_generator_from_aborted_capture()
            self.on_failure()
            log.warning("capture off for %s: %s: %s; running it eagerly", _name(self.fn), type(e).__name__, e)
            return
        self.graph, self.static_inputs, self.static_outputs = graph, static_inputs, static_outputs


def _release_generator_from_aborted_capture() -> None:
    """A capture that fails ends before the graph's epilogue, which is what tells the device's default
    generator that capture is over: it would go on believing it is capturing, and the next eager draw
    (torch.randn of the fallback) raises "Offset increment outside graph capture encountered
    unexpectedly". A clone of its state has the same seed and offset and is not capturing; graphs
    captured earlier keep the old state object and would replay from the same offsets as the eager
    draws after this, so the caller's ``on_failure`` must have them captured again."""
    generator = torch.cuda.default_generators[torch.cuda.current_device()]
    generator.graphsafe_set_state(generator.clone_state())


def _name(fn: Callable) -> str:
    """The step's name for messages: a bound method's, or a partial's function and arguments."""
    if isinstance(fn, functools.partial):
        return f"{_name(fn.func)}({', '.join(f'{k}={v}' for k, v in fn.keywords.items())})"
    return getattr(fn, "__name__", repr(fn)).lstrip("_")
