"""The training recipe on tiny real models: it learns, it is reproducible, its options work."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lora_train_core.data.buckets import BucketConfig, plan_buckets
from lora_train_core.data.dataset import DatasetConfig, load_dataset
from lora_train_core.data.latent_cache import CacheConfig, build_latents
from lora_train_core.model.network import NetworkConfig
from lora_train_core.model.tiny_models import tiny_backend
from lora_train_core.optim.optimizers import OptimizerConfig
from lora_train_core.run.train import TrainConfig, TrainingRecipe, train

BUCKETS = BucketConfig(resolution=(128, 128), min_bucket_reso=64, max_bucket_reso=256, bucket_reso_steps=64)


def _setup(backend, dataset_dir, buckets=BUCKETS):
    dataset = load_dataset(DatasetConfig(path=dataset_dir))
    plan = plan_buckets(dataset.images, buckets)
    return dataset, plan, build_latents(dataset, plan, backend, CacheConfig(mode="ram"))


def _recipe(**train_kwargs):
    return TrainingRecipe(
        train=TrainConfig(**{"max_train_steps": 6, "train_batch_size": 2, "seed": 7, **train_kwargs}),
        network=NetworkConfig(network_dim=4, network_alpha=4.0),
        optimizer=OptimizerConfig(learning_rate=1e-3),
    )


def _weights(trained):
    return {k: v.clone() for k, v in trained.network.kohya_state_dict().items()}


def test_training_on_a_fixed_batch_lowers_the_loss(sd15_backend, tmp_path):
    """One image, one fixed noise/timestep draw per step: the LoRA must fit it."""
    from lora_train_core.demo import make_synthetic_dataset

    dataset_dir = make_synthetic_dataset(tmp_path / "one", count=1)
    dataset, plan, latents = _setup(sd15_backend, dataset_dir)
    recipe = dataclasses.replace(
        _recipe(max_train_steps=40, train_batch_size=1),
        optimizer=OptimizerConfig(learning_rate=3e-3),
        noise=dataclasses.replace(_recipe().noise, min_timestep=500, max_timestep=501),
    )
    trained = train(sd15_backend, dataset, plan, latents, recipe)
    losses = trained.losses
    assert trained.steps == 40
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_same_seed_gives_identical_weights_and_losses(shapes_dataset):
    runs = []
    for _ in range(2):
        backend = tiny_backend("sd15", seed=0)
        dataset, plan, latents = _setup(backend, shapes_dataset)
        trained = train(backend, dataset, plan, latents, _recipe())
        runs.append((trained.losses, _weights(trained)))
    assert runs[0][0] == runs[1][0]
    for key in runs[0][1]:
        assert torch.equal(runs[0][1][key], runs[1][1][key]), key


def test_training_leaves_the_base_model_unchanged(sd15_backend, shapes_dataset):
    before = {k: v.clone() for k, v in sd15_backend.unet.state_dict().items()}
    dataset, plan, latents = _setup(sd15_backend, shapes_dataset)
    train(sd15_backend, dataset, plan, latents, _recipe(max_train_steps=2))
    after = sd15_backend.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # and the LoRA layers are gone again: the original forward is back
    assert all("forward" not in vars(m) for m in sd15_backend.unet.modules())


def test_gradient_checkpointing_gives_the_same_losses(shapes_dataset):
    results = []
    for checkpointing in (False, True):
        backend = tiny_backend("sd15", seed=0)
        dataset, plan, latents = _setup(backend, shapes_dataset)
        trained = train(backend, dataset, plan, latents, _recipe(gradient_checkpointing=checkpointing))
        results.append(trained.losses)
    assert results[0] == pytest.approx(results[1], rel=1e-5, abs=1e-6)


def test_gradient_accumulation_counts_optimizer_steps(shapes_dataset):
    """With 2 accumulation steps, 4 micro-batches make 2 optimiser steps (kohya counts optimiser steps)."""
    backend = tiny_backend("sd15", seed=0)
    dataset, plan, latents = _setup(backend, shapes_dataset)
    seen = []
    trained = train(
        backend,
        dataset,
        plan,
        latents,
        _recipe(max_train_steps=2, gradient_accumulation_steps=2),
        on_step=lambda report: seen.append((report.step, report.total)),
    )
    assert seen == [(1, 2), (2, 2)]
    assert trained.steps == 2


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_with_finite_loss(shapes_dataset, precision):
    backend = tiny_backend("sd15", seed=0)
    dataset, plan, latents = _setup(backend, shapes_dataset)
    trained = train(backend, dataset, plan, latents, _recipe(mixed_precision=precision, max_train_steps=3))
    assert all(torch.isfinite(torch.tensor(trained.losses)))
    assert all(p.dtype == torch.float32 for _, p in trained.network.named_lora_parameters())


def test_sdxl_trains_both_text_encoders_and_the_unet(sdxl_backend, shapes_dataset):
    dataset, plan, latents = _setup(
        sdxl_backend, shapes_dataset, dataclasses.replace(BUCKETS, bucket_reso_steps=32)
    )
    trained = train(sdxl_backend, dataset, plan, latents, _recipe(max_train_steps=3))
    prefixes = {k.split("_")[1] for k in trained.network.kohya_state_dict()}
    assert {"unet", "te1", "te2"} <= prefixes
    ups = {k: v for k, v in trained.network.kohya_state_dict().items() if k.endswith("lora_up.weight")}
    assert any(v.abs().sum() > 0 for k, v in ups.items() if k.startswith("lora_te2"))


def test_stop_text_encoder_training_freezes_text_encoder_lora_after_n_steps(shapes_dataset):
    """A 4-step run with stop at 2 ends with the text-encoder LoRA of the 2-step run; the UNet trains on."""
    weights = {}
    for steps in (2, 4):
        backend = tiny_backend("sd15", seed=0)
        dataset, plan, latents = _setup(backend, shapes_dataset)
        optimizer = OptimizerConfig(learning_rate=1e-3, stop_text_encoder_training=2)
        recipe = dataclasses.replace(_recipe(max_train_steps=steps), optimizer=optimizer)
        weights[steps] = _weights(train(backend, dataset, plan, latents, recipe))
    te = [k for k in weights[2] if k.startswith("lora_te_") and k.endswith("lora_up.weight")]
    unet = [k for k in weights[2] if k.startswith("lora_unet_") and k.endswith("lora_up.weight")]
    assert any(weights[2][k].abs().sum() > 0 for k in te)  # the text encoder did train for 2 steps
    assert all(torch.equal(weights[2][k], weights[4][k]) for k in te)
    assert any(not torch.equal(weights[2][k], weights[4][k]) for k in unet)


def test_block_dims_set_each_blocks_rank_and_dim_0_leaves_a_block_out(shapes_dataset):
    """SD1.5 layout, 25 values; the tiny UNet's modules sit in blocks 1-2 (down), 12 (mid), 13+ (up)."""
    from lora_train_core.optim.param_groups import block_index

    dims = [4] * 25
    dims[12] = 0  # no LoRA in the mid block
    dims[1] = 2
    backend = tiny_backend("sd15", seed=0)
    dataset, plan, latents = _setup(backend, shapes_dataset)
    network = NetworkConfig(
        network_dim=8,
        network_alpha=8.0,
        block_dims=tuple(dims),
        block_alphas=(1.0,) * 25,
        train_text_encoder=False,
    )
    recipe = dataclasses.replace(_recipe(max_train_steps=1), network=network)
    weights = _weights(train(backend, dataset, plan, latents, recipe))
    downs = {k.rsplit(".", 2)[0]: v for k, v in weights.items() if k.endswith("lora_down.weight")}
    assert not [m for m in downs if block_index(m, "sd15") == 12]
    for module, down in downs.items():
        assert down.shape[0] == dims[block_index(module, "sd15")], module
        assert weights[f"{module}.alpha"].item() == 1.0
