"""The benchmark's fast path (channels_last, no host sync, LoRA in the activation dtype) changes no result.

On the CPU, in float32, one fixed-seed step of our LoRA training step with the
fast-path options on gives the loss, LoRA gradients and LoRA update of the same
step with them off (the core's step as train() runs it), to float32 rounding:
loss to 1e-6 relative, gradients to 1e-5 relative norm. The update is AdamW's,
whose first step is about lr·sign(g), so rounding-level differences in g are
amplified where g is near 0: it is compared to 1e-3 relative norm and, per
element, to 5% of one learning-rate step.
"""

from __future__ import annotations

import pytest
import torch

from bench.models import Case, build_unet, make_inputs
from bench.step_bench import FastPath, build_ours
from bench.steps import LEARNING_RATE

CASE = Case("tiny_sd15_b1", "sd15", 64, 1)
REFERENCE = FastPath(autocast=False)  # the core's step, in float32 so that rounding stays small
FAST = FastPath(autocast=False, channels_last=True, host_sync=False, lora_path="compute_dtype")


def _one_step(fast: FastPath) -> tuple[torch.Tensor | float, torch.Tensor, torch.Tensor]:
    device = torch.device("cpu")
    inputs = make_inputs(build_unet("sd15", True, torch.device("meta")).config, CASE, True, device)
    setup = build_ours(CASE, inputs, device, tiny=True, fast=fast, weight_dtype=torch.float32)
    # lora_up starts at zero, which leaves lora_down without a gradient; give both one
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in setup.network.named_lora_parameters():
            if name.endswith("lora_up.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    before = [p.detach().clone() for p in setup.params]
    seen = []  # the gradients the optimiser steps with (apply_update clears them after)
    setup.optimizer.register_step_pre_hook(
        lambda *_: seen.append(torch.cat([p.grad.flatten() for p in setup.params]))
    )
    loss = setup.step(torch.Generator().manual_seed(0))
    (grads,) = seen
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(setup.params, before, strict=True)])
    return loss, grads, update


@pytest.fixture(scope="module")
def reference_and_fast():
    return _one_step(REFERENCE), _one_step(FAST)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_fast_path_step_gives_the_same_loss(reference_and_fast):
    (ref_loss, _, _), (fast_loss, _, _) = reference_and_fast
    assert float(fast_loss) == pytest.approx(ref_loss, rel=1e-6)


def test_fast_path_step_gives_the_same_lora_gradients(reference_and_fast):
    (_, ref_grads, _), (_, fast_grads, _) = reference_and_fast
    assert ref_grads.abs().sum() > 0
    assert _rel(fast_grads, ref_grads) < 1e-5


def test_fast_path_step_gives_the_same_lora_update(reference_and_fast):
    (_, _, ref_update), (_, _, fast_update) = reference_and_fast
    # AdamW's first step moves every weight with a gradient by about lr
    assert ref_update.abs().max() == pytest.approx(LEARNING_RATE, rel=0.05)
    assert _rel(fast_update, ref_update) < 1e-3
    assert (fast_update - ref_update).abs().max() < 0.05 * LEARNING_RATE


def test_fast_path_step_returns_the_loss_without_a_host_sync(reference_and_fast):
    (ref_loss, _, _), (fast_loss, _, _) = reference_and_fast
    assert isinstance(ref_loss, float)  # the core's step reads the loss back (.item())
    assert isinstance(fast_loss, torch.Tensor) and fast_loss.ndim == 0 and not fast_loss.requires_grad
