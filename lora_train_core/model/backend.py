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

from ..families import ModelFamily
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


class Backend(Protocol):
    """What `train()` needs from a model family (see DESIGN.md, "The backend protocol")."""

    family: str  # the family's name, e.g. "sd15" (SD1.x/2.x) or "sdxl"
    family_spec: ModelFamily  # the family's row of the table (families/): keys, strings, layout
    prediction_type: str  # "epsilon" or "v_prediction"
    device: torch.device
    alphas_cumprod: torch.Tensor  # (T,) float32, DDPM ā_t on `device`
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
