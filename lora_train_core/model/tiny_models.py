"""Tiny SD1.5- and SDXL-shaped models with seeded random weights, built on the spot.

Used by the demo and the tests: the real architectures (UNet with cross
attention, KL VAE with 8× downscale, CLIP text encoders, SDXL's size
conditioning and two encoders) at a size that trains in seconds on a CPU, and
a byte-level CLIP tokenizer made without downloading a vocabulary.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..families import get_family
from .diffusers_backend import DiffusersBackend, text_encoder_suffixes

TOKEN_LENGTH = 32
HIDDEN = 32


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values (the byte-level BPE alphabet)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_tiny_tokenizer(folder: Path) -> Path:
    """A CLIP tokenizer whose vocabulary is the byte alphabet alone (no merges): 514 tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate([*symbols, *(s + "</w>" for s in symbols)])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    config = {"model_max_length": TOKEN_LENGTH, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def tiny_tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(write_tiny_tokenizer(Path(tmp)))


def _text_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=514,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TOKEN_LENGTH,
        projection_dim=HIDDEN,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )


def tiny_vae(family: str) -> AutoencoderKL:
    spec = get_family(family)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=spec.latent_channels,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=spec.vae_scaling_factor,
    )


def tiny_unet(family: str) -> UNet2DConditionModel:
    channels = get_family(family).latent_channels
    common = dict(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=2,
        block_out_channels=(32, 64),
        norm_num_groups=32,
    )
    if family == "sd15":
        return UNet2DConditionModel(
            **common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=HIDDEN,
            attention_head_dim=8,
        )
    time_embed_dim = 8
    return UNet2DConditionModel(
        **common,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * HIDDEN,
        attention_head_dim=(4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + HIDDEN,
    )


def tiny_components(family: str, seed: int = 0):
    """(unet, vae, text_encoders, tokenizers) with weights drawn from `seed`."""
    spec = get_family(family)
    torch.manual_seed(seed)
    unet, vae = tiny_unet(family), tiny_vae(family)
    text_encoders = [CLIPTextModel(_text_config()) for _ in spec.text_encoder_prefixes[1:]]
    last = CLIPTextModelWithProjection if spec.pooled_text else CLIPTextModel  # its projection: pooled text
    text_encoders.append(last(_text_config()))
    tokenizers = [tiny_tokenizer() for _ in text_encoders]
    return unet, vae, text_encoders, tokenizers


def tiny_backend(
    family: str = "sd15", seed: int = 0, prediction_type: str = "epsilon", **placement
) -> DiffusersBackend:
    """A DiffusersBackend over tiny_components (a tiny_flux backend for Flux.1 and Chroma);
    `placement`: device, weight_dtype, fp8_base."""
    if get_family(family).is_flow:
        from .tiny_flux import tiny_flux_backend

        return tiny_flux_backend(family, seed, **placement)
    unet, vae, text_encoders, tokenizers = tiny_components(family, seed)
    return DiffusersBackend(
        unet, vae, text_encoders, tokenizers, family=family, prediction_type=prediction_type, **placement
    )


def save_tiny_model(folder: Path, family: str = "sd15", seed: int = 0) -> Path:
    """Write a tiny model as a diffusers folder that `load_diffusers_backend` reads."""
    if get_family(family).is_flow:
        from .tiny_flux import save_tiny_flux_model

        return save_tiny_flux_model(folder, family, seed)
    unet, vae, text_encoders, _ = tiny_components(family, seed)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    for suffix, te in zip(text_encoder_suffixes(get_family(family)), text_encoders, strict=True):
        te.save_pretrained(folder / f"text_encoder{suffix}")
        write_tiny_tokenizer(folder / f"tokenizer{suffix}")
    index = {"_class_name": get_family(family).diffusers_pipeline}
    (folder / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    return folder
