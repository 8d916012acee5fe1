"""One training step's math, top to bottom, as small functions (kohya train_network.py).

`draw_batch` takes a batch's latents, captions, noise, timesteps and target from the run's
random sources, in kohya's order of draws; `loss_and_backward` predicts, weighs the loss and
backpropagates (the part `speed.cuda_graph` records and replays); `checked_loss` averages and
clips the accumulated gradients and stops the run on a loss or gradient norm that is not
finite, before anything changes (fp16 excepted: its grad scaler skips such steps); and
`apply_update` steps the optimiser, the schedule and the EMA. train.py's loop calls them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.captions import process_caption
from ..model.backend import TextConditioning
from ..objective.flow import flow_target, noisy_flow_input, sample_sigmas
from ..objective.flow_loss import flow_training_loss, guidance_scale_for
from ..objective.loss import training_loss
from ..objective.noise import add_noise, perturbed_noise, sample_noise, sample_timesteps, velocity_target
from ..optim.ema import LoraEMA
from .distributed import DataParallel
from .state import RngState
from .trained import NonFiniteError

log = logging.getLogger(__name__)
MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class StepContext:
    """What every step reads and none changes."""

    backend: object  # the Backend
    dataset: object  # the Dataset
    latents: object  # CachedLatents or OnTheFlyLatents
    recipe: object  # the TrainingRecipe
    alphas_cumprod: Tensor | None  # the DDPM schedule; None for a flow-matching model
    dist: DataParallel
    graphed: bool  # speed.cuda_graph: forward and backward replay from recorded graphs

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return MIXED_PRECISION[self.recipe.train.mixed_precision]

    @property
    def is_flow(self) -> bool:
        """The model is trained with the flow-matching objective (objective/flow.py)."""
        return self.backend.prediction_type == "flow"


@dataclass
class RandomSources:
    """The run's own random sources, seeded by train.seed: noise, timesteps and crops draw from
    `generator`, caption shuffling and dropout from `captions`."""

    generator: torch.Generator
    captions: random.Random

    @classmethod
    def seeded(cls, seed: int, device: torch.device) -> RandomSources:
        return cls(torch.Generator(device).manual_seed(seed), random.Random(seed))

    def capture(self, device: torch.device) -> RngState:
        return RngState.capture(self.generator, self.captions, device)

    def restore(self, rng: RngState, device: torch.device) -> None:
        rng.restore(self.generator, self.captions, device)


@dataclass(frozen=True)
class Batch:
    """A global batch as drawn; each process computes its share of the rows.

    timesteps: DDPM's integer t, or a flow model's σ ∈ [0, 1] (float32).
    guidance: the guidance input per sample (Flux-dev), else None.
    """

    noisy: Tensor
    timesteps: Tensor
    target: Tensor
    size_conditioning: Tensor
    guidance: Tensor | None
    captions: list[str]
    indices: list[int]


def draw_batch(ctx: StepContext, indices, epoch: int, rng: RandomSources) -> Batch:
    """Latents (a crop may be drawn), captions, noise, timesteps, noisy input and target."""
    recipe, device = ctx.recipe, ctx.backend.device
    samples = [ctx.latents.get(i, rng.generator) for i in indices]
    latents = torch.stack([s.latents for s in samples]).to(device, torch.float32)
    size_cond = torch.stack([s.size_conditioning() for s in samples]).to(device)
    captions = [
        process_caption(image.caption, recipe.captions_for(image.subset), epoch, rng.captions)
        for image in (ctx.dataset.images[i] for i in indices)
    ]
    noise = sample_noise(latents, recipe.noise, rng.generator)
    if ctx.is_flow:
        noisy, timesteps, target = _flow_draws(ctx, latents, noise, rng)
    else:
        noisy, timesteps, target = _ddpm_draws(ctx, latents, noise, rng)
    guidance = guidance_scale_for(recipe.flow, ctx.backend.family_spec) if ctx.is_flow else None
    if guidance is not None:
        guidance = torch.full((len(indices),), guidance, dtype=torch.float32, device=device)
    return Batch(noisy, timesteps, target, size_cond, guidance, captions, list(indices))


def _ddpm_draws(ctx: StepContext, latents: Tensor, noise: Tensor, rng: RandomSources):
    """t ~ U{min, …, max − 1}; x_t = √ā·x0 + √(1 − ā)·ε'; target ε or v (kohya's order of draws)."""
    cfg = ctx.recipe.noise
    timesteps = sample_timesteps(len(latents), cfg, rng.generator, latents.device)
    noisy = add_noise(latents, perturbed_noise(noise, cfg, rng.generator), timesteps, ctx.alphas_cumprod)
    if ctx.backend.prediction_type == "v_prediction":
        return noisy, timesteps, velocity_target(latents, noise, timesteps, ctx.alphas_cumprod)
    return noisy, timesteps, noise


def _flow_draws(ctx: StepContext, latents: Tensor, noise: Tensor, rng: RandomSources):
    """σ by flow.timestep_sampling; x_t = (1 − σ)·x0 + σ·ε'; target ε − x0 (kohya flux_train_utils
    `get_noisy_model_input_and_timesteps`, its order of draws)."""
    sigmas = sample_sigmas(
        len(latents), ctx.recipe.flow, rng.generator, latents.device, tuple(latents.shape[-2:])
    )
    noisy = noisy_flow_input(latents, perturbed_noise(noise, ctx.recipe.noise, rng.generator), sigmas)
    return noisy, sigmas, flow_target(latents, noise)


def autocast(ctx: StepContext):
    if ctx.amp_dtype is None:
        return contextlib.nullcontext()
    # a graph must not keep autocast's cache of cast weights (PyTorch's CUDA-graph notes)
    return torch.autocast(ctx.backend.device.type, dtype=ctx.amp_dtype, cache_enabled=not ctx.graphed)


def encode_captions(ctx: StepContext, captions: list[str], text_encoder_trains: bool) -> TextConditioning:
    """The batch's text conditioning; differentiable while text-encoder LoRA trains."""
    grad = ctx.recipe.network.train_text_encoder and text_encoder_trains
    with contextlib.nullcontext() if grad else torch.no_grad(), autocast(ctx):
        return ctx.backend.encode_text(captions, weighted=ctx.recipe.captions.weighted_captions)


