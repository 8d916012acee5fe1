"""Data-parallel training: 2 processes (gloo, CPU) reach the 1-process weights for the same global batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from lora_train_core.data.buckets import BucketConfig, plan_buckets
from lora_train_core.data.dataset import DatasetConfig, load_dataset
from lora_train_core.data.latent_cache import CacheConfig, build_latents
from lora_train_core.model.network import NetworkConfig
from lora_train_core.model.tiny_models import tiny_backend
from lora_train_core.optim.optimizers import OptimizerConfig
from lora_train_core.run.distributed import DataParallel
from lora_train_core.run.train import TrainConfig, TrainingRecipe, train

GLOBAL_BATCH, STEPS, LR = 4, 3, 1e-3
# Both runs compute the same math in a different float order (batch-2 vs batch-4 kernels, gradients
# averaged across ranks); Adam's per-element normalisation turns that into small update differences.
# Bound: 2% of the largest move the run can make (AdamW moves each weight at most lr per step).
TOLERANCE = 0.02 * LR * STEPS


def _run(dataset_dir: Path, per_device_batch: int, dist: DataParallel) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    backend = tiny_backend("sd15", seed=0)
    dataset = load_dataset(DatasetConfig(path=dataset_dir))
    plan = plan_buckets(dataset.images, BucketConfig(resolution=(128, 128), enable_bucket=False))
    latents = build_latents(dataset, plan, backend, CacheConfig(mode="ram"))
    recipe = TrainingRecipe(
        train=TrainConfig(max_train_steps=STEPS, train_batch_size=per_device_batch, seed=3),
        network=NetworkConfig(network_dim=4, network_alpha=4.0),
        optimizer=OptimizerConfig(learning_rate=LR),
    )
    return train(backend, dataset, plan, latents, recipe, dist=dist).network.kohya_state_dict()


def _worker(rank: int, world: int, port: int, dataset_dir: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    dist = DataParallel.from_environment()
    assert (dist.rank, dist.world_size) == (rank, world)
    weights = _run(Path(dataset_dir), GLOBAL_BATCH // world, dist)
    save_file(weights, f"{out}.rank{rank}.safetensors")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shares_cover_a_global_batch_once_and_weighted_means_average_to_the_batch_mean():
    for n in (3, 4, 7):
        values = torch.arange(n, dtype=torch.float64) ** 2
        ranks = [DataParallel(r, 3) for r in range(3)]
        parts = [d.share(n) for d in ranks]
        assert [i for p in parts for i in range(n)[p]] == list(range(n))
        averaged = sum(d.loss_weight(n) * values[p].mean() for d, p in zip(ranks, parts, strict=True)) / 3
        assert averaged.item() == pytest.approx(values.mean().item())


@pytest.mark.slow
def test_two_processes_reach_the_one_process_weights(shapes_dataset, tmp_path):
    single = _run(shapes_dataset, GLOBAL_BATCH, DataParallel())
    out = str(tmp_path / "weights")
    mp.spawn(_worker, args=(2, _free_port(), str(shapes_dataset), out), nprocs=2, join=True)
    rank0, rank1 = load_file(f"{out}.rank0.safetensors"), load_file(f"{out}.rank1.safetensors")
    for key, value in single.items():
        assert torch.equal(rank0[key], rank1[key]), key  # every rank applied the same update
        torch.testing.assert_close(rank0[key], value, rtol=0, atol=TOLERANCE, msg=key)
    ups = [k for k in single if k.endswith("lora_up.weight")]
    assert any(single[k].abs().sum() > 0 for k in ups)  # the LoRA did move


def test_learning_rates_scale_with_processes_only_when_asked(tmp_path):
    import dataclasses

    from lora_train_core.demo import demo_config
    from lora_train_core.run.preflight import _with_lr_rule

    cfg = demo_config("sd15", tmp_path, steps=1)
    opt = dataclasses.replace(cfg.recipe.optimizer, learning_rate=1e-4, unet_lr=2e-4, text_encoder_lr=(5e-5,))
    cfg = dataclasses.replace(cfg, recipe=dataclasses.replace(cfg.recipe, optimizer=opt))
    assert _with_lr_rule(cfg, 4) is cfg  # no silent scaling
    on = dataclasses.replace(
        cfg,
        recipe=dataclasses.replace(
            cfg.recipe, train=dataclasses.replace(cfg.recipe.train, scale_lr_by_processes=True)
        ),
    )
    scaled = _with_lr_rule(on, 4).recipe.optimizer
    assert (scaled.learning_rate, scaled.unet_lr, scaled.text_encoder_lr) == (4e-4, 8e-4, (2e-4,))
    assert _with_lr_rule(on, 1) is on
