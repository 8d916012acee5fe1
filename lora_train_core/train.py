"""The training recipe: one readable loop over the components.

`train()` wires a backend, a dataset with its bucket plan and latents, and the
configs of the network, optimiser, noise, loss and EMA into kohya's LoRA
training step (train_network.py): encode captions, draw noise and timesteps,
predict, weight the loss, step the optimiser. Everything random flows from the
seed, so a CPU run is reproducible.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .backends.base import Backend, TextConditioning
from .buckets import BucketPlan, epoch_batches
from .captions import CaptionConfig, process_caption
from .dataset import Dataset
from .ema import EMAConfig, LoraEMA
from .errors import ConfigError, check_choice, check_int
from .latent_cache import CachedLatents, OnTheFlyLatents
from .loss import LossConfig, check_loss_for_prediction_type, rescale_zero_terminal_snr, training_loss
from .network import LoRANetwork, NetworkConfig
from .noise import NoiseConfig, add_noise, perturbed_noise, sample_noise, sample_timesteps, velocity_target
from .optim import OptimizerConfig, build_optimizer
from .param_groups import BlockWeights, build_param_groups, excluded_modules, set_text_encoder_trainable
from .schedule import build_lr_scheduler

MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainConfig:
    """[train] section (kohya names)."""

    max_train_steps: int = 1600  # optimiser steps; 0 = use max_train_epochs
    max_train_epochs: int = 0
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no, bf16, fp16 (fp16 uses a grad scaler)
    gradient_checkpointing: bool = False
    seed: int = 42

    def __post_init__(self):
        check_int("train.max_train_steps", self.max_train_steps, 0, 10_000_000)
        check_int("train.max_train_epochs", self.max_train_epochs, 0, 100_000)
        if self.max_train_steps == 0 and self.max_train_epochs == 0:
            raise ConfigError("train: set max_train_steps or max_train_epochs (both are 0)")
        check_int("train.train_batch_size", self.train_batch_size, 1, 4096)
        check_int("train.gradient_accumulation_steps", self.gradient_accumulation_steps, 1, 4096)
        check_choice("train.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_int("train.seed", self.seed, 0, 2**63 - 1)


@dataclass(frozen=True)
class TrainingRecipe:
    """Every config that shapes a run, passed as one value."""

    train: TrainConfig
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    blocks: BlockWeights | None = None


@dataclass
class TrainedLora:
    """What a run produced; `network` still holds the trained modules."""

    network: LoRANetwork
    ema: LoraEMA | None
    losses: list[float]
    steps: int
    epochs: int
    total_steps: int
    started_at: float
    finished_at: float = 0.0

    @property
    def completed(self) -> bool:
        return self.steps >= self.total_steps

    def kohya_state_dict(self, use_ema: bool = False) -> dict[str, torch.Tensor]:
        """The trained weights under kohya keys; with `use_ema`, the EMA-averaged ones."""
        state = self.network.kohya_state_dict()
        if not use_ema:
            return state
        if self.ema is None:
            raise ConfigError("ema: this run kept no EMA weights; set ema.enabled = true before training")
        state.update({k: v.detach().to("cpu").clone() for k, v in self.ema.shadow_state_dict().items()})
        return state


class TrainingStopped(Exception):
    """Training stopped early (cancel, error); `partial` holds what was trained so far."""

    def __init__(self, message: str, partial: TrainedLora):
        super().__init__(message)
        self.partial = partial


@dataclass(frozen=True)
class StepReport:
    """What a step callback sees after each optimiser step; `trained` is the live run."""

    step: int
    total: int
    loss: float
    lr: float
    epoch: int
    trained: TrainedLora


StepCallback = Callable[[StepReport], None]


def total_optimizer_steps(plan: BucketPlan, cfg: TrainConfig) -> tuple[int, int]:
    """(optimiser steps, epochs) for the run, as kohya counts them."""
    batches = len(epoch_batches(plan, cfg.train_batch_size, cfg.seed, 1))
    steps_per_epoch = math.ceil(batches / cfg.gradient_accumulation_steps)
    if cfg.max_train_epochs:
        return steps_per_epoch * cfg.max_train_epochs, cfg.max_train_epochs
    return cfg.max_train_steps, math.ceil(cfg.max_train_steps / steps_per_epoch)


def train(
    backend: Backend,
    dataset: Dataset,
    plan: BucketPlan,
    latents: CachedLatents | OnTheFlyLatents,
    recipe: TrainingRecipe,
    on_step: StepCallback | None = None,
) -> TrainedLora:
    """Train a LoRA; on any exception raise TrainingStopped carrying the partial result."""
    cfg = recipe.train
    check_loss_for_prediction_type(recipe.loss, backend.prediction_type)
    torch.manual_seed(cfg.seed)  # LoRA init and dropout masks
    network = build_network(backend, recipe)
    groups = build_param_groups(
        network.named_lora_parameters(), backend.family, recipe.optimizer, recipe.blocks
    )
    optimizer = build_optimizer(groups, recipe.optimizer, backend.device)
    total_steps, total_epochs = total_optimizer_steps(plan, cfg)
    scheduler = build_lr_scheduler(optimizer, recipe.optimizer, total_steps)
    ema = LoraEMA(network.named_lora_parameters(), recipe.ema) if recipe.ema.enabled else None
    alphas_cumprod = backend.alphas_cumprod
    if recipe.loss.zero_terminal_snr:
        alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
    result = TrainedLora(network, ema, [], 0, 0, total_steps, time.time())
    step_fn = _StepRunner(
        backend, dataset, latents, recipe, network, optimizer, scheduler, ema, alphas_cumprod
    )
    try:
        with network.applied():
            _set_train_mode(backend, network, cfg, training=True)
            for epoch in range(1, total_epochs + 1):
                result.epochs = epoch
                if step_fn.run_epoch(plan, epoch, result, on_step):
                    break
    except Exception as exc:
        result.finished_at = time.time()
        raise TrainingStopped(f"training stopped at step {result.steps}: {exc}", result) from exc
    finally:
        _set_train_mode(backend, network, cfg, training=False)
    result.finished_at = time.time()
    return result


def build_network(backend: Backend, recipe: TrainingRecipe) -> LoRANetwork:
    """The LoRA over the backend's kohya targets, minus blocks of LR weight 0 (kohya never makes them)."""
    net = recipe.network
    targets = backend.lora_targets(net.conv_dim > 0, net.train_unet, net.train_text_encoder)
    if recipe.blocks is not None:
        dropped = set(excluded_modules([t.name for t in targets], backend.family, recipe.blocks))
        targets = [t for t in targets if t.name not in dropped]
    return LoRANetwork(targets, net).to(backend.device)


