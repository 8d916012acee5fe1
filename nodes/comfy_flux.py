"""Flux.1 (dev, schnell) and Chroma behind the core's backend protocol: what `ComfyBackend` asks
of ComfyUI's `comfy.ldm.flux` / `comfy.ldm.chroma` models (FLOW_FACTS §3).

ComfyUI's Flux-family models take unpacked latents (B, 16, H, W) and patchify inside, take σ
itself as their time input (CONST prediction; `timestep(σ) = σ` for ModelSamplingFlux and for
schnell's ModelSamplingDiscreteFlow with multiplier 1) and output the velocity ε − x0, so the
core's flow step feeds them directly. The modules are BFL's, so kohya's LoRA names are their
native paths (families/flux.py `native_targets`).
"""

from __future__ import annotations

import comfy.model_base as mb
import comfy.model_sampling
import torch
from torch import nn

from ..lora_train_core.errors import ConfigError, ModelError
from ..lora_train_core.families import flux
from ..lora_train_core.model.backend import TextConditioning
from ..lora_train_core.model.kohya_keys import LoraTarget
from . import comfy_compat

# ComfyUI's CLIP attributes of the text encoders each family's DiT reads
_CLIP_ENCODERS = {"flux_dev": ("clip_l", "t5xxl"), "flux_schnell": ("clip_l", "t5xxl"), "chroma": ("t5xxl",)}
_LOADERS = "Load Checkpoint, or DualCLIPLoader (type flux) / CLIPLoader (type chroma)"


def flux_family(base) -> str | None:
    """The family of a ComfyUI model_base object if it is Flux.1 or Chroma, else None.

    Exact classes: ChromaRadiance (pixel space, no VAE latents) and Flux Kontext-style variants
    subclass these and are not trained here."""
    if type(base) is mb.Chroma:
        return "chroma"
    if type(base) is mb.Flux:
        # dev is guidance-distilled (a guidance_in embedder); schnell has none
        return "flux_dev" if base.diffusion_model.params.guidance_embed else "flux_schnell"
    return None


class FluxAdapter:
    """The Flux/Chroma parts of `ComfyBackend` (selected by family in nodes/comfy_backend.py)."""

    # 0.3.64's blocks add residuals into their inputs in place (`txt += …`, `x.addcmul_(…)`)
    blocks_modify_inputs = True

    def __init__(self, family: str):
        self.family = family
        self.clip_attributes = ("clip_l",) if family != "chroma" else ()  # those that get a LoRA

    def objective(self, sampling) -> tuple[str, torch.Tensor | None]:
        """("flow", None), after proving the MODEL's sampling is CONST with time input σ: the core's
        flow step draws σ itself and hands it to `predict` unchanged."""
        if not isinstance(sampling, comfy.model_sampling.CONST) or not isinstance(
            sampling, comfy.model_sampling.ModelSamplingFlux | comfy.model_sampling.ModelSamplingDiscreteFlow
        ):
            raise ModelError(
                f"MODEL: a {self.family} model with model_sampling {type(sampling).__name__}; flow training "
                "needs ComfyUI's CONST flow sampling (ModelSamplingFlux or ModelSamplingDiscreteFlow): "
                "remove the node that changed the model's sampling type"
            )
        probe = torch.tensor([0.25, 0.5, 1.0])
        if not torch.allclose(sampling.timestep(probe).float(), probe):
            raise ModelError(
                f"MODEL: this {self.family} model's time input is not σ (its sampling multiplier is "
                f"{getattr(sampling, 'multiplier', '?')}); remove the node that changed it"
            )
        return "flow", None

    def check_clip(self, clip, title: str) -> None:
        """Refuse a CLIP that is not the family's text encoders (e.g. an SD CLIP on a Flux MODEL)."""
        encoders = clip.cond_stage_model
        needed = _CLIP_ENCODERS[self.family]
        missing = [name for name in needed if not hasattr(encoders, name)]
        if missing or (self.family == "chroma" and hasattr(encoders, "clip_l")):
            raise ConfigError(
                f"CLIP: this is a {type(encoders).__name__} text encoder, but a {title} MODEL needs "
                f"{' + '.join(needed)} (from {_LOADERS}); connect the CLIP that belongs to this model"
            )

    def predict(self, backend, noisy, sigmas, text: TextConditioning, size_conditioning, guidance):
        """v̂ = diffusion_model(x_t, σ, T5 hidden, CLIP-L pooled, guidance) as float, computed in the
        model's compute dtype (bf16 over fp8 weights with manual cast)."""
        dtype, device = backend.compute_dtype, backend.device
        batch = noisy.shape[0]
        kwargs = {}
        if self.family == "chroma":
            # Chroma's approximator always reads a guidance value; ComfyUI samples it with 0
            # (model_base.Chroma.extra_conds) and kohya's docs train it with 0.0
            kwargs["guidance"] = torch.zeros(batch, device=device)
        else:
            kwargs["y"] = text.pooled.to(device, dtype)
            if guidance is not None:
                kwargs["guidance"] = guidance.to(device, torch.float32)
        hidden = text.hidden.to(device, dtype)
        if text.attention_mask is not None:
            kwargs["attention_mask"] = _attention_bias(text.attention_mask.to(device), noisy.shape, dtype)
        with comfy_compat.inplace_safe_autograd():  # 0.3.64's blocks add residuals in place
            out = backend.diffusion_model(
                noisy.to(device, dtype), sigmas.to(device).float(), context=hidden, **kwargs
            )
        return out.float()

    def unet_targets(self, backend, include_conv: bool) -> list[LoraTarget]:
        """kohya's default Flux/Chroma targets: every Linear in the double and single blocks
        (Chroma's blocks have no modulation Linears, so none are found there). A DiT has no k×k
        convs; the core refuses conv_dim for it before this is asked."""
        return flux.native_targets(backend.diffusion_model)

    def checkpointed_blocks(self, diffusion_model: nn.Module) -> list[nn.Module]:
        return [*diffusion_model.double_blocks, *diffusion_model.single_blocks]


def _attention_bias(text_mask: torch.Tensor, latent_shape, dtype) -> torch.Tensor:
    """The additive attention mask ComfyUI's Flux/Chroma take, over their (text, image) token
    sequence: 0 where attended, the dtype's minimum on the text tokens `text_mask` leaves out (the
    padding `TextConditioning.cat` adds to a shorter caption: ComfyUI's Chroma T5 is unpadded)."""
    b, _, h, w = latent_shape
    image_tokens = ((h + 1) // 2) * ((w + 1) // 2)  # 2×2 patches, padded up as the model does
    keys = torch.cat([text_mask, text_mask.new_ones(b, image_tokens)], dim=1)
    bias = torch.zeros(keys.shape, dtype=dtype, device=text_mask.device)
    bias = bias.masked_fill(~keys, torch.finfo(dtype).min)
    return bias[:, None, None, :]  # (B, heads, queries, keys) by broadcasting
