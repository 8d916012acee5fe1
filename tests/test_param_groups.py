"""Param groups from kohya names: block indices, block lr weights, per-part lrs, LoRA+, block dims."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lora_train_core.errors import ConfigError
from lora_train_core.optim.optimizers import OptimizerConfig, build_optimizer
from lora_train_core.optim.param_groups import (
    BlockWeights,
    block_index,
    build_param_groups,
    excluded_modules,
    lr_weight_per_block,
    per_module_dims,
    set_text_encoder_trainable,
)

SD15_TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
SD15_DOWN0 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # block 1
SD15_DOWN1 = "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k"  # block 5
SD15_MID = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2"  # block 12
SD15_UP3 = "lora_unet_up_blocks_3_attentions_2_proj_out"  # block 24


def lora_params(modules: list[str]) -> list[tuple[str, nn.Parameter]]:
    return [
        (f"{m}.{part}.weight", nn.Parameter(torch.zeros(2, 2)))
        for m in modules
        for part in ("lora_down", "lora_up")
    ]


def by_name(groups: list[dict]) -> dict[str, dict]:
    return {g["name"]: g for g in groups}


@pytest.mark.parametrize(
    ("name", "index"),
    [
        (SD15_DOWN0, 1),
        ("lora_unet_down_blocks_0_attentions_1_proj_in", 2),
        ("lora_unet_down_blocks_0_downsamplers_0_conv", 3),
        (SD15_DOWN1, 5),
        ("lora_unet_down_blocks_3_resnets_1_conv2", 11),
        (SD15_MID, 12),
        ("lora_unet_up_blocks_0_resnets_0_conv1", 13),
        ("lora_unet_up_blocks_0_upsamplers_0_conv", 15),
        ("lora_unet_up_blocks_1_attentions_2_proj_in", 18),
        (SD15_UP3, 24),
        (SD15_TE, None),
    ],
)
def test_sd15_block_index_is_kohyas_3i_plus_j_layout(name, index):
    assert block_index(name, "sd15") == index


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("lora_unet_input_blocks_1_0_in_layers_2", 2),
        ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 5),
        ("lora_unet_middle_block_0_emb_layers_1", 10),
        ("lora_unet_middle_block_1_transformer_blocks_9_ff_net_2", 11),
        ("lora_unet_output_blocks_0_1_proj_in", 13),
        ("lora_unet_output_blocks_8_0_skip_connection", 21),
        ("lora_te1_text_model_encoder_layers_0_mlp_fc1", None),
        ("lora_te2_text_model_encoder_layers_31_mlp_fc2", None),
    ],
)
def test_sdxl_block_index_is_input_1_plus_n_middle_10_plus_n_output_13_plus_n(name, index):
    assert block_index(name, "sdxl") == index


def test_a_unet_name_outside_every_block_is_an_error():
    with pytest.raises(ValueError, match="lies in no sd15 UNet block"):
        block_index("lora_unet_conv_in", "sd15")
    with pytest.raises(ValueError, match="prefixes"):
        block_index("lora_te_text_model_encoder_layers_0_mlp_fc1", "sdxl")


def test_sd15_sine_preset_and_padding_match_kohya():
    weights = lr_weight_per_block(BlockWeights(down_lr_weight="sine", up_lr_weight=(0.5, 0.25)), "sd15")
    sine = [math.sin(math.pi * (i / 11) / 2) for i in range(12)]
    assert weights == pytest.approx([*sine, 1.0, 0.5, 0.25] + [1.0] * 10)


def test_sdxl_presets_span_nine_blocks_with_base_and_fixed_ends():
    weights = lr_weight_per_block(
        BlockWeights(
            down_lr_weight="cosine+.5", mid_lr_weight=(0.1, 0.2, 0.3), up_lr_weight="reverse_linear"
        ),
        "sdxl",
    )
    cosine = [math.cos(math.pi * (i / 8) / 2) + 0.5 for i in range(9)]
    reverse_linear = [(8 - i) / 8 for i in range(9)]
    assert len(weights) == 23
    assert weights == pytest.approx([1.0, *cosine, 0.1, 0.2, 0.3, *reverse_linear, 1.0])


def test_weights_at_or_below_the_threshold_become_zero():
    blocks = BlockWeights(down_lr_weight="linear", block_lr_zero_threshold=0.3)
    weights = lr_weight_per_block(blocks, "sd15")
    linear = [i / 11 for i in range(12)]
    assert weights[:12] == pytest.approx([w if w > 0.3 else 0.0 for w in linear])
    assert weights[:4] == [0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"down_lr_weight": "triangle"}, "blocks.down_lr_weight: 'triangle' is not a preset"),
        ({"up_lr_weight": "sine+x"}, "after '\\+' must be a number"),
        ({"mid_lr_weight": "sine"}, "mid_lr_weight.*not a preset"),
        ({"down_lr_weight": (1.0, -0.5)}, "down_lr_weight: -0.5 is out of range"),
        ({"block_lr_zero_threshold": 0.1}, "block_lr_zero_threshold: only means something"),
    ],
)
def test_bad_block_weights_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        BlockWeights(**kwargs)


def test_too_many_block_weights_for_the_family_is_an_error():
    with pytest.raises(ConfigError, match="down_lr_weight: 12 values given; this model has 9"):
        lr_weight_per_block(BlockWeights(down_lr_weight=(1.0,) * 12), "sdxl")


def test_text_encoder_and_unet_lrs_fall_back_to_learning_rate():
    named = lora_params([SD15_TE, SD15_DOWN0])
    groups = by_name(build_param_groups(named, "sd15", OptimizerConfig(learning_rate=1e-4), None))
    assert {n: g["lr"] for n, g in groups.items()} == {"te": 1e-4, "unet": 1e-4}
    cfg = OptimizerConfig(learning_rate=1e-4, unet_lr=3e-4, text_encoder_lr=(5e-5,))
    groups = build_param_groups(named, "sd15", cfg, None)
    assert [(g["name"], g["component"], g["lr"], len(g["params"])) for g in groups] == [
        ("te", "te", 5e-5, 2),
        ("unet", "unet", 3e-4, 2),
    ]


def test_sdxl_takes_one_text_encoder_lr_per_encoder():
    named = lora_params(
        ["lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_te2_text_model_encoder_layers_0_mlp_fc1"]
    )
    groups = build_param_groups(named, "sdxl", OptimizerConfig(text_encoder_lr=(1e-5, 2e-5)), None)
    assert [(g["component"], g["lr"]) for g in groups] == [("te1", 1e-5), ("te2", 2e-5)]
    groups = build_param_groups(named, "sdxl", OptimizerConfig(text_encoder_lr=(3e-5,)), None)
    assert [(g["component"], g["lr"]) for g in groups] == [("te1", 3e-5), ("te2", 3e-5)]


def test_two_text_encoder_lrs_for_sd15_is_an_error():
    with pytest.raises(ConfigError, match=r"has 2 values but SD1\.x/2\.x has 1 text encoder"):
        build_param_groups(
            lora_params([SD15_TE]), "sd15", OptimizerConfig(text_encoder_lr=(1e-5, 2e-5)), None
        )


def test_a_part_with_lr_zero_gets_no_group_and_is_frozen():
    named = lora_params([SD15_TE, SD15_DOWN0])
    groups = build_param_groups(named, "sd15", OptimizerConfig(text_encoder_lr=(0.0,)), None)
    assert [g["name"] for g in groups] == ["unet"]
    assert [p.requires_grad for _, p in named] == [False, False, True, True]


def test_a_block_with_weight_zero_puts_no_parameter_in_the_optimizer():
    named = lora_params([SD15_TE, SD15_DOWN0, SD15_DOWN1, SD15_MID])
    blocks = BlockWeights(down_lr_weight=(1.0, 1.0, 1.0, 1.0, 1.0, 0.0), mid_lr_weight=0.5)
    groups = build_param_groups(named, "sd15", OptimizerConfig(learning_rate=1e-4), blocks)
    opt = build_optimizer(groups, OptimizerConfig(learning_rate=1e-4), torch.device("cpu"))
    in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
    down1 = [p for n, p in named if n.startswith(SD15_DOWN1)]
    assert all(id(p) not in in_optimizer for p in down1)
    assert all(not p.requires_grad for p in down1)
    assert len(in_optimizer) == 6
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [
        ("te", 1e-4),
        ("unet block 1", 1e-4),
        ("unet block 12", pytest.approx(0.5e-4)),
    ]


def test_loraplus_puts_lora_up_weights_in_their_own_group_at_lr_times_ratio():
    named = lora_params([SD15_TE, SD15_DOWN0, SD15_MID])
    cfg = OptimizerConfig(learning_rate=1e-4, text_encoder_lr=(2e-5,), loraplus_lr_ratio=16)
    groups = build_param_groups(named, "sd15", cfg, None)
    summary = [(g["name"], g["lr"], g["is_lora_up"], len(g["params"])) for g in groups]
    assert summary == [
        ("te", 2e-5, False, 1),
        ("te plus", pytest.approx(2e-5 * 16), True, 1),
        ("unet", 1e-4, False, 2),
        ("unet plus", pytest.approx(1e-4 * 16), True, 2),
    ]
    ups = {id(p) for n, p in named if n.endswith(".lora_up.weight")}
    assert all(id(p) in ups for g in groups if g["is_lora_up"] for p in g["params"])
    assert all(id(p) not in ups for g in groups if not g["is_lora_up"] for p in g["params"])


def test_loraplus_with_block_weights_splits_every_block():
    named = lora_params([SD15_DOWN0, SD15_MID])
    cfg = OptimizerConfig(learning_rate=1e-4, loraplus_lr_ratio=4)
    groups = build_param_groups(named, "sd15", cfg, BlockWeights(mid_lr_weight=0.5))
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("unet block 1", 1e-4),
        ("unet block 1 plus", pytest.approx(4e-4)),
        ("unet block 12", pytest.approx(0.5e-4)),
        ("unet block 12 plus", pytest.approx(2e-4)),
    ]


def test_frozen_text_encoder_stops_changing_while_unet_trains():
    named = lora_params([SD15_TE, SD15_DOWN0])
    cfg = OptimizerConfig(learning_rate=1e-2, stop_text_encoder_training=1)
    groups = build_param_groups(named, "sd15", cfg, None)
    opt = build_optimizer(groups, cfg, torch.device("cpu"))
    before = [p.detach().clone() for _, p in named]
    set_text_encoder_trainable(groups, cfg.text_encoder_trains_at(1))
    loss = sum((p - 1).pow(2).sum() for _, p in named if p.requires_grad)
    loss.backward()
    opt.step()
    changed = [not torch.equal(b, p) for b, (_, p) in zip(before, named, strict=True)]
    assert changed == [False, False, True, True]


def test_adafactor_relative_step_refuses_block_weights():
    cfg = OptimizerConfig(optimizer_type="Adafactor", lr_scheduler="adafactor")
    with pytest.raises(ConfigError, match="blocks: Adafactor with relative_step=True"):
        build_param_groups(lora_params([SD15_DOWN0]), "sd15", cfg, BlockWeights(mid_lr_weight=0.5))


def test_excluded_modules_are_those_in_zero_weight_blocks():
    blocks = BlockWeights(up_lr_weight=(1.0,) * 11 + (0.0,))
    assert excluded_modules([SD15_TE, SD15_DOWN0, SD15_UP3], "sd15", blocks) == [SD15_UP3]


def test_block_dims_give_each_unet_module_its_blocks_rank_and_alpha():
    dims = list(range(25))
    alphas = [d / 2 for d in range(25)]
    conv_dims = [100 + d for d in range(25)]
    conv = "lora_unet_down_blocks_1_resnets_0_conv1"  # block 4, a 3×3 conv
    got_dims, got_alphas = per_module_dims(
        [SD15_TE, SD15_DOWN0, SD15_MID, SD15_UP3, conv],
        "sd15",
        dims,
        alphas,
        conv_block_dims=conv_dims,
        conv3x3_modules=frozenset({conv}),
    )
    assert got_dims == {SD15_DOWN0: 1, SD15_MID: 12, SD15_UP3: 24, conv: 104}
    assert got_alphas == {SD15_DOWN0: 0.5, SD15_MID: 6.0, SD15_UP3: 12.0}  # conv: conv_alpha applies


@pytest.mark.parametrize(("family", "count"), [("sd15", 25), ("sdxl", 23)])
def test_block_dims_of_the_wrong_length_name_the_needed_count(family, count):
    with pytest.raises(ConfigError, match=f"network.block_dims: 24 values given; {family} needs {count}"):
        per_module_dims([], family, [4] * 24)
