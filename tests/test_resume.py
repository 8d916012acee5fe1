"""Training state: a stopped and resumed run ends bit-exactly where an uninterrupted one does.

The reference is always the uninterrupted run itself, trained in the same process with
the same seed; every random source is switched on (dropouts draw from torch's CPU RNG,
noise offset and timesteps from the trainer's generator, caption shuffle and dropout
from the caption Random), with EMA, a warmup + cosine schedule and gradient
accumulation that straddles epochs, so a state that forgot any of them would differ.

The dataset: 5 images × 2 repeats in two buckets, (64, 192) with 2 and (128, 128)
with 8, so an epoch is 1 + 4 = 5 batches of 2. A step takes 2 batches, and the
lone last batch of an epoch makes a step of its own (kohya): steps 1-3 are epoch
1 (step 3 ends it), steps 4-6 epoch 2 (step 5 ends after its 4th batch).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lora_train_core.data.buckets import BucketConfig, plan_buckets
from lora_train_core.data.captions import CaptionConfig
from lora_train_core.data.dataset import DatasetConfig, load_dataset
from lora_train_core.data.latent_cache import CacheConfig, build_latents
from lora_train_core.demo import make_synthetic_dataset
from lora_train_core.errors import ConfigError
from lora_train_core.model.network import NetworkConfig
from lora_train_core.model.tiny_models import tiny_backend
from lora_train_core.objective.noise import NoiseConfig
from lora_train_core.optim.ema import EMAConfig
from lora_train_core.optim.optimizers import OptimizerConfig
from lora_train_core.run.state_files import (
    RECORD_FILE,
    StateWriter,
    latest_state,
    load_training_state,
    save_training_state,
)
from lora_train_core.run.train import TrainConfig, TrainingRecipe, TrainingStopped, train

BUCKETS = BucketConfig(resolution=(128, 128), min_bucket_reso=64, max_bucket_reso=256)
TOTAL = 6


def _recipe(steps=TOTAL, every=0, **network):
    return TrainingRecipe(
        train=TrainConfig(
            max_train_steps=steps,
            train_batch_size=2,
            gradient_accumulation_steps=2,
            seed=5,
            save_state_every_n_steps=every,
        ),
        network=NetworkConfig(
            **{
                "network_dim": 4,
                "network_alpha": 2.0,
                "network_dropout": 0.1,
                "rank_dropout": 0.1,
                "module_dropout": 0.1,
                **network,
            }
        ),
        optimizer=OptimizerConfig(learning_rate=1e-3, lr_scheduler="cosine", lr_warmup_steps=2),
        noise=NoiseConfig(noise_offset=0.05),
        captions=CaptionConfig(shuffle_caption=True, caption_dropout_rate=0.3),
        ema=EMAConfig(enabled=True, decay=0.9),
    )


def _setup(dataset_dir):
    backend = tiny_backend("sd15", seed=0)
    dataset = load_dataset(DatasetConfig(path=dataset_dir))
    plan = plan_buckets(dataset.images, BUCKETS)
    return backend, dataset, plan, build_latents(dataset, plan, backend, CacheConfig(mode="ram"))


def _stop_at(step):
    def on_step(report):
        if report.step == step:
            raise RuntimeError(
                "cancel"
            )  # any exception stops a run the same way (tests/test_run.py: BaseException)

    return on_step


def _final(trained):
    return trained.kohya_state_dict(), trained.kohya_state_dict(use_ema=True), trained.losses


def _assert_identical(a, b):
    for got, want in zip(a[:2], b[:2], strict=True):
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key
    assert a[2] == b[2]


@pytest.fixture
def shapes_dataset(tmp_path):
    return make_synthetic_dataset(tmp_path / "dataset", count=5)


@pytest.fixture
def straight(shapes_dataset):
    """The uninterrupted run of TOTAL steps."""
    return _final(train(*_setup(shapes_dataset), _recipe()))


@pytest.mark.parametrize("stop_after", [2, 3, 5])
def test_stopped_and_resumed_run_ends_with_the_weights_of_the_uninterrupted_run(
    shapes_dataset, tmp_path, straight, stop_after
):
    """Steps 1..k, cancel, save, load, steps k+1..N: same LoRA, EMA and losses, bit for bit."""
    with pytest.raises(TrainingStopped) as stopped:
        train(*_setup(shapes_dataset), _recipe(), on_step=_stop_at(stop_after))
    assert stopped.value.state.step == stop_after
    folder = save_training_state(stopped.value.state, tmp_path / "state")

    resumed = train(*_setup(shapes_dataset), _recipe(), resume=load_training_state(folder))
    assert resumed.steps == TOTAL and resumed.completed
    _assert_identical(_final(resumed), straight)


def test_a_periodic_state_resumes_to_the_same_weights(shapes_dataset, tmp_path, straight):
    writer = StateWriter(tmp_path / "state", "run", keep_last=0)
    train(*_setup(shapes_dataset), _recipe(every=3), save_state=writer)
    assert [p.name for p in sorted((tmp_path / "state").iterdir())] == [
        "run-step00000003",
        "run-step00000006",
    ]

    resumed = train(
        *_setup(shapes_dataset), _recipe(), resume=load_training_state(tmp_path / "state/run-step00000003")
    )
    _assert_identical(_final(resumed), straight)


def test_a_state_of_the_last_step_resumes_to_a_finished_run(shapes_dataset, tmp_path, straight):
    writer = StateWriter(tmp_path / "state", "run")
    train(*_setup(shapes_dataset), _recipe(every=TOTAL), save_state=writer)
    resumed = train(*_setup(shapes_dataset), _recipe(), resume=load_training_state(tmp_path / "state"))
    _assert_identical(_final(resumed), straight)


def test_state_json_records_the_position_and_the_tensors_hold_optimizer_and_rng(shapes_dataset, tmp_path):
    with pytest.raises(TrainingStopped) as stopped:
        train(*_setup(shapes_dataset), _recipe(), on_step=_stop_at(3))
    folder = save_training_state(stopped.value.state, tmp_path / "s")
    record = json.loads((folder / RECORD_FILE).read_text())
    assert (record["step"], record["epoch"], record["batch_in_epoch"]) == (3, 1, 5)
    with safe_open(str(folder / "state.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("network.lora_unet_") for k in keys)
    assert any(k.startswith("optimizer.state.") and k.endswith("exp_avg_sq") for k in keys)
    assert {"rng.torch_cpu", "rng.generator", "losses"} <= keys
    assert any(k.startswith("ema.shadow.") for k in keys)


def test_an_epochs_last_batch_steps_the_optimizer_as_kohya_does(shapes_dataset):
    """5 batches an epoch, 2 accumulated: steps of batches (1,2), (3,4), (5), then epoch 2 alike."""
    seen = []
    trained = train(*_setup(shapes_dataset), _recipe(), on_step=lambda r: seen.append((r.step, r.epoch)))
    assert seen == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]
    assert trained.completed


def _a_state(shapes_dataset, tmp_path, name="s", step=1):
    with pytest.raises(TrainingStopped) as stopped:
        train(*_setup(shapes_dataset), _recipe(), on_step=_stop_at(step))
    return stopped.value.state, save_training_state(stopped.value.state, tmp_path / name)


def test_a_state_without_its_json_is_incomplete_and_never_chosen(shapes_dataset, tmp_path):
    state, folder = _a_state(shapes_dataset, tmp_path, "run-step00000001")
    later = save_training_state(state, tmp_path / "run-step00000002")
    (later / RECORD_FILE).unlink()  # as a kill between the two writes leaves it
    assert latest_state(tmp_path) == folder
    with pytest.raises(ConfigError, match="incomplete training state"):
        load_training_state(later)


def test_tensors_of_another_save_are_refused(shapes_dataset, tmp_path):
    state, folder = _a_state(shapes_dataset, tmp_path, "a")
    other = save_training_state(state, tmp_path / "b")
    (other / "state.safetensors").replace(folder / "state.safetensors")
    with pytest.raises(ConfigError, match=r"does not belong to state\.json"):
        load_training_state(folder)


def test_writer_keeps_the_newest_n_states_and_drops_interrupted_saves(shapes_dataset, tmp_path):
    state, _ = _a_state(shapes_dataset, tmp_path / "scratch")
    root = tmp_path / "state"
    (root / "run-step00000000").mkdir(parents=True)  # an interrupted save: no JSON
    writer = StateWriter(root, "run", keep_last=2)
    for step in (1, 2, 3):
        state.step = step
        writer(state)
    assert sorted(p.name for p in root.iterdir()) == ["run-step00000002", "run-step00000003"]


def test_resuming_with_another_rank_is_a_clear_error(shapes_dataset, tmp_path):
    state, _ = _a_state(shapes_dataset, tmp_path)
    with pytest.raises(ConfigError, match=r"network\.network_dim: 4 in the state, 8 now"):
        train(*_setup(shapes_dataset), _recipe(network_dim=8), resume=state)


def test_resuming_on_another_model_family_is_a_clear_error(shapes_dataset, tmp_path):
    state, _ = _a_state(shapes_dataset, tmp_path)
    backend = tiny_backend("sdxl", seed=0)
    dataset = load_dataset(DatasetConfig(path=shapes_dataset))
    plan = plan_buckets(dataset.images, BUCKETS)
    latents = build_latents(dataset, plan, backend, CacheConfig(mode="ram"))
    with pytest.raises(ConfigError, match="trained on a sd15 model, this model is sdxl"):
        train(backend, dataset, plan, latents, _recipe(), resume=state)


def test_save_state_every_n_steps_without_a_writer_is_refused(shapes_dataset):
    with pytest.raises(ConfigError, match=r"train\.save_state_every_n_steps"):
        train(*_setup(shapes_dataset), _recipe(every=2))
