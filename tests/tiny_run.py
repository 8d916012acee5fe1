"""A tiny SD1.5 run's inputs, shared by the tests that compare a training step bit for bit."""

from __future__ import annotations

from lora_train_core.data.buckets import BucketConfig, plan_buckets
from lora_train_core.data.dataset import DatasetConfig, load_dataset
from lora_train_core.data.latent_cache import CacheConfig, build_latents
from lora_train_core.model.tiny_models import tiny_backend

BUCKETS = BucketConfig(resolution=(128, 128), min_bucket_reso=64, max_bucket_reso=256)


def prepared_sd15(dataset_dir):
    """(backend, dataset, plan, latents): a fresh tiny SD1.5 backend (seed 0) and the images of
    `dataset_dir` in buckets, their latents cached in RAM."""
    backend = tiny_backend("sd15", seed=0)
    dataset = load_dataset(DatasetConfig(path=dataset_dir))
    plan = plan_buckets(dataset.images, BUCKETS)
    return backend, dataset, plan, build_latents(dataset, plan, backend, CacheConfig(mode="ram"))
