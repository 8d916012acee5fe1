"""Tiny ComfyUI Flux.1 (dev, schnell) and Chroma models, their CLIPs and a Flux-AE-shaped VAE,
built from ComfyUI's own classes with seeded weights (ComfyUI's ops leave weights uninitialised).

The DiTs are `comfy.supported_models.Flux / FluxSchnell / Chroma` with a 64-wide, 1+1-block
config; the CLIPs are ComfyUI's FluxClipModel / PixArtT5XXL with 32-wide CLIP-L and T5 (the real
tokenizers); the VAE is the Flux AE layout as ComfyUI's VAE loader detects it (16 latent
channels, no quant_conv), at its real width. ComfyUI is imported on first use (after setup_comfy).
"""

from __future__ import annotations

import torch

HIDDEN, TEXT = 64, 32
_BLOCKS = dict(
    in_channels=16,
    out_channels=16,
    patch_size=2,
    context_in_dim=TEXT,
    hidden_size=HIDDEN,
    mlp_ratio=4.0,
    num_heads=2,
    depth=1,
    depth_single_blocks=1,
    axes_dim=[8, 12, 12],  # sums to hidden_size / num_heads, as RoPE needs
    theta=10000,
    qkv_bias=True,
)
TINY_UNETS = {
    "flux_dev": ("Flux", {"image_model": "flux", "guidance_embed": True, "vec_in_dim": TEXT, **_BLOCKS}),
    "flux_schnell": (
        "FluxSchnell",
        {"image_model": "flux", "guidance_embed": False, "vec_in_dim": TEXT, **_BLOCKS},
    ),
    "chroma": (
        "Chroma",
        # Chroma's img_in takes the 2×2-patchified 64 channels; its approximator makes every
        # block's modulation (out_dim = hidden_size)
        {
            "image_model": "chroma",
            **_BLOCKS,
            "in_channels": 64,
            "out_channels": 64,
            "in_dim": 64,
            "out_dim": HIDDEN,
            "hidden_dim": HIDDEN,
            "n_layers": 1,
        },
    ),
}
TINY_CLIP_L = {
    "hidden_act": "quick_gelu",
    "hidden_size": TEXT,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "layer_norm_eps": 1e-5,
    "max_position_embeddings": 77,
    "projection_dim": TEXT,
    "vocab_size": 49408,
    "bos_token_id": 0,
    "eos_token_id": 49407,
    "pad_token_id": 1,
    "model_type": "clip_text_model",
}
TINY_T5 = {
    "d_ff": 64,
    "d_kv": 16,
    "d_model": TEXT,
    "dense_act_fn": "gelu_pytorch_tanh",
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-6,
    "model_type": "t5",
    "num_heads": 2,
    "num_layers": 2,
    "relative_attention_num_buckets": 32,
    "vocab_size": 32128,
}
FLUX_AE = {  # ComfyUI's VAE loader's config for a 16-channel AE without quant_conv (comfy/sd.py)
    "double_z": True,
    "z_channels": 16,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def seed_weights(module: torch.nn.Module, seed: int) -> None:
    """1-D weights (norm scales) 1, biases 0, the rest ~ N(0, 1/fan_in); written through
    `copy_`, so float8 storage receives the rounded values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in module.named_parameters():
            if weight.ndim <= 1:
                weight.fill_(0.0 if name.endswith("bias") else 1.0)
            else:
                fan_in = weight[0].numel()
                weight.copy_(torch.randn(weight.shape, generator=generator) / fan_in**0.5)


def tiny_model(family: str, seed: int = 0, weight_dtype=torch.float32, manual_cast=None):
    """A ModelPatcher of ComfyUI's class for `family`; `weight_dtype=torch.float8_e4m3fn,
    manual_cast=torch.bfloat16` is what UNETLoader's weight_dtype fp8_e4m3fn gives."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    class_name, unet_config = TINY_UNETS[family]
    config = getattr(comfy.supported_models, class_name)(dict(unet_config))
    config.set_inference_dtype(weight_dtype, manual_cast)
    with torch.inference_mode():  # as a loader runs under the executor
        model = config.get_model({})
        seed_weights(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())


def _t5_class():
    from comfy import sd1_clip
    from comfy.text_encoders import t5

    class TinyT5(sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options=None):
            options = {**(model_options or {}), "model_name": "t5xxl"}
            super().__init__(
                device=device,
                dtype=dtype,
                textmodel_json_config=dict(TINY_T5),
                special_tokens={"end": 1, "pad": 0},
                model_class=t5.T5,
                model_options=options,
            )

    return TinyT5


def tiny_clip(family: str, seed: int = 0):
    """A comfy.sd.CLIP of ComfyUI's text-encoder class for `family` (FluxClipModel: clip_l + t5xxl;
    Chroma's PixArtT5XXL: t5xxl), tiny and seeded."""
    import comfy.sd
    import comfy.supported_models_base
    from comfy import sd1_clip
    from comfy.text_encoders import flux, pixart_t5

    tiny_t5 = _t5_class()
    if family == "chroma":

        class Encoder(pixart_t5.PixArtT5XXL):
            def __init__(self, device="cpu", dtype=None, model_options=None):
                sd1_clip.SD1ClipModel.__init__(
                    self,
                    device=device,
                    dtype=dtype,
                    name="t5xxl",
                    clip_model=tiny_t5,
                    model_options=model_options or {},
                )

        tokenizer = pixart_t5.PixArtTokenizer
    else:

        class Encoder(flux.FluxClipModel):
            def __init__(self, device="cpu", dtype=None, model_options=None):
                torch.nn.Module.__init__(self)
                self.clip_l = sd1_clip.SDClipModel(
                    device=device,
                    dtype=dtype,
                    return_projected_pooled=False,
                    textmodel_json_config=dict(TINY_CLIP_L),
                    model_options=model_options or {},
                )
                self.t5xxl = tiny_t5(device=device, dtype=dtype, model_options=model_options or {})
                self.dtypes = {dtype}

        tokenizer = flux.FluxTokenizer
    with torch.inference_mode():
        target = comfy.supported_models_base.ClipTarget(tokenizer, Encoder)
        clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32})
        seed_weights(clip.cond_stage_model, seed)
    return clip


def flux_ae(seed: int = 0):
    """A comfy.sd.VAE loaded from a random state dict of the Flux AE's layout: ComfyUI's loader
    builds its AutoencodingEngine (16 channels, no quant_conv) from the keys, as for ae.safetensors."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    engine = AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": FLUX_AE},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": FLUX_AE},
    )
    seed_weights(engine, seed)
    with torch.inference_mode():
        return comfy.sd.VAE(sd=engine.state_dict())
