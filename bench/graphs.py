"""Whole-step CUDA graph: record a training step once, then replay it with one launch.

The eager step spends most of its wall time in the host launching thousands of
small kernels (see RESULTS.md's profiles). A graph replays the same kernels
with one launch. Pattern of the PyTorch CUDA-graphs notes ("whole network
capture"): warm up on a side stream (lazy state, cuDNN autotuning, compiles),
then capture forward, backward and the optimiser step with gradients set to
None, so that they live in the graph's memory pool; the optimiser must be built
with capturable=True. Inputs are copied into static buffers before each replay.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


class GraphedCall:
    """`fn(*static_inputs) -> Tensor`, recorded once; calling it copies new inputs in and replays."""

    def __init__(self, fn: Callable[..., Tensor], example: Sequence[Tensor], warmup: int = 3):
        self.static_inputs = [t.clone() for t in example]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_output = fn(*self.static_inputs)

    def __call__(self, *inputs: Tensor) -> Tensor:
        for static, value in zip(self.static_inputs, inputs, strict=True):
            static.copy_(value)
        self.graph.replay()
        return self.static_output.clone()
