"""The kohya key scheme on the real SD1.5 / SDXL architectures (built on the meta device: no memory)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lora_train_core.errors import ConfigError
from lora_train_core.families import get_family
from lora_train_core.model.kohya_keys import (
    UNetLayout,
    diffusers_to_sgm_unet_path,
    sgm_to_diffusers_unet_path,
    sgm_unet_targets,
    text_encoder_targets,
    unet_targets,
)
from lora_train_core.model.published_configs import CLIP_BIGG, CLIP_L, SD15_UNET, SDXL_UNET

SD15, SDXL = get_family("sd15"), get_family("sdxl")
SD15_LAYOUT, SDXL_LAYOUT = SD15.unet_layout, SDXL.unet_layout


@pytest.fixture(scope="module")
def sd15_unet() -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET)


@pytest.fixture(scope="module")
def sdxl_unet() -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_UNET)


@pytest.fixture(scope="module")
def clip_l() -> CLIPTextModel:
    with torch.device("meta"):
        return CLIPTextModel(CLIPTextConfig(**CLIP_L))


@pytest.fixture(scope="module")
def clip_bigg() -> CLIPTextModelWithProjection:
    with torch.device("meta"):
        return CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))


def clip_layers(model: nn.Module) -> nn.ModuleList:
    # transformers 5's CLIPTextModel dropped the `text_model` level that 4.x and
    # CLIPTextModelWithProjection have
    return getattr(model, "text_model", model).encoder.layers


def by_name(targets):
    return {t.name: t.module for t in targets}


def kohya_sdxl_unet_names(include_conv: bool) -> set[str]:
    """Names kohya's `create_modules` gives on its `sdxl_original_unet.SdxlUNet2DConditionModel`.

    Written from that file's structure: (SGM block, transformer depth) for each
    Transformer2DModel, and the resnets / samplers for conv LoRA.
    """
    transformers = [(f"input_blocks_{n}_1", 2) for n in (4, 5)] + [
        (f"input_blocks_{n}_1", 10) for n in (7, 8)
    ]
    transformers += [("middle_block_1", 10)]
    transformers += [(f"output_blocks_{n}_1", 10) for n in (0, 1, 2)]
    transformers += [(f"output_blocks_{n}_1", 2) for n in (3, 4, 5)]
    members = [f"{a}_{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out_0")]
    members += ["ff_net_0_proj", "ff_net_2"]
    names = set()
    for block, depth in transformers:
        names |= {f"lora_unet_{block}_proj_in", f"lora_unet_{block}_proj_out"}
        names |= {f"lora_unet_{block}_transformer_blocks_{d}_{m}" for d in range(depth) for m in members}
    if include_conv:
        resnets = [f"input_blocks_{n}_0" for n in (1, 2, 4, 5, 7, 8)] + ["middle_block_0", "middle_block_2"]
        resnets += [f"output_blocks_{n}_0" for n in range(9)]
        for resnet in resnets:
            names |= {f"lora_unet_{resnet}_{m}" for m in ("in_layers_2", "emb_layers_1", "out_layers_3")}
        # skip_connection where in_channels != out_channels: the first resnet of a wider
        # level, and every output resnet (its input is concatenated with a skip)
        skips = ["input_blocks_4_0", "input_blocks_7_0"] + [f"output_blocks_{n}_0" for n in range(9)]
        names |= {f"lora_unet_{s}_skip_connection" for s in skips}
        names |= {"lora_unet_input_blocks_3_0_op", "lora_unet_input_blocks_6_0_op"}
        names |= {"lora_unet_output_blocks_2_2_conv", "lora_unet_output_blocks_5_2_conv"}
    return names


def test_sd15_unet_target_counts_match_kohya(sd15_unet):
    assert len(unet_targets(sd15_unet, SD15, include_conv=False)) == 192
    assert len(unet_targets(sd15_unet, SD15, include_conv=True)) == 278


def test_sdxl_unet_target_counts_match_kohya(sdxl_unet):
    assert len(unet_targets(sdxl_unet, SDXL, include_conv=False)) == 722
    # + 17 resnets × 3 + 11 skip connections + 2 downsamplers + 2 upsamplers
    assert len(unet_targets(sdxl_unet, SDXL, include_conv=True)) == 722 + 66


def test_text_encoder_target_counts_match_kohya(clip_l, clip_bigg):
    assert len(text_encoder_targets(clip_l, "lora_te")) == 72
    assert len(text_encoder_targets(clip_l, "lora_te1")) == 72
    assert len(text_encoder_targets(clip_bigg, "lora_te2")) == 192


def test_sd15_unet_names_are_kohya_diffusers_paths(sd15_unet):
    u = sd15_unet
    names = by_name(unet_targets(u, SD15, include_conv=True))
    attn = u.down_blocks[0].attentions[0]
    assert names["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] is (
        attn.transformer_blocks[0].attn1.to_q
    )
    assert (
        names["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0"]
        is (attn.transformer_blocks[0].attn2.to_out[0])
    )
    assert names["lora_unet_mid_block_attentions_0_proj_in"] is u.mid_block.attentions[0].proj_in
    assert names["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj"] is (
        u.up_blocks[3].attentions[2].transformer_blocks[0].ff.net[0].proj
    )
    assert names["lora_unet_down_blocks_0_resnets_0_conv1"] is u.down_blocks[0].resnets[0].conv1
    assert (
        names["lora_unet_down_blocks_1_resnets_0_conv_shortcut"] is u.down_blocks[1].resnets[0].conv_shortcut
    )
    assert names["lora_unet_up_blocks_0_resnets_2_time_emb_proj"] is u.up_blocks[0].resnets[2].time_emb_proj
    assert names["lora_unet_down_blocks_2_downsamplers_0_conv"] is u.down_blocks[2].downsamplers[0].conv
    assert names["lora_unet_up_blocks_2_upsamplers_0_conv"] is u.up_blocks[2].upsamplers[0].conv


def test_sdxl_unet_names_are_kohya_sgm_names(sdxl_unet):
    u = sdxl_unet
    names = by_name(unet_targets(u, SDXL, include_conv=True))
    assert names["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] is (
        u.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    )
    assert (
        names["lora_unet_middle_block_1_transformer_blocks_9_ff_net_2"]
        is (u.mid_block.attentions[0].transformer_blocks[9].ff.net[2])
    )
    assert names["lora_unet_output_blocks_0_1_proj_out"] is u.up_blocks[0].attentions[0].proj_out
    assert names["lora_unet_output_blocks_4_1_proj_in"] is u.up_blocks[1].attentions[1].proj_in
    assert names["lora_unet_input_blocks_1_0_in_layers_2"] is u.down_blocks[0].resnets[0].conv1
    assert names["lora_unet_input_blocks_7_0_emb_layers_1"] is u.down_blocks[2].resnets[0].time_emb_proj
    assert names["lora_unet_input_blocks_3_0_op"] is u.down_blocks[0].downsamplers[0].conv
    assert names["lora_unet_middle_block_0_out_layers_3"] is u.mid_block.resnets[0].conv2
    assert names["lora_unet_output_blocks_2_2_conv"] is u.up_blocks[0].upsamplers[0].conv
    assert names["lora_unet_output_blocks_5_2_conv"] is u.up_blocks[1].upsamplers[0].conv
    assert names["lora_unet_output_blocks_8_0_skip_connection"] is u.up_blocks[2].resnets[2].conv_shortcut


@pytest.mark.parametrize("include_conv", [False, True])
def test_sdxl_unet_name_set_equals_kohyas_sgm_unet(sdxl_unet, include_conv):
    ours = {t.name for t in unet_targets(sdxl_unet, SDXL, include_conv)}
    assert ours == kohya_sdxl_unet_names(include_conv)


# diffusers' converter finds a block's keys by substring, so input_blocks_1 also takes
# input_blocks_10/11 (conv-only blocks of SD1.5): a case no kohya file has, as kohya's
# SD1.5 names are diffusers-style.
@pytest.mark.parametrize(
    ("unet_fixture", "include_conv"), [("sdxl_unet", False), ("sdxl_unet", True), ("sd15_unet", False)]
)
def test_sgm_names_map_back_through_diffusers_kohya_converter(request, unet_fixture, include_conv):
    """diffusers' loader for kohya files must send every SGM key back to the module it came from."""
    conversion = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    peft_utils = pytest.importorskip("diffusers.utils.state_dict_utils")
    unet = request.getfixturevalue(unet_fixture)
    layout = UNetLayout.from_config(unet.config)
    path_of = {id(m): p for p, m in unet.named_modules()}
    sd, expected = {}, {}
    for index, target in enumerate(unet_targets(unet, SD15, include_conv)):  # diffusers paths
        path = path_of[id(target.module)]
        name = "lora_unet_" + diffusers_to_sgm_unet_path(path, layout).replace(".", "_")
        tag = torch.tensor(float(index))
        sd |= {f"{name}.lora_down.weight": tag, f"{name}.lora_up.weight": tag, f"{name}.alpha": tag}
        expected[path] = index

    mapped = conversion._maybe_map_sgm_blocks_to_diffusers(sd, unet.config)
    converted, _ = conversion._convert_non_diffusers_lora_to_diffusers(mapped)
    converted = {k.removeprefix("unet."): v for k, v in converted.items()}
    peft = peft_utils.convert_unet_state_dict_to_peft(converted)
    got = {k.removesuffix(".lora_A.weight"): int(v) for k, v in peft.items() if k.endswith(".lora_A.weight")}
    assert got == expected


