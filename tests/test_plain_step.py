"""With every noise/loss/caption option at its default, a training step is exactly the plain step.

The plain step is written out here from the textbook: ε ~ N(0, I), t ~ U{0..999},
x_t = √ā_t·x0 + √(1−ā_t)·ε, MSE against ε, clip to norm 1, AdamW. The options of
noise.py, loss.py and captions.py must cost nothing when off: same bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tiny_run import prepared_sd15

from lora_train_core.data.buckets import epoch_batches
from lora_train_core.model.network import LoRANetwork, NetworkConfig
from lora_train_core.optim.optimizers import OptimizerConfig
from lora_train_core.run.train import TrainConfig, TrainingRecipe, train

SEED, BATCH, LR = 11, 2, 1e-3
NET = NetworkConfig(network_dim=4, network_alpha=4.0)


def _plain_step(backend, dataset, plan, latents):
    torch.manual_seed(SEED)
    network = LoRANetwork(backend.lora_targets(False, True, True), NET)
    params = [p for _, p in network.named_lora_parameters()]
    optimizer = torch.optim.AdamW(params, lr=LR, foreach=True)
    generator = torch.Generator().manual_seed(SEED)
    _, indices = epoch_batches(plan, BATCH, SEED, 1)[0]
    samples = [latents.get(i) for i in indices]
    x0 = torch.stack([s.latents for s in samples])
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, 1000, (BATCH,), generator=generator)
    a = backend.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a**0.5 * x0 + (1 - a) ** 0.5 * noise
    captions = [dataset.images[i].caption for i in indices]
    with network.applied():
        network.train()
        pred = backend.predict(noisy, t, backend.encode_text(captions), None)
    loss = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3)).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return loss.item(), network.kohya_state_dict()


def test_default_step_is_bit_identical_to_the_plain_step(shapes_dataset):
    backend, dataset, plan, latents = prepared_sd15(shapes_dataset)
    plain_loss, plain_weights = _plain_step(backend, dataset, plan, latents)

    backend, dataset, plan, latents = prepared_sd15(shapes_dataset)
    recipe = TrainingRecipe(
        train=TrainConfig(max_train_steps=1, train_batch_size=BATCH, seed=SEED),
        network=NET,
        optimizer=OptimizerConfig(learning_rate=LR),
    )
    trained = train(backend, dataset, plan, latents, recipe)

    assert trained.losses == [plain_loss]
    weights = trained.network.kohya_state_dict()
    assert weights.keys() == plain_weights.keys()
    for key in weights:
        assert torch.equal(weights[key], plain_weights[key]), key
