"""The NaN guard: a non-finite loss or gradient stops training before it touches the weights.

The reference for "the last good weights" is a run stopped cleanly one step earlier.
The faults are injected where they happen in real runs: a latent that is NaN (a
broken image or VAE overflow) and a backward pass that yields NaN gradients.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from faults import PoisonedLatents
from safetensors.torch import load_file

from lora_train_core.config import OutputConfig, RunConfig
from lora_train_core.data.buckets import BucketConfig, plan_buckets
from lora_train_core.data.dataset import DatasetConfig, load_dataset
from lora_train_core.data.latent_cache import CacheConfig, build_latents
from lora_train_core.model.network import NetworkConfig
from lora_train_core.model.tiny_models import tiny_backend
from lora_train_core.optim.optimizers import OptimizerConfig
from lora_train_core.run.orchestrator import run_training
from lora_train_core.run.state_files import load_training_state
from lora_train_core.run.train import NonFiniteError, TrainConfig, TrainingRecipe, TrainingStopped, train

BUCKETS = BucketConfig(resolution=(128, 128), min_bucket_reso=64, max_bucket_reso=256)
BAD_STEP = 3  # with batch size 1, a PoisonedLatents' read n is step n


class _NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class _NaNGradientBackend:
    """The tiny backend, except that the `bad_call`-th prediction back-propagates NaN."""

    def __init__(self, inner, bad_call: int):
        self.inner, self.bad_call, self.calls = inner, bad_call, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict(self, *args):
        self.calls += 1
        out = self.inner.predict(*args)
        return _NaNGradient.apply(out) if self.calls == self.bad_call else out


def _recipe(steps=5, **train_kwargs):
    return TrainingRecipe(
        train=TrainConfig(max_train_steps=steps, train_batch_size=1, seed=3, **train_kwargs),
        network=NetworkConfig(network_dim=4, network_alpha=4.0),
        optimizer=OptimizerConfig(learning_rate=1e-3),
    )


def _setup(dataset_dir):
    backend = tiny_backend("sd15", seed=0)
    dataset = load_dataset(DatasetConfig(path=dataset_dir))
    plan = plan_buckets(dataset.images, BUCKETS)
    return backend, dataset, plan, build_latents(dataset, plan, backend, CacheConfig(mode="ram"))


def _good_weights(dataset_dir, steps):
    return train(*_setup(dataset_dir), _recipe(steps)).kohya_state_dict()


def _assert_same(got, want):
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_weights(shapes_dataset):
    backend, dataset, plan, latents = _setup(shapes_dataset)
    with pytest.raises(TrainingStopped) as stopped:
        train(backend, dataset, plan, PoisonedLatents(latents, BAD_STEP), _recipe())
    error = stopped.value.__cause__
    assert isinstance(error, NonFiniteError) and error.step == BAD_STEP
    assert "the loss of step 3 is nan" in str(stopped.value)
    assert stopped.value.partial.steps == stopped.value.state.step == BAD_STEP - 1
    _assert_same(stopped.value.partial.kohya_state_dict(), _good_weights(shapes_dataset, BAD_STEP - 1))


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_nan_gradient_stops_before_the_update(shapes_dataset, max_grad_norm):
    """With clipping the norm comes from clip_grad_norm_, without it from its own computation."""
    backend, dataset, plan, latents = _setup(shapes_dataset)
    recipe = dataclasses.replace(
        _recipe(), optimizer=OptimizerConfig(learning_rate=1e-3, max_grad_norm=max_grad_norm)
    )
    with pytest.raises(TrainingStopped, match="the gradient norm of step 3 is nan") as stopped:
        train(_NaNGradientBackend(backend, BAD_STEP), dataset, plan, latents, recipe)
    reference = dataclasses.replace(_recipe(BAD_STEP - 1), optimizer=recipe.optimizer)
    _assert_same(
        stopped.value.partial.kohya_state_dict(),
        train(*_setup(shapes_dataset), reference).kohya_state_dict(),
    )


def test_fp16_grad_scaler_skips_a_nan_step_and_counts_it(shapes_dataset):
    backend, dataset, plan, latents = _setup(shapes_dataset)
    trained = train(
        backend, dataset, plan, PoisonedLatents(latents, BAD_STEP), _recipe(mixed_precision="fp16")
    )
    assert trained.completed and trained.skipped_steps >= 1
    assert all(torch.isfinite(v).all() for v in trained.kohya_state_dict().values())


def test_run_saves_the_last_good_weights_and_a_state_when_the_loss_turns_nan(
    shapes_dataset, tmp_path, monkeypatch
):
    """run_training: the partial LoRA file holds step 2's weights (fp16) and the state resumes at step 2."""
    import lora_train_core.run.orchestrator as run_module

    real_build = run_module.build_latents
    monkeypatch.setattr(
        run_module, "build_latents", lambda *a, **k: PoisonedLatents(real_build(*a, **k), BAD_STEP)
    )
    cfg = RunConfig(
        model=None,
        dataset=DatasetConfig(path=shapes_dataset),
        buckets=BUCKETS,
        output=OutputConfig(output_dir=tmp_path / "out", output_name="lora"),
        recipe=_recipe(),
    )
    with pytest.raises(TrainingStopped):
        run_training(cfg, tiny_backend("sd15", seed=0), say=lambda _: None)
    saved = load_file(tmp_path / "out" / "lora-partial.safetensors")
    want = {k: v.to(torch.float16) for k, v in _good_weights(shapes_dataset, BAD_STEP - 1).items()}
    _assert_same(saved, want)
    state = load_training_state(tmp_path / "out" / "state")
    assert state.step == BAD_STEP - 1