def loss_weights(ctx: StepContext, indices) -> Tensor | None:
    """Per-sample loss weights (prior_loss_weight on regularisation images); None when all are 1."""
    weights = [ctx.dataset.images[i].loss_weight for i in indices]
    if all(w == 1.0 for w in weights):
        return None
    return torch.tensor(weights, dtype=torch.float32, device=ctx.backend.device)


def loss_and_backward(
    ctx: StepContext,
    scaler: torch.amp.GradScaler,
    noisy: Tensor,
    timesteps: Tensor,
    hidden: Tensor,
    pooled: Tensor | None,
    text_mask: Tensor | None,
    size_cond: Tensor,
    guidance: Tensor | None,
    target: Tensor,
    weights: Tensor | None,
    loss_weight: Tensor,
) -> Tensor:
    """Predict, weigh the loss, backpropagate (÷ accumulation steps); returns the detached loss.

    Tensors only (or None) in, one tensor out: the signature speed.cuda_graph records.
    """
    backend, recipe = ctx.backend, ctx.recipe
    with autocast(ctx):
        text = TextConditioning(hidden, pooled, text_mask)
        pred = backend.predict(noisy, timesteps, text, size_cond, guidance)
    if ctx.is_flow:
        loss = flow_training_loss(pred, target, noisy, timesteps, recipe.flow, recipe.loss, weights)
    else:
        loss = training_loss(
            pred, target, timesteps, ctx.alphas_cumprod, backend.prediction_type, recipe.loss, weights
        )
    loss = loss * loss_weight
    scaler.scale(loss / recipe.train.gradient_accumulation_steps).backward()
    return loss.detach()


def checked_loss(
    ctx: StepContext,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    pending_losses: list[Tensor],
    step: int,
) -> float:
    """Average the gradients over processes and clip them; the step's loss, or NonFiniteError.

    Nothing has changed the weights yet when this raises, so the run keeps step − 1's weights.
    """
    max_norm = ctx.recipe.optimizer.max_grad_norm
    ctx.dist.average_gradients(params)
    if max_norm > 0:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    # One read-back per optimiser step, the batch losses and the norm together: each host
    # sync leaves the GPU idle while the host catches up (bench/RESULTS.md measures it).
    *losses, norm_value = torch.stack([*pending_losses, norm.to(torch.float32)]).tolist()
    if not scaler.is_enabled():  # with fp16 the grad scaler itself skips a step whose gradients are inf/NaN
        for value in losses:
            _check_finite("loss", value, step)
        _check_finite("gradient norm", norm_value, step)
    loss = 0.0
    for value in losses:
        loss += value / ctx.recipe.train.gradient_accumulation_steps
    return loss


def apply_update(
    ctx: StepContext,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scheduler,
    ema: LoraEMA | None,
    step: int,
    ema_step: int,
) -> bool:
    """Step the optimiser, schedule and EMA; True when fp16's grad scaler skipped the update."""
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    skipped = scale is not None and scaler.get_scale() < scale
    if skipped:
        log.info("step %d: fp16 gradients overflowed; the grad scaler skipped the update", step)
    scheduler.step()
    # recorded graphs write into the same .grad tensors every replay
    optimizer.zero_grad(set_to_none=not ctx.graphed)
    if ema is not None:
        ema.step(ema_step)
    return skipped


def forward_backward(
    ctx: StepContext, backward, indices, epoch: int, rng: RandomSources, text_encoder_trains: bool
) -> Tensor:
    """One batch's forward and backward; its loss stays on the device until the optimiser step.

    backward: `loss_and_backward` bound to the context and scaler, or its CUDA-graph replay.
    """
    device, dist = ctx.backend.device, ctx.dist
    batch = draw_batch(ctx, indices, epoch, rng)
    # Everything above was drawn for the whole global batch; this process computes its share.
    mine = dist.share(len(indices))
    if mine.start == mine.stop:  # more processes than samples: this one only joins the averaging
        return dist.mean(torch.zeros((), device=device))
    text = encode_captions(ctx, batch.captions[mine], text_encoder_trains)
    loss = backward(
        batch.noisy[mine],
        batch.timesteps[mine],
        text.hidden,
        text.pooled,
        text.attention_mask,
        batch.size_conditioning[mine],
        None if batch.guidance is None else batch.guidance[mine],
        batch.target[mine],
        loss_weights(ctx, batch.indices[mine]),
        torch.full((), dist.loss_weight(len(indices)), device=device),
    )
    return dist.mean(loss)


def _check_finite(what: str, value: float, step: int) -> None:
    if not math.isfinite(value):
        raise NonFiniteError(what, value, step)