def test_text_encoder_names_are_kohya_names(clip_l, clip_bigg):
    te1 = by_name(text_encoder_targets(clip_l, "lora_te1"))
    te2 = by_name(text_encoder_targets(clip_bigg, "lora_te2"))
    sd15 = text_encoder_targets(clip_l, "lora_te")
    assert te1["lora_te1_text_model_encoder_layers_11_mlp_fc2"] is clip_layers(clip_l)[11].mlp.fc2
    assert te2["lora_te2_text_model_encoder_layers_31_self_attn_out_proj"] is (
        clip_layers(clip_bigg)[31].self_attn.out_proj
    )
    assert by_name(sd15)["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] is (
        clip_layers(clip_l)[0].self_attn.q_proj
    )
    assert by_name(sd15)["lora_te_text_model_encoder_layers_0_mlp_fc1"] is clip_layers(clip_l)[0].mlp.fc1
    assert {t.component for t in sd15} == {"te"}
    assert {t.component for t in text_encoder_targets(clip_bigg, "lora_te2")} == {"te2"}
    assert not any("text_projection" in name for name in te2)


def test_layout_read_from_published_configs(sd15_unet, sdxl_unet):
    assert UNetLayout.from_config(sd15_unet.config) == SD15_LAYOUT
    assert UNetLayout.from_config(sdxl_unet.config) == SDXL_LAYOUT


