"""The backend protocol: everything the core asks of a loaded model.

The loop knows nothing of SD1.5 or SDXL. A backend supplies the noise schedule and
prediction type, encodes images and captions, predicts the network output for a noisy
latent, lists the modules LoRA may wrap under their kohya names, says which frozen
modules a cached run never calls, identifies its weights (cache keys, the base model's
record in a saved LoRA), and, where it can, the parts of a diffusers pipeline for
validation samples. Per-family facts are the family's row (`family_spec`, families/).
`diffusers_backend.py` implements it for the CLI and tests; `nodes/comfy_backend.py`
on ComfyUI's loaded objects; `data/text_cache.CachedTextEncoder` wraps either. The core
uses nothing of a backend beyond this protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..families import ModelFamily
from .kohya_keys import LoraTarget


@dataclass(frozen=True)
class TextConditioning:
    """Text-encoder outputs for a batch of captions.

    hidden: (B, L, D) cross-attention context.
    pooled: (B, P) pooled text embedding (SDXL's second encoder, Flux's CLIP-L), else None.
    attention_mask: (B, L) bool, the context tokens the denoiser may attend to (Chroma's T5
        mask), else None: every token is attended.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    def __post_init__(self):
        mask = self.attention_mask
        if mask is not None and (mask.dtype != torch.bool or mask.shape != self.hidden.shape[:2]):
            raise ValueError(
                f"TextConditioning.attention_mask: {mask.dtype} {tuple(mask.shape)}, "
                f"needs bool {tuple(self.hidden.shape[:2])} (batch, tokens)"
            )

    def to(self, device: torch.device | str) -> TextConditioning:
        return self._map(lambda t: t.to(device))

    def index(self, rows: Sequence[int] | torch.Tensor) -> TextConditioning:
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.hidden.device)
        return self._map(lambda t: t[rows])

    @staticmethod
    def cat(parts: Sequence[TextConditioning]) -> TextConditioning:
        """Rows of several batches in one. Hidden states of different lengths (an unpadded T5, as
        ComfyUI's Chroma encoder gives one per caption) are zero-padded at the end to the longest,
        and the padding is masked out: a part without a mask attends to all of its own tokens."""
        length = max(p.hidden.shape[1] for p in parts)
        masked = any(p.attention_mask is not None or p.hidden.shape[1] != length for p in parts)
        hidden = torch.cat([_pad_tokens(p.hidden, length, 0.0) for p in parts])
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        mask = torch.cat([_pad_tokens(_mask_of(p), length, False) for p in parts]) if masked else None
        return TextConditioning(hidden, pooled, mask)

    def _map(self, fn) -> TextConditioning:
        """`fn` applied to each tensor field (the optional ones where present)."""
        fields = (self.hidden, self.pooled, self.attention_mask)
        return TextConditioning(*(None if t is None else fn(t) for t in fields))


def _mask_of(text: TextConditioning) -> torch.Tensor:
    if text.attention_mask is not None:
        return text.attention_mask
    return torch.ones(text.hidden.shape[:2], dtype=torch.bool, device=text.hidden.device)


def _pad_tokens(tensor: torch.Tensor, length: int, value) -> torch.Tensor:
    """(B, L, ...) → (B, length, ...), filled with `value` at the end."""
    if tensor.shape[1] == length:
        return tensor
    pad = tensor.new_full((tensor.shape[0], length - tensor.shape[1], *tensor.shape[2:]), value)
    return torch.cat([tensor, pad], dim=1)


@dataclass(frozen=True)
class ModelFacts:
    """What the checks before training need to know of a model; known before its weights load
    (the CLI reads them from the config and the model's layout, ComfyUI from the loaded MODEL)."""

    family: str
    prediction_type: str  # "epsilon", "v_prediction" or "flow"
    device: torch.device
    fp8_base: bool = False  # the denoiser's weights are stored in float8

    @classmethod
    def of(cls, backend: Backend) -> ModelFacts:
        return cls(backend.family, backend.prediction_type, backend.device, backend.fp8_base)


