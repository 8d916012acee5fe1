"""Cached text-encoder outputs: same training as encoding each step, each caption encoded once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from lora_train_core.data.buckets import BucketConfig, plan_buckets
from lora_train_core.data.captions import CaptionConfig
from lora_train_core.data.dataset import DatasetConfig, load_dataset
from lora_train_core.data.latent_cache import CacheConfig, build_latents
from lora_train_core.data.text_cache import CachedTextEncoder, maybe_cache_text
from lora_train_core.demo import demo_config, make_synthetic_dataset
from lora_train_core.errors import ConfigError
from lora_train_core.model.network import NetworkConfig
from lora_train_core.model.tiny_models import tiny_backend
from lora_train_core.optim.optimizers import OptimizerConfig
from lora_train_core.run.orchestrator import run_training
from lora_train_core.run.train import TrainConfig, TrainingRecipe, train

BUCKETS = BucketConfig(resolution=(128, 128), min_bucket_reso=64, max_bucket_reso=256, bucket_reso_steps=64)
FROZEN_TE = TrainingRecipe(
    train=TrainConfig(max_train_steps=3, train_batch_size=2, seed=3),
    network=NetworkConfig(network_dim=4, network_alpha=4.0, train_text_encoder=False),
    optimizer=OptimizerConfig(learning_rate=1e-3),
)


def _distinct_caption_files(folder: Path) -> set[str]:
    return {p.read_text(encoding="utf-8") for p in folder.rglob("*.txt")}


def test_cached_outputs_give_the_same_loss_at_every_step_and_encode_each_caption_once(tmp_path):
    dataset_dir = make_synthetic_dataset(tmp_path / "data", count=4)
    dataset = load_dataset(DatasetConfig(dataset_dir))
    plan = plan_buckets(dataset.images, BUCKETS)
    latents = build_latents(dataset, plan, tiny_backend("sd15", seed=0), CacheConfig(mode="ram"))
    losses = {}
    for mode in ("none", "ram"):
        backend = tiny_backend("sd15", seed=0)
        backend = maybe_cache_text(backend, dataset, CacheConfig(text_encoder_outputs=mode), FROZEN_TE)
        losses[mode] = train(backend, dataset, plan, latents, FROZEN_TE).losses
    assert isinstance(backend, CachedTextEncoder)
    assert len(losses["none"]) == FROZEN_TE.train.max_train_steps
    assert torch.allclose(torch.tensor(losses["ram"]), torch.tensor(losses["none"]), rtol=1e-5, atol=0)
    assert backend.encoded_count == len(_distinct_caption_files(dataset_dir))


def test_cached_rows_equal_the_backends_own_encoding(tmp_path, sdxl_backend):
    dataset_dir = make_synthetic_dataset(tmp_path / "data", count=3)
    dataset = load_dataset(DatasetConfig(dataset_dir))
    cached = maybe_cache_text(sdxl_backend, dataset, CacheConfig(text_encoder_outputs="ram"), FROZEN_TE)
    captions = [dataset.images[i].caption for i in (2, 0, 2)]
    got = cached.encode_text(captions)
    with torch.no_grad():
        want = sdxl_backend.encode_text(captions)
    assert torch.allclose(got.hidden, want.hidden, atol=1e-6)
    assert torch.allclose(got.pooled, want.pooled, atol=1e-6)
    assert not got.hidden.requires_grad


def test_cached_text_is_the_static_caption_training_sees(tmp_path, sd15_backend):
    dataset_dir = make_synthetic_dataset(tmp_path / "data", count=1)
    (dataset_dir / "2_shape" / "00.txt").write_text("red; dog, sofa\nsecond line", encoding="utf-8")
    dataset = load_dataset(DatasetConfig(dataset_dir))
    captions = CaptionConfig(caption_prefix="photo of", caption_suffix="4k", secondary_separator=";")
    recipe = TrainingRecipe(TrainConfig(), network=FROZEN_TE.network, captions=captions)
    cached = maybe_cache_text(sd15_backend, dataset, CacheConfig(text_encoder_outputs="ram"), recipe)
    assert cached.encoded_count == 1
    cached.encode_text(["photo of red, dog, sofa 4k"])  # first line, prefix/suffix, ";" -> ","
    assert cached.encoded_count == 1  # already cached: no new encode


def test_disk_cache_round_trip_reencodes_only_unreadable_entries_and_other_models(tmp_path):
    dataset_dir = make_synthetic_dataset(tmp_path / "data", count=4)
    dataset = load_dataset(DatasetConfig(dataset_dir))
    cfg = CacheConfig(cache_dir=tmp_path / "cache", text_encoder_outputs="disk")
    distinct = len(_distinct_caption_files(dataset_dir))
    captions = [r.caption for r in dataset.images]

    first = maybe_cache_text(tiny_backend("sdxl", seed=0), dataset, cfg, FROZEN_TE)
    entries = sorted((tmp_path / "cache" / "text_encoder_outputs").glob("*.safetensors"))
    assert first.encoded_count == distinct and len(entries) == distinct

    again = maybe_cache_text(tiny_backend("sdxl", seed=0), dataset, cfg, FROZEN_TE)
    assert again.encoded_count == 0
    a, b = first.encode_text(captions), again.encode_text(captions)
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.pooled, b.pooled)

    entries[0].write_bytes(b"not a safetensors file")
    torn = maybe_cache_text(tiny_backend("sdxl", seed=0), dataset, cfg, FROZEN_TE)
    assert torn.encoded_count == 1
    assert torch.equal(torn.encode_text(captions).hidden, a.hidden)

    other_model = maybe_cache_text(tiny_backend("sdxl", seed=1), dataset, cfg, FROZEN_TE)
    assert other_model.encoded_count == distinct


def test_disk_cache_defaults_to_a_hidden_folder_in_the_dataset(tmp_path, sd15_backend):
    dataset_dir = make_synthetic_dataset(tmp_path / "data", count=1)
    dataset = load_dataset(DatasetConfig(dataset_dir))
    maybe_cache_text(sd15_backend, dataset, CacheConfig(text_encoder_outputs="disk"), FROZEN_TE)
    assert len(list((dataset_dir / ".text_encoder_cache").glob("*.safetensors"))) == 1
    assert len(load_dataset(DatasetConfig(dataset_dir)).images) == 1  # not scanned as images


def test_no_caching_returns_the_backend_itself(tmp_path, sd15_backend):
    dataset = load_dataset(DatasetConfig(make_synthetic_dataset(tmp_path / "data", count=1)))
    assert maybe_cache_text(sd15_backend, dataset, CacheConfig(), FROZEN_TE) is sd15_backend


def test_caching_with_a_trained_text_encoder_is_refused(tmp_path, sd15_backend):
    dataset = load_dataset(DatasetConfig(make_synthetic_dataset(tmp_path / "data", count=1)))
    recipe = TrainingRecipe(TrainConfig(), network=NetworkConfig(train_text_encoder=True))
    with pytest.raises(
        ConfigError, match=r"cache\.text_encoder_outputs: 'ram'.*network\.train_text_encoder = true"
    ):
        maybe_cache_text(sd15_backend, dataset, CacheConfig(text_encoder_outputs="ram"), recipe)


@pytest.mark.parametrize(
    "option",
    [
        {"shuffle_caption": True},
        {"caption_dropout_rate": 0.1},
        {"caption_tag_dropout_rate": 0.2},
        {"caption_dropout_every_n_epochs": 3},
        {"enable_wildcard": True},
    ],
)
def test_caching_with_captions_that_vary_per_step_is_refused_naming_the_option(
    tmp_path, sd15_backend, option
):
    dataset = load_dataset(DatasetConfig(make_synthetic_dataset(tmp_path / "data", count=1)))
    recipe = TrainingRecipe(TrainConfig(), network=FROZEN_TE.network, captions=CaptionConfig(**option))
    (name,) = option
    with pytest.raises(ConfigError, match=rf"cache\.text_encoder_outputs: 'disk'.*captions\.{name} = "):
        maybe_cache_text(sd15_backend, dataset, CacheConfig(text_encoder_outputs="disk"), recipe)


def test_unknown_cache_choice_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"cache\.text_encoder_outputs: 'gpu' is not one of"):
        CacheConfig(text_encoder_outputs="gpu")


def test_cached_outputs_are_not_weighted_so_a_weighted_request_is_refused(sd15_backend):
    with pytest.raises(ConfigError, match=r"cache\.text_encoder_outputs: cached outputs are not weighted"):
        CachedTextEncoder(sd15_backend).encode_text(["(red:1.5) cat"], weighted=True)


def test_run_training_applies_the_text_cache_setting(tmp_path, sd15_backend):
    """The refusal comes from run_training itself, before any latent is encoded."""
    make_synthetic_dataset(tmp_path / "dataset", count=1)
    cfg = demo_config("sd15", tmp_path, steps=1)
    cfg = dataclasses.replace(cfg, cache=CacheConfig(text_encoder_outputs="ram"))  # TE trains by default
    with pytest.raises(ConfigError, match=r"cache\.text_encoder_outputs: 'ram'.*train_text_encoder"):
        run_training(cfg, sd15_backend, say=lambda _: None)
