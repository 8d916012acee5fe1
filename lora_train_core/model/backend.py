"""The backend protocol: what the training loop needs from a model family.

The loop knows nothing of SD1.5 or SDXL. A backend supplies the noise
schedule and prediction type, encodes images and captions, predicts the
network output for a noisy latent, and lists the modules LoRA may wrap under
their kohya names. `diffusers_backend.py` implements it for the CLI and tests;
`nodes/comfy_backend.py` implements it on ComfyUI's loaded objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .kohya_keys import LoraTarget


@dataclass(frozen=True)
class TextConditioning:
    """Text-encoder outputs for a batch of captions.

    hidden: (B, L, D) cross-attention context.
    pooled: (B, P) pooled text embedding (SDXL's second encoder), else None.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> TextConditioning:
        pooled = None if self.pooled is None else self.pooled.to(device)
        return TextConditioning(self.hidden.to(device), pooled)

    def index(self, rows: Sequence[int] | torch.Tensor) -> TextConditioning:
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.hidden.device)
        pooled = None if self.pooled is None else self.pooled[rows]
        return TextConditioning(self.hidden[rows], pooled)

    @staticmethod
    def cat(parts: Sequence[TextConditioning]) -> TextConditioning:
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return TextConditioning(torch.cat([p.hidden for p in parts]), pooled)


@dataclass(frozen=True)
class ModelFacts:
    """What the checks before training need to know of a model; known before its weights load
    (the CLI reads them from the config and the model's layout, ComfyUI from the loaded MODEL)."""

    family: str
    prediction_type: str
    device: torch.device
    fp8_base: bool = False  # the denoiser's weights are stored in float8

    @classmethod
    def of(cls, backend: Backend) -> ModelFacts:
        return cls(backend.family, backend.prediction_type, backend.device, backend.fp8_base)


class Backend(Protocol):
    """What `train()` needs from a model family (see DESIGN.md, "The backend protocol")."""

    family: str  # "sd15" (SD1.x/2.x UNet layout) or "sdxl"
    prediction_type: str  # "epsilon" or "v_prediction"
    device: torch.device
    alphas_cumprod: torch.Tensor  # (T,) float32, DDPM ā_t on `device`
    latent_downscale: int  # image pixels per latent pixel (8 for SD)
    base_model_version: str  # kohya's ss_base_model_version
    modelspec_architecture: str  # SAI model spec, e.g. "stable-diffusion-v1/lora"
    fingerprint: str  # identifies the VAE weights, for the latent cache key

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] → latents scaled as the UNet expects.

        Latents are a sample of the VAE posterior (as kohya caches them),
        drawn from `generator`.
        """
        ...

    def encode_text(self, captions: Sequence[str]) -> TextConditioning:
        """Captions → conditioning; differentiable when text-encoder LoRA trains."""
        ...

    def predict(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text: TextConditioning,
        size_conditioning: torch.Tensor | None,
    ) -> torch.Tensor:
        """Raw network output (epsilon or v) for DDPM-convention x_t at integer t.

        size_conditioning: (B, 6) as SDXL's add_time_ids (original h, w, crop
        top, left, target h, w); None for families without it.
        """
        ...

    def lora_targets(self, include_conv: bool, unet: bool, text_encoder: bool) -> list[LoraTarget]:
        """Modules LoRA may wrap, under their kohya names."""
        ...

    def trainable_modules(self) -> list[nn.Module]:
        """The UNet and text encoders, for train/eval mode and checkpointing."""
        ...

    def set_gradient_checkpointing(self, enabled: bool, preserve_rng_state: bool = True) -> None:
        """Checkpoint the UNet's blocks; preserve_rng_state=False when nothing inside draws random
        numbers (speed.cuda_graph needs it: the RNG state cannot be read while a graph records)."""
        ...
