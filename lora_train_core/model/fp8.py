"""Frozen weights stored in float8 (speed.fp8_base, kohya's `--fp8_base`): the storage dtype,
the cast, and the test for weights that already are float8 (a ComfyUI MODEL loaded so)."""

from __future__ import annotations

import torch
from torch import nn

FP8_STORAGE = torch.float8_e4m3fn


def is_float8(dtype: torch.dtype) -> bool:
    """True for every float8 variant (e4m3fn, e5m2, their fnuz forms, ...): one-byte floats."""
    return dtype.is_floating_point and dtype.itemsize == 1


def store_in_fp8(module: nn.Module) -> nn.Module:
    """The Linear and Conv2d weights of frozen `module` stored as float8 e4m3fn (a plain cast, as
    kohya's --fp8_base); they are over 99% of a UNet's bytes. Norms and biases keep their dtype:
    autocast casts linear/conv weights to the compute dtype where used on every device, but not
    the weights of norms on the CPU."""
    if any(p.requires_grad for p in module.parameters()):
        raise ValueError("store_in_fp8: the module has trainable parameters; fp8 is for frozen weights")
    for layer in module.modules():
        if isinstance(layer, nn.Linear | nn.Conv2d):
            layer.weight.data = layer.weight.data.to(FP8_STORAGE)
    return module
