"""Aspect-ratio buckets, exactly as kohya sd-scripts makes and fills them.

Sources: `library/model_util.py make_bucket_resolutions` and
`library/train_util.py BucketManager.select_bucket`, `trim_and_resize_if_required`,
`BaseDataset.make_buckets` / `shuffle_buckets` (KOHYA_FACTS, "Buckets").
Our one difference: an epoch's order is drawn from `random.Random(seed + epoch)`
starting from the plan's fixed order, where kohya reseeds the global `random`
and shuffles its lists in place, so its order also depends on earlier epochs.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, DatasetError, check_int
from ..families import get_family
from .dataset import ImageRecord
from .images import load_rgb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BucketConfig:
    """[buckets] section, with kohya's option names and defaults."""

    resolution: tuple[int, int] = (512, 512)  # [width, height] of the training area; it bounds every bucket
    min_bucket_reso: int = 256  # the shortest bucket side, in pixels
    max_bucket_reso: int = 1024  # the longest bucket side, in pixels
    bucket_reso_steps: int = 64  # bucket sides are multiples of this (the VAE needs multiples of 8)
    # buckets follow the image sizes and never upscale (min/max_bucket_reso must then stay at their defaults)
    bucket_no_upscale: bool = False
    random_crop: bool = False  # crop at a random place instead of the centre (needs cache.mode = "none")
    # aspect-ratio buckets; false is kohya's fixed-size mode: every image is resized to cover `resolution`
    # and cropped to it
    enable_bucket: bool = True

    def __post_init__(self):
        if isinstance(self.resolution, list):
            object.__setattr__(self, "resolution", tuple(self.resolution))
        for flag in ("bucket_no_upscale", "random_crop", "enable_bucket"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"buckets.{flag}: {getattr(self, flag)!r} is not true or false")
        steps = self.bucket_reso_steps
        check_int("buckets.bucket_reso_steps", steps, 8, hint="64 for SD1.5, 32 or 64 for SDXL")
        if steps % 8:
            raise ConfigError(
                f"buckets.bucket_reso_steps: {steps} is not a multiple of 8 (the VAE's factor); "
                "use 64 for SD1.5, 32 or 64 for SDXL"
            )
        self._check_resolution(steps)
        if not self.enable_bucket and self.bucket_no_upscale:
            raise ConfigError(
                "buckets.bucket_no_upscale: true needs enable_bucket = true; turn one of them off"
            )
        if self.enable_bucket and not self.bucket_no_upscale:
            self._check_min_max(steps)
        else:
            self._check_min_max_unused()

    def _check_resolution(self, steps: int) -> None:
        res = self.resolution
        if not isinstance(res, tuple) or len(res) != 2:
            raise ConfigError(f"buckets.resolution: {res!r} is not (width, height); use e.g. (512, 512)")
        for side in res:
            self._check_multiple("buckets.resolution", side, steps)

    @staticmethod
    def _check_multiple(field: str, value: int, steps: int) -> None:
        check_int(field, value, steps, hint=f"a multiple of bucket_reso_steps = {steps}")
        if value % steps:
            lower = value - value % steps
            raise ConfigError(
                f"{field}: {value} is not a multiple of bucket_reso_steps = {steps}; "
                f"use {lower} or {lower + steps}"
            )

    def _check_min_max(self, steps: int) -> None:
        # kohya rounds min/max to steps silently, then asserts that they bracket the resolution
        # (BaseDataset.adjust_min_max_bucket_reso_by_steps); we ask for the rounded values.
        for name in ("min_bucket_reso", "max_bucket_reso"):
            self._check_multiple(f"buckets.{name}", getattr(self, name), steps)
        if self.min_bucket_reso > min(self.resolution):
            raise ConfigError(
                f"buckets.min_bucket_reso: {self.min_bucket_reso} is above the resolution's shorter side "
                f"{min(self.resolution)}; use at most {min(self.resolution)}"
            )
        if self.max_bucket_reso < max(self.resolution):
            raise ConfigError(
                f"buckets.max_bucket_reso: {self.max_bucket_reso} is below the resolution's longer side "
                f"{max(self.resolution)}; use at least {max(self.resolution)}"
            )

    def _check_min_max_unused(self) -> None:
        why = (
            "enable_bucket = false"
            if not self.enable_bucket
            else "bucket_no_upscale (buckets follow image sizes)"
        )
        defaults = {f.name: f.default for f in fields(self)}
        for name in ("min_bucket_reso", "max_bucket_reso"):
            if getattr(self, name) != defaults[name]:
                raise ConfigError(
                    f"buckets.{name}: {getattr(self, name)} has no effect with {why}; "
                    f"leave it at {defaults[name]}"
                )


