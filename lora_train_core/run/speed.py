"""[speed] section: options that make a step faster or leaner; all but fp8_base compute the same.

Measured in bench/ (RESULTS.md) on real-size SD1.5 and SDXL UNets:

cuda_graph: the step's forward, loss and backward are recorded as one CUDA graph
    per batch shape (one per bucket) and replayed, so the host launches one graph
    instead of thousands of small kernels; the optimiser, clipping, the NaN guard
    and EMA stay eager, so every optimiser works (cuda_graphs.py). The graphs'
    memory pool holds more than an eager step (RESULTS.md run 8: 8.8 vs 7.8 GiB).
compile_blocks: `torch.compile` each repeated block of the denoiser (regional
    compilation: one compiled graph per block shape, compiled once).
cudnn_benchmark: let cuDNN time its convolution algorithms for each new shape.
fp8_base: store the frozen UNet's Linear and Conv2d weights as float8 (e4m3fn),
    as kohya's `--fp8_base` (model/fp8.py); autocast casts them to the mixed-precision
    dtype where used. This one changes results (the weights are rounded to 3 mantissa bits).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, check_choice

# kohya / diffusers class names of the blocks a UNet repeats
# the repeated blocks of each denoiser: the UNets' transformer blocks (diffusers' and ComfyUI's
# share the name), Flux's double- and single-stream blocks (diffusers' names, then BFL's / ComfyUI's)
TRANSFORMER_BLOCKS = (
    "BasicTransformerBlock",
    "FluxTransformerBlock",
    "FluxSingleTransformerBlock",
    "DoubleStreamBlock",
    "SingleStreamBlock",
)
COMPILE_BLOCKS = {
    "none": (),
    "transformer": TRANSFORMER_BLOCKS,
    # diffusers' ResNet block, then ComfyUI's (comfy.ldm.modules.diffusionmodules.openaimodel)
    "transformer+resnet": (*TRANSFORMER_BLOCKS, "ResnetBlock2D", "ResBlock"),
}


@dataclass(frozen=True)
class SpeedConfig:
    """[speed] section (see the module docstring for what each option does)."""

    cuda_graph: bool = False  # replay forward, loss and backward from one CUDA graph per batch shape
    compile_blocks: str = "none"  # torch.compile each transformer block (and ResNet block) of the denoiser
    cudnn_benchmark: bool = False  # cuDNN times its convolution algorithms for each new shape
    fp8_base: bool = False  # keep the frozen UNet's weights in float8 (kohya --fp8_base); changes results

    def __post_init__(self):
        for name in ("cuda_graph", "cudnn_benchmark", "fp8_base"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"speed.{name}: {getattr(self, name)!r} is not true/false")
        check_choice("speed.compile_blocks", self.compile_blocks, COMPILE_BLOCKS)


def check_speed(recipe, device: torch.device, fp8_base: bool, world_size: int = 1) -> None:
    """Refuse [speed] settings this run cannot honour, naming the setting that conflicts.

    device: where the run trains; fp8_base: whether the model's weights are stored in float8.
    """
    speed, train, net = recipe.speed, recipe.train, recipe.network
    # A door may load float8 weights on the user's word elsewhere (ComfyUI's loader node): the
    # metadata records backend.fp8_base. Asking for float8 from a model without it is refused.
    if speed.fp8_base and not fp8_base:
        raise ConfigError(
            "speed.fp8_base = true, but the model was loaded without float8 weights; the CLI loads "
            "it as the setting says (ComfyUI: choose the weight dtype in the loader node instead)"
        )
    if speed.fp8_base and train.mixed_precision == "no":
        raise ConfigError(
            "speed.fp8_base: float8 weights are cast where used by mixed precision; "
            "set train.mixed_precision to 'bf16' (or 'fp16')"
        )
    if not speed.cuda_graph:
        return
    if device.type != "cuda":
        raise ConfigError(f"speed.cuda_graph: needs a CUDA device; this run is on {device.type}")
    refusals = {
        "network.train_text_encoder": net.train_text_encoder,
        "train.mixed_precision = 'fp16'": train.mixed_precision == "fp16",
        "network dropout (network.network_dropout, rank_dropout, module_dropout)": any(
            (net.network_dropout, net.rank_dropout, net.module_dropout)
        ),
        "multi-process training": world_size > 1,
    }
    for what, present in refusals.items():
        if present:
            raise ConfigError(f"speed.cuda_graph with {what} is not implemented yet; turn one of them off")


@contextlib.contextmanager
def speedups(modules: Sequence[nn.Module], speed: SpeedConfig) -> Iterator[None]:
    """cuDNN autotuning and compiled blocks for the length of a run (cuda_graph is the step's),
    always with the attention kernels `without_cudnn_attention` allows."""
    with (
        without_cudnn_attention(),
        cudnn_benchmark(speed.cudnn_benchmark),
        compiled_blocks(modules, speed.compile_blocks),
    ):
        yield


@contextlib.contextmanager
def without_cudnn_attention() -> Iterator[None]:
    """Scaled-dot-product attention may use flash, memory-efficient or math kernels, not cuDNN's,
    for the length of a run; the previous setting comes back after.

    Measured on an H200 with torch 2.11 (2026-12-01): cuDNN's attention crashed with an illegal
    memory access in the backward of a real-size Flux.1 step at 1024², where flash and
    memory-efficient attention ran (tests/test_gpu_attention.py). PyTorch prefers cuDNN's kernel
    on Hopper when it is enabled, so it is switched off rather than left to chance.
    """
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


def compile_blocks(modules: Sequence[nn.Module], which: str) -> list[nn.Module]:
    """`torch.compile` every block whose class is in COMPILE_BLOCKS[which], in place; returns them.

    Compiling happens lazily, at a block's first call: one graph per distinct block
    shape (dynamo's recompile limit is raised so that SDXL's ~70 transformer
    blocks of 3 widths all compile rather than fall back to eager).
    """
    names = COMPILE_BLOCKS[which]
    blocks = [m for module in modules for m in module.modules() if type(m).__name__ in names]
    if not blocks:
        return blocks
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in blocks:
        block.compile()
    return blocks


@contextlib.contextmanager
def compiled_blocks(modules: Sequence[nn.Module], which: str) -> Iterator[int]:
    """compile_blocks for the length of a run, then back to eager; yields how many were compiled."""
    blocks = compile_blocks(modules, which)
    try:
        yield len(blocks)
    finally:
        for block in blocks:
            block._compiled_call_impl = None  # nn.Module.compile's own slot


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """cuDNN autotuning on for the run (a process-wide switch), restored after."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled or before
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
