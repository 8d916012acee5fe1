"""SD1.x and SD2.x: one UNet naming, one CLIP text encoder (kohya's default family).

kohya trains these on a diffusers UNet, so its LoRA names are diffusers module paths
(`lora_unet_down_blocks_0_attentions_0_proj_in`); the text encoder's prefix is `lora_te`.
Strings as sd-scripts writes them: `ss_base_model_version` "sd_v1" (library/train_util.py),
`modelspec.architecture` "stable-diffusion-v1/lora" with implementation "diffusers"
(library/sai_model_spec.py). The context is the encoder's last hidden state.
"""

from __future__ import annotations

from ..model.kohya_keys import UNetLayout
from . import BlockLayout, ModelFamily

FAMILY = ModelFamily(
    name="sd15",
    title="SD1.x/2.x",
    text_encoder_prefixes=("lora_te",),
    unet_names="diffusers",
    unet_layout=UNetLayout(
        layers_per_block=(2, 2, 2, 2), up_attention=(False, True, True, True), mid_attention=True
    ),
    # kohya: 12 down, 1 mid, 12 up; down block 0 holds nothing LoRA wraps.
    blocks=BlockLayout(down=12, mid=1, outer=False, description="0 unused, 1-11 down, 12 mid, 13-24 up"),
    base_model_version="sd_v1",
    modelspec_architecture="stable-diffusion-v1/lora",
    modelspec_implementation="diffusers",
    v_prediction_is_v2=True,  # the v-prediction members of the family are SD2.x (768-v)
    bucket_reso_step=64,  # the VAE's 8 × the UNet's three halvings
    latent_channels=4,
    latent_downscale=8,
    vae_scaling_factor=0.18215,
    text_hidden_state="last",
    pooled_text=False,
    size_conditioning=False,
    diffusers_pipeline="StableDiffusionPipeline",
)
