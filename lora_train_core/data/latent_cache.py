"""Latents for training: encoded once and cached (RAM or disk), or per step.

A disk entry is a safetensors file whose name and metadata carry a key made of
the image's content hash, its bucket, resize and crop, and the VAE's weight
fingerprint. Any change to one of them gives another key, so a stale latent is
never reused; an entry that cannot be read (a kill mid-write, a foreign file)
is encoded again. kohya's cache checks only that keys exist (KOHYA_FACTS, "Caches").
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..atomic_io import atomic_save_safetensors
from ..errors import ConfigError, check_choice
from ..model.backend import Backend
from .buckets import BucketAssignment, BucketPlan, load_bucketed_pixels
from .dataset import Dataset

log = logging.getLogger(__name__)
CACHE_FORMAT = "lora_train_core.latents.v1"


@dataclass(frozen=True)
class CacheConfig:
    """[cache] section: what is encoded once, and where it is kept."""

    mode: str = "ram"  # latents: encoded once and kept in RAM or on disk, or "none": encoded every step
    cache_dir: Path | None = None  # the disk cache's folder; unset: <dataset>/.latent_cache
    # text-encoder outputs, the same choice (kohya cache_text_encoder_outputs[_to_disk]); only while the
    # text encoder is frozen and captions do not change per step
    text_encoder_outputs: str = "none"

    def __post_init__(self):
        check_choice("cache.mode", self.mode, ("ram", "disk", "none"))
        check_choice("cache.text_encoder_outputs", self.text_encoder_outputs, ("none", "ram", "disk"))
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))


@dataclass(frozen=True)
class LatentSample:
    latents: torch.Tensor  # (C, h, w)
    original_size: tuple[int, int]  # (w, h) before resize
    crop_left_top: tuple[int, int]
    bucket: tuple[int, int]  # (w, h) target size

    def size_conditioning(self) -> torch.Tensor:
        """SDXL's add_time_ids: original (h, w), crop (top, left), target (h, w)."""
        (ow, oh), (left, top), (bw, bh) = self.original_size, self.crop_left_top, self.bucket
        return torch.tensor([oh, ow, top, left, bh, bw], dtype=torch.float32)


def check_cacheable(mode: str, random_crop: bool) -> None:
    if mode != "none" and random_crop:
        raise ConfigError(
            "cache.mode: latents cannot be cached with buckets.random_crop = true, because each "
            'step needs a new crop; set cache.mode = "none" or turn random_crop off'
        )


def check_cacheable_across_processes(encoded_per_step: bool, world_size: int) -> None:
    """encoded_per_step: cache.mode 'none' (latents from OnTheFlyLatents)."""
    if world_size > 1 and encoded_per_step:
        raise ConfigError(
            "cache.mode: 'none' is not implemented yet for multi-process training; use 'ram' or 'disk'"
        )


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def entry_key(image_digest: str, assignment: BucketAssignment, vae_fingerprint: str) -> str:
    fields = {
        "format": CACHE_FORMAT,
        "image": image_digest,
        "bucket": assignment.bucket,
        "resized": assignment.resized,
        "crop": assignment.crop_left_top,
        "vae": vae_fingerprint,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class CachedLatents:
    """Latents encoded once; `get` returns the cached entry."""

    def __init__(self, samples: Sequence[LatentSample]):
        self.samples = tuple(samples)

    def get(self, index: int, generator: torch.Generator | None = None) -> LatentSample:
        return self.samples[index]


class OnTheFlyLatents:
    """Latents encoded when asked (random crop needs a fresh crop each time)."""

    def __init__(self, dataset: Dataset, plan: BucketPlan, backend: Backend):
        self.dataset, self.plan, self.backend = dataset, plan, backend

    def get(self, index: int, generator: torch.Generator | None = None) -> LatentSample:
        record, assignment = self.dataset.images[index], self.plan.assignments[index]
        pixels, crop = load_bucketed_pixels(record.path, assignment, generator)
        latents = self.backend.encode_images(pixels[None], generator)[0]
        return LatentSample(latents, record.size, crop, assignment.bucket)


def build_latents(
    dataset: Dataset,
    plan: BucketPlan,
    backend: Backend,
    cfg: CacheConfig,
    on_progress: Callable[[int, int], None] | None = None,
) -> CachedLatents | OnTheFlyLatents:
    """Encode every image once (ram/disk), or defer to each step (none)."""
    check_cacheable(cfg.mode, plan.config.random_crop)
    if cfg.mode == "none":
        return OnTheFlyLatents(dataset, plan, backend)
    cache_dir = (cfg.cache_dir or dataset.root / ".latent_cache") if cfg.mode == "disk" else None
    samples = []
    for i, (record, assignment) in enumerate(zip(dataset.images, plan.assignments, strict=True)):
        key = entry_key(file_digest(record.path), assignment, backend.vae_fingerprint)
        sample = _read_entry(cache_dir, key) if cache_dir else None
        if sample is None:
            sample = _encode(record.path, record.size, assignment, backend, key)
            if cache_dir:
                _write_entry(cache_dir, key, sample)
        samples.append(sample)
        if on_progress:
            on_progress(i + 1, len(dataset.images))
    return CachedLatents(samples)


def _encode(path: Path, size, assignment: BucketAssignment, backend: Backend, key: str) -> LatentSample:
    # The posterior sample is seeded by the entry key, so RAM and disk caches hold the same latent.
    generator = torch.Generator(backend.device).manual_seed(int(key[:15], 16))
    pixels, crop = load_bucketed_pixels(path, assignment)
    latents = backend.encode_images(pixels[None], generator)[0].to("cpu", torch.float32)
    return LatentSample(latents, size, crop, assignment.bucket)


def _entry_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"{key[:32]}.safetensors"


def _write_entry(cache_dir: Path, key: str, sample: LatentSample) -> None:
    meta = {
        "key": key,
        "original_size": json.dumps(sample.original_size),
        "crop_left_top": json.dumps(sample.crop_left_top),
        "bucket": json.dumps(sample.bucket),
    }
    atomic_save_safetensors(_entry_path(cache_dir, key), {"latents": sample.latents}, meta)


def _read_entry(cache_dir: Path, key: str) -> LatentSample | None:
    path = _entry_path(cache_dir, key)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            latents = f.get_tensor("latents")
            sample = LatentSample(
                latents,
                tuple(json.loads(meta["original_size"])),
                tuple(json.loads(meta["crop_left_top"])),
                tuple(json.loads(meta["bucket"])),
            )
    except Exception as exc:  # a torn or foreign file: encode again rather than fail
        log.warning("latent cache entry %s unreadable (%s); encoding again", path, exc)
        return None
    return sample