@dataclass(frozen=True)
class PipelineParts:
    """What a diffusers pipeline of the backend's family is assembled from, for validation samples:
    the backend's own modules (no second copy), so LoRA applied to them is in the picture."""

    family: ModelFamily  # its `diffusers_pipeline` names the pipeline class
    unet: nn.Module
    vae: nn.Module
    text_encoders: tuple[nn.Module, ...]
    tokenizers: tuple[Any, ...]
    prediction_type: str  # "epsilon", "v_prediction" or "flow"
    device: torch.device
    compute_dtype: torch.dtype  # what the UNet computes in
    fp8_base: bool  # the UNet's weights are float8: sample under autocast to compute_dtype


class Backend(Protocol):
    """What the core needs from a model (see DESIGN.md, "The backend protocol")."""

    family: str  # the family's name, e.g. "sd15" (SD1.x/2.x) or "sdxl"
    family_spec: ModelFamily  # the family's row of the table (families/): keys, strings, layout
    prediction_type: str  # "epsilon" or "v_prediction" (DDPM families), "flow" (flow-matching)
    device: torch.device
    alphas_cumprod: torch.Tensor | None  # (T,) float32, DDPM ā_t on `device`; None for "flow"
    fp8_base: bool  # the denoiser's weights are stored in float8 (kohya --fp8_base, ss_fp8_base)
    base_model_name: str  # what a saved LoRA records as its base model (ss_sd_model_name)
    vae_fingerprint: str  # identifies the VAE's weights: the latent cache key
    text_encoder_fingerprint: str  # identifies the text encoders and tokenizers: the text cache key

    def base_model_fingerprint(self) -> str:
        """Identifies the denoiser's weights, for a saved LoRA's `ss_new_sd_model_hash`:
        `model/fingerprint.sampled_weights_fingerprint` of its state dict (cheap on a multi-GB
        model, also on GPU weights; not kohya's SHA-256 of the checkpoint file)."""
        ...

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → latents scaled as the UNet expects.

        Latents are a sample of the VAE posterior (as kohya caches them),
        drawn from `generator`.
        """
        ...

    def encode_text(self, captions: Sequence[str], weighted: bool = False) -> TextConditioning:
        """Captions → conditioning; differentiable when text-encoder LoRA trains.

        weighted: apply A1111/kohya attention weights written in the captions ("(red:1.5)",
        captions.weighted_captions); a backend that cannot raises ConfigError saying so.
        """
        ...

    def predict(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text: TextConditioning,
        size_conditioning: torch.Tensor | None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw network output for a noisy latent, shaped like it.

        DDPM families: epsilon or v for DDPM-convention x_t at integer t. Flow families: the
        velocity v̂ ≈ ε − x0 for x_t = (1 − σ)·x0 + σ·ε at `timesteps` = σ ∈ [0, 1] (float), in the
        core's latent layout (B, C, H, W); the backend turns σ into its model's time input and
        packs the latent into tokens if its model wants them.
        size_conditioning: (B, 6) as SDXL's add_time_ids (original h, w, crop
        top, left, target h, w); None for families without it.
        guidance: (B,) the guidance input of a guidance-distilled model (Flux-dev); None otherwise.
        """
        ...

    def lora_targets(self, include_conv: bool, unet: bool, text_encoder: bool) -> list[LoraTarget]:
        """Modules LoRA may wrap, under their kohya names."""
        ...

    def trainable_modules(self) -> list[nn.Module]:
        """The UNet and text encoders, for train/eval mode and checkpointing."""
        ...

    def parkable_modules(self, latents_cached: bool, text_cached: bool) -> list[nn.Module]:
        """The frozen modules that a run's steps never call and that may wait on the CPU
        (run/parking.py): the VAE once latents are cached, the text encoders once their outputs
        are. Empty where the backend's environment manages memory itself (ComfyUI)."""
        ...

    def set_gradient_checkpointing(self, enabled: bool, preserve_rng_state: bool = True) -> None:
        """Checkpoint the UNet's blocks; preserve_rng_state=False when nothing inside draws random
        numbers (speed.cuda_graph needs it: the RNG state cannot be read while a graph records)."""
        ...

    def pipeline_parts(self) -> PipelineParts | None:
        """The parts of a diffusers pipeline over this backend's modules, for the CLI's validation
        samples; None where none can be built (ComfyUI samples with its own sampler)."""
        ...
