"""Flux.1 dev and schnell: BFL's rectified-flow DiT (19 double-stream, 38 single-stream blocks),
conditioned on T5-XXL's last hidden state and CLIP-L's pooled output, over the 16-channel Flux AE.

kohya trains Flux on BFL's own module layout, so its LoRA names are the native paths
(`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_0_linear1`), which ComfyUI's
Flux class uses too; only CLIP-L gets a text-encoder LoRA (`lora_te1`; T5 would be `lora_te3`,
kohya's `train_t5xxl`, not implemented here). Strings as sd-scripts writes them:
`ss_base_model_version` "flux1" (library/flux_utils.py MODEL_VERSION_FLUX_V1), `ss_model_type`
"flux", `modelspec.architecture` "flux-1-dev" / "flux-1-schnell" + "/lora" with BFL's repository
as implementation (library/sai_model_spec.py). Latents are (z − 0.1159)·0.3611 (FLOW_FACTS §1.6).
Buckets step by 16 px: the AE's 8 × the 2×2 packing into tokens.

Guidance: only dev has a guidance embedding; kohya's docs train it with 1.0
(docs/flux_train_network.md:215-216); schnell has none, so a guidance scale is refused for it.
"""

from __future__ import annotations

from torch import nn

from ..model.kohya_keys import UNET_PREFIX, LoraTarget
from . import ModelFamily

_COMMON = dict(
    text_encoder_prefixes=("lora_te1",),
    unet_names="native",
    unet_layout=None,
    blocks=None,
    base_model_version="flux1",
    modelspec_implementation="https://github.com/black-forest-labs/flux",
    v_prediction_is_v2=False,
    bucket_reso_step=16,
    latent_channels=16,
    latent_downscale=8,
    vae_scaling_factor=0.3611,
    vae_shift_factor=0.1159,
    text_hidden_state="last",
    pooled_text=True,
    size_conditioning=False,
    diffusers_pipeline="FluxPipeline",
    objective="flow",
    kohya_model_type="flux",
    native_block_roots=("double_blocks", "single_blocks"),
)

FLUX_DEV = ModelFamily(
    name="flux_dev",
    title="Flux.1-dev",
    modelspec_architecture="flux-1-dev/lora",
    guidance_input=True,
    default_guidance_scale=1.0,
    **_COMMON,
)

FLUX_SCHNELL = ModelFamily(
    name="flux_schnell",
    title="Flux.1-schnell",
    modelspec_architecture="flux-1-schnell/lora",
    **_COMMON,
)

# Chroma (lodestones' Flux.1-schnell derivative): Flux's blocks without their modulation Linears
# (an approximator computes every block's modulation from σ), T5 only, no guidance embedding
# (ComfyUI feeds its approximator guidance 0, model_base.Chroma). kohya's `ss_model_type` "chroma"
# (flux_train_network.py:49-54). No text-encoder LoRA: kohya's would be `lora_te3` on T5, which
# ComfyUI maps for a T5-only model as `lora_te1` (FLOW_FACTS §3.3, §7), so none is trained here.
CHROMA = ModelFamily(
    name="chroma",
    title="Chroma",
    modelspec_architecture="chroma/lora",
    **{
        **_COMMON,
        "text_encoder_prefixes": (),
        "pooled_text": False,
        "kohya_model_type": "chroma",
        "diffusers_pipeline": "ChromaPipeline",
    },
)

FAMILIES = (FLUX_DEV, FLUX_SCHNELL, CHROMA)


# --- LoRA targets: kohya's default for Flux (networks/lora_flux.py, FLOW_FACTS §2.1) ------------
# Every Linear inside a DoubleStreamBlock or SingleStreamBlock of BFL's layout, named by its native
# path; the final layer and the embedders are not wrapped. diffusers splits some of those Linears:
# each native module below is listed with the diffusers modules that make it up, in the order of
# the fused weight's rows (ComfyUI's `flux_to_diffusers`, comfy/utils.py:568-660, FLOW_FACTS §3.4).
TARGET_BLOCKS = frozenset({"DoubleStreamBlock", "SingleStreamBlock"})
DOUBLE_BLOCK = (
    ("img_mod.lin", ("norm1.linear",)),
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("img_attn.proj", ("attn.to_out.0",)),
    ("img_mlp.0", ("ff.net.0.proj",)),
    ("img_mlp.2", ("ff.net.2",)),
    ("txt_mod.lin", ("norm1_context.linear",)),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("txt_attn.proj", ("attn.to_add_out",)),
    ("txt_mlp.0", ("ff_context.net.0.proj",)),
    ("txt_mlp.2", ("ff_context.net.2",)),
)
SINGLE_BLOCK = (
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    ("linear2", ("proj_out",)),
    ("modulation.lin", ("norm.linear",)),
)
# diffusers' block lists → BFL's, with each one's table
DIFFUSERS_BLOCKS = (
    ("transformer_blocks", "double_blocks", DOUBLE_BLOCK),
    ("single_transformer_blocks", "single_blocks", SINGLE_BLOCK),
)


def native_targets(diffusion_model: nn.Module) -> list[LoraTarget]:
    """kohya's default Flux targets in a model of BFL's layout (ComfyUI's `comfy.ldm.flux`):
    every Linear inside the double- and single-stream blocks, `lora_unet_<path with _>`."""
    targets = []
    for path, block in diffusion_model.named_modules():
        if type(block).__name__ not in TARGET_BLOCKS:
            continue
        for child_path, child in block.named_modules():
            if isinstance(child, nn.Linear):
                name = f"{UNET_PREFIX}_{path}.{child_path}".replace(".", "_")
                targets.append(LoraTarget(name, child, "unet"))
    return targets


def diffusers_targets(transformer: nn.Module) -> list[LoraTarget]:
    """The same targets in diffusers' `FluxTransformer2DModel`, under their native kohya names;
    a native Linear that diffusers splits (qkv, linear1) is one split target over its parts, so
    the LoRA trained here is the one kohya trains on the fused layer. A member a model lacks
    (Chroma has no modulation Linears) is skipped, as the native walk finds none there."""
    targets = []
    for diffusers_root, native_root, table in DIFFUSERS_BLOCKS:
        for index, block in enumerate(transformer.get_submodule(diffusers_root)):
            for native, members in table:
                parts = [_member(block, m) for m in members]
                if any(p is None for p in parts):
                    continue
                name = f"{UNET_PREFIX}_{native_root}.{index}.{native}".replace(".", "_")
                targets.append(LoraTarget(name, parts[0], "unet", tuple(parts) if len(parts) > 1 else ()))
    return targets


def _member(block: nn.Module, path: str) -> nn.Module | None:
    try:
        module = block.get_submodule(path)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Linear) else None