def check_steps_for_family(cfg: BucketConfig, family: str) -> None:
    """Raise ConfigError unless bucket_reso_steps suits the model family (kohya: 64 SD1.5, 32 SDXL;
    16 for Flux.1 / Chroma: the AE's 8 px × the DiT's 2×2 patches)."""
    spec = get_family(family, "model family")
    needed = spec.bucket_reso_step
    if cfg.bucket_reso_steps % needed:
        how = "split the latents into 2×2 patches" if spec.is_flow else "halve the latents evenly"
        raise ConfigError(
            f"buckets.bucket_reso_steps: {cfg.bucket_reso_steps} is not a multiple of {needed}, "
            f"which {spec.title} ({family}) needs so its model can {how}; use {needed} or a multiple"
        )


@dataclass(frozen=True)
class BucketAssignment:
    bucket: tuple[int, int]  # (w, h) of the training crop
    resized: tuple[int, int]  # size after resize, before the crop
    crop_left_top: tuple[int, int] | None  # None with random_crop: drawn per load


@dataclass(frozen=True)
class BucketPlan:
    config: BucketConfig
    assignments: tuple[BucketAssignment, ...]  # parallel to the dataset's images
    buckets: dict[tuple[int, int], tuple[int, ...]]  # bucket -> image indices, each `repeats` times


def make_bucket_resolutions(
    max_reso: tuple[int, int], min_size: int, max_size: int, divisible: int
) -> list[tuple[int, int]]:
    """kohya's predefined buckets: the square of area W*H, and for each width w
    from min_size to max_size in steps of `divisible`, (w, h) and (h, w) with
    h = min(max_size, floor(floor(area / w) / divisible) * divisible) if h >= min_size.
    """
    area = max_reso[0] * max_reso[1]
    side = math.isqrt(area) // divisible * divisible
    resos = {(side, side)}
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, area // width // divisible * divisible)
        if height >= min_size:
            resos |= {(width, height), (height, width)}
    return sorted(resos)


