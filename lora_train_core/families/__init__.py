"""One table row per model family: every fact about a family that the core branches on.

A family is one module here (`sd15.py`, `sdxl.py`, `flux.py`) defining a `ModelFamily`; everything else asks
`get_family(name)` for it instead of keeping its own copy or testing the name. Adding a family is a
new module here plus its backend code (the diffusers and ComfyUI model objects behind
`model/backend.py`). Facts that only one door needs and that name that door's objects (ComfyUI's
`clip_l` / `clip_g` attributes) stay in that door, keyed by the family's name.

This package imports nothing of the orchestrator (`run/`) or the doors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import check_choice
from ..model.kohya_keys import TEXT_ENCODER_COMPONENTS, UNET_BLOCK_ROOTS, UNetLayout

UNET_NAMES = ("diffusers", "sgm", "native")
OBJECTIVES = ("ddpm", "flow")
TEXT_HIDDEN_STATES = ("last", "penultimate")


@dataclass(frozen=True)
class BlockLayout:
    """kohya's UNet blocks for block-wise lr weights and dims (sd-scripts networks/lora.py
    `get_block_index`, `get_block_lr_weight`, `get_block_dims_and_alphas`).

    The lists a user gives run: `down` down weights, `mid` mid weights, `down` up weights; with
    `outer`, the first and last block (time/label embedding and out, which kohya never wraps)
    frame them at weight 1. block_dims / block_alphas take one value per block (`count`).
    """

    down: int  # entries of down_lr_weight, and of up_lr_weight
    mid: int  # entries of mid_lr_weight
    outer: bool  # blocks 0 and count-1 lie outside the down/mid/up lists
    description: str  # what each block index is, for messages: "0 unused, 1-11 down, ..."

    def __post_init__(self):
        if self.down < 1 or self.mid < 1:
            raise ValueError(f"BlockLayout: down {self.down} and mid {self.mid} must be at least 1")

    @property
    def count(self) -> int:
        """Blocks in all: the length of kohya's block_dims for this family."""
        return 2 * self.down + self.mid + 2 * self.outer


