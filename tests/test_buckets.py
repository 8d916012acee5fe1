"""Buckets against kohya's formulas (KOHYA_FACTS "Buckets"), re-derived plainly here."""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_train_core.data.buckets import (
    BucketAssignment,
    BucketConfig,
    assign_bucket,
    bucket_report,
    check_steps_for_family,
    epoch_batches,
    load_bucketed_pixels,
    make_bucket_resolutions,
    plan_buckets,
)
from lora_train_core.data.dataset import ImageRecord
from lora_train_core.errors import ConfigError, DatasetError


def kohya_resolutions(max_reso, min_size, max_size, divisible):
    """model_util.make_bucket_resolutions, transcribed from KOHYA_FACTS."""
    area = max_reso[0] * max_reso[1]
    found = set()
    square = int(math.sqrt(area) // divisible) * divisible
    found.add((square, square))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((area // width) // divisible) * divisible)
        if height >= min_size:
            found.add((width, height))
            found.add((height, width))
        width += divisible
    return sorted(found)


def kohya_select(width, height, resolutions):
    """BucketManager.select_bucket without bucket_no_upscale, transcribed from KOHYA_FACTS."""
    if (width, height) in resolutions:
        bucket = (width, height)
    else:
        errors = [abs(bw / bh - width / height) for bw, bh in resolutions]
        bucket = resolutions[errors.index(min(errors))]
    scale = bucket[1] / height if width / height > bucket[0] / bucket[1] else bucket[0] / width
    resized = (math.floor(width * scale + 0.5), math.floor(height * scale + 0.5))
    crop = ((resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2)
    return bucket, resized, crop


def records(sizes, repeats=None):
    repeats = repeats or [1] * len(sizes)
    return [
        ImageRecord(Path(f"img{i}.png"), "", r, "", s)
        for i, (s, r) in enumerate(zip(sizes, repeats, strict=True))
    ]


def test_sd15_default_resolutions_match_hand_computed_list_and_transcription():
    hand = [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
        (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
        (1024, 256),
    ]  # fmt: skip
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == hand
    assert hand == kohya_resolutions((512, 512), 256, 1024, 64)


@pytest.mark.parametrize(
    "args",
    [((1024, 1024), 256, 2048, 32), ((640, 384), 128, 768, 32), ((768, 512), 320, 960, 64)],
)
def test_resolutions_match_kohya_transcription(args):
    assert make_bucket_resolutions(*args) == kohya_resolutions(*args)


# (image size) -> (bucket, resized, center crop), hand-computed for (512, 512), 256..1024, step 64.
HAND_TABLE = {
    (512, 512): ((512, 512), (512, 512), (0, 0)),  # exact bucket
    (320, 768): ((320, 768), (320, 768), (0, 0)),  # exact non-square bucket
    (1024, 1024): ((512, 512), (512, 512), (0, 0)),
    (100, 100): ((512, 512), (512, 512), (0, 0)),  # tiny: upscaled
    (600, 800): ((448, 576), (448, 597), (0, 10)),  # 800 * 448/600 = 597.3
    (800, 600): ((576, 448), (597, 448), (10, 0)),  # 800 * 448/600
    (1000, 3000): ((256, 832), (277, 832), (10, 0)),  # 1000 * 832/3000 = 277.3
    (513, 512): ((512, 512), (513, 512), (0, 0)),
    (4000, 1000): ((1024, 256), (1024, 256), (0, 0)),  # aspect 4 exactly
    (10000, 100): ((1024, 256), (25600, 256), (12288, 0)),  # wider than any bucket
    (6000, 4000): ((640, 384), (640, 427), (0, 21)),  # huge: 4000 * 640/6000 = 426.7
}


@pytest.mark.parametrize("size", list(HAND_TABLE))
def test_bucket_choice_resize_and_center_crop_match_kohya(size):
    cfg = BucketConfig()
    resolutions = kohya_resolutions((512, 512), 256, 1024, 64)
    got = assign_bucket(size, cfg, make_bucket_resolutions((512, 512), 256, 1024, 64))
    assert (got.bucket, got.resized, got.crop_left_top) == HAND_TABLE[size]
    assert HAND_TABLE[size] == kohya_select(*size, resolutions)


def test_an_image_of_exactly_a_bucket_size_keeps_that_bucket_over_an_equal_aspect_one():
    # kohya checks the exact size before the aspect argmin, which would pick the first (256, 256)
    got = assign_bucket((512, 512), BucketConfig(), [(256, 256), (512, 512)])
    assert (got.bucket, got.resized) == ((512, 512), (512, 512))
    assert assign_bucket((600, 600), BucketConfig(), [(256, 256), (512, 512)]).bucket == (256, 256)


def test_resized_image_always_covers_its_bucket():
    cfg = BucketConfig(resolution=(1024, 1024), max_bucket_reso=2048, bucket_reso_steps=32)
    resolutions = make_bucket_resolutions((1024, 1024), 256, 2048, 32)
    for width in range(100, 3000, 97):
        for height in range(100, 3000, 89):
            a = assign_bucket((width, height), cfg, resolutions)
            assert a.resized[0] >= a.bucket[0] and a.resized[1] >= a.bucket[1]
            assert a.bucket in resolutions


def test_fixed_size_mode_resizes_to_cover_then_center_crops():
    cfg = BucketConfig(enable_bucket=False)
    plan = plan_buckets(records([(800, 600), (512, 512)]), cfg)
    # 600 -> 512: scale 512/600, 800 * 0.8533 = 682.7 -> 683; crop (683 - 512) // 2 = 85
    assert plan.assignments[0] == BucketAssignment((512, 512), (683, 512), (85, 0))
    assert plan.assignments[1] == BucketAssignment((512, 512), (512, 512), (0, 0))
    assert list(plan.buckets) == [(512, 512)]


@pytest.mark.parametrize(
    ("size", "resized", "bucket"),
    [
        ((300, 200), (300, 200), (256, 192)),  # smaller than the area: kept, floored to steps
        ((1024, 1024), (512, 512), (512, 512)),
        # 2000x1000: shrunk to 724.1x362.0; width-rounding 704 -> h 320 (aspect 2.2), height-rounding
        # 320 -> w 640 (aspect 2.0) wins
        ((2000, 1000), (640, 320), (640, 320)),
        # 1000x2000: width-rounding 320 -> h 640 (aspect 0.5) beats 320/704
        ((1000, 2000), (320, 640), (320, 640)),
        ((1500, 1000), (576, 384), (576, 384)),
    ],
)
def test_bucket_no_upscale_matches_hand_computed_sizes(size, resized, bucket):
    cfg = BucketConfig(bucket_no_upscale=True)
    got = assign_bucket(size, cfg, [])
    assert (got.resized, got.bucket) == (resized, bucket)
    assert got.crop_left_top == ((resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2)


def test_bucket_no_upscale_buckets_are_the_sizes_that_occur():
    plan = plan_buckets(records([(300, 200), (2000, 1000), (310, 250)]), BucketConfig(bucket_no_upscale=True))
    assert plan.buckets == {(256, 192): (0, 2), (640, 320): (1,)}


def test_bucket_no_upscale_reports_images_too_small_or_too_thin_for_a_bucket():
    cfg = BucketConfig(bucket_no_upscale=True)
    with pytest.raises(DatasetError) as info:
        plan_buckets(records([(30, 30), (512, 512), (10000, 50)]), cfg)
    assert "img0.png" in str(info.value) and "img2.png" in str(info.value)
    assert "img1.png" not in str(info.value)


def test_plan_repeats_each_index_in_its_bucket():
    plan = plan_buckets(records([(512, 512), (600, 800), (512, 512)], [3, 2, 1]), BucketConfig())
    assert plan.buckets == {(448, 576): (1, 1), (512, 512): (0, 0, 0, 2)}
    assert bucket_report(plan) == (
        "bucket 448x576: 1 image (2 with repeats)\nbucket 512x512: 2 images (4 with repeats)"
    )


def small_plan():
    sizes = [(512, 512)] * 5 + [(600, 800)] * 3 + [(800, 600)] * 2
    return plan_buckets(records(sizes, [2, 1, 3, 1, 1, 2, 2, 1, 1, 4]), BucketConfig())


def test_epoch_batches_are_reproducible_per_seed_and_epoch_and_differ_across_epochs():
    plan = small_plan()
    assert epoch_batches(plan, 2, seed=7, epoch=3) == epoch_batches(plan, 2, seed=7, epoch=3)
    assert epoch_batches(plan, 2, seed=7, epoch=3) != epoch_batches(plan, 2, seed=7, epoch=4)


def test_epoch_batches_hold_every_repeat_once_and_stay_in_one_bucket():
    plan = small_plan()
    batches = epoch_batches(plan, 3, seed=0, epoch=1)
    seen = Counter(i for _, batch in batches for i in batch)
    assert seen == Counter({0: 2, 1: 1, 2: 3, 3: 1, 4: 1, 5: 2, 6: 2, 7: 1, 8: 1, 9: 4})
    for bucket, batch in batches:
        assert 1 <= len(batch) <= 3
        assert all(plan.assignments[i].bucket == bucket for i in batch)
    per_bucket = Counter(bucket for bucket, _ in batches)
    assert per_bucket == {b: math.ceil(len(items) / 3) for b, items in plan.buckets.items()}


def test_epoch_batches_follow_kohya_shuffle_order_with_seed_plus_epoch():
    plan = small_plan()
    rng = random.Random(5 + 2)
    slots = [(b, k) for b, items in plan.buckets.items() for k in range(math.ceil(len(items) / 4))]
    rng.shuffle(slots)
    shuffled = {}
    for b, items in plan.buckets.items():
        shuffled[b] = list(items)
        rng.shuffle(shuffled[b])
    expected = [(b, tuple(shuffled[b][4 * k : 4 * k + 4])) for b, k in slots]
    assert epoch_batches(plan, 4, seed=5, epoch=2) == expected


def test_batch_size_larger_than_every_bucket_gives_one_short_batch_per_bucket():
    plan = small_plan()
    batches = epoch_batches(plan, 64, seed=1, epoch=1)
    assert sorted(len(batch) for _, batch in batches) == sorted(len(v) for v in plan.buckets.values())


def coordinate_image(path: Path, width: int, height: int) -> None:
    """Red encodes x, green encodes y, so a crop's offset can be read from its pixels."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = np.arange(width)[None, :]
    pixels[..., 1] = np.arange(height)[:, None]
    Image.fromarray(pixels).save(path)


def test_random_crop_stays_in_bounds_and_is_reproducible(tmp_path):
    path = tmp_path / "grid.png"
    coordinate_image(path, 80, 72)
    assignment = BucketAssignment((64, 64), (80, 72), None)
    offsets = set()
    for seed in range(20):
        pixels, (left, top) = load_bucketed_pixels(path, assignment, torch.Generator().manual_seed(seed))
        again, crop_again = load_bucketed_pixels(path, assignment, torch.Generator().manual_seed(seed))
        assert (left, top) == crop_again and torch.equal(pixels, again)
        assert 0 <= left <= 16 and 0 <= top <= 8
        assert pixels.shape == (3, 64, 64)
        # the top-left pixel of the crop is the source pixel (left, top)
        assert (pixels[0, 0, 0] + 1) * 127.5 == pytest.approx(left)
        assert (pixels[1, 0, 0] + 1) * 127.5 == pytest.approx(top)
        offsets.add((left, top))
    assert len(offsets) > 5


def test_random_crop_without_generator_is_refused(tmp_path):
    path = tmp_path / "grid.png"
    coordinate_image(path, 80, 72)
    with pytest.raises(ValueError, match="Generator"):
        load_bucketed_pixels(path, BucketAssignment((64, 64), (80, 72), None))


def test_center_crop_and_area_shrink_give_block_means_in_minus_one_to_one(tmp_path):
    path = tmp_path / "blocks.png"
    block = np.array([[0, 40], [80, 120]], np.uint8)  # mean 60
    pixels = np.stack([np.tile(block, (3, 3))] * 3, axis=-1)  # 6x6
    Image.fromarray(pixels).save(path)
    tensor, crop = load_bucketed_pixels(path, BucketAssignment((2, 2), (3, 3), (0, 0)))
    assert crop == (0, 0) and tensor.dtype == torch.float32 and tensor.shape == (3, 2, 2)
    assert torch.allclose(tensor, torch.full((3, 2, 2), 60 / 127.5 - 1))


def test_enlarging_uses_lanczos(tmp_path):
    path = tmp_path / "small.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(path)
    tensor, crop = load_bucketed_pixels(path, BucketAssignment((16, 16), (24, 20), (4, 2)))
    expected = Image.open(path).resize((24, 20), Image.Resampling.LANCZOS).crop((4, 2, 20, 18))
    assert crop == (4, 2)
    want = torch.from_numpy(np.asarray(expected, np.float32) / 127.5 - 1).permute(2, 0, 1)
    assert torch.allclose(tensor, want)
    assert tensor.min() >= -1 and tensor.max() <= 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bucket_reso_steps": 60}, "bucket_reso_steps"),
        ({"bucket_reso_steps": 0}, "bucket_reso_steps"),
        ({"resolution": (512, 500)}, "resolution"),
        ({"min_bucket_reso": 576}, "min_bucket_reso"),  # above the resolution's side
        ({"max_bucket_reso": 448}, "max_bucket_reso"),
        ({"min_bucket_reso": 300}, "min_bucket_reso"),  # not a multiple of 64
        ({"enable_bucket": False, "bucket_no_upscale": True}, "bucket_no_upscale"),
        ({"bucket_no_upscale": True, "max_bucket_reso": 2048}, "max_bucket_reso"),
        ({"enable_bucket": False, "min_bucket_reso": 128}, "min_bucket_reso"),
        ({"random_crop": 1}, "random_crop"),
    ],
)
def test_invalid_bucket_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"buckets.{field}"):
        BucketConfig(**kwargs)


def test_unused_min_max_need_not_be_multiples_of_steps():
    for kwargs in ({"bucket_no_upscale": True}, {"enable_bucket": False}):
        BucketConfig(resolution=(960, 960), bucket_reso_steps=48, **kwargs)  # 256, 1024 are not 48k


def test_steps_must_suit_the_model_family():
    check_steps_for_family(BucketConfig(resolution=(1024, 1024), bucket_reso_steps=32), "sdxl")
    check_steps_for_family(BucketConfig(), "sd15")
    with pytest.raises(ConfigError, match="64"):
        check_steps_for_family(BucketConfig(bucket_reso_steps=32), "sd15")
    with pytest.raises(ConfigError, match="32"):
        cfg = BucketConfig(
            resolution=(960, 960), bucket_reso_steps=48, min_bucket_reso=288, max_bucket_reso=1248
        )
        check_steps_for_family(cfg, "sdxl")
