"""Saving: kohya keys and metadata, exact round trip, kohya's hashes, atomic and no silent overwrite."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from lora_train_core.errors import ConfigError
from lora_train_core.outputs.export import next_free_path, read_metadata, save_lora


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "lora_unet_a.lora_down.weight": torch.randn(4, 8, generator=g),
        "lora_unet_a.lora_up.weight": torch.randn(8, 4, generator=g),
        "lora_unet_a.alpha": torch.tensor(4.0),
    }


def test_round_trip_in_fp32_is_exact(tmp_path):
    path = save_lora(tmp_path / "a.safetensors", _tensors(), {"ss_network_dim": "4"}, torch.float32)
    loaded = load_file(path)
    for key, value in _tensors().items():
        assert torch.equal(loaded[key], value), key


def test_sshs_model_hash_is_sha256_of_the_tensor_bytes(tmp_path):
    path = save_lora(tmp_path / "a.safetensors", _tensors(), {"ss_network_dim": "4"}, torch.float16)
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + header_len])["__metadata__"]
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + header_len :]).hexdigest()
    assert len(meta["sshs_legacy_hash"]) == 8
    assert meta["ss_network_dim"] == "4"


def test_existing_file_is_not_overwritten_unless_asked(tmp_path):
    path = save_lora(tmp_path / "a.safetensors", _tensors(), {}, torch.float32)
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        save_lora(path, _tensors(), {"x": "1"}, torch.float32)
    assert path.read_bytes() == before
    save_lora(path, _tensors(), {"x": "1"}, torch.float32, overwrite=True)
    assert read_metadata(path)["x"] == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp files left


def test_next_free_path_counts_up(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"x")
    (tmp_path / "a_1.safetensors").write_bytes(b"x")
    assert next_free_path(tmp_path / "a.safetensors").name == "a_2.safetensors"


def test_saved_files_get_the_usual_permissions_not_mkstemps_private_ones(tmp_path):
    import os

    umask = os.umask(0)
    os.umask(umask)
    path = save_lora(tmp_path / "a.safetensors", _tensors(), {}, torch.float32)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_bucket_info_records_counts_and_the_mean_aspect_error(tmp_path):
    from PIL import Image

    from lora_train_core.data.buckets import BucketConfig, plan_buckets
    from lora_train_core.data.dataset import DatasetConfig, load_dataset
    from lora_train_core.outputs.metadata import bucket_info

    (tmp_path / "2_x").mkdir()
    Image.new("RGB", (128, 128)).save(tmp_path / "2_x" / "square.png")
    Image.new("RGB", (200, 100)).save(tmp_path / "2_x" / "wide.png")
    dataset = load_dataset(DatasetConfig(path=tmp_path))
    plan = plan_buckets(
        dataset.images, BucketConfig(resolution=(128, 128), min_bucket_reso=64, max_bucket_reso=256)
    )
    info = bucket_info(plan, dataset)
    # the 2:1 image goes to the nearest-aspect bucket (kohya), the square one to 128x128 exactly
    wide_bucket = plan.assignments[[i.path.name for i in dataset.images].index("wide.png")].bucket
    expected = abs(wide_bucket[0] / wide_bucket[1] - 2.0) / 2  # the square image fits 128x128 exactly
    assert info["mean_img_ar_error"] == pytest.approx(expected)
    assert sum(b["count"] for b in info["buckets"].values()) == 4  # 2 images x 2 repeats
