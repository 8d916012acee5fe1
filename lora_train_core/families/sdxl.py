"""SDXL: an SGM-layout UNet with size conditioning and two CLIP text encoders (ViT-L, bigG).

kohya trains SDXL on its own SGM UNet, so its LoRA names are the original paths
(`lora_unet_input_blocks_4_1_proj_in`); the encoders' prefixes are `lora_te1` and `lora_te2`.
Strings as sd-scripts writes them: `ss_base_model_version` "sdxl_base_v1-0"
(library/sdxl_model_util.py MODEL_VERSION_SDXL_BASE_V1_0), `modelspec.architecture`
"stable-diffusion-xl-v1-base/lora" with Stability's generative-models as implementation
(library/sai_model_spec.py). The context concatenates both encoders' penultimate hidden
states; the second encoder's pooled, projected output joins the size embedding
(sdxl_train_util).
"""

from __future__ import annotations

from ..model.kohya_keys import UNetLayout
from . import BlockLayout, ModelFamily

FAMILY = ModelFamily(
    name="sdxl",
    title="SDXL",
    text_encoder_prefixes=("lora_te1", "lora_te2"),
    unet_names="sgm",
    unet_layout=UNetLayout(layers_per_block=(2, 2, 2), up_attention=(True, True, False), mid_attention=True),
    # kohya: 9 input, 3 middle, 9 output blocks, framed by the time/label embedding and out.
    blocks=BlockLayout(
        down=9,
        mid=3,
        outer=True,
        description="0 time embedding, 1-9 input, 10-12 middle, 13-21 output, 22 out",
    ),
    base_model_version="sdxl_base_v1-0",
    modelspec_architecture="stable-diffusion-xl-v1-base/lora",
    modelspec_implementation="https://github.com/Stability-AI/generative-models",
    v_prediction_is_v2=False,
    bucket_reso_step=32,  # the VAE's 8 × the UNet's two halvings
    latent_channels=4,
    latent_downscale=8,
    vae_scaling_factor=0.13025,
    text_hidden_state="penultimate",
    pooled_text=True,
    size_conditioning=True,
    diffusers_pipeline="StableDiffusionXLPipeline",
)
