"""Flux.1 dev/schnell and Chroma on diffusers + transformers models (the CLI's flow backend).

The denoiser is diffusers' `FluxTransformer2DModel` / `ChromaTransformer2DModel`, which takes the
latent as 2×2-packed tokens and σ as its time (it multiplies by 1000 itself). Conditioning as kohya's
flux_train_network.py builds it: T5-XXL's last hidden state padded to the family's length
(`t5xxl_max_token_length`) and, for Flux, CLIP-L's pooled output (`y`, diffusers'
`pooled_projections`); Chroma has no CLIP-L and applies the T5 attention mask. The placement,
fingerprints, fp8 storage and checkpointing are DiffusersBackend's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from ..families import ModelFamily, get_family
from ..families.flux import diffusers_targets
from .backend import TextConditioning
from .diffusers_backend import DiffusersBackend
from .kohya_keys import LoraTarget, text_encoder_targets

TRANSFORMER_CLASSES = {
    "FluxTransformer2DModel": "flux",  # dev or schnell, by the config's guidance_embeds
    "ChromaTransformer2DModel": "chroma",
}


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, (H/2)(W/2), 4C): each 2×2 patch one token, features in (c, ph, pw) order,
    tokens row-major, as diffusers' FluxPipeline._pack_latents and kohya's flux_utils.pack_latents."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for a latent of `height` × `width`."""
    b, _, features = tokens.shape
    c = features // 4
    patches = tokens.reshape(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, height, width)


