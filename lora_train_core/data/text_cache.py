"""Text-encoder outputs encoded once per distinct caption and reused (kohya
`--cache_text_encoder_outputs` / `--cache_text_encoder_outputs_to_disk`).

`CachedTextEncoder` wraps any backend: `encode_text` returns cached rows and every
other member of the backend protocol is the wrapped backend's, so `train()` runs on
it unchanged.
Caching is only exact while the text encoder is frozen and each image's caption
gives the same text at every step; `maybe_cache_text` refuses it otherwise, as
kohya does (KOHYA_FACTS, "Caches"). Unlike kohya, the cached text is the text
training would see: prefix/suffix, first line and secondary separator applied.

A disk entry is a safetensors file named by the SHA-256 of the caption and of a
fingerprint of the text encoders' weights, so another model or caption never
reuses it; an entry that cannot be read is encoded again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import nn

from ..atomic_io import atomic_save_safetensors
from ..errors import ConfigError
from ..families import ModelFamily
from ..model.backend import Backend, PipelineParts, TextConditioning
from ..model.kohya_keys import LoraTarget
from .captions import CaptionConfig, process_caption
from .dataset import Dataset
from .latent_cache import CacheConfig

if TYPE_CHECKING:  # a data component does not import the orchestrator's package
    from ..run.train import TrainingRecipe

log = logging.getLogger(__name__)
CACHE_FORMAT = "lora_train_core.text.v1"
# The caption options that make one caption's text differ between steps (CaptionConfig.varies_per_step).
PER_STEP_CAPTION_OPTIONS = (
    "shuffle_caption",
    "caption_dropout_rate",
    "caption_tag_dropout_rate",
    "caption_dropout_every_n_epochs",
    "enable_wildcard",
)


class CachedTextEncoder:
    """A backend whose `encode_text` returns cached outputs, each caption encoded once.

    Outputs are kept on the CPU and moved to the backend's device per batch. With
    `cache_dir`, each output is also stored on disk, keyed by the backend's
    `text_encoder_fingerprint`, and read back by later runs. `encoded_count`
    counts the captions that went through the text encoder. Every other member of
    the Backend protocol is the wrapped backend's.
    """

    def __init__(self, backend: Backend, cache_dir: Path | None = None, batch_size: int = 16):
        self.backend = backend
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.batch_size = batch_size
        self.encoded_count = 0
        self._rows: dict[str, TextConditioning] = {}

    def encode_text(self, captions: Sequence[str], weighted: bool = False) -> TextConditioning:
        """The cached outputs for `captions` (a caption not seen before is encoded now)."""
        if weighted:  # the cache holds plain-text outputs (check_text_cacheable refuses the pairing)
            raise ConfigError(
                "cache.text_encoder_outputs: cached outputs are not weighted; "
                "set cache.text_encoder_outputs = 'none' or captions.weighted_captions = false"
            )
        self.prefill(captions)
        return TextConditioning.cat([self._rows[c] for c in captions]).to(self.backend.device)

    # --- the rest of the Backend protocol: the wrapped backend's --------------------------------
    @property
    def family(self) -> str:
        return self.backend.family

    @property
    def family_spec(self) -> ModelFamily:
        return self.backend.family_spec

    @property
    def prediction_type(self) -> str:
        return self.backend.prediction_type

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.backend.alphas_cumprod

    @property
    def fp8_base(self) -> bool:
        return self.backend.fp8_base

    @property
    def base_model_name(self) -> str:
        return self.backend.base_model_name

    @property
    def vae_fingerprint(self) -> str:
        return self.backend.vae_fingerprint

    @property
    def text_encoder_fingerprint(self) -> str:
        return self.backend.text_encoder_fingerprint

    def base_model_fingerprint(self) -> str:
        return self.backend.base_model_fingerprint()

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.backend.encode_images(pixels, generator)

    def predict(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text: TextConditioning,
        size_conditioning: torch.Tensor | None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.backend.predict(noisy_latents, timesteps, text, size_conditioning, guidance)

    def lora_targets(self, include_conv: bool, unet: bool, text_encoder: bool) -> list[LoraTarget]:
        return self.backend.lora_targets(include_conv, unet, text_encoder)

    def trainable_modules(self) -> list[nn.Module]:
        return self.backend.trainable_modules()

    def parkable_modules(self, latents_cached: bool, text_cached: bool) -> list[nn.Module]:
        return self.backend.parkable_modules(latents_cached, text_cached)

    def set_gradient_checkpointing(self, enabled: bool, preserve_rng_state: bool = True) -> None:
        self.backend.set_gradient_checkpointing(enabled, preserve_rng_state)

    def pipeline_parts(self) -> PipelineParts | None:
        return self.backend.pipeline_parts()

    # --- the cache ------------------------------------------------------------------------------

    def prefill(self, captions: Iterable[str]) -> None:
        """Make sure every caption has an output: read from disk, else encode in batches."""
        missing = [c for c in dict.fromkeys(captions) if c not in self._rows]
        if self.cache_dir is not None:
            for caption in missing:
                row = self._read_entry(caption)
                if row is not None:
                    self._rows[caption] = row
            missing = [c for c in missing if c not in self._rows]
        for start in range(0, len(missing), self.batch_size):
            self._encode(missing[start : start + self.batch_size])

    def _encode(self, batch: list[str]) -> None:
        with torch.no_grad():
            out = self.backend.encode_text(batch)
        self.encoded_count += len(batch)
        for i, caption in enumerate(batch):
            row = out.index([i]).to("cpu")  # indexing copies, so the batch is not kept alive
            self._rows[caption] = row
            if self.cache_dir is not None:
                self._write_entry(caption, row)

    def _key(self, caption: str) -> str:
        fields = {"format": CACHE_FORMAT, "caption": caption, "text_encoders": self.text_encoder_fingerprint}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def _entry_path(self, key: str) -> Path:
        return self.cache_dir / f"{key[:32]}.safetensors"

    def _write_entry(self, caption: str, row: TextConditioning) -> None:
        key = self._key(caption)
        tensors = {"hidden": row.hidden[0]}
        if row.pooled is not None:
            tensors["pooled"] = row.pooled[0]
        if row.attention_mask is not None:
            tensors["attention_mask"] = row.attention_mask[0]
        atomic_save_safetensors(self._entry_path(key), tensors, {"key": key})

    def _read_entry(self, caption: str) -> TextConditioning | None:
        key = self._key(caption)
        path = self._entry_path(key)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    return None
                names = set(f.keys())
                hidden = f.get_tensor("hidden")[None]
                pooled = f.get_tensor("pooled")[None] if "pooled" in names else None
                mask = f.get_tensor("attention_mask")[None] if "attention_mask" in names else None
        except Exception as exc:  # a torn or foreign file: encode again rather than fail
            log.warning("text-encoder cache entry %s unreadable (%s); encoding again", path, exc)
            return None
        return TextConditioning(hidden, pooled, mask)


def check_text_cacheable(mode: str, train_text_encoder: bool, captions: CaptionConfig) -> None:
    """Raise ConfigError when cached outputs would differ from what training encodes."""
    if mode == "none":
        return
    if train_text_encoder:
        raise ConfigError(
            f"cache.text_encoder_outputs: {mode!r} needs a frozen text encoder, but "
            "network.train_text_encoder = true trains it; set network.train_text_encoder = false "
            "or cache.text_encoder_outputs = 'none'"
        )
    if captions.weighted_captions:
        # The cache keys and encodes plain text; kohya refuses this pairing too (sdxl_train.py).
        raise ConfigError(
            f"cache.text_encoder_outputs: {mode!r} is not supported with captions.weighted_captions = true; "
            "set cache.text_encoder_outputs = 'none' or captions.weighted_captions = false"
        )
    if captions.varies_per_step:
        varying = [
            f"captions.{name} = {getattr(captions, name)!r}"
            for name in PER_STEP_CAPTION_OPTIONS
            if getattr(captions, name)
        ]
        raise ConfigError(
            f"cache.text_encoder_outputs: {mode!r} encodes each caption once, but "
            f"{', '.join(varying) or 'a caption option'} changes the text at every step; "
            "turn that off or set cache.text_encoder_outputs = 'none'"
        )


def static_captions(dataset: Dataset, recipe: TrainingRecipe) -> list[str]:
    """Each image's text as training sees it when no caption option varies per step."""
    # With no per-step option, process_caption draws nothing and ignores the epoch.
    return [
        process_caption(image.caption, recipe.captions_for(image.subset), 1, random.Random(0))
        for image in dataset.images
    ]


def text_cache_dir(cache_cfg: CacheConfig, dataset: Dataset) -> Path:
    """`<cache.cache_dir>/text_encoder_outputs`, by default `<dataset>/.text_encoder_cache`."""
    if cache_cfg.cache_dir is not None:
        return cache_cfg.cache_dir / "text_encoder_outputs"
    return dataset.root / ".text_encoder_cache"


def maybe_cache_text(
    backend: Backend, dataset: Dataset, cache_cfg: CacheConfig, recipe: TrainingRecipe
) -> Backend:
    """`backend` wrapped in a filled CachedTextEncoder per cache.text_encoder_outputs, or unchanged.

    Disk entries go to `<cache.cache_dir>/text_encoder_outputs`, by default
    `<dataset>/.text_encoder_cache`. Raises ConfigError when caching is refused.
    """
    mode = cache_cfg.text_encoder_outputs
    for captions in recipe.all_captions():
        check_text_cacheable(mode, recipe.network.train_text_encoder, captions)
    if mode == "none":
        return backend
    cache_dir = None
    if mode == "disk":
        cache_dir = text_cache_dir(cache_cfg, dataset)
    cached = CachedTextEncoder(backend, cache_dir)
    cached.prefill(static_captions(dataset, recipe))
    return cached