@dataclass(frozen=True)
class ModelFamily:
    """What the core needs to know about a model family; one instance per module in families/.

    name: the id users write (`model.family`) and code passes around, e.g. "sd15".
    title: what messages call the family, e.g. "SD1.x/2.x".
    text_encoder_prefixes: kohya's key prefix of each text encoder a LoRA may train, in the backend's
        encoder order; empty where this trainer puts no LoRA on the text encoders (Chroma's T5).
    unet_names: where kohya's `lora_unet_*` names come from: "diffusers" module paths (SD1.x/2.x,
        trained by kohya on a diffusers UNet), "sgm", the original Stability paths (SDXL), or
        "native", the model's original module paths (the DiTs: BFL's Flux, as ComfyUI loads it).
    unet_layout: the published UNet's block structure (diffusers ↔ SGM naming); None for a DiT.
    blocks: kohya's block numbering for block-wise lr weights and dims; None where kohya has none.
    base_model_version: kohya's `ss_base_model_version`.
    modelspec_architecture / modelspec_implementation: SAI model spec `modelspec.architecture`
        and `.implementation` of a LoRA for it (sd-scripts library/sai_model_spec.py).
    v_prediction_is_v2: kohya's `ss_v2` is true for a v-prediction model of this family (SD2.x).
    bucket_reso_step: bucket sides must be multiples of this so the UNet halves the latents evenly.
    latent_channels, latent_downscale: the VAE's latent channels and pixels per latent pixel.
    vae_scaling_factor: latents are the VAE's output times this.
    text_hidden_state: the cross-attention context is each encoder's "last" hidden state (after
        the final layer norm) or its "penultimate" one, concatenated across encoders.
    pooled_text: the last encoder's pooled, projected output conditions the UNet too.
    size_conditioning: the UNet takes SDXL's six size numbers (original size, crop, target size).
    diffusers_pipeline: the diffusers pipeline class that samples from the family.
    objective: "ddpm" (epsilon / v-prediction on a discrete DDPM schedule) or "flow" (rectified flow,
        objective/flow.py: x_t = (1 − σ)·x0 + σ·ε, the model predicts ε − x0).
    vae_shift_factor: latents are (the VAE's output − this) × vae_scaling_factor (the Flux AE's 0.1159).
    guidance_input: the denoiser takes a guidance value (Flux-dev's distilled guidance embedding).
    default_guidance_scale: what `flow.guidance_scale` is when unset (kohya's docs: 1.0 to train
        Flux-dev); None for a family without a guidance input.
    kohya_model_type: kohya's `ss_model_type` ("flux", "chroma"); "" where kohya writes none.
    native_block_roots: for "native" names, the top-level block lists kohya's UNet names start with
        (Flux: double_blocks, single_blocks); the UNets' come from their naming (kohya_keys).
    """

    name: str
    title: str
    text_encoder_prefixes: tuple[str, ...]
    unet_names: str
    unet_layout: UNetLayout | None
    blocks: BlockLayout | None
    base_model_version: str
    modelspec_architecture: str
    modelspec_implementation: str
    v_prediction_is_v2: bool
    bucket_reso_step: int
    latent_channels: int
    latent_downscale: int
    vae_scaling_factor: float
    text_hidden_state: str
    pooled_text: bool
    size_conditioning: bool
    diffusers_pipeline: str
    objective: str = "ddpm"
    vae_shift_factor: float = 0.0
    guidance_input: bool = False
    default_guidance_scale: float | None = None
    kohya_model_type: str = ""
    native_block_roots: tuple[str, ...] = ()

    def __post_init__(self):
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"ModelFamily.name: {self.name!r} must be a lowercase identifier")
        for prefix in self.text_encoder_prefixes:
            check_choice(f"ModelFamily {self.name}: text_encoder_prefixes", prefix, TEXT_ENCODER_COMPONENTS)
        check_choice(f"ModelFamily {self.name}: unet_names", self.unet_names, UNET_NAMES)
        check_choice(
            f"ModelFamily {self.name}: text_hidden_state", self.text_hidden_state, TEXT_HIDDEN_STATES
        )
        if not self.modelspec_architecture.endswith("/lora"):
            raise ValueError(f"ModelFamily {self.name}: modelspec_architecture must end in '/lora'")
        for field in ("bucket_reso_step", "latent_channels", "latent_downscale"):
            if getattr(self, field) < 1:
                raise ValueError(f"ModelFamily {self.name}: {field} must be at least 1")
        if self.bucket_reso_step % self.latent_downscale:
            raise ValueError(f"ModelFamily {self.name}: bucket_reso_step is not a multiple of the latent's")
        if self.vae_scaling_factor <= 0:
            raise ValueError(f"ModelFamily {self.name}: vae_scaling_factor must be positive")
        check_choice(f"ModelFamily {self.name}: objective", self.objective, OBJECTIVES)
        if (self.unet_names == "native") != (self.unet_layout is None):
            raise ValueError(
                f"ModelFamily {self.name}: unet_names 'native' (a DiT) has no UNet layout; others need one"
            )
        if (self.unet_names == "native") != bool(self.native_block_roots):
            raise ValueError(f"ModelFamily {self.name}: native_block_roots goes with unet_names 'native'")
        if self.guidance_input != (self.default_guidance_scale is not None):
            raise ValueError(f"ModelFamily {self.name}: default_guidance_scale goes with guidance_input")

    @property
    def unet_block_roots(self) -> tuple[str, ...]:
        """The top-level modules every kohya `lora_unet_*` name of this family starts with."""
        return self.native_block_roots or UNET_BLOCK_ROOTS[self.unet_names]

    @property
    def is_flow(self) -> bool:
        """Trained with the flow-matching objective (objective/flow.py), not DDPM's."""
        return self.objective == "flow"


from . import flux, sd15, sdxl  # noqa: E402  (the family modules build rows of the class above)

FAMILIES: dict[str, ModelFamily] = {
    family.name: family for family in (sd15.FAMILY, sdxl.FAMILY, *flux.FAMILIES)
}

# names a user may write for "whichever of these the model turns out to be" (model.family)
FAMILY_GROUPS: dict[str, tuple[str, ...]] = {"flux": ("flux_dev", "flux_schnell")}


def get_family(name: str, field: str = "model.family") -> ModelFamily:
    """The family called `name`; ConfigError naming `field` and the known names otherwise."""
    check_choice(field, name, FAMILIES)
    return FAMILIES[name]


__all__ = ["FAMILIES", "FAMILY_GROUPS", "BlockLayout", "ModelFamily", "get_family"]
