"""speed.cuda_graph: replayed steps train exactly as eager ones (needs a CUDA GPU; skipped without).

On tiny SD1.5 and SDXL models in bf16 with gradient checkpointing, several buckets (one
graph each) and gradient accumulation over 2 batches, a graphed run and an eager run of
the same seed give the same losses and LoRA weights. A replay runs the kernels of the
step it recorded, so they are expected to agree to float rounding at most; the test
allows 1e-5 relative (losses) and 1e-4 relative norm (weights after AdamW steps).
The NaN guard still stops a graphed run before a bad step touches the weights.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from faults import PoisonedLatents

from lora_train_core.data.buckets import BucketConfig, plan_buckets
from lora_train_core.data.dataset import DatasetConfig, load_dataset
from lora_train_core.data.latent_cache import CacheConfig, build_latents
from lora_train_core.model.network import NetworkConfig
from lora_train_core.model.tiny_models import tiny_backend
from lora_train_core.optim.optimizers import OptimizerConfig
from lora_train_core.run import cuda_graphs
from lora_train_core.run.speed import SpeedConfig
from lora_train_core.run.train import NonFiniteError, TrainConfig, TrainingRecipe, TrainingStopped, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


@pytest.fixture(autouse=True)
def _same_conv_algorithms():
    """cuDNN picks one algorithm per shape for every run (autotuning by timing would not, and
    a flaky first run on a fresh H200 showed it)."""
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


BUCKETS = BucketConfig(resolution=(128, 128), min_bucket_reso=64, max_bucket_reso=256, bucket_reso_steps=64)


def _recipe(cuda_graph: bool, steps: int = 6) -> TrainingRecipe:
    return TrainingRecipe(
        train=TrainConfig(
            max_train_steps=steps,
            train_batch_size=1,
            gradient_accumulation_steps=2,
            mixed_precision="bf16",
            gradient_checkpointing=True,
            seed=3,
        ),
        network=NetworkConfig(network_dim=4, network_alpha=2.0, train_text_encoder=False),
        optimizer=OptimizerConfig(learning_rate=1e-3),
        speed=SpeedConfig(cuda_graph=cuda_graph),
    )


def _run(family: str, dataset_dir, recipe: TrainingRecipe, latents_wrapper=None):
    backend = tiny_backend(family, seed=0, device="cuda", weight_dtype=torch.bfloat16)
    dataset = load_dataset(DatasetConfig(path=dataset_dir))
    plan = plan_buckets(dataset.images, BUCKETS)
    latents = build_latents(dataset, plan, backend, CacheConfig(mode="ram"))
    if latents_wrapper is not None:
        latents = latents_wrapper(latents)
    return train(backend, dataset, plan, latents, recipe), plan


def _weights(trained) -> torch.Tensor:
    return torch.cat([v.float().flatten().cpu() for v in trained.network.kohya_state_dict().values()])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_a_graphed_run_trains_as_the_eager_run(family, shapes_dataset, monkeypatch):
    records = Counter()
    record = cuda_graphs.GraphedBackward._record
    monkeypatch.setattr(
        cuda_graphs.GraphedBackward,
        "_record",
        lambda self, key, inputs: records.update([key]) or record(self, key, inputs),
    )
    eager, plan = _run(family, shapes_dataset, _recipe(cuda_graph=False))
    graphed, _ = _run(family, shapes_dataset, _recipe(cuda_graph=True))
    assert graphed.losses == pytest.approx(eager.losses, rel=1e-5)
    a, b = _weights(graphed), _weights(eager)
    assert float((a - b).norm() / b.norm()) < 1e-4
    # one recording per batch shape, several shapes in this dataset
    assert len(plan.buckets) > 1
    assert len(records) > 1 and set(records.values()) == {1}


def test_the_nan_guard_stops_a_graphed_run_before_the_update(shapes_dataset):
    good, _ = _run("sd15", shapes_dataset, _recipe(cuda_graph=True, steps=2))
    with pytest.raises(TrainingStopped) as stopped:
        # batch 1 and accumulation 2: read 5 is the first batch of step 3
        _run("sd15", shapes_dataset, _recipe(cuda_graph=True), lambda inner: PoisonedLatents(inner, 5))
    assert isinstance(stopped.value.__cause__, NonFiniteError)
    assert stopped.value.partial.steps == 2
    assert torch.equal(_weights(stopped.value.partial), _weights(good))
