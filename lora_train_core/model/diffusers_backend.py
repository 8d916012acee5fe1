"""SD1.x/2.x and SDXL on diffusers + transformers models (the CLI's backend).

Text encoding follows kohya, as the family's row says: SD1.x/2.x use the encoder's
last hidden state; SDXL concatenates the penultimate hidden states of both encoders
and takes the pooled, projected output of the second (`sdxl_train_util`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property, partial
from pathlib import Path

import torch
import torch.utils.checkpoint
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn

from ..errors import ConfigError, ModelError, check_choice
from ..families import FAMILY_GROUPS, ModelFamily, get_family
from .backend import ModelFacts, PipelineParts, TextConditioning
from .fingerprint import sampled_weights_fingerprint, text_encoders_fingerprint, weights_fingerprint
from .fp8 import store_in_fp8
from .kohya_keys import LoraTarget, text_encoder_targets, unet_targets
from .model_config import ModelConfig
from .weighted_text import encode_weighted_captions


def kohya_alphas_cumprod() -> torch.Tensor:
    """ā_t of the DDPM schedule kohya trains SD1.x/2.x and SDXL with (scaled_linear, 0.00085..0.012)."""
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    return scheduler.alphas_cumprod.to(torch.float32)


class DiffusersBackend:
    """The backend protocol over diffusers/transformers modules already in memory."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoders: Sequence[nn.Module],
        tokenizers: Sequence,
        family: str,
        prediction_type: str = "epsilon",
        device: torch.device | str = "cpu",
        weight_dtype: torch.dtype = torch.float32,
        fp8_base: bool = False,
        model_name: str = "in-memory",
    ):
        """weight_dtype: the frozen weights' and the UNet inputs' dtype (the mixed-precision dtype).
        fp8_base: store the UNet's weights as float8 instead (speed.fp8_base); they are cast to
        weight_dtype where used, under the training step's autocast.
        model_name: `base_model_name`, what a saved LoRA records (the model path's name)."""
        self.family_spec = get_family(family)
        # the TOML sets it through model.v_parameterization (ModelConfig.prediction_type)
        check_choice("prediction_type", prediction_type, ("epsilon", "v_prediction"))
        encoders = len(self.family_spec.text_encoder_prefixes)
        if len(text_encoders) != encoders:
            raise ModelError(f"a {family} model has {encoders} text encoder(s), got {len(text_encoders)}")
        self.prediction_type = prediction_type
        self._place_models(unet, vae, text_encoders, tokenizers, device, weight_dtype, fp8_base)
        self.alphas_cumprod = kohya_alphas_cumprod().to(self.device)
        self.base_model_name = model_name

    def _place_models(self, unet, vae, text_encoders, tokenizers, device, weight_dtype, fp8_base) -> None:
        """Put the frozen modules on `device` in their dtypes (shared with flux_backend)."""
        self.family = self.family_spec.name
        self.device = torch.device(device)
        self.weight_dtype = weight_dtype
        # The VAE stays fp32: SDXL's VAE overflows in fp16, and it runs once per image when caching.
        self.vae = _place(vae, self.device, torch.float32).eval()
        self.unet = _place(unet, self.device, weight_dtype)
        if fp8_base:
            if weight_dtype == torch.float32:
                raise ConfigError(
                    "speed.fp8_base: needs train.mixed_precision 'bf16' or 'fp16' to compute in"
                )
            self.unet = store_in_fp8(self.unet)
        self.fp8_base = fp8_base
        self.text_encoders = [_place(te, self.device, weight_dtype) for te in text_encoders]
        self.tokenizers = list(tokenizers)

    @cached_property
    def vae_fingerprint(self) -> str:
        """`weights_fingerprint` of the VAE (computed when first asked)."""
        return weights_fingerprint(self.vae.state_dict())

    @cached_property
    def text_encoder_fingerprint(self) -> str:
        """`text_encoders_fingerprint` of the encoders, with each tokenizer's class and length."""
        tokenizers = [f"{type(t).__name__}:{t.model_max_length}" for t in self.tokenizers]
        return text_encoders_fingerprint(
            self.family, [te.state_dict() for te in self.text_encoders], tokenizers
        )

    def base_model_fingerprint(self) -> str:
        """`sampled_weights_fingerprint` of the UNet's state dict (its weights as loaded: float8 with
        fp8_base, else weight_dtype)."""
        return sampled_weights_fingerprint(self.unet.state_dict())

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        posterior = self.vae.encode(pixels.to(self.device, torch.float32)).latent_dist
        # The Flux AE centres its latents first (config shift_factor); SD's VAEs have none.
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (posterior.sample(generator) - shift) * self.vae.config.scaling_factor

    def encode_text(self, captions: Sequence[str], weighted: bool = False) -> TextConditioning:
        """weighted: model/weighted_text.py, kohya's `--weighted_captions`."""
        if weighted:
            return encode_weighted_captions(self, captions)
        return self.encode_token_ids([self._token_ids(tok, captions) for tok in self.tokenizers])

    def encode_token_ids(self, ids: Sequence[torch.Tensor]) -> TextConditioning:
        """Run each text encoder on its tokenizer's ids, as the family conditions its UNet: each
        encoder's last (final-norm) or penultimate hidden state, concatenated, and the last
        encoder's pooled projection where the family uses it (kohya `sdxl_train_util`)."""
        family = self.family_spec
        penultimate = family.text_hidden_state == "penultimate"
        outputs = [
            encoder(token_ids.to(self.device), output_hidden_states=penultimate)
            for encoder, token_ids in zip(self.text_encoders, ids, strict=True)
        ]
        states = [out.hidden_states[-2] if penultimate else out.last_hidden_state for out in outputs]
        hidden = states[0] if len(states) == 1 else torch.cat(states, dim=-1)
        return TextConditioning(hidden, outputs[-1].text_embeds if family.pooled_text else None)

    def _token_ids(self, tokenizer, captions: Sequence[str]) -> torch.Tensor:
        return tokenizer(
            list(captions),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def predict(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text: TextConditioning,
        size_conditioning: torch.Tensor | None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if guidance is not None:
            raise ValueError(f"{self.family_spec.title} has no guidance input")
        added = None
        if self.family_spec.size_conditioning:
            if size_conditioning is None or text.pooled is None:
                raise ValueError("SDXL needs pooled text embeddings and size conditioning")
            added = {"text_embeds": text.pooled, "time_ids": size_conditioning.to(self.device)}
        return self.unet(
            noisy_latents.to(self.device, self.weight_dtype),
            timesteps.to(self.device),
            encoder_hidden_states=text.hidden.to(self.weight_dtype),
            added_cond_kwargs=added,
        ).sample

    def lora_targets(self, include_conv: bool, unet: bool, text_encoder: bool) -> list[LoraTarget]:
        targets: list[LoraTarget] = []
        if unet:
            targets += unet_targets(self.unet, self.family_spec, include_conv)
        if text_encoder:
            for te, prefix in zip(self.text_encoders, self.family_spec.text_encoder_prefixes, strict=True):
                targets += text_encoder_targets(te, prefix)
        return targets

    def trainable_modules(self) -> list[nn.Module]:
        """The UNet first, then the text encoders that may train (set_gradient_checkpointing's)."""
        return [self.unet, *self.text_encoders]

    def parkable_modules(self, latents_cached: bool, text_cached: bool) -> list[nn.Module]:
        return ([self.vae] if latents_cached else []) + (list(self.text_encoders) if text_cached else [])

    def pipeline_parts(self) -> PipelineParts:
        return PipelineParts(
            family=self.family_spec,
            unet=self.unet,
            vae=self.vae,
            text_encoders=tuple(self.text_encoders),
            tokenizers=tuple(self.tokenizers),
            prediction_type=self.prediction_type,
            device=self.device,
            compute_dtype=self.weight_dtype,
            fp8_base=self.fp8_base,
        )

    def set_gradient_checkpointing(self, enabled: bool, preserve_rng_state: bool = True) -> None:
        if enabled:
            self.unet.enable_gradient_checkpointing(
                partial(_checkpoint, preserve_rng_state=preserve_rng_state)
            )
            for te in self.trainable_modules()[1:]:
                te.gradient_checkpointing_enable()
        else:
            self.unet.disable_gradient_checkpointing()
            for te in self.trainable_modules()[1:]:
                te.gradient_checkpointing_disable()


def _checkpoint(module: nn.Module, *args, preserve_rng_state: bool):
    """diffusers' own checkpointing call, with the RNG-state saving made a choice: reading the
    RNG state is not allowed while a CUDA graph records, and without dropout it is not needed."""
    return torch.utils.checkpoint.checkpoint(
        module.__call__, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state
    )


def _place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move a frozen module; cast only if needed (diffusers warns on every dtype cast)."""
    module = module.to(device).requires_grad_(False)
    if any(p.dtype != dtype for p in module.parameters()):
        module = module.to(dtype)
    return module


def detect_family(path: Path) -> str:
    """sd15, sdxl, flux_dev, flux_schnell or chroma, from a diffusers folder's layout and configs
    or a single file's keys; no weights are loaded."""
    if path.is_dir():
        from .flux_backend import detect_flux_folder

        flux = detect_flux_folder(path)
        if flux is not None:
            return flux
        return "sdxl" if (path / "text_encoder_2").is_dir() else "sd15"
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except Exception as exc:
        raise ModelError(f"{path}: not a readable .safetensors checkpoint ({exc})") from exc
    if any(_is_flux_key(k) for k in keys):
        raise ModelError(
            f"model.path: {str(path)!r} is a single-file Flux/Chroma checkpoint; the CLI loads Flux.1 and "
            "Chroma from a diffusers folder only (transformer/, vae/, text_encoder/, tokenizer/, and for "
            "Flux.1 text_encoder_2/ and tokenizer_2/): give that folder as model.path"
        )
    return "sdxl" if any(k.startswith("conditioner.embedders.1.") for k in keys) else "sd15"


def _is_flux_key(key: str) -> bool:
    """BFL's (`double_blocks.`, maybe under ComfyUI's `model.diffusion_model.`) or diffusers' Flux names."""
    native = key.removeprefix("model.diffusion_model.")
    return native.startswith(("double_blocks.", "single_transformer_blocks."))


def model_facts(cfg: ModelConfig, device: torch.device, fp8_base: bool = False) -> ModelFacts:
    """What the checks before training need of the model in `cfg`, read without loading it."""
    family = get_family(_checked_family(cfg))
    if family.is_flow:
        if cfg.v_parameterization:
            raise ConfigError(
                f"model.v_parameterization: true, but {family.title} is a flow-matching model (it "
                "predicts the velocity ε − x0); remove it"
            )
        return ModelFacts(family.name, "flow", torch.device(device), fp8_base)
    return ModelFacts(family.name, cfg.prediction_type, torch.device(device), fp8_base)


def _checked_family(cfg: ModelConfig) -> str:
    path = cfg.path
    if not path.exists():
        raise ModelError(
            f"model.path: {str(path)!r} does not exist; give a diffusers model folder "
            "(with unet/ or transformer/, vae/, text_encoder/) or a .safetensors SD checkpoint"
        )
    family = detect_family(path)
    if cfg.family not in ("auto", family, *_groups_of(family)):
        raise ModelError(
            f"model.path: {str(path)!r} holds a {family!r} model ({get_family(family).title}), but "
            f"model.family is {cfg.family!r}; set model.family = {family!r} or 'auto'"
        )
    spec = get_family(family)
    if spec.is_flow:
        from .flux_backend import check_flux_folder

        check_flux_folder(path, spec)
    return family


def _groups_of(family: str) -> tuple[str, ...]:
    return tuple(group for group, members in FAMILY_GROUPS.items() if family in members)


def load_diffusers_backend(
    cfg: ModelConfig,
    device: torch.device | str = "cpu",
    weight_dtype: torch.dtype = torch.float32,
    fp8_base: bool = False,
) -> DiffusersBackend:
    """Load a base model from a diffusers folder or a single .safetensors checkpoint; a Flux or
    Chroma folder gives a flux_backend.FluxBackend."""
    path = cfg.path
    model_facts(cfg, device, fp8_base)  # every check that needs no weights, first
    family = _checked_family(cfg)
    spec = get_family(family)
    if spec.is_flow:
        from .flux_backend import load_flux_backend

        return load_flux_backend(path, spec, device, weight_dtype, fp8_base)
    parts = _load_folder(path, spec) if path.is_dir() else _load_single_file(path, spec)
    return DiffusersBackend(
        *parts,
        family=family,
        prediction_type=cfg.prediction_type,
        device=device,
        weight_dtype=weight_dtype,
        fp8_base=fp8_base,
        model_name=path.name,
    )


def text_encoder_suffixes(family: ModelFamily) -> list[str]:
    """diffusers' name suffix of each text encoder and its tokenizer, in the family's encoder order:
    `text_encoder`, `text_encoder_2`, ... (the pipelines' arguments and the model folders' names)."""
    return ["" if i == 0 else f"_{i + 1}" for i in range(len(family.text_encoder_prefixes))]


def _load_folder(path: Path, family: ModelFamily):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    missing = [d for d in ("unet", "vae", "text_encoder", "tokenizer") if not (path / d).is_dir()]
    if missing:
        raise ModelError(
            f"model.path: {str(path)!r} is not a diffusers model folder (missing {', '.join(missing)}/)"
        )
    suffixes = text_encoder_suffixes(family)
    # the last encoder's projection gives the pooled text, where the family uses it
    classes = [CLIPTextModel] * (len(suffixes) - 1)
    classes.append(CLIPTextModelWithProjection if family.pooled_text else CLIPTextModel)
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
        text_encoders = [
            cls.from_pretrained(path, subfolder=f"text_encoder{suffix}")
            for cls, suffix in zip(classes, suffixes, strict=True)
        ]
        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder=f"tokenizer{s}") for s in suffixes]
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.path: cannot load the model in {str(path)!r}: {exc}") from exc
    return unet, vae, text_encoders, tokenizers


def _load_single_file(path: Path, family: ModelFamily):
    import diffusers

    pipeline_class = getattr(diffusers, family.diffusers_pipeline)
    try:
        pipe = pipeline_class.from_single_file(str(path))
    except Exception as exc:
        raise ModelError(
            f"model.path: cannot load the checkpoint {str(path)!r} ({exc}). diffusers needs the model's "
            "configs, which it downloads once; offline, convert the checkpoint to a diffusers folder first"
        ) from exc
    suffixes = text_encoder_suffixes(family)
    text_encoders = [getattr(pipe, f"text_encoder{suffix}") for suffix in suffixes]
    return pipe.unet, pipe.vae, text_encoders, [getattr(pipe, f"tokenizer{suffix}") for suffix in suffixes]


__all__ = ["DiffusersBackend", "detect_family", "load_diffusers_backend"]