def assign_bucket(
    size: tuple[int, int], cfg: BucketConfig, resolutions: list[tuple[int, int]]
) -> BucketAssignment:
    """kohya's BucketManager.select_bucket for one (width, height).

    Predefined buckets (`resolutions`; with enable_bucket=False pass [resolution]):
    the image's own size if it is one, else the first with the smallest aspect
    error; scaled to cover it, rounded half up. With bucket_no_upscale
    `resolutions` is unused. Crop: centered, floor(excess / 2).
    Raises DatasetError if bucket_no_upscale leaves a side shorter than one step.
    """
    size = (int(size[0]), int(size[1]))
    width, height = size
    if cfg.bucket_no_upscale:
        resized = _no_upscale_size(width, height, cfg)
        bucket = (
            resized[0] - resized[0] % cfg.bucket_reso_steps,
            resized[1] - resized[1] % cfg.bucket_reso_steps,
        )
        if min(bucket) == 0:
            raise DatasetError(
                f"{width}x{height} image is smaller than bucket_reso_steps = {cfg.bucket_reso_steps} on one "
                "side with bucket_no_upscale — use a larger image or turn bucket_no_upscale off"
            )
    else:
        aspect = width / height
        bucket = size if size in resolutions else min(resolutions, key=lambda r: abs(r[0] / r[1] - aspect))
        scale = bucket[1] / height if aspect > bucket[0] / bucket[1] else bucket[0] / width
        resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    crop = None if cfg.random_crop else ((resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2)
    return BucketAssignment(bucket, resized, crop)


def _no_upscale_size(width: int, height: int, cfg: BucketConfig) -> tuple[int, int]:
    """Shrink to the resolution's area if larger, one side rounded to a step multiple."""
    area = cfg.resolution[0] * cfg.resolution[1]
    if width * height <= area:
        return (width, height)
    aspect = width / height
    shrunk_width = math.sqrt(area * aspect)
    shrunk_height = area / shrunk_width
    steps = cfg.bucket_reso_steps

    def to_steps(x: float) -> int:
        x = int(x + 0.5)
        return x - x % steps

    def aspect_error(w: int, h: int) -> float:
        # kohya divides by zero here for extreme aspects; such sizes lose the comparison.
        return abs(w / h - aspect) if h > 0 and w > 0 else math.inf

    rounded_width = to_steps(shrunk_width)
    rounded_height = to_steps(shrunk_height)
    width_error = aspect_error(rounded_width, to_steps(rounded_width / aspect))
    height_error = aspect_error(to_steps(rounded_height * aspect), rounded_height)
    if width_error < height_error:
        return (rounded_width, int(rounded_width / aspect + 0.5))
    return (int(rounded_height * aspect + 0.5), rounded_height)


def plan_buckets(images: Sequence[ImageRecord], cfg: BucketConfig) -> BucketPlan:
    """Assign every image a bucket and fill buckets with indices × repeats (kohya make_buckets).

    Raises DatasetError listing every image that fits no bucket.
    """
    if not cfg.enable_bucket:
        resolutions = [cfg.resolution]
    elif cfg.bucket_no_upscale:
        resolutions = []
        log.info("bucket_no_upscale: buckets follow image sizes, min/max_bucket_reso do not apply")
    else:
        resolutions = make_bucket_resolutions(
            cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps
        )
    assignments, problems = [], []
    for record in images:
        try:
            assignments.append(assign_bucket(record.size, cfg, resolutions))
        except DatasetError as error:
            problems.append(f"{record.path}: {error}")
    if problems:
        raise DatasetError(f"{len(problems)} image(s) fit no bucket", problems)
    filled: dict[tuple[int, int], list[int]] = {}
    for index, (record, assignment) in enumerate(zip(images, assignments, strict=True)):
        filled.setdefault(assignment.bucket, []).extend([index] * record.repeats)
    buckets = {bucket: tuple(filled[bucket]) for bucket in sorted(filled)}
    return BucketPlan(cfg, tuple(assignments), buckets)


def epoch_batches(
    plan: BucketPlan, batch_size: int, seed: int, epoch: int
) -> list[tuple[tuple[int, int], tuple[int, ...]]]:
    """One epoch's batches as (bucket, image indices), every batch from one bucket.

    kohya's shuffle_buckets, with random.Random(seed + epoch): shuffle the list
    of (bucket, batch number), then each bucket's contents (in bucket order);
    batch b of a bucket is its items [b*batch_size, (b+1)*batch_size), the last
    one possibly short.
    """
    check_int("train.train_batch_size", batch_size, 1, hint="images per step, e.g. 1-8")
    rng = random.Random(seed + epoch)
    slots = [
        (bucket, b)
        for bucket, items in plan.buckets.items()
        for b in range(math.ceil(len(items) / batch_size))
    ]
    rng.shuffle(slots)
    contents = {}
    for bucket, items in plan.buckets.items():
        shuffled = list(items)
        rng.shuffle(shuffled)
        contents[bucket] = shuffled
    return [(bucket, tuple(contents[bucket][b * batch_size : (b + 1) * batch_size])) for bucket, b in slots]


def bucket_report(plan: BucketPlan) -> str:
    """One line per bucket, sorted: "bucket 512x512: 12 images (36 with repeats)"."""
    lines = []
    for (w, h), items in sorted(plan.buckets.items()):
        count = len(set(items))
        lines.append(f"bucket {w}x{h}: {count} image{'s' * (count != 1)} ({len(items)} with repeats)")
    return "\n".join(lines)


def load_bucketed_pixels(
    path: Path, assignment: BucketAssignment, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """The image resized and cropped to its bucket: (3, H, W) float32 in [-1, 1], and (left, top).

    kohya's trim_and_resize_if_required: area (Image.BOX) when no side grows,
    else Lanczos. A random crop (assignment.crop_left_top is None) draws
    left, then top, each uniform in [0, excess], from `generator`.
    """
    image = load_rgb(path)
    if image.size != assignment.resized:
        shrinking = image.width >= assignment.resized[0] and image.height >= assignment.resized[1]
        image = image.resize(
            assignment.resized, Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS
        )
    (bw, bh), (rw, rh) = assignment.bucket, assignment.resized
    if assignment.crop_left_top is not None:
        left, top = assignment.crop_left_top
    elif generator is None:
        raise ValueError("load_bucketed_pixels: a random crop needs a torch.Generator")
    else:
        left = int(torch.randint(0, rw - bw + 1, (1,), generator=generator, device=generator.device))
        top = int(torch.randint(0, rh - bh + 1, (1,), generator=generator, device=generator.device))
    pixels = np.asarray(image.crop((left, top, left + bw, top + bh)), dtype=np.float32)
    tensor = torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1).contiguous()
    return tensor, (left, top)
