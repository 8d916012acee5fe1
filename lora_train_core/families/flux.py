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

FAMILIES = (FLUX_DEV, FLUX_SCHNELL)
