"""A LoRA we train loads into diffusers' own pipelines (`load_lora_weights`) with every key used."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import logging as diffusers_logging
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from lora_train_core.data.buckets import BucketConfig, plan_buckets
from lora_train_core.data.dataset import DatasetConfig, load_dataset
from lora_train_core.data.latent_cache import CacheConfig, build_latents
from lora_train_core.model.network import NetworkConfig
from lora_train_core.model.tiny_models import tiny_backend, tiny_components
from lora_train_core.optim.optimizers import OptimizerConfig
from lora_train_core.outputs.export import save_lora
from lora_train_core.run.train import TrainConfig, TrainingRecipe, train


def _trained_lora_file(family, dataset_dir, tmp_path):
    backend = tiny_backend(family, seed=0)
    dataset = load_dataset(DatasetConfig(path=dataset_dir))
    steps = 64 if family == "sd15" else 32
    plan = plan_buckets(
        dataset.images,
        BucketConfig(resolution=(128, 128), min_bucket_reso=64, max_bucket_reso=256, bucket_reso_steps=steps),
    )
    latents = build_latents(dataset, plan, backend, CacheConfig(mode="ram"))
    recipe = TrainingRecipe(
        train=TrainConfig(max_train_steps=2, train_batch_size=2),
        network=NetworkConfig(network_dim=4, network_alpha=2.0),
        optimizer=OptimizerConfig(learning_rate=1e-2),
    )
    trained = train(backend, dataset, plan, latents, recipe)
    return save_lora(
        tmp_path / f"{family}.safetensors", trained.network.kohya_state_dict(), {}, torch.float32
    )


def _pipeline(family):
    unet, vae, text_encoders, tokenizers = tiny_components(family, seed=0)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if family == "sd15":
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoders[0],
            tokenizer=tokenizers[0],
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoders[0],
        text_encoder_2=text_encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=scheduler,
    )


def _unet_output(pipe, family):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    hidden = torch.randn(1, 32, pipe.unet.config.cross_attention_dim, generator=g)
    added = None
    if family == "sdxl":
        added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[128.0] * 6])}
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500]), encoder_hidden_states=hidden, added_cond_kwargs=added).sample


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_diffusers_load_lora_weights_uses_every_key_and_changes_the_output(
    family, shapes_dataset, tmp_path, caplog
):
    path = _trained_lora_file(family, shapes_dataset, tmp_path)
    modules = {k.rsplit(".", 2)[0] for k in load_file(path) if k.endswith(".lora_down.weight")}
    pipe = _pipeline(family)
    before = _unet_output(pipe, family)
    diffusers_logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(path))
    diffusers_logging.disable_propagation()
    complaints = [
        r.getMessage()
        for r in caplog.records
        if "unexpected" in r.getMessage().lower()
        or "missing" in r.getMessage().lower()
        or "not" in r.getMessage().lower()
    ]
    assert complaints == []
    components = [pipe.unet, pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    wrapped = sum(isinstance(m, LoraLayer) for c in components for m in c.modules())
    assert wrapped == len(modules)
    assert not torch.allclose(_unet_output(pipe, family), before)
