"""The benchmark's cases: real-size denoisers from their published configs, random weights and inputs.

The configs are those of `runwayml/stable-diffusion-v1-5` and
`stabilityai/stable-diffusion-xl-base-1.0` (`unet/config.json`), and FLUX.1-dev's transformer
(FLOW_FACTS.md §5: diffusers' class defaults with the guidance embedding), written out so that
nothing is downloaded. Cached latents and text-encoder outputs are stood in by seeded random
tensors of the shapes training feeds the denoiser: latents (B, 4, H/8, W/8), text hidden states
(B, 77, 768) for SD1.5 and (B, 77, 2048) for SDXL, plus SDXL's pooled embedding (B, 1280) and size
ids (B, 6); for Flux latents (B, 16, H/8, W/8), T5-XXL's (B, 512, 4096) and CLIP-L's pooled (B, 768).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor

from lora_train_core.model.published_configs import SD15_UNET, SDXL_UNET
from lora_train_core.model.tiny_models import tiny_unet

TEXT_TOKENS = 77


@dataclass(frozen=True)
class Case:
    """One benchmark case: model family, image side in pixels, batch, gradient checkpointing."""

    name: str
    family: str  # "sd15", "sdxl" or "flux_dev"
    resolution: int
    batch_size: int
    gradient_checkpointing: bool = False


CASES = {
    c.name: c
    for c in (
        Case("sd15_512_b8", "sd15", 512, 8),
        Case("sdxl_1024_b4", "sdxl", 1024, 4),
        Case("sdxl_1024_b1_gc", "sdxl", 1024, 1, gradient_checkpointing=True),
        Case("flux_dev_1024_b1", "flux_dev", 1024, 1),
        Case("flux_dev_1024_b1_gc", "flux_dev", 1024, 1, gradient_checkpointing=True),
    )
}
FLUX_T5_TOKENS = 512  # kohya's T5 length for Flux-dev
# a tiny transformer of the same class for --tiny (axes_dims_rope sums to attention_head_dim)
TINY_FLUX = dict(
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=(4, 6, 6),
    guidance_embeds=True,
)


def is_flux(family: str) -> bool:
    return family.startswith("flux")


# --tiny: the same cases on lora_train_core's tiny UNets (8×8 latents), for a CPU check in seconds
TINY_RESOLUTION = 64


@dataclass(frozen=True)
class StepInputs:
    """What one training step feeds the UNet besides noise and timesteps (float32, on the device)."""

    latents: Tensor  # (B, 4, h, w)
    text_hidden: Tensor  # (B, 77, cross_attention_dim)
    pooled: Tensor | None  # SDXL: (B, 1280)
    time_ids: Tensor | None  # SDXL: (B, 6) original size, crop top-left, target size

    def added_cond_kwargs(self, dtype: torch.dtype) -> dict | None:
        if self.pooled is None:
            return None
        return {"text_embeds": self.pooled.to(dtype), "time_ids": self.time_ids.to(dtype)}


def build_unet(family: str, tiny: bool, device: torch.device, seed: int = 0) -> UNet2DConditionModel:
    """A float32 UNet (Flux: transformer) with weights drawn from `seed`, made on `device`, frozen."""
    torch.manual_seed(seed)
    if is_flux(family):
        return build_flux_transformer(tiny, device, torch.float32)
    with torch.device(device):
        if tiny:
            unet = tiny_unet(family)
        else:
            config = SDXL_UNET if family == "sdxl" else SD15_UNET
            unet = UNet2DConditionModel(**config)
    return unet.requires_grad_(False)


def build_flux_transformer(tiny: bool, device: torch.device, dtype: torch.dtype):
    """FLUX.1-dev's transformer (or the tiny one) with random weights, made on `device` in `dtype`
    directly: 12 B parameters in float32 and then cast would hold 71 GB at once."""
    from diffusers import FluxTransformer2DModel

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(**(TINY_FLUX if tiny else {"guidance_embeds": True}))
    finally:
        torch.set_default_dtype(default)
    return transformer.requires_grad_(False)


def make_inputs(cfg, case: Case, tiny: bool, device: torch.device, seed: int = 0) -> StepInputs:
    """Seeded random stand-ins for cached latents and text-encoder outputs, shaped for a UNet `cfg`."""
    g = torch.Generator().manual_seed(seed)
    if is_flux(case.family):
        return _flux_inputs(cfg, case, tiny, device, g)
    side = (TINY_RESOLUTION if tiny else case.resolution) // 8
    b = case.batch_size
    latents = torch.randn((b, cfg.in_channels, side, side), generator=g)
    hidden = torch.randn((b, TEXT_TOKENS, cfg.cross_attention_dim), generator=g)
    pooled = time_ids = None
    if cfg.addition_embed_type == "text_time":
        pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        pooled = torch.randn((b, pooled_dim), generator=g).to(device)
        size = float(side * 8)
        time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]] * b, device=device)
    return StepInputs(latents.to(device), hidden.to(device), pooled, time_ids)


def _flux_inputs(cfg, case: Case, tiny: bool, device: torch.device, g: torch.Generator) -> StepInputs:
    side, b = (TINY_RESOLUTION if tiny else case.resolution) // 8, case.batch_size
    tokens = 8 if tiny else FLUX_T5_TOKENS
    latents = torch.randn((b, cfg.in_channels // 4, side, side), generator=g)  # 64 = 16 channels · 2 · 2
    hidden = torch.randn((b, tokens, cfg.joint_attention_dim), generator=g)
    pooled = torch.randn((b, cfg.pooled_projection_dim), generator=g)
    return StepInputs(latents.to(device), hidden.to(device), pooled.to(device), None)