def image_ids(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(rows·cols, 3) position ids of the packed tokens: [0, row, col] (the RoPE axes of Flux)."""
    row, col = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    ids = torch.stack([torch.zeros_like(row), row, col], dim=-1).reshape(rows * cols, 3)
    return ids.to(device, dtype)


def chroma_text_mask(tokenizer_mask: torch.Tensor) -> torch.Tensor:
    """The caption's tokens and the first padding token (diffusers' ChromaPipeline; kohya's Chroma
    trims the text to the valid tokens plus `attn_padding` = 1)."""
    valid = tokenizer_mask.sum(dim=1, keepdim=True)
    return torch.arange(tokenizer_mask.shape[1], device=tokenizer_mask.device)[None] <= valid


class FluxBackend(DiffusersBackend):
    """The backend protocol over a Flux or Chroma transformer, its AE and text encoders in memory.

    text_encoders / tokenizers: Flux [CLIP-L, T5-XXL]; Chroma [T5-XXL]. Only CLIP-L can take a
    text-encoder LoRA (the family's `text_encoder_prefixes`); T5 stays frozen and in eval mode.
    t5_max_length: the T5 padding length; the family's (kohya's default) when None.
    """

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module,
        text_encoders: Sequence[nn.Module],
        tokenizers: Sequence,
        family: str,
        device: torch.device | str = "cpu",
        weight_dtype: torch.dtype = torch.float32,
        fp8_base: bool = False,
        model_name: str = "in-memory",
        t5_max_length: int | None = None,
    ):
        self.family_spec = spec = get_family(family)
        if not spec.is_flow or not spec.t5_max_length:
            raise ModelError(f"FluxBackend: {spec.title} is not flux_dev, flux_schnell or chroma")
        expected = len(spec.text_encoder_prefixes) + 1  # the LoRA-able CLIP-L (Flux), then T5
        if len(text_encoders) != expected or len(tokenizers) != expected:
            raise ModelError(f"a {spec.title} model has {expected} text encoder(s), got {len(text_encoders)}")
        self.prediction_type = "flow"
        self._place_models(transformer, vae, text_encoders, tokenizers, device, weight_dtype, fp8_base)
        self.text_encoders[-1].eval()  # T5 is never trained: no dropout
        self.alphas_cumprod = None
        self.base_model_name = model_name
        self.t5_max_length = t5_max_length or spec.t5_max_length

    @property
    def transformer(self) -> nn.Module:
        return self.unet

    @property
    def lora_text_encoders(self) -> list[nn.Module]:
        """The encoders that may take a LoRA: CLIP-L for Flux, none for Chroma."""
        return self.text_encoders[:-1]

    def encode_text(self, captions: Sequence[str], weighted: bool = False) -> TextConditioning:
        if weighted:
            raise ConfigError(
                f"captions.weighted_captions: not implemented yet for {self.family_spec.title}; "
                "set it to false"
            )
        captions = list(captions)
        t5_tokens = self.tokenizers[-1](
            captions,
            padding="max_length",
            max_length=self.t5_max_length,
            truncation=True,
            return_tensors="pt",
        ).to(self.device)
        masked = self.family_spec.t5_attention_mask
        # kohya passes T5 the mask only with apply_t5_attn_mask (Chroma); Flux's T5 sees the padding
        hidden = self.text_encoders[-1](
            t5_tokens.input_ids, attention_mask=t5_tokens.attention_mask if masked else None
        ).last_hidden_state
        pooled = None
        if self.family_spec.pooled_text:
            clip_ids = self._token_ids(self.tokenizers[0], captions)
            pooled = self.text_encoders[0](clip_ids).pooler_output
        mask = chroma_text_mask(t5_tokens.attention_mask) if masked else None
        return TextConditioning(hidden, pooled, mask)

    def encode_token_ids(self, ids: Sequence[torch.Tensor]) -> TextConditioning:
        raise ConfigError(f"weighted captions are not implemented yet for {self.family_spec.title}")

    def predict(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text: TextConditioning,
        size_conditioning: torch.Tensor | None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """v̂ for x_t (B, 16, H, W) at σ = `timesteps` (B,); see Backend.predict."""
        spec, dtype = self.family_spec, self.weight_dtype
        _, _, height, width = noisy_latents.shape
        tokens = pack_latents(noisy_latents.to(self.device, dtype))
        extra = {}
        if spec.guidance_input:
            if guidance is None:
                raise ValueError(f"{spec.title} needs a guidance value")
            extra["guidance"] = guidance.to(self.device, dtype)  # raw: the transformer scales it by 1000
        elif guidance is not None:
            raise ValueError(f"{spec.title} has no guidance input")
        if spec.pooled_text:
            extra["pooled_projections"] = text.pooled.to(dtype)
        if spec.t5_attention_mask:
            # the joint sequence is [text, image]; every image token is attended
            image_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=self.device)
            extra["attention_mask"] = torch.cat([text.attention_mask.to(self.device), image_mask], dim=1)
        out = self.unet(
            hidden_states=tokens,
            encoder_hidden_states=text.hidden.to(dtype),
            timestep=timesteps.to(self.device, dtype),
            img_ids=image_ids(height // 2, width // 2, self.device, dtype),
            txt_ids=torch.zeros(text.hidden.shape[1], 3, device=self.device, dtype=dtype),
            return_dict=False,
            **extra,
        )[0]
        return unpack_latents(out, height, width)

    def lora_targets(self, include_conv: bool, unet: bool, text_encoder: bool) -> list[LoraTarget]:
        targets = diffusers_targets(self.unet) if unet else []
        if text_encoder:
            prefixes = self.family_spec.text_encoder_prefixes
            for te, prefix in zip(self.lora_text_encoders, prefixes, strict=True):
                targets += text_encoder_targets(te, prefix)
        return targets

    def trainable_modules(self) -> list[nn.Module]:
        return [self.unet, *self.lora_text_encoders]

    def pipeline_parts(self) -> None:
        """None: validation samples for Flux and Chroma are not implemented yet (sampling refuses
        [samples] prompts with a message)."""
        return None


# --- detection and loading from a diffusers folder --------------------------------------------


def detect_flux_folder(path: Path) -> str | None:
    """flux_dev, flux_schnell or chroma from `path/transformer/config.json` (no weights read);
    None where the folder has no transformer/ (an SD folder)."""
    config_path = path / "transformer" / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.path: cannot read {str(config_path)!r} ({exc})") from exc
    kind = TRANSFORMER_CLASSES.get(config.get("_class_name"))
    if kind is None:
        raise ModelError(
            f"model.path: {str(path)!r} holds a {config.get('_class_name')!r} transformer; the CLI trains "
            f"{', '.join(TRANSFORMER_CLASSES)} (Flux.1 dev/schnell, Chroma) and SD1.x/2.x/SDXL UNets"
        )
    if kind == "flux":
        return "flux_dev" if config.get("guidance_embeds") else "flux_schnell"
    return kind


def folder_layout(family: ModelFamily) -> dict[str, str]:
    """The subfolders a diffusers folder of the family has, and what each holds."""
    layout = {"transformer": "the transformer", "vae": "the AE"}
    t5 = "_2" if family.pooled_text else ""  # Flux's CLIP-L comes first; Chroma's T5 alone is text_encoder
    if family.pooled_text:
        layout |= {"text_encoder": "CLIP-L", "tokenizer": "CLIP-L's tokenizer"}
    return layout | {f"text_encoder{t5}": "T5-XXL", f"tokenizer{t5}": "T5's tokenizer"}


def check_flux_folder(path: Path, family: ModelFamily) -> None:
    """ModelError naming the missing subfolders, before anything loads."""
    layout = folder_layout(family)
    missing = [f"{name}/ ({what})" for name, what in layout.items() if not (path / name).is_dir()]
    if missing:
        raise ModelError(
            f"model.path: {str(path)!r} is not a complete {family.title} diffusers folder: missing "
            f"{', '.join(missing)}"
        )


def load_flux_backend(
    path: Path,
    family: ModelFamily,
    device: torch.device | str = "cpu",
    weight_dtype: torch.dtype = torch.float32,
    fp8_base: bool = False,
) -> FluxBackend:
    """A FluxBackend over the diffusers folder `path` of `family` (detected and checked already)."""
    from diffusers import AutoencoderKL, ChromaTransformer2DModel, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    check_flux_folder(path, family)
    transformer_class = FluxTransformer2DModel if family.pooled_text else ChromaTransformer2DModel
    t5 = "_2" if family.pooled_text else ""
    try:
        # loaded in the training dtype: a real T5-XXL is 19 GB in float32
        transformer = transformer_class.from_pretrained(
            path, subfolder="transformer", torch_dtype=weight_dtype
        )
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
        encoders, tokenizers = [], []
        if family.pooled_text:
            clip = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=weight_dtype)
            encoders.append(clip)
            tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"))
        t5_encoder = T5EncoderModel.from_pretrained(path, subfolder=f"text_encoder{t5}", dtype=weight_dtype)
        encoders.append(t5_encoder)
        tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder=f"tokenizer{t5}"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.path: cannot load the model in {str(path)!r}: {exc}") from exc
    return FluxBackend(
        transformer,
        vae,
        encoders,
        tokenizers,
        family=family.name,
        device=device,
        weight_dtype=weight_dtype,
        fp8_base=fp8_base,
        model_name=path.name,
    )


__all__ = ["FluxBackend", "detect_flux_folder", "load_flux_backend", "pack_latents", "unpack_latents"]
