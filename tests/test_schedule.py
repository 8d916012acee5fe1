"""LR schedules against KOHYA_FACTS' formulas, per param group and block weight."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lora_train_core.errors import ConfigError
from lora_train_core.optim.optimizers import OptimizerConfig, build_optimizer
from lora_train_core.optim.param_groups import BlockWeights, build_param_groups
from lora_train_core.optim.schedule import build_lr_scheduler, warmup_steps

CPU = torch.device("cpu")
T, W = 20, 4


def kohya_factor(name: str, s: int, warmup: int, total: int, cycles: int = 1, power: float = 1.0, lr0=1e-3):
    """KOHYA_FACTS "Optimisers and schedules", written out."""
    if name == "constant":
        return 1.0
    if s < warmup:
        return s / warmup
    p = (s - warmup) / (total - warmup)
    if name == "constant_with_warmup":
        return 1.0
    if name == "linear":
        return (total - s) / (total - warmup)
    if name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * p))
    if name == "cosine_with_restarts":
        return 0.5 * (1 + math.cos(math.pi * ((cycles * p) % 1))) if p < 1 else 0.0
    if name == "polynomial":
        return ((lr0 - 1e-7) * (1 - p) ** power + 1e-7) / lr0
    raise AssertionError(name)


def lrs_over_steps(optimizer, scheduler, steps: int) -> list[list[float]]:
    """Each group's lr in force for optimiser steps 0..steps-1."""
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize(
    ("name", "warmup", "cycles", "power"),
    [
        ("constant", 0, 1, 1.0),
        ("constant_with_warmup", W, 1, 1.0),
        ("linear", W, 1, 1.0),
        ("cosine", W, 1, 1.0),
        ("cosine_with_restarts", W, 3, 1.0),
        ("polynomial", W, 1, 2.0),
    ],
)
def test_group_lr_follows_the_kohya_formula_at_every_step(name, warmup, cycles, power):
    lr0 = 1e-3
    cfg = OptimizerConfig(
        learning_rate=lr0,
        lr_scheduler=name,
        lr_warmup_steps=warmup,
        lr_scheduler_num_cycles=cycles,
        lr_scheduler_power=power,
    )
    groups = [
        {"params": [nn.Parameter(torch.zeros(2))], "lr": lr0},
        {"params": [nn.Parameter(torch.zeros(2))], "lr": 5e-4},
    ]
    opt = build_optimizer(groups, cfg, CPU)
    seen = lrs_over_steps(opt, build_lr_scheduler(opt, cfg, T), T)
    for s, (lr_a, lr_b) in enumerate(seen):
        factor = kohya_factor(name, s, warmup, T, cycles, power, lr0)
        assert lr_a == pytest.approx(lr0 * factor, rel=1e-9, abs=1e-15), s
        # every schedule multiplies each group's own lr by the same factor (lr₀ = learning_rate)
        assert lr_b == pytest.approx(5e-4 * factor, rel=1e-9, abs=1e-15), s


def test_block_group_lrs_are_the_schedule_times_the_block_weight():
    names = [
        "lora_te_text_model_encoder_layers_0_mlp_fc1",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",  # block 1
        "lora_unet_mid_block_attentions_0_proj_in",  # block 12
        "lora_unet_up_blocks_3_attentions_2_proj_out",  # block 24
    ]
    named = [
        (f"{n}.{part}.weight", nn.Parameter(torch.zeros(2, 2)))
        for n in names
        for part in ("lora_down", "lora_up")
    ]
    cfg = OptimizerConfig(learning_rate=1e-3, unet_lr=2e-3, lr_scheduler="cosine", lr_warmup_steps=W)
    blocks = BlockWeights(down_lr_weight=(1.0, 0.25), mid_lr_weight=0.5, up_lr_weight=(1.0,) * 11 + (0.75,))
    opt = build_optimizer(build_param_groups(named, "sd15", cfg, blocks), cfg, CPU)
    expected_base = {
        "te": 1e-3,
        "unet block 1": 2e-3 * 0.25,
        "unet block 12": 2e-3 * 0.5,
        "unet block 24": 2e-3 * 0.75,
    }
    assert [g["name"] for g in opt.param_groups] == list(expected_base)
    seen = lrs_over_steps(opt, build_lr_scheduler(opt, cfg, T), T)
    for s in (0, 2, W, 9, T - 1):
        factor = kohya_factor("cosine", s, W, T)
        assert seen[s] == pytest.approx(
            [base * factor for base in expected_base.values()], rel=1e-9, abs=1e-15
        )


