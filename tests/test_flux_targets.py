"""Flux.1's LoRA targets are kohya's defaults, on real-size configs built on the meta device.

kohya (networks/lora_flux.py, FLOW_FACTS §2.1) wraps every Linear inside BFL's DoubleStreamBlock
(img/txt: mod.lin, attn.qkv, attn.proj, mlp.0, mlp.2) and SingleStreamBlock (linear1, linear2,
modulation.lin), and nothing else; the expected names below are written out from that rule.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from lora_train_core.families.flux import diffusers_targets
from lora_train_core.model.network import LoRANetwork, NetworkConfig

# FLOW_FACTS §5: the published transformer configs differ only in the guidance embedding
REAL_SIZE = {"flux_dev": {"guidance_embeds": True}, "flux_schnell": {"guidance_embeds": False}}
HIDDEN, MLP = 3072, 12288


def kohya_default_names(double: int = 19, single: int = 38) -> set[str]:
    per_double = [
        f"{s}_{m}" for s in ("img", "txt") for m in ("mod_lin", "attn_qkv", "attn_proj", "mlp_0", "mlp_2")
    ]
    names = {f"lora_unet_double_blocks_{i}_{m}" for i in range(double) for m in per_double}
    names |= {
        f"lora_unet_single_blocks_{i}_{m}"
        for i in range(single)
        for m in ("linear1", "linear2", "modulation_lin")
    }
    return names


@pytest.fixture(scope="module", params=sorted(REAL_SIZE))
def real_size(request):
    with torch.device("meta"):
        return FluxTransformer2DModel(**REAL_SIZE[request.param])


def test_wrapped_modules_are_exactly_kohyas_default_targets(real_size):
    targets = diffusers_targets(real_size)
    assert len(targets) == 19 * 10 + 38 * 3
    assert {t.name for t in targets} == kohya_default_names()


def test_each_target_has_the_fused_native_layers_shape(real_size):
    """in × Σ out of the parts is the native weight's shape: qkv 3·3072 rows, linear1 3·3072 + 12288,
    modulation 6·3072 (double) and 3·3072 (single)."""
    expected_out = {
        "mod_lin": 6 * HIDDEN,
        "attn_qkv": 3 * HIDDEN,
        "attn_proj": HIDDEN,
        "mlp_0": MLP,
        "mlp_2": HIDDEN,
        "linear1": 3 * HIDDEN + MLP,
        "linear2": HIDDEN,
        "modulation_lin": 3 * HIDDEN,
    }
    expected_in = {"mlp_2": MLP, "linear2": HIDDEN + MLP}
    for target in diffusers_targets(real_size):
        kind = next(k for k in expected_out if target.name.endswith(k))
        assert sum(m.out_features for m in target.modules) == expected_out[kind], target.name
        assert {m.in_features for m in target.modules} == {expected_in.get(kind, HIDDEN)}, target.name


def test_a_split_target_saves_as_one_fused_kohya_lora(real_size):
    """The file holds the fused layer's LoRA: one down (r × in) and one up (Σ out × r) per name."""
    targets = [t for t in diffusers_targets(real_size) if t.name.startswith("lora_unet_single_blocks_0_")]
    with torch.device("meta"):
        network = LoRANetwork(targets, NetworkConfig(network_dim=4, train_text_encoder=False))
    shapes = {k: tuple(v.shape) for k, v in network.state_dict().items() if not k.endswith("alpha")}
    assert shapes["lora_unet_single_blocks_0_linear1.lora_down.weight"] == (4, HIDDEN)
    assert shapes["lora_unet_single_blocks_0_linear1.lora_up.weight"] == (3 * HIDDEN + MLP, 4)


def tiny_transformer() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
        guidance_embeds=True,
    )


class _Targets:
    """What merge_into_backend asks of a backend: the family and the LoRA targets."""

    family = "flux_dev"

    def __init__(self, transformer):
        self.transformer = transformer

    def lora_targets(self, include_conv, unet, text_encoder):
        return diffusers_targets(self.transformer)


def test_merging_a_fused_lora_into_split_layers_adds_each_part_its_rows():
    from lora_train_core.outputs.merge import merge_into_backend

    transformer = tiny_transformer()
    attn = transformer.single_transformer_blocks[0].attn
    parts = [attn.to_q, attn.to_k, attn.to_v, transformer.single_transformer_blocks[0].proj_mlp]
    before = torch.cat([p.weight.detach().clone() for p in parts])
    down, up = torch.randn(4, 16), torch.randn(before.shape[0], 4)
    sd = {
        "lora_unet_single_blocks_0_linear1.lora_down.weight": down,
        "lora_unet_single_blocks_0_linear1.lora_up.weight": up,
        "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(2.0),
    }
    merge_into_backend(_Targets(transformer), sd, multiplier=0.5)
    after = torch.cat([p.weight.detach() for p in parts])
    torch.testing.assert_close(after - before, 0.5 * (2.0 / 4) * up @ down)


def test_a_flux_lora_merges_with_flux_loras_only():
    from lora_train_core.errors import ConfigError
    from lora_train_core.outputs.merge import check_same_architecture

    flux = {
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": 1,
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": 1,
    }
    sdxl = {"lora_unet_input_blocks_4_1_proj_in.alpha": 1}
    check_same_architecture(["a", "b"], [flux, dict(flux)])
    with pytest.raises(ConfigError, match=r"Flux\.1-dev / Flux\.1-schnell in a .*SDXL in b"):
        check_same_architecture(["a", "b"], [flux, sdxl])
