"""The core's backend protocol on ComfyUI's own MODEL / CLIP / VAE objects.

Nothing is loaded twice: training runs on the diffusion model the graph already
loaded. ComfyUI works in sigma space (x = x0 + σε, input scaled by 1/√(σ²+1));
DDPM's x_t = √ā·x0 + √(1−ā)·ε is exactly that scaled input with
ā = 1/(1+σ²), so the core's noising is reused unchanged and `predict` calls
the raw network at the DDPM timestep, returning ε or v (not ComfyUI's x0).
See DESIGN.md, "The sigma convention"; tests/integration/test_parity.py proves it.

What differs per family (objective, conditioning, LoRA targets, checkpointed blocks) is a small
adapter chosen by family: `SDAdapter` here for the UNets, `comfy_flux.FluxAdapter` for Flux.1
and Chroma (flow matching: σ in, velocity out).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property, partial

import comfy.model_management as mm
import comfy.model_sampling
import comfy.utils
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..lora_train_core.errors import ConfigError, ModelError
from ..lora_train_core.families import get_family
from ..lora_train_core.model.backend import PipelineParts, TextConditioning
from ..lora_train_core.model.fingerprint import (
    sampled_weights_fingerprint,
    text_encoders_fingerprint,
    weights_fingerprint,
)
from ..lora_train_core.model.fp8 import is_float8
from ..lora_train_core.model.kohya_keys import LoraTarget, sgm_unet_targets, text_encoder_targets
from . import comfy_compat
from .comfy_flux import FluxAdapter, flux_family


def model_family(model) -> str:
    """sd15 (SD1.x/2.x UNet, kohya's diffusers-style names), sdxl, flux_dev, flux_schnell or
    chroma; other model classes are refused, naming the class and the supported families."""
    import comfy.model_base as mb

    base = model.model
    if isinstance(base, mb.SDXL):
        return "sdxl"
    if type(base) is mb.BaseModel:
        return "sd15"
    family = flux_family(base)
    if family is not None:
        return family
    supported = ", ".join(get_family(name).title for name in ADAPTERS)
    raise ModelError(
        f"MODEL: {type(base).__name__} models are not supported; this trainer supports {supported}"
    )


class SDAdapter:
    """The SD1.x/2.x and SDXL parts of `ComfyBackend`: DDPM objective from ComfyUI's sigma table,
    cross-attention context (+ SDXL's vector), kohya's UNet targets, checkpointed UNet blocks."""

    blocks_modify_inputs = False  # the UNet blocks never write into their inputs

    def __init__(self, family: str):
        self.family = family
        # ComfyUI's CLIP attribute of each text encoder, in the order of text_encoder_prefixes
        self.clip_attributes = {"sd15": ("clip_l",), "sdxl": ("clip_l", "clip_g")}[family]

    def objective(self, sampling) -> tuple[str, torch.Tensor]:
        # V_PREDICTION subclasses EPS, so test for it first.
        prediction = "v_prediction" if isinstance(sampling, comfy.model_sampling.V_PREDICTION) else "epsilon"
        return prediction, 1.0 / (1.0 + sampling.sigmas.to(torch.float32) ** 2)

    def check_clip(self, clip, title: str) -> None:
        encoders = clip.cond_stage_model
        if hasattr(encoders, "t5xxl") or not all(hasattr(encoders, a) for a in self.clip_attributes):
            raise ConfigError(
                f"CLIP: this is a {type(encoders).__name__} text encoder, but a {title} MODEL needs "
                f"{' + '.join(self.clip_attributes)}; connect the CLIP of the same checkpoint"
            )

    def predict(self, backend, noisy, timesteps, text, size_conditioning, guidance):
        if guidance is not None:
            raise ValueError(f"{backend.family_spec.title} has no guidance input")
        y = backend._sdxl_vector(text, size_conditioning) if backend.family_spec.size_conditioning else None
        return backend.diffusion_model(
            noisy.to(backend.device, backend.compute_dtype),
            timesteps.to(backend.device).float(),
            context=text.hidden.to(backend.device, backend.compute_dtype),
            y=None if y is None else y.to(backend.compute_dtype),
        ).float()

    def unet_targets(self, backend, include_conv: bool) -> list[LoraTarget]:
        sgm_names = backend.family_spec.unet_names == "sgm"
        rename = str if sgm_names else _sgm_to_diffusers(backend.model).__getitem__
        return sgm_unet_targets(backend.diffusion_model, include_conv=include_conv, rename=rename)

    def checkpointed_blocks(self, diffusion_model: nn.Module) -> list[nn.Module]:
        dm = diffusion_model
        return [*dm.input_blocks, dm.middle_block, *dm.output_blocks]


ADAPTERS = {
    "sd15": SDAdapter,
    "sdxl": SDAdapter,
    "flux_dev": FluxAdapter,
    "flux_schnell": FluxAdapter,
    "chroma": FluxAdapter,
}


class ComfyBackend:
    """Backend over a ModelPatcher (+ CLIP, VAE). Build it inside `torch.inference_mode(False)`."""

    def __init__(self, model, clip=None, vae=None):
        self.model, self.clip, self.vae = model, clip, vae
        self.family = model_family(model)
        self.family_spec = get_family(self.family)
        self.adapter = ADAPTERS[self.family](self.family)
        if clip is not None:  # a CLIP of another family is refused before anything loads
            self.adapter.check_clip(clip, self.family_spec.title)
        self.device = model.load_device
        self.diffusion_model: nn.Module = model.model.diffusion_model
        self.compute_dtype = model.model.manual_cast_dtype or model.model.get_dtype()
        self.fp8_base = is_float8(model.model.get_dtype())  # e.g. a loader's weight_dtype fp8_e4m3fn
        sampling = model.get_model_object("model_sampling")
        self.prediction_type, alphas_cumprod = self.adapter.objective(sampling)
        self.alphas_cumprod = None if alphas_cumprod is None else alphas_cumprod.to(self.device)
        self._checkpointed: list[nn.Module] = []
        self._layers_out_of_place: list[nn.Module] = []

    @cached_property
    def vae_fingerprint(self) -> str:
        """`weights_fingerprint` of the VAE (computed when first asked)."""
        return weights_fingerprint(self.vae.get_sd()) if self.vae is not None else "no-vae"

    @cached_property
    def text_encoder_fingerprint(self) -> str:
        """`text_encoders_fingerprint` of the CLIP's encoders, with its tokenizer's class."""
        weights = self._clip().cond_stage_model.state_dict()
        return text_encoders_fingerprint(self.family, [weights], [type(self.clip.tokenizer).__name__])

    def base_model_fingerprint(self) -> str:
        """`sampled_weights_fingerprint` of the diffusion model's state dict, as it is when asked:
        after `prepare_for_training` that is what training sees, with the graph's patches (other
        LoRAs) applied and in ComfyUI's storage dtype."""
        return sampled_weights_fingerprint(self.diffusion_model.state_dict())

    @property
    def base_model_name(self) -> str:
        """A MODEL does not carry its file name: "ComfyUI MODEL " and the fingerprint's first 12 hex."""
        return f"ComfyUI MODEL {self.base_model_fingerprint()[:12]}"

    def _clip(self):
        if self.clip is None:
            raise ConfigError("Train LoRA: connect the CLIP from the checkpoint loader")
        return self.clip

    def prepare_for_training(self, text_encoder: bool = False) -> None:
        """Load the model on its device and make its weights usable by autograd.

        Call inside torch.inference_mode(False). A dynamic-VRAM MODEL is swapped for a
        non-dynamic clone here (comfy_compat.training_patcher): `self.model` is what trains.
        """
        self.model = comfy_compat.training_patcher(self.model, self.clip, text_encoder)
        comfy_compat.load_for_training(self.model)
        self.diffusion_model = self.model.model.diffusion_model
        _make_trainable(self.diffusion_model)
        if text_encoder and self.clip is not None:
            _make_trainable(self.clip.cond_stage_model)
            self._layers_out_of_place = _out_of_place_clip_layers(self.clip.cond_stage_model)

    def release(self) -> None:
        """Undo what training needed on the shared CLIP modules (call in `finally`)."""
        for layer in self._layers_out_of_place:
            del layer.forward
        self._layers_out_of_place = []

    # --- images -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A posterior sample (as kohya caches), scaled by the model's latent format."""
        if self.vae is None:
            raise ConfigError("Cache Latents: connect a VAE")
        mm.load_models_gpu([self.vae.patcher])
        vae_model = self.vae.first_stage_model
        h = vae_model.encoder(pixels.to(self.vae.device, self.vae.vae_dtype))
        h = vae_model.quant_conv(h) if getattr(vae_model, "quant_conv", None) is not None else h
        mean, logvar = h.float().chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        noise = torch.randn(mean.shape, generator=generator, device=generator.device if generator else "cpu")
        return self.model.model.process_latent_in(mean + std * noise.to(mean.device))

    # --- text ---------------------------------------------------------------------------------
    def encode_text(self, captions: Sequence[str], weighted: bool = False) -> TextConditioning:
        if weighted:
            raise ConfigError(
                "captions.weighted_captions is not implemented yet in the ComfyUI door; the CLI "
                "(python -m lora_train_core train) has it; set captions.weighted_captions = false"
            )
        clip = self._clip()
        rows = []
        for caption in captions:
            tokens = clip.tokenize(caption, disable_weights=True)
            # kohya trains on one 77-token window; ComfyUI would append more chunks (T5's
            # tokenizers give one chunk of any length: Flux's padded to 256, Chroma's unpadded)
            tokens = {k: v[:1] for k, v in tokens.items()}
            cond, pool = clip.encode_from_tokens(tokens, return_pooled=True)
            pooled = pool.to(self.device) if self.family_spec.pooled_text else None
            rows.append(TextConditioning(cond.to(self.device), pooled))
        return TextConditioning.cat(rows)  # unequal T5 lengths are zero-padded (and masked in predict)

    # --- prediction ---------------------------------------------------------------------------
    def predict(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text: TextConditioning,
        size_conditioning: torch.Tensor | None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.adapter.predict(self, noisy_latents, timesteps, text, size_conditioning, guidance)

    def _sdxl_vector(self, text: TextConditioning, size_conditioning: torch.Tensor | None) -> torch.Tensor:
        """SDXL's `y`: pooled text ‖ 256-d embeddings of the six size numbers (model_base.SDXL.encode_adm)."""
        if text.pooled is None or size_conditioning is None:
            raise ValueError("SDXL needs pooled text embeddings and size conditioning")
        sizes = size_conditioning.to(self.device, torch.float32)
        embedded = self.model.model.embedder(sizes.flatten()).reshape(sizes.shape[0], -1)
        return torch.cat([text.pooled.to(self.device, torch.float32), embedded.to(self.device)], dim=1)

    # --- LoRA targets and modes -----------------------------------------------------------------
    def lora_targets(self, include_conv: bool, unet: bool, text_encoder: bool) -> list[LoraTarget]:
        targets: list[LoraTarget] = []
        if unet:
            targets += self.adapter.unet_targets(self, include_conv)
        if text_encoder:
            if self.clip is None:
                raise ConfigError("Train LoRA: training the text encoder needs the CLIP input")
            encoders = self.clip.cond_stage_model
            prefixes = self.family_spec.text_encoder_prefixes
            for attr, prefix in zip(self.adapter.clip_attributes, prefixes, strict=True):
                targets += text_encoder_targets(getattr(encoders, attr), prefix)
        return targets

    def trainable_modules(self) -> list[nn.Module]:
        return [self.diffusion_model] + ([self.clip.cond_stage_model] if self.clip is not None else [])

    def parkable_modules(self, latents_cached: bool, text_cached: bool) -> list[nn.Module]:
        """None: ComfyUI moves its models between devices itself (model_management)."""
        return []

    def pipeline_parts(self) -> PipelineParts | None:
        """None: ComfyUI samples with its own sampler (nodes/comfy_sampling.py), not diffusers'."""
        return None

    def set_gradient_checkpointing(self, enabled: bool, preserve_rng_state: bool = True) -> None:
        """Checkpoint each block (the UNet's input/middle/output blocks, Flux's double and single
        blocks); ComfyUI's own `use_checkpoint` ignores LoRA tensors held outside."""
        if enabled and not self._checkpointed:
            for block in self.adapter.checkpointed_blocks(self.diffusion_model):
                forward = type(block).forward.__get__(block)
                if self.adapter.blocks_modify_inputs:
                    forward = partial(_on_copied_inputs, forward)
                block.forward = partial(
                    checkpoint,
                    forward,
                    use_reentrant=False,
                    preserve_rng_state=preserve_rng_state,
                )
                self._checkpointed.append(block)
        elif not enabled:
            for block in self._checkpointed:
                del block.forward
            self._checkpointed.clear()


def _on_copied_inputs(forward, *args, **kwargs):
    """`forward` on copies of its tensor arguments. A block that adds into its input in place
    (Flux's `txt += …`) would otherwise change the very tensors checkpoint keeps to recompute
    it from, and the recomputation would differ from the forward."""
    copy = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
    return forward(*[copy(a) for a in args], **{k: copy(v) for k, v in kwargs.items()})


def _out_of_place_clip_layers(encoders: nn.Module) -> list[nn.Module]:
    """Give each CLIPLayer a forward without in-place residual adds.

    ComfyUI's `CLIPLayer.forward` does `x += attn(...)`, which autograd refuses once a
    text-encoder LoRA needs the activations; the sum is the same out of place.
    """
    layers = [m for m in encoders.modules() if type(m).__name__ == "CLIPLayer"]
    for layer in layers:
        layer.forward = partial(_clip_layer_forward, layer)
    return layers


def _clip_layer_forward(layer, x, mask=None, optimized_attention=None):
    x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
    return x + layer.mlp(layer.layer_norm2(x))


def _sgm_to_diffusers(model) -> dict[str, str]:
    """ComfyUI module path (SGM) → diffusers module path, from ComfyUI's own key map."""
    d2s = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    return {s[: -len(".weight")]: d[: -len(".weight")] for d, s in d2s.items() if d.endswith(".weight")}


def _make_trainable(module: nn.Module) -> None:
    """Replace inference-tensor parameters by equal normal tensors.

    ComfyUI loads models under torch.inference_mode(); autograd cannot save such
    tensors for backward, so a LoRA beside a frozen layer could not train. The
    values are copied bit for bit; only the tensor objects change.
    """
    for name, param in list(module.named_parameters()):
        if param.is_inference():
            comfy.utils.set_attr_param(module, name, param.clone())
    for name, buf in list(module.named_buffers()):
        if buf.is_inference():
            comfy.utils.set_attr(module, name, buf.clone())
