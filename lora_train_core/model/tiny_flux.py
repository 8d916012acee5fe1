"""Tiny Flux.1 (dev, schnell) and Chroma models with seeded random weights, built on the spot.

The real classes (diffusers' FluxTransformer2DModel / ChromaTransformer2DModel, the 16-channel
AutoencoderKL with the Flux AE's shift, transformers' CLIPTextModel and T5EncoderModel) at a size
that trains in seconds on a CPU, and a T5-style tokenizer (word-level, `</s>` appended, `<pad>` 0)
written as a tokenizer.json with no download.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ChromaTransformer2DModel, FluxTransformer2DModel
from transformers import AutoTokenizer, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from ..families import ModelFamily, get_family
from .flux_backend import FluxBackend, folder_layout
from .tiny_models import _text_config, tiny_tokenizer, tiny_vae, write_tiny_tokenizer

T5_HIDDEN = 32
T5_WORDS = 256  # the vocabulary: special tokens, the demo's caption words, then filler
TINY_T5_LENGTH = 32  # what tiny_flux_backend pads T5 to (a saved folder uses the family's length)
SPECIAL = ("<pad>", "</s>", "<unk>")
# the demo's caption words (demo.make_synthetic_dataset), so its captions are not all <unk>
CAPTION_WORDS = ("a", "red", "green", "blue", "yellow", "circle", "square", "background", "flat", "colors")


def tiny_flux_transformer(family: ModelFamily):
    common = dict(
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_HIDDEN,
        axes_dims_rope=(2, 2, 4),  # sums to attention_head_dim
    )
    if not family.pooled_text:  # Chroma: no CLIP-L, a small approximator
        return ChromaTransformer2DModel(
            **common, approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1
        )
    return FluxTransformer2DModel(
        **common, pooled_projection_dim=_text_config().hidden_size, guidance_embeds=family.guidance_input
    )


def tiny_flux_vae(family: ModelFamily) -> AutoencoderKL:
    vae = tiny_vae(family.name)
    vae.register_to_config(shift_factor=family.vae_shift_factor)
    return vae


def tiny_t5() -> T5EncoderModel:
    config = T5Config(
        vocab_size=T5_WORDS,
        d_model=T5_HIDDEN,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


def write_tiny_t5_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer saved as tokenizer.json: T5's special ids (<pad> 0, </s> 1, <unk> 2),
    lower-cased words split on spaces and punctuation, `</s>` appended as T5's tokenizer does."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    words = [*CAPTION_WORDS, ",", "shape", "photo", "of"]
    vocab = {token: i for i, token in enumerate([*SPECIAL, *words])}
    vocab |= {f"w{i}": i for i in range(len(vocab), T5_WORDS)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )
    fast.save_pretrained(folder)
    return folder


def tiny_t5_tokenizer():
    with tempfile.TemporaryDirectory() as tmp:
        return AutoTokenizer.from_pretrained(write_tiny_t5_tokenizer(Path(tmp)))


def tiny_flux_components(family: str, seed: int = 0):
    """(transformer, vae, text_encoders, tokenizers) of a tiny `family` model, weights from `seed`:
    encoders [CLIP-L, T5] for Flux, [T5] for Chroma."""
    spec = get_family(family)
    torch.manual_seed(seed)
    transformer, vae = tiny_flux_transformer(spec), tiny_flux_vae(spec)
    encoders, tokenizers = [], []
    if spec.pooled_text:
        encoders.append(CLIPTextModel(_text_config()))
        tokenizers.append(tiny_tokenizer())
    encoders.append(tiny_t5())
    tokenizers.append(tiny_t5_tokenizer())
    return transformer, vae, encoders, tokenizers


def tiny_flux_backend(family: str = "flux_dev", seed: int = 0, **placement) -> FluxBackend:
    """A FluxBackend over tiny_flux_components; `placement`: device, weight_dtype, fp8_base."""
    transformer, vae, encoders, tokenizers = tiny_flux_components(family, seed)
    return FluxBackend(
        transformer, vae, encoders, tokenizers, family=family, t5_max_length=TINY_T5_LENGTH, **placement
    )


def save_tiny_flux_model(folder: Path, family: str = "flux_dev", seed: int = 0) -> Path:
    """Write a tiny Flux/Chroma model as the diffusers folder `load_diffusers_backend` reads."""
    spec = get_family(family)
    transformer, vae, encoders, _ = tiny_flux_components(family, seed)
    modules = [transformer, vae, *encoders]
    layout = [name for name in folder_layout(spec) if not name.startswith("tokenizer")]
    for name, module in zip(layout, modules, strict=True):
        module.save_pretrained(folder / name)
    t5 = "_2" if spec.pooled_text else ""
    if spec.pooled_text:
        write_tiny_tokenizer(folder / "tokenizer")
    write_tiny_t5_tokenizer(folder / f"tokenizer{t5}")
    index = {"_class_name": spec.diffusers_pipeline}
    (folder / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    return folder
