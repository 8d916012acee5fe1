"""Regularisation images in the dataset: kohya's balancing per epoch, prior_loss_weight, metadata."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from lora_train_core.data.buckets import BucketConfig, epoch_batches, plan_buckets
from lora_train_core.data.dataset import DatasetConfig, load_dataset
from lora_train_core.errors import ConfigError, DatasetError
from lora_train_core.outputs.metadata import training_metadata
from lora_train_core.run.train import TrainConfig, TrainingRecipe

BUCKETS = BucketConfig(resolution=(128, 128), min_bucket_reso=64, max_bucket_reso=256, bucket_reso_steps=64)
SIZES = [(128, 128), (192, 128), (128, 192)]


def _folder(root: Path, name: str, count: int, captions: list[str] | None = None) -> list[str]:
    folder = root / name
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", SIZES[i % len(SIZES)], (40 * i, 90, 200)).save(folder / f"{i}.png")
        if captions:
            (folder / f"{i}.txt").write_text(captions[i], encoding="utf-8")
    return [f"{name}/{i}.png" for i in range(count)]


def _name(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def _appearances(dataset, batch_size: int, seed: int, epoch: int) -> Counter:
    plan = plan_buckets(dataset.images, BUCKETS)
    batches = epoch_batches(plan, batch_size, seed, epoch)
    return Counter(_name(dataset.images[i].path) for _bucket, indices in batches for i in indices)


def test_each_epoch_shows_reg_images_as_often_as_kohyas_balancing_gives(tmp_path):
    train = _folder(tmp_path / "train", "3_cat", 4)  # 4 images x 3 repeats = 12
    reg = _folder(tmp_path / "reg", "1_person", 5)
    dataset = load_dataset(DatasetConfig(tmp_path / "train", reg_path=tmp_path / "reg"))
    # By hand: 5 reg images x 1 = 5 < 12; one more each in turn: 10; then the first two: 12.
    expected = {**dict.fromkeys(train, 3), reg[0]: 3, reg[1]: 3, reg[2]: 2, reg[3]: 2, reg[4]: 2}
    for epoch in (1, 2):
        assert _appearances(dataset, batch_size=2, seed=5, epoch=epoch) == expected


def test_reg_images_after_the_count_is_reached_never_appear(tmp_path):
    train = _folder(tmp_path / "train", "1_cat", 3)  # 3 with repeats
    reg = _folder(tmp_path / "reg", "2_dog", 4)
    dataset = load_dataset(DatasetConfig(tmp_path / "train", reg_path=tmp_path / "reg"))
    # By hand: dog 0 brings 2 (< 3), dog 1 brings 4 (>= 3) and keeps both repeats; dogs 2, 3 unused.
    expected = {**dict.fromkeys(train, 1), reg[0]: 2, reg[1]: 2}
    assert _appearances(dataset, batch_size=3, seed=0, epoch=1) == expected
    assert [_name(r.path) for r in dataset.reg_images] == reg  # all found, kept for metadata
    assert [r.repeats for r in dataset.reg_images] == [2, 2, 2, 2]


def test_reg_and_train_images_share_buckets(tmp_path):
    _folder(tmp_path / "train", "1_cat", 1)
    _folder(tmp_path / "reg", "1_person", 1)
    dataset = load_dataset(DatasetConfig(tmp_path / "train", reg_path=tmp_path / "reg"))
    plan = plan_buckets(dataset.images, BUCKETS)
    assert plan.buckets == {(128, 128): (0, 1)}


def test_prior_loss_weight_reaches_reg_records_only(tmp_path):
    _folder(tmp_path / "train", "2_cat", 2)
    _folder(tmp_path / "reg", "1_person", 4)
    dataset = load_dataset(
        DatasetConfig(tmp_path / "train", reg_path=tmp_path / "reg", prior_loss_weight=0.25)
    )
    got = [(r.subset, r.is_reg, r.loss_weight, r.caption) for r in dataset.images]
    assert got == [("2_cat", False, 1.0, "cat")] * 2 + [("1_person", True, 0.25, "person")] * 4


def test_metadata_counts_reg_images_apart_and_tags_every_folder_as_kohya(tmp_path):
    _folder(tmp_path / "train", "3_cat", 2, ["a cat, Sofa", "a cat"])
    _folder(tmp_path / "reg", "1_person", 8)  # 8 found, 6 used (3 x 2 train images)
    dataset = load_dataset(
        DatasetConfig(tmp_path / "train", reg_path=tmp_path / "reg", prior_loss_weight=0.5)
    )
    plan = plan_buckets(dataset.images, BUCKETS)
    meta = training_metadata(
        recipe=TrainingRecipe(TrainConfig()),
        family="sd15",
        prediction_type="epsilon",
        fp8_base=False,
        dataset=dataset,
        plan=plan,
        output_name="x",
        model_name="m",
        steps=1,
        epochs=1,
        total_steps=1,
        started_at=0.0,
        finished_at=0.0,
    )
    assert meta["ss_num_train_images"] == "6"
    assert meta["ss_num_reg_images"] == "8"  # kohya: folder repeats x images, before balancing
    assert meta["ss_prior_loss_weight"] == "0.5"
    assert json.loads(meta["ss_dataset_dirs"]) == {"3_cat": {"n_repeats": 3, "img_count": 2}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_person": {"n_repeats": 1, "img_count": 8}}
    # kohya's set_tag_frequency runs for reg subsets too; training folders keep their own counts.
    assert json.loads(meta["ss_tag_frequency"]) == {
        "3_cat": {"a cat": 2, "sofa": 1},
        "1_person": {"person": 8},
    }


def test_metadata_without_reg_folder_has_no_reg_images(tmp_path):
    _folder(tmp_path / "train", "2_cat", 1)
    dataset = load_dataset(DatasetConfig(tmp_path / "train"))
    assert dataset.reg_images == () and not any(r.is_reg for r in dataset.images)


def test_prior_loss_weight_without_reg_folder_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset\.prior_loss_weight: 0\.5 .*reg_path"):
        DatasetConfig(tmp_path, prior_loss_weight=0.5)


def test_negative_prior_loss_weight_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset\.prior_loss_weight: -1\.0 is out of range"):
        DatasetConfig(tmp_path, reg_path=tmp_path / "reg_elsewhere" / "x", prior_loss_weight=-1.0)


@pytest.mark.parametrize("reg", [".", "10_person", ".."])
def test_reg_folder_overlapping_the_training_folder_is_refused(tmp_path, reg):
    train = tmp_path / "train"
    with pytest.raises(ConfigError, match=r"dataset\.reg_path: .* overlaps the training folder"):
        DatasetConfig(train, reg_path=train / reg)


def test_missing_or_empty_reg_folder_is_a_dataset_error_naming_reg_path(tmp_path):
    _folder(tmp_path / "train", "1_cat", 1)
    with pytest.raises(DatasetError, match=r"regularisation folder does not exist — check dataset\.reg_path"):
        load_dataset(DatasetConfig(tmp_path / "train", reg_path=tmp_path / "reg"))
    (tmp_path / "reg").mkdir()
    with pytest.raises(DatasetError, match=r"reg: no images found .*unset dataset\.reg_path"):
        load_dataset(DatasetConfig(tmp_path / "train", reg_path=tmp_path / "reg"))


def test_problems_in_both_folders_are_listed_in_one_error(tmp_path):
    _folder(tmp_path / "train", "1_cat", 1)
    _folder(tmp_path / "reg", "1_person", 1)
    (tmp_path / "train" / "1_cat" / "bad.png").write_bytes(b"")
    (tmp_path / "reg" / "1_person" / "bad.png").write_bytes(b"")
    with pytest.raises(DatasetError) as info:
        load_dataset(DatasetConfig(tmp_path / "train", reg_path=tmp_path / "reg"))
    assert len(info.value.problems) == 2