def _set_train_mode(backend: Backend, network: LoRANetwork, cfg: TrainConfig, training: bool) -> None:
    network.train(training)
    if cfg.gradient_checkpointing:
        backend.set_gradient_checkpointing(training)
        # diffusers checkpoints only modules in train mode; the frozen base has no dropout to change.
        for module in backend.trainable_modules():
            module.train(training)


class _StepRunner:
    """Holds the state of one run so that each step reads top to bottom."""

    def __init__(self, backend, dataset, latents, recipe, network, optimizer, scheduler, ema, alphas_cumprod):
        self.backend, self.dataset, self.latents, self.recipe = backend, dataset, latents, recipe
        self.network, self.optimizer, self.scheduler, self.ema = network, optimizer, scheduler, ema
        self.alphas_cumprod = alphas_cumprod
        cfg = recipe.train
        self.generator = torch.Generator(backend.device).manual_seed(cfg.seed)
        self.caption_rng = random.Random(cfg.seed)
        self.amp_dtype = MIXED_PRECISION[cfg.mixed_precision]
        self.scaler = torch.amp.GradScaler(backend.device.type, enabled=cfg.mixed_precision == "fp16")
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.micro_step = 0
        self.pending_loss = 0.0
        self.text_encoder_trains = self._text_encoder_was_training = True

    def run_epoch(self, plan: BucketPlan, epoch: int, result: TrainedLora, on_step) -> bool:
        """Run one epoch; True once the run's total steps are done."""
        cfg = self.recipe.train
        for _bucket, indices in epoch_batches(plan, cfg.train_batch_size, cfg.seed, epoch):
            self.text_encoder_trains = self.recipe.optimizer.text_encoder_trains_at(result.steps)
            loss = self.forward_backward(indices, epoch)
            self.pending_loss += loss / cfg.gradient_accumulation_steps
            self.micro_step += 1
            if self.micro_step % cfg.gradient_accumulation_steps:
                continue
            self.optimizer_step(result.steps + 1)
            result.steps += 1
            result.losses.append(self.pending_loss)
            if on_step:
                lr = self.scheduler.get_last_lr()[0]
                on_step(StepReport(result.steps, result.total_steps, self.pending_loss, lr, epoch, result))
            self.pending_loss = 0.0
            if result.steps >= result.total_steps:
                return True
        return False

    def forward_backward(self, indices, epoch: int) -> float:
        recipe, backend = self.recipe, self.backend
        samples = [self.latents.get(i, self.generator) for i in indices]
        latents = torch.stack([s.latents for s in samples]).to(backend.device, torch.float32)
        size_cond = torch.stack([s.size_conditioning() for s in samples]).to(backend.device)
        captions = [
            process_caption(self.dataset.images[i].caption, recipe.captions, epoch, self.caption_rng)
            for i in indices
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
        with self._autocast():
            text = self._encode_text(captions)
            pred = backend.predict(noisy, timesteps, text, size_cond)
        loss = training_loss(
            pred,
            target,
            timesteps,
            self.alphas_cumprod,
            backend.prediction_type,
            recipe.loss,
            self._sample_weights(indices),
        )
        self.scaler.scale(loss / recipe.train.gradient_accumulation_steps).backward()
        return loss.detach().item()

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
            return self.backend.encode_text(captions)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.backend.device.type, dtype=self.amp_dtype)

    def optimizer_step(self, step: int) -> None:
        opt_cfg = self.recipe.optimizer
        if opt_cfg.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, opt_cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(step)
