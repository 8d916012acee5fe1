"""[speed] options: validated, refused where they cannot hold, and result-preserving on the CPU.

compile_blocks is compared with the eager run on a tiny SD1.5 model: losses to 1e-5
relative; LoRA weights after 4 AdamW steps to 1e-4 relative norm and, per element, to
5% of one learning-rate step (inductor reorders float32 sums, and AdamW's first steps
move each weight by about lr·sign(g), which amplifies rounding where g is near 0;
measured: 1.8e-5 and 0.6%);
fp8_base is checked for what it stores and that training on it still runs and learns
nothing absurd. CUDA graphs are in tests/test_cuda_graphs.py (they need a GPU).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lora_train_core.config import run_config_from_dict
from lora_train_core.data.buckets import BucketConfig, plan_buckets
from lora_train_core.data.dataset import DatasetConfig, load_dataset
from lora_train_core.data.latent_cache import CacheConfig, build_latents
from lora_train_core.errors import ConfigError
from lora_train_core.model.fp8 import FP8_STORAGE
from lora_train_core.model.network import NetworkConfig
from lora_train_core.model.tiny_models import tiny_backend
from lora_train_core.optim.optimizers import OptimizerConfig
from lora_train_core.run.speed import SpeedConfig, check_speed
from lora_train_core.run.train import TrainConfig, TrainingRecipe, train

LEARNING_RATE = 1e-3
NETWORK = NetworkConfig(network_dim=4, network_alpha=4.0, train_text_encoder=False)
BUCKETS = BucketConfig(resolution=(128, 128), min_bucket_reso=64, max_bucket_reso=256, bucket_reso_steps=64)


def _recipe(speed: SpeedConfig | None = None, **train_kwargs):
    return TrainingRecipe(
        train=TrainConfig(**{"max_train_steps": 4, "train_batch_size": 2, "seed": 7, **train_kwargs}),
        network=NETWORK,
        optimizer=OptimizerConfig(learning_rate=LEARNING_RATE),
        speed=speed or SpeedConfig(),
    )


def _train(backend, dataset_dir, recipe):
    dataset = load_dataset(DatasetConfig(path=dataset_dir))
    plan = plan_buckets(dataset.images, BUCKETS)
    latents = build_latents(dataset, plan, backend, CacheConfig(mode="ram"))
    return train(backend, dataset, plan, latents, recipe)


def _lora_weights(trained) -> torch.Tensor:
    return torch.cat([v.flatten() for k, v in trained.network.kohya_state_dict().items() if "lora_" in k])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"cuda_graph": "yes"}, "speed.cuda_graph: 'yes' is not true/false"),
        ({"compile_blocks": "all"}, "speed.compile_blocks"),
        ({"fp8_base": 1}, "speed.fp8_base: 1 is not true/false"),
    ],
)
def test_bad_speed_settings_are_named(values, message):
    with pytest.raises(ConfigError, match=message):
        SpeedConfig(**values)


def test_the_speed_section_is_read_from_toml(tmp_path):
    raw = {
        "model": {"path": "m"},
        "dataset": {"path": "d"},
        "speed": {"cuda_graph": True, "compile_blocks": "transformer", "cudnn_benchmark": True},
    }
    speed = run_config_from_dict(raw, tmp_path).recipe.speed
    assert speed == SpeedConfig(cuda_graph=True, compile_blocks="transformer", cudnn_benchmark=True)


def test_cuda_graph_on_the_cpu_is_refused(sd15_backend):
    with pytest.raises(ConfigError, match=r"speed\.cuda_graph: needs a CUDA device; this run is on cpu"):
        check_speed(_recipe(SpeedConfig(cuda_graph=True)), sd15_backend.device, False)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"network": dataclasses.replace(NETWORK, train_text_encoder=True)}, "network.train_text_encoder"),
        ({"network": dataclasses.replace(NETWORK, module_dropout=0.1)}, "network dropout"),
        ({"network": dataclasses.replace(NETWORK, network_dropout=0.1)}, "network dropout"),
        ({"train": TrainConfig(max_train_steps=4, mixed_precision="fp16")}, "train.mixed_precision = .fp16."),
    ],
)
def test_cuda_graph_refuses_what_it_cannot_record(sd15_backend, change, named):
    recipe = dataclasses.replace(_recipe(SpeedConfig(cuda_graph=True)), **change)
    sd15_backend.device = torch.device("cuda")  # only its type is read: no GPU needed to refuse
    with pytest.raises(ConfigError, match=f"speed.cuda_graph with {named}.* is not implemented yet"):
        check_speed(recipe, sd15_backend.device, False)


def test_cuda_graph_refuses_multi_process_runs(sd15_backend):
    sd15_backend.device = torch.device("cuda")
    with pytest.raises(ConfigError, match="multi-process training is not implemented yet"):
        check_speed(_recipe(SpeedConfig(cuda_graph=True)), sd15_backend.device, False, world_size=2)


def test_fp8_base_must_match_how_the_model_was_loaded(sd15_backend):
    with pytest.raises(ConfigError, match=r"speed\.fp8_base = true, but the model was loaded without"):
        check_speed(_recipe(SpeedConfig(fp8_base=True), mixed_precision="bf16"), sd15_backend.device, False)


def test_fp8_base_needs_mixed_precision():
    with pytest.raises(ConfigError, match=r"train\.mixed_precision 'bf16' or 'fp16'"):
        tiny_backend("sd15", fp8_base=True)


def test_compiled_blocks_give_the_eager_losses_and_weights(shapes_dataset):
    eager = _train(tiny_backend("sd15"), shapes_dataset, _recipe())
    backend = tiny_backend("sd15")
    compiled = _train(backend, shapes_dataset, _recipe(SpeedConfig(compile_blocks="transformer+resnet")))
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)
    eager_w, compiled_w = _lora_weights(eager), _lora_weights(compiled)
    assert _rel(compiled_w, eager_w) < 1e-4
    assert (compiled_w - eager_w).abs().max() < 0.05 * LEARNING_RATE
    # after the run the blocks are eager again (sampling and ComfyUI see the plain modules)
    assert all(m._compiled_call_impl is None for m in backend.unet.modules())


def test_fp8_base_stores_linear_and_conv_weights_in_float8_and_trains(shapes_dataset):
    backend = tiny_backend("sd15", weight_dtype=torch.bfloat16, fp8_base=True)
    layers = [m for m in backend.unet.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    assert layers and all(m.weight.dtype == FP8_STORAGE for m in layers)
    norms = [m for m in backend.unet.modules() if isinstance(m, torch.nn.GroupNorm | torch.nn.LayerNorm)]
    assert all(m.weight.dtype == torch.bfloat16 for m in norms if m.weight is not None)
    fp8 = _train(backend, shapes_dataset, _recipe(SpeedConfig(fp8_base=True), mixed_precision="bf16"))
    bf16 = _train(
        tiny_backend("sd15", weight_dtype=torch.bfloat16), shapes_dataset, _recipe(mixed_precision="bf16")
    )
    # the same run on weights rounded to 3 mantissa bits: close, not equal
    assert fp8.losses == pytest.approx(bf16.losses, rel=0.05)
    assert fp8.losses != bf16.losses
