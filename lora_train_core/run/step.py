"""One optimiser step at a time: the epoch loop, the step's math, the NaN guard, and state.

`StepRunner` holds a run's parts so that a step reads top to bottom (kohya
train_network.py): load latents, process captions, draw noise and timesteps,
predict, weight the loss, backpropagate; every `gradient_accumulation_steps`
batches, clip and step the optimiser. After each optimiser step it notes
where the run stands (epoch, batch, every RNG), so that a TrainingState taken
then, or on a later stop, continues the run bit-exactly. A loss or gradient
norm that is not finite stops the run before the update (fp16 excepted: its
grad scaler skips such steps, and they are counted).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random

import torch

from ..data.buckets import BucketPlan, epoch_batches
from ..data.captions import process_caption
from ..model.backend import TextConditioning
from ..objective.loss import training_loss
from ..objective.noise import add_noise, perturbed_noise, sample_noise, sample_timesteps, velocity_target
from ..optim.param_groups import set_text_encoder_trainable
from .cuda_graphs import GraphedBackward
from .distributed import SINGLE_PROCESS, DataParallel
from .state import RngState, TrainingState, data_fingerprint, recipe_record
from .trained import NonFiniteError, StepReport, TrainedLora

log = logging.getLogger(__name__)
MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class StepRunner:
    """A run's parts and where it stands; train() calls `run_epoch` until the steps are done."""

    def __init__(
        self,
        backend,
        dataset,
        latents,
        recipe,
        network,
        optimizer,
        scheduler,
        ema,
        alphas_cumprod,
        save_state,
        dist: DataParallel = SINGLE_PROCESS,
    ):
        self.backend, self.dataset, self.latents, self.recipe = backend, dataset, latents, recipe
        self.network, self.optimizer, self.scheduler, self.ema = network, optimizer, scheduler, ema
        self.alphas_cumprod, self.save_state, self.dist = alphas_cumprod, save_state, dist
        cfg = recipe.train
        self.generator = torch.Generator(backend.device).manual_seed(cfg.seed)
        self.caption_rng = random.Random(cfg.seed)
        self.amp_dtype = MIXED_PRECISION[cfg.mixed_precision]
        self.scaler = torch.amp.GradScaler(backend.device.type, enabled=cfg.mixed_precision == "fp16")
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.graphed = recipe.speed.cuda_graph
        self.backward = (
            GraphedBackward(self._loss_and_backward, self.params) if self.graphed else self._loss_and_backward
        )
        self.micro_step = 0  # batches accumulated since the last optimiser step
        self.pending_losses: list[torch.Tensor] = []  # this optimiser step's batch losses, on the device
        self.text_encoder_trains = self._text_encoder_was_training = True
        # Where the last optimiser step left the run: (epoch, batches of it consumed, RNGs then).
        self.boundary: tuple[int, int, RngState] | None = None
        self.updating = False  # True while the weights change: no state can be taken then

    def run_epoch(self, plan: BucketPlan, epoch: int, result: TrainedLora, on_step, skip: int = 0) -> bool:
        """Run one epoch from its batch `skip`; True once the run's total steps are done."""
        cfg = self.recipe.train
        # Every rank walks the same global batches and computes its own share of each.
        batches = epoch_batches(plan, cfg.train_batch_size * self.dist.world_size, cfg.seed, epoch)
        for index in range(skip, len(batches)):
            _bucket, indices = batches[index]
            self.text_encoder_trains = self.recipe.optimizer.text_encoder_trains_at(result.steps)
            self.pending_losses.append(self.forward_backward(indices, epoch))
            self.micro_step += 1
            # As kohya (accelerate syncs at the end of the dataloader), an epoch's last batch
            # steps the optimiser even when fewer batches were accumulated.
            if self.micro_step < cfg.gradient_accumulation_steps and index + 1 < len(batches):
                continue
            self.micro_step = 0
            loss = self.optimizer_step(result.steps + 1, result)
            result.steps += 1
            result.losses.append(loss)
            rng = RngState.capture(self.generator, self.caption_rng, self.backend.device)
            self.boundary = (epoch, index + 1, rng)
            every = cfg.save_state_every_n_steps
            if every and result.steps % every == 0:
                self.save_state(self.snapshot(result, plan))
            if on_step:
                lr = self.scheduler.get_last_lr()[0]
                on_step(StepReport(result.steps, result.total_steps, loss, lr, epoch, result))
            if result.steps >= result.total_steps:
                return True
        return False

    def forward_backward(self, indices, epoch: int) -> torch.Tensor:
        """One batch's forward and backward; its loss stays on the device until the optimiser step."""
        recipe, backend = self.recipe, self.backend
        samples = [self.latents.get(i, self.generator) for i in indices]
        latents = torch.stack([s.latents for s in samples]).to(backend.device, torch.float32)
        size_cond = torch.stack([s.size_conditioning() for s in samples]).to(backend.device)
        captions = [
            process_caption(image.caption, recipe.captions_for(image.subset), epoch, self.caption_rng)
            for image in (self.dataset.images[i] for i in indices)
        ]
        noise = sample_noise(latents, recipe.noise, self.generator)
        timesteps = sample_timesteps(len(indices), recipe.noise, self.generator, backend.device)
        noisy = add_noise(
            latents, perturbed_noise(noise, recipe.noise, self.generator), timesteps, self.alphas_cumprod
        )
        if backend.prediction_type == "v_prediction":
            target = velocity_target(latents, noise, timesteps, self.alphas_cumprod)
        else:
            target = noise
        # Everything above was drawn for the whole global batch; this rank computes its share.
        mine = self.dist.share(len(indices))
        if mine.start == mine.stop:  # more ranks than samples: this rank only joins the averaging
            return self.dist.mean(torch.zeros((), device=backend.device))
        with self._autocast():
            text = self._encode_text(captions[mine])
        loss = self.backward(
            noisy[mine],
            timesteps[mine],
            text.hidden,
            text.pooled,
            size_cond[mine],
            target[mine],
            self._sample_weights(indices[mine]),
            torch.full((), self.dist.loss_weight(len(indices)), device=backend.device),
        )
        return self.dist.mean(loss)

    def _loss_and_backward(
        self, noisy, timesteps, hidden, pooled, size_cond, target, weights, loss_weight
    ) -> torch.Tensor:
        """Predict, weigh the loss, backpropagate: the part of a step speed.cuda_graph replays."""
        recipe = self.recipe
        with self._autocast():
            pred = self.backend.predict(noisy, timesteps, TextConditioning(hidden, pooled), size_cond)
        loss = (
            training_loss(
                pred,
                target,
                timesteps,
                self.alphas_cumprod,
                self.backend.prediction_type,
                recipe.loss,
                weights,
            )
            * loss_weight
        )
        self.scaler.scale(loss / recipe.train.gradient_accumulation_steps).backward()
        return loss.detach()

    def _sample_weights(self, indices) -> torch.Tensor | None:
        """Per-sample loss weights (prior_loss_weight on regularisation images); None when all are 1."""
        weights = [self.dataset.images[i].loss_weight for i in indices]
        if all(w == 1.0 for w in weights):
            return None
        return torch.tensor(weights, dtype=torch.float32, device=self.backend.device)

    def _encode_text(self, captions) -> TextConditioning:
        if self.text_encoder_trains != self._text_encoder_was_training:
            set_text_encoder_trainable(self.optimizer.param_groups, self.text_encoder_trains)
            self._text_encoder_was_training = self.text_encoder_trains
        grad = self.recipe.network.train_text_encoder and self.text_encoder_trains
        with contextlib.nullcontext() if grad else torch.no_grad():
            return self.backend.encode_text(captions, weighted=self.recipe.captions.weighted_captions)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # a graph must not keep autocast's cache of cast weights (PyTorch's CUDA-graph notes)
        return torch.autocast(self.backend.device.type, dtype=self.amp_dtype, cache_enabled=not self.graphed)

    def optimizer_step(self, step: int, result: TrainedLora) -> float:
        """Average, clip, check and apply the accumulated gradients; returns the step's loss."""
        opt_cfg = self.recipe.optimizer
        self.dist.average_gradients(self.params)
        if opt_cfg.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.params, opt_cfg.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        # One read-back per optimiser step, the batch losses and the norm together: each host
        # sync leaves the GPU idle while the host catches up (bench/RESULTS.md measures it).
        *losses, norm_value = torch.stack([*self.pending_losses, norm.to(torch.float32)]).tolist()
        self.pending_losses = []
        fp16 = self.scaler.is_enabled()
        scale = self.scaler.get_scale() if fp16 else None
        if not fp16:  # with fp16 the grad scaler itself skips a step whose gradients are inf/NaN
            for value in losses:
                _check_finite("loss", value, step)
            _check_finite("gradient norm", norm_value, step)
        self.updating = True
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if fp16 and self.scaler.get_scale() < scale:
            result.skipped_steps += 1
            log.info("step %d: fp16 gradients overflowed; the grad scaler skipped the update", step)
        self.scheduler.step()
        # recorded graphs write into the same .grad tensors every replay
        self.optimizer.zero_grad(set_to_none=not self.graphed)
        if self.ema is not None:
            self.ema.step(step)
        self.updating = False
        loss = 0.0
        for value in losses:
            loss += value / self.recipe.train.gradient_accumulation_steps
        return loss

    def snapshot(self, result: TrainedLora, plan: BucketPlan) -> TrainingState:
        """The run as it stood after its last optimiser step (see state.TrainingState)."""
        epoch, batch, rng = self.boundary
        return TrainingState(
            step=result.steps,
            epoch=epoch,
            batch_in_epoch=batch,
            losses=list(result.losses),
            started_at=result.started_at,
            skipped_steps=result.skipped_steps,
            family=self.backend.family,
            recipe=recipe_record(self.recipe),
            data=data_fingerprint(self.dataset, plan),
            network=self.network.kohya_state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            ema=self.ema.state_dict() if self.ema is not None else None,
            rng=rng,
        )

    def stop_state(self, result: TrainedLora, plan: BucketPlan) -> TrainingState | None:
        """The state to save when training stops: none before the first step or mid-update."""
        if self.boundary is None or self.updating:
            return None
        return self.snapshot(result, plan)

    def restore(self, state: TrainingState, result: TrainedLora) -> tuple[int, int]:
        """Load `state` into this run; returns (epoch, batch) where training goes on."""
        self.network.load_kohya_state_dict(state.network)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        self.scaler.load_state_dict(state.scaler)
        if self.ema is not None:
            self.ema.load_state_dict(state.ema)
        state.rng.restore(self.generator, self.caption_rng, self.backend.device)
        result.steps, result.epochs, result.losses = state.step, state.epoch, list(state.losses)
        result.started_at, result.skipped_steps = state.started_at, state.skipped_steps
        self.boundary = (state.epoch, state.batch_in_epoch, state.rng)
        return state.epoch, state.batch_in_epoch


def _check_finite(what: str, value: float, step: int) -> None:
    if not math.isfinite(value):
        raise NonFiniteError(what, value, step)