def test_sgm_mapping_follows_config_of_a_tiny_uneven_unet():
    """Two levels, one resnet each, attention only at the top: SGM indices worked out by hand."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            norm_num_groups=4,
            cross_attention_dim=8,
            attention_head_dim=4,
        )
    names = by_name(unet_targets(unet, SDXL, include_conv=True))
    # input: 0 conv_in, 1 (res + attn), 2 downsampler, 3 res; output: 0, 1 (+ upsampler), 2, 3 (res + attn)
    assert names["lora_unet_input_blocks_1_1_proj_in"] is unet.down_blocks[0].attentions[0].proj_in
    assert names["lora_unet_input_blocks_2_0_op"] is unet.down_blocks[0].downsamplers[0].conv
    assert names["lora_unet_input_blocks_3_0_in_layers_2"] is unet.down_blocks[1].resnets[0].conv1
    assert names["lora_unet_output_blocks_1_0_out_layers_3"] is unet.up_blocks[0].resnets[1].conv2
    assert names["lora_unet_output_blocks_1_1_conv"] is unet.up_blocks[0].upsamplers[0].conv
    assert names["lora_unet_output_blocks_3_1_proj_out"] is unet.up_blocks[1].attentions[1].proj_out
    assert names["lora_unet_middle_block_2_emb_layers_1"] is unet.mid_block.resnets[1].time_emb_proj


@pytest.mark.parametrize(("unet_fixture", "layout"), [("sd15_unet", SD15_LAYOUT), ("sdxl_unet", SDXL_LAYOUT)])
def test_sgm_to_diffusers_inverts_diffusers_to_sgm(request, unet_fixture, layout):
    unet = request.getfixturevalue(unet_fixture)
    path_of = {id(m): p for p, m in unet.named_modules()}
    for target in unet_targets(unet, SD15, include_conv=True):
        path = path_of[id(target.module)]
        assert sgm_to_diffusers_unet_path(diffusers_to_sgm_unet_path(path, layout), layout) == path


class CastLinear(nn.Linear):
    """Stands in for ComfyUI's `comfy.ops` Linear: a subclass must count too."""


class SpatialTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = nn.Conv2d(4, 4, 1)
        self.to_q = CastLinear(4, 4)


class ResBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(1, 4), nn.SiLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(4, 4))


class Downsample(nn.Module):
    def __init__(self):
        super().__init__()
        self.op = nn.Conv2d(4, 4, 3, stride=2, padding=1)


class Upsample(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)


class ComfyStyleUNet(nn.Module):
    """A few SD1.5 blocks as ComfyUI's `UNetModel` names them (SGM paths, ComfyUI class names)."""

    def __init__(self):
        super().__init__()
        self.input_blocks = nn.ModuleList(
            [
                nn.ModuleList([nn.Conv2d(4, 4, 3)]),
                nn.ModuleList([ResBlock(), SpatialTransformer()]),
                nn.ModuleList([ResBlock()]),
                nn.ModuleList([Downsample()]),
            ]
        )
        self.middle_block = nn.ModuleList([ResBlock(), SpatialTransformer(), ResBlock()])
        self.output_blocks = nn.ModuleList(
            [
                nn.ModuleList([ResBlock()]),
                nn.ModuleList([ResBlock()]),
                nn.ModuleList([ResBlock(), Upsample()]),
            ]
        )


def test_sgm_unet_targets_walks_comfyui_class_names_and_subclasses():
    unet = ComfyStyleUNet()
    names = by_name(sgm_unet_targets(unet, include_conv=True))
    assert names["lora_unet_input_blocks_1_1_to_q"] is unet.input_blocks[1][1].to_q
    assert names["lora_unet_input_blocks_3_0_op"] is unet.input_blocks[3][0].op
    assert names["lora_unet_output_blocks_2_1_conv"] is unet.output_blocks[2][1].conv
    assert "lora_unet_input_blocks_0_0" not in names  # conv_in is in no container
    assert len(by_name(sgm_unet_targets(unet, include_conv=False))) == 4  # 2 transformers × 2


def test_sgm_unet_targets_renames_comfyui_sd15_paths_to_kohya_diffusers_names():
    unet = ComfyStyleUNet()
    targets = sgm_unet_targets(
        unet, include_conv=True, rename=partial(sgm_to_diffusers_unet_path, layout=SD15_LAYOUT)
    )
    names = by_name(targets)
    assert names["lora_unet_down_blocks_0_attentions_0_to_q"] is unet.input_blocks[1][1].to_q
    assert names["lora_unet_down_blocks_0_resnets_0_conv1"] is unet.input_blocks[1][0].in_layers[2]
    assert names["lora_unet_down_blocks_0_resnets_1_time_emb_proj"] is unet.input_blocks[2][0].emb_layers[1]
    assert names["lora_unet_down_blocks_0_downsamplers_0_conv"] is unet.input_blocks[3][0].op
    assert names["lora_unet_mid_block_attentions_0_proj_in"] is unet.middle_block[1].proj_in
    assert names["lora_unet_mid_block_resnets_1_conv1"] is unet.middle_block[2].in_layers[2]
    assert names["lora_unet_up_blocks_0_upsamplers_0_conv"] is unet.output_blocks[2][1].conv


def test_unknown_family_and_prefix_are_rejected(sd15_unet, clip_l):
    with pytest.raises(ConfigError, match=r"model\.family: 'sd3' is not one of 'sd15', 'sdxl'"):
        get_family("sd3")
    with pytest.raises(ConfigError, match="lora_te3"):
        text_encoder_targets(clip_l, "lora_te3")
