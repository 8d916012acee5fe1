"""The bench times the core's own step: one default step of `OurStep` is one step of train().

On the CPU, in float32 (mixed_precision "no"), tiny SD1.5 model: the bench's step built by
`build_ours` (the UNet of `bench.models.build_unet`, its own network, optimiser and schedule,
its own draw of noise and timesteps) and one optimiser step of `train()` on the same UNet
weights, LoRA weights, latents, text-encoder outputs and seed give the same loss and the same
updated LoRA weights, bit for bit. What the bench builds or draws on its own (everything but
step.py's functions) can therefore not drift from the core unseen.
"""

from __future__ import annotations

import torch
from tiny_run import prepared_sd15

from bench.models import Case, StepInputs
from bench.steps import LEARNING_RATE, MAX_GRAD_NORM, RANK, FastPath, build_ours
from lora_train_core.data.buckets import epoch_batches
from lora_train_core.model.network import NetworkConfig
from lora_train_core.optim.optimizers import OptimizerConfig
from lora_train_core.run.train import StartFrom, TrainConfig, TrainingRecipe, train

SEED, BATCH = 11, 2
CASE = Case("tiny_sd15_b2", "sd15", 128, BATCH)


def _bench_step(backend, dataset, plan, latents):
    """One step of the bench on train()'s first batch: (loss, LoRA weights before, after)."""
    _, indices = epoch_batches(plan, BATCH, SEED, 1)[0]
    with torch.no_grad():  # text-encoder LoRA off: train() encodes the captions without grad
        text = backend.encode_text([dataset.images[i].caption for i in indices])
    inputs = StepInputs(torch.stack([latents.get(i).latents for i in indices]), text.hidden, None, None)
    fast = FastPath(autocast=False)  # mixed_precision "no", every bench prototype off
    setup = build_ours(CASE, inputs, torch.device("cpu"), tiny=True, fast=fast, weight_dtype=torch.float32)
    assert all(
        torch.equal(a, b)
        for a, b in zip(setup.unet.state_dict().values(), backend.unet.state_dict().values(), strict=True)
    ), "the bench's UNet is not the tiny backend's"
    # lora_up starts at zero, which leaves lora_down without a gradient; give both one
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in setup.network.named_lora_parameters():
            if name.endswith("lora_up.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    before = setup.network.kohya_state_dict()
    loss = setup.step(torch.Generator().manual_seed(SEED))  # train() seeds its generator so
    return loss, before, setup.network.kohya_state_dict()


def _train_step(backend, dataset, plan, latents, start, learning_rate=LEARNING_RATE):
    recipe = TrainingRecipe(
        train=TrainConfig(max_train_steps=1, train_batch_size=BATCH, seed=SEED),
        network=NetworkConfig(network_dim=RANK, network_alpha=RANK, train_text_encoder=False),
        optimizer=OptimizerConfig(learning_rate=learning_rate, max_grad_norm=MAX_GRAD_NORM),
    )
    trained = train(backend, dataset, plan, latents, recipe, start=StartFrom(weights=start))
    return trained.losses, trained.network.kohya_state_dict()


def _differing(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [key for key in a if not torch.equal(a[key], b[key])]


def test_bench_default_step_is_bit_identical_to_a_train_step(shapes_dataset):
    bench_loss, before, bench_after = _bench_step(*prepared_sd15(shapes_dataset))
    train_losses, train_after = _train_step(*prepared_sd15(shapes_dataset), start=before)

    assert train_losses == [bench_loss]
    assert _differing(before, bench_after), "the step changed no LoRA weight"
    assert _differing(train_after, bench_after) == []


def test_bench_step_comparison_fails_when_the_train_step_differs(shapes_dataset):
    bench_loss, before, bench_after = _bench_step(*prepared_sd15(shapes_dataset))
    lr = 2 * LEARNING_RATE
    train_losses, train_after = _train_step(*prepared_sd15(shapes_dataset), start=before, learning_rate=lr)

    assert train_losses == [bench_loss]  # the learning rate changes the update only
    assert _differing(train_after, bench_after)
