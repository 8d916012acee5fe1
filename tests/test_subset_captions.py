"""Per-subset caption settings (kohya's dataset-config subsets): a folder may override [captions] keys."""

from __future__ import annotations

import pytest
from PIL import Image

from lora_train_core.config import run_config_from_dict
from lora_train_core.data.buckets import BucketConfig, plan_buckets
from lora_train_core.data.captions import CaptionConfig
from lora_train_core.data.dataset import DatasetConfig, load_dataset
from lora_train_core.data.latent_cache import CacheConfig, build_latents
from lora_train_core.errors import ConfigError
from lora_train_core.model.network import NetworkConfig
from lora_train_core.model.tiny_models import tiny_backend
from lora_train_core.run.train import TrainConfig, TrainingRecipe, train


def _config(tmp_path, extra):
    return run_config_from_dict(
        {
            "model": {"path": "m"},
            "dataset": {"path": "d"},
            "captions": {"keep_tokens": 1, "caption_suffix": "S"},
            **extra,
        },
        base_dir=tmp_path,
    )


def test_a_subset_overrides_only_the_keys_it_names(tmp_path):
    cfg = _config(tmp_path, {"subset_captions": {"2_dog": {"caption_prefix": "P", "keep_tokens": 2}}})
    dog = cfg.recipe.captions_for("2_dog")
    assert (dog.caption_prefix, dog.keep_tokens, dog.caption_suffix) == ("P", 2, "S")
    assert cfg.recipe.captions_for("3_cat") == cfg.recipe.captions


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"subset_captions": {"2_dog": {"keep_tokenz": 1}}}, "did you mean 'keep_tokens'"),
        ({"subset_captions": {"2_dog": {"weighted_captions": True}}}, "not per subset"),
        ({"subset_captions": {"2_dog": 3}}, 'subset_captions."10_name"'),
    ],
)
def test_bad_subset_settings_are_named(tmp_path, extra, fragment):
    with pytest.raises(ConfigError, match=fragment):
        _config(tmp_path, extra)


class _Recording:
    """The real backend; remembers the captions it was asked to encode."""

    def __init__(self, backend):
        self.backend, self.seen = backend, []

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def encode_text(self, captions, weighted=False):
        self.seen += list(captions)
        return self.backend.encode_text(captions, weighted)


def test_training_uses_each_images_subset_captions(tmp_path):
    for folder in ("1_dog", "1_cat"):
        (tmp_path / "data" / folder).mkdir(parents=True)
        Image.new("RGB", (128, 128), "red").save(tmp_path / "data" / folder / "a.png")
        (tmp_path / "data" / folder / "a.txt").write_text(f"a {folder[2:]}", encoding="utf-8")
    backend = _Recording(tiny_backend("sd15"))
    dataset = load_dataset(DatasetConfig(path=tmp_path / "data"))
    plan = plan_buckets(dataset.images, BucketConfig(resolution=(128, 128), enable_bucket=False))
    latents = build_latents(dataset, plan, backend, CacheConfig(mode="ram"))
    recipe = TrainingRecipe(
        TrainConfig(max_train_steps=1, train_batch_size=2),
        network=NetworkConfig(network_dim=2, train_text_encoder=False),
        subset_captions={"1_dog": CaptionConfig(caption_prefix="photo of")},
    )
    train(backend, dataset, plan, latents, recipe)
    assert sorted(backend.seen) == ["a cat", "photo of a dog"]