def test_warmup_fraction_is_a_share_of_total_steps_truncated():
    assert warmup_steps(OptimizerConfig(lr_scheduler="linear", lr_warmup_steps=0.25), 20) == 5
    assert warmup_steps(OptimizerConfig(lr_scheduler="linear", lr_warmup_steps=0.1), 25) == 2
    assert warmup_steps(OptimizerConfig(lr_scheduler="linear", lr_warmup_steps=3), 20) == 3
    assert warmup_steps(OptimizerConfig(lr_scheduler="linear", lr_warmup_steps=3.0), 20) == 3


def test_whole_warmup_steps_are_stored_as_an_int_however_written():
    # a ComfyUI float widget gives 0.0 or 10.0 where a TOML says 0 or 10; ss_lr_warmup_steps must agree
    for written, stored in ((0.0, "0"), (10.0, "10"), (10, "10"), (0.25, "0.25")):
        value = OptimizerConfig(lr_scheduler="linear", lr_warmup_steps=written).lr_warmup_steps
        assert str(value) == stored, written


def test_warmup_longer_than_training_is_an_error():
    with pytest.raises(ConfigError, match="lr_warmup_steps: 30 warmup steps exceed the 20"):
        warmup_steps(OptimizerConfig(lr_scheduler="linear", lr_warmup_steps=30), 20)


def test_non_integral_warmup_above_one_is_an_error():
    with pytest.raises(ConfigError, match=r"lr_warmup_steps: 2.5"):
        OptimizerConfig(lr_scheduler="linear", lr_warmup_steps=2.5)


def test_constant_with_warmup_suggests_constant_with_warmup():
    with pytest.raises(ConfigError, match=r"lr_warmup_steps.*'constant'.*constant_with_warmup"):
        OptimizerConfig(lr_scheduler="constant", lr_warmup_steps=10)


def test_unknown_schedule_lists_the_known_ones():
    with pytest.raises(ConfigError, match="lr_scheduler: 'cosine_annealing' is not one of 'constant'"):
        OptimizerConfig(lr_scheduler="cosine_annealing")


def test_polynomial_needs_learning_rate_above_its_end_lr():
    cfg = OptimizerConfig(learning_rate=1e-8, lr_scheduler="polynomial")
    opt = build_optimizer([{"params": [nn.Parameter(torch.zeros(2))], "lr": 1e-8}], cfg, CPU)
    with pytest.raises(ConfigError, match=r"learning_rate.*1e-07"):
        build_lr_scheduler(opt, cfg, T)


def test_adafactor_schedule_reports_adafactors_own_relative_step_lr():
    cfg = OptimizerConfig(optimizer_type="Adafactor", learning_rate=1e-3, lr_scheduler="adafactor")
    param = nn.Parameter(torch.full((4, 4), 0.5))
    opt = build_optimizer([{"params": [param], "lr": 1e-3}], cfg, CPU)
    scheduler = build_lr_scheduler(opt, cfg, T)
    assert scheduler.get_last_lr() == [1e-3]  # before any step: learning_rate, as kohya's "adafactor:<lr>"
    rms_before = param.detach().pow(2).mean().sqrt().item()
    param.grad = torch.ones_like(param)
    opt.step()
    scheduler.step()
    # transformers Adafactor, relative_step at step 1: min(1e-2, 1/√1) × max(eps₂ = 1e-3, RMS(p))
    assert scheduler.get_last_lr() == [pytest.approx(1e-2 * max(1e-3, rms_before))]
