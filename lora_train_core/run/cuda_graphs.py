"""Forward, loss and backward replayed from CUDA graphs, one per batch shape ([speed] cuda_graph).

An eager step spends most of its wall time in the host launching thousands of
small kernels (bench/RESULTS.md: over 8,000 per SDXL step; the GPU idles). A
CUDA graph replays the same kernels with one launch. The pattern is PyTorch's
"partial network capture" (CUDA semantics notes): warm up on a side stream
(lazy initialisation, cuDNN autotuning, torch.compile), then record the call;
later calls copy their inputs into the recorded buffers and replay.

What is recorded ends with `backward()`: gradients accumulate in place into
`.grad` tensors allocated before recording, so gradient accumulation works and
the optimiser step (any optimiser), clipping, the NaN guard and EMA stay
eager. Callers must therefore zero gradients in place (`zero_grad(set_to_none=False)`).
All graphs share one memory pool: they are replayed one at a time and their
outputs are copied out at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

CAPTURE_WARMUP = 3  # eager calls on a side stream before recording (PyTorch's notes use 3)


@dataclass
class _Recorded:
    graph: torch.cuda.CUDAGraph
    inputs: list[Tensor | None]
    output: Tensor


class GraphedBackward:
    """`fn(*inputs) -> Tensor` that runs a backward into `params`' gradients, replayed from graphs.

    Inputs are tensors or None; each distinct (shape, dtype, None-pattern)
    signature is recorded once, at its first call. The warm-up calls add
    gradients too; they are undone before recording, so a call's effect on
    `.grad` is exactly one eager call's.
    """

    def __init__(
        self, fn: Callable[..., Tensor], params: Sequence[nn.Parameter], warmup: int = CAPTURE_WARMUP
    ):
        self.fn, self.params, self.warmup = fn, list(params), warmup
        self.recorded: dict[tuple, _Recorded] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, *inputs: Tensor | None) -> Tensor:
        key = tuple(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in inputs)
        recorded = self.recorded.get(key) or self._record(key, inputs)
        for static, value in zip(recorded.inputs, inputs, strict=True):
            if static is not None:
                static.copy_(value)
        recorded.graph.replay()
        return recorded.output.clone()

    def _record(self, key: tuple, inputs: Sequence[Tensor | None]) -> _Recorded:
        if any(t is not None and not t.is_cuda for t in inputs):
            raise ValueError("GraphedBackward: every input must be on the CUDA device a graph runs on")
        static = [None if t is None else t.clone() for t in inputs]
        grads = self._allocated_grads()
        # Warm-up calls accumulate into .grad; keep what an unfinished accumulation already holds.
        held = [g.clone() for g in grads] if _any_nonzero(grads) else None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.fn(*static)
        with torch.no_grad():
            if held is None:
                torch._foreach_zero_(grads)
            else:
                torch._foreach_copy_(grads, held)
        self.recorded[key] = _Recorded(graph, static, output)
        return self.recorded[key]

    def _allocated_grads(self) -> list[Tensor]:
        """The gradients the graphs write into: allocated once, outside any graph's pool."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.params]


def _any_nonzero(tensors: list[Tensor]) -> bool:
    return bool(torch.stack(torch._foreach_norm(tensors)).sum() > 0) if tensors else False
