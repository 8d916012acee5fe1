"""A Flux LoRA trained on diffusers' split layers, exported in kohya's fused format, loads in diffusers
at full strength: every key converted, and the loaded model computes what our LoRA computed.

diffusers reads a kohya Flux file with `_convert_kohya_flux_lora_to_diffusers` (FLOW_FACTS §4.2),
reached through `FluxPipeline.lora_state_dict` / `load_lora_weights`, which these tests call: it
bakes α/r into A and B, and for a fused qkv / linear1 whose up is not block-sparse (ours: one LoRA
over the fused layer) copies down to every part and splits up's rows. It raises on any `lora_unet_`
key it does not consume, so "loads" means "every key mapped". It hard-codes Flux.1's linear1 split
[3072, 3072, 3072, 12288], so a LoRA on linear1 is checked on a model of Flux.1's real width.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file

from lora_train_core.families.flux import diffusers_targets
from lora_train_core.model.network import LoRANetwork, NetworkConfig
from lora_train_core.outputs.export import save_lora

# FLOW_FACTS §5: the published transformer configs differ only in the guidance embedding
REAL_SIZE = {"flux_dev": {"guidance_embeds": True}, "flux_schnell": {"guidance_embeds": False}}
TINY = dict(
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=16,
    pooled_projection_dim=16,
    axes_dims_rope=(2, 2, 4),
    guidance_embeds=True,
)
# one single-stream block of Flux.1's width (3072 = 24 heads × 128; MLP 4 × 3072), no double block:
# the smallest model whose linear1 diffusers' converter accepts
REAL_WIDTH_SINGLE = dict(
    num_layers=0,
    num_single_layers=1,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=16,
    pooled_projection_dim=16,
    axes_dims_rope=(16, 56, 56),
    guidance_embeds=False,
)
RANK, ALPHA = 4, 2.0


def _randomise(network: LoRANetwork, seed: int, up_std: float) -> None:
    """Non-zero lora_up (kohya inits it to zero, which would make every comparison vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.modules_by_name.values():
            module.lora_down.weight.copy_(torch.randn(module.lora_down.weight.shape, generator=g) * 0.3)
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=g) * up_std)
            module.set_alpha(ALPHA)


def _export(transformer, path, *, dims=None, seed=1, up_std=0.3) -> LoRANetwork:
    network = LoRANetwork(
        diffusers_targets(transformer),
        NetworkConfig(network_dim=RANK, network_alpha=ALPHA, train_text_encoder=False),
        dims=dims,
    )
    if next(network.parameters()).is_meta:  # a real-size model on the meta device: LoRA tensors real
        network.to_empty(device="cpu")
    _randomise(network, seed, up_std)
    save_lora(path, network.kohya_state_dict(), {"ss_network_module": "networks.lora"}, torch.float32)
    return network


def _inputs(config: dict, tokens_hw=(2, 3), text_tokens=5, seed=2) -> dict:
    g = torch.Generator().manual_seed(seed)
    h, w = tokens_hw
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    inputs = dict(
        hidden_states=torch.randn(1, h * w, 64, generator=g),
        encoder_hidden_states=torch.randn(1, text_tokens, config["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=g),
        timestep=torch.tensor([0.6]),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(text_tokens, 3),
    )
    if config["guidance_embeds"]:
        inputs["guidance"] = torch.tensor([1.0])
    return inputs


def _transformer(config: dict) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(**config).eval()


def _pipeline_with(transformer) -> FluxPipeline:
    """A FluxPipeline holding only the transformer: `load_lora_weights` needs nothing else for a
    file without text-encoder keys."""
    return FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )


def _same_output_through_diffusers_loader(config: dict, tmp_path, dims=None) -> None:
    base = _transformer(config)
    path = tmp_path / "flux.safetensors"
    network = _export(base, path, dims=dims)
    inputs = _inputs(config)
    with torch.no_grad():
        plain = base(**inputs).sample
        with network.applied():
            ours = base(**inputs).sample

    pipe = _pipeline_with(_transformer(config))  # the same seed: the same base weights
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        theirs = pipe.transformer(**inputs).sample

    # float32 throughout; the two compute (α/r)·up·down·x in different orders (diffusers bakes
    # the scale into A and B), so they agree to rounding, far below the LoRA's own effect
    assert (ours - plain).abs().max() > 1e-2
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_diffusers_loads_every_double_block_lora_and_computes_ours(tmp_path):
    """Every kohya default target of the double blocks and the single blocks except linear1
    (diffusers' converter needs linear1 at Flux.1's width: the next test)."""
    linear1 = {"lora_unet_single_blocks_0_linear1": 0}
    _same_output_through_diffusers_loader(TINY, tmp_path, dims=linear1)


def test_diffusers_loads_a_linear1_lora_of_flux1s_width_and_computes_ours(tmp_path):
    _same_output_through_diffusers_loader(REAL_WIDTH_SINGLE, tmp_path)


@pytest.fixture(scope="module", params=sorted(REAL_SIZE))
def real_size(request):
    with torch.device("meta"):
        return FluxTransformer2DModel(**REAL_SIZE[request.param])


def test_diffusers_converter_maps_every_key_of_a_real_size_file_onto_the_split_layers(real_size, tmp_path):
    """Each split layer gets exactly its rows of the fused update at full strength:
    B_i·A_i = (α/r)·up[rows_i]·down, checked on probe vectors."""
    path = tmp_path / "flux.safetensors"
    network = _export(real_size, path)
    kohya = load_file(path)
    converted = FluxPipeline.lora_state_dict(str(path))
    names = {id(module): name for name, module in real_size.named_modules()}

    expected = set()
    probe = torch.Generator().manual_seed(3)
    for name, module in network.modules_by_name.items():
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        x = torch.randn(down.shape[1], 2, generator=probe)
        fused = (ALPHA / RANK) * (up @ (down @ x))
        start = 0
        for part in module.org_modules:
            key = f"transformer.{names[id(part)]}"
            expected |= {f"{key}.lora_A.weight", f"{key}.lora_B.weight"}
            a, b = converted[f"{key}.lora_A.weight"], converted[f"{key}.lora_B.weight"]
            rows = slice(start, start + part.out_features)
            start = rows.stop
            torch.testing.assert_close(b @ (a @ x), fused[rows], rtol=1e-5, atol=1e-5)
    assert len(network.modules_by_name) == 19 * 10 + 38 * 3
    assert set(converted) == expected
