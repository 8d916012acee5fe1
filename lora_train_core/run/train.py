"""The training recipe: one readable loop over the components.

`train()` wires a backend, a dataset with its bucket plan and latents, and the
configs of the network, optimiser, noise, loss and EMA into kohya's LoRA
training loop (train_network.py); step.py runs its steps. Everything random
flows from the seed, so a CPU run is reproducible, and a run resumed from a
saved state (state.py) ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial

import torch

from ..data.buckets import BucketPlan, epoch_batches
from ..data.captions import CaptionConfig
from ..data.dataset import Dataset
from ..data.latent_cache import CachedLatents, OnTheFlyLatents, check_cacheable_across_processes
from ..errors import ConfigError, check_choice, check_int
from ..model.backend import Backend
from ..model.network import LoRANetwork, NetworkConfig, is_conv_kxk
from ..objective.flow import FlowConfig
from ..objective.loss import LossConfig, rescale_zero_terminal_snr
from ..objective.noise import NoiseConfig
from ..optim.ema import EMAConfig, LoraEMA
from ..optim.optimizers import OptimizerConfig, build_optimizer
from ..optim.param_groups import (
    BlockWeights,
    build_param_groups,
    excluded_modules,
    per_module_dims,
    set_text_encoder_trainable,
)
from ..optim.schedule import build_lr_scheduler
from .checks import check_recipe
from .cuda_graphs import GraphedBackward
from .distributed import SINGLE_PROCESS, DataParallel
from .speed import SpeedConfig, speedups
from .state import RngState, TrainingState, check_resumable, data_fingerprint, recipe_record
from .step import (
    MIXED_PRECISION,
    RandomSources,
    StepContext,
    apply_update,
    checked_loss,
    forward_backward,
    loss_and_backward,
)
from .trained import NonFiniteError, StepCallback, StepReport, TrainedLora, TrainingStopped

log = logging.getLogger(__name__)
__all__ = [
    "MIXED_PRECISION",
    "NonFiniteError",
    "StartFrom",
    "StepCallback",
    "StepReport",
    "TrainConfig",
    "TrainedLora",
    "TrainingRecipe",
    "TrainingStopped",
    "build_network",
    "total_optimizer_steps",
    "train",
]


@dataclass(frozen=True)
class TrainConfig:
    """[train] section (kohya names)."""

    max_train_steps: int = 1600  # optimiser steps; 0 = use max_train_epochs
    max_train_epochs: int = 0  # train this many epochs instead of max_train_steps (0 = use the steps)
    train_batch_size: int = 1  # images per batch, each batch from one bucket
    gradient_accumulation_steps: int = 1  # batches summed into one optimiser step
    mixed_precision: str = "no"  # no, bf16, fp16 (fp16 uses a grad scaler)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    seed: int = 42  # seeds the LoRA init, noise, timesteps, crops and captions: same seed, same run
    save_state_every_n_steps: int = 0  # also saved when training stops early; 0 = only then
    save_last_n_states: int = 2  # 0 keeps every state
    scale_lr_by_processes: bool = False  # multi-process runs: learning rates x number of processes

    def __post_init__(self):
        check_int("train.max_train_steps", self.max_train_steps, 0, 10_000_000)
        check_int("train.max_train_epochs", self.max_train_epochs, 0, 100_000)
        if self.max_train_steps == 0 and self.max_train_epochs == 0:
            raise ConfigError("train: set max_train_steps or max_train_epochs (both are 0)")
        check_int("train.train_batch_size", self.train_batch_size, 1, 4096)
        check_int("train.gradient_accumulation_steps", self.gradient_accumulation_steps, 1, 4096)
        check_choice("train.mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_int("train.seed", self.seed, 0, 2**63 - 1)
        check_int("train.save_state_every_n_steps", self.save_state_every_n_steps, 0, None, "0 = off")
        check_int("train.save_last_n_states", self.save_last_n_states, 0, None, "0 keeps every state")
        if not isinstance(self.scale_lr_by_processes, bool):
            raise ConfigError(
                f"train.scale_lr_by_processes: {self.scale_lr_by_processes!r} is not true/false"
            )


@dataclass(frozen=True)
class TrainingRecipe:
    """Every config that shapes a run, passed as one value."""

    train: TrainConfig
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)  # the flow-matching objective's options
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    blocks: BlockWeights | None = None
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    # kohya per-subset caption settings: folder name (e.g. "10_cat") → its full caption config
    subset_captions: Mapping[str, CaptionConfig] = field(default_factory=dict)

    def captions_for(self, subset: str) -> CaptionConfig:
        return self.subset_captions.get(subset, self.captions)

    def all_captions(self) -> list[CaptionConfig]:
        return [self.captions, *self.subset_captions.values()]


def total_optimizer_steps(plan: BucketPlan, cfg: TrainConfig, world_size: int = 1) -> tuple[int, int]:
    """(optimiser steps, epochs) for the run, as kohya counts them (global batches with world_size ranks)."""
    batches = len(epoch_batches(plan, cfg.train_batch_size * world_size, cfg.seed, 1))
    steps_per_epoch = math.ceil(batches / cfg.gradient_accumulation_steps)
    if cfg.max_train_epochs:
        return steps_per_epoch * cfg.max_train_epochs, cfg.max_train_epochs
    return cfg.max_train_steps, math.ceil(cfg.max_train_steps / steps_per_epoch)


@dataclass(frozen=True)
class StartFrom:
    """Where a run starts when it continues another: the LoRA and EMA weights a previous stage
    ended with, and the optimiser steps taken before it (the EMA decay keeps counting)."""

    weights: Mapping[str, torch.Tensor] | None = None
    ema: dict | None = None
    steps_before: int = 0


@dataclass(frozen=True)
class Boundary:
    """Where the last optimiser step left the run: the next batch is `batch` of `epoch`."""

    epoch: int
    batch: int
    rng: RngState


@dataclass
class Trainables:
    """What a run changes as it trains: what a TrainingState saves and restores."""

    network: LoRANetwork
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    ema: LoraEMA | None
    rng: RandomSources

    def snapshot(self, result: TrainedLora, at: Boundary, recipe, family: str, data: str) -> TrainingState:
        return TrainingState(
            step=result.steps,
            epoch=at.epoch,
            batch_in_epoch=at.batch,
            losses=list(result.losses),
            started_at=result.started_at,
            skipped_steps=result.skipped_steps,
            family=family,
            recipe=recipe_record(recipe),
            data=data,
            network=self.network.kohya_state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            ema=self.ema.state_dict() if self.ema is not None else None,
            rng=at.rng,
        )

    def restore(self, state: TrainingState, result: TrainedLora, device: torch.device) -> Boundary:
        self.network.load_kohya_state_dict(state.network)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        self.scaler.load_state_dict(state.scaler)
        if self.ema is not None:
            self.ema.load_state_dict(state.ema)
        self.rng.restore(state.rng, device)
        result.steps, result.epochs, result.losses = state.step, state.epoch, list(state.losses)
        result.started_at, result.skipped_steps = state.started_at, state.skipped_steps
        return Boundary(state.epoch, state.batch_in_epoch, state.rng)


def train(
    backend: Backend,
    dataset: Dataset,
    plan: BucketPlan,
    latents: CachedLatents | OnTheFlyLatents,
    recipe: TrainingRecipe,
    on_step: StepCallback | None = None,
    resume: TrainingState | None = None,
    save_state: Callable[[TrainingState], object] | None = None,
    start: StartFrom = StartFrom(),
    dist: DataParallel = SINGLE_PROCESS,
) -> TrainedLora:
    """Train a LoRA; on any exception (also a BaseException such as a Cancel) raise TrainingStopped
    carrying the partial result and the state to resume from.

    resume: continue from this state (its settings must match `recipe`, see state.check_resumable).
    save_state: called with the state every train.save_state_every_n_steps optimiser steps.
    start: the weights to start from and the steps before this run (a previous stage's).
    dist: this process's place in a data-parallel run (distributed.py); one process by default.
    """
    cfg = recipe.train
    if cfg.save_state_every_n_steps and save_state is None:
        raise ConfigError(
            "train.save_state_every_n_steps: set, but this caller has nowhere to save states; set it to 0"
        )
    check_recipe(
        recipe, backend.family, backend.prediction_type, backend.device, backend.fp8_base, dist.world_size
    )
    check_cacheable_across_processes(isinstance(latents, OnTheFlyLatents), dist.world_size)
    _note_short_batches(plan, cfg)
    parts = _build_trainables(backend, recipe, plan, start, dist)
    ctx = StepContext(
        backend, dataset, latents, recipe, _alphas_cumprod(backend, recipe), dist, recipe.speed.cuda_graph
    )
    total_steps, total_epochs = total_optimizer_steps(plan, cfg, dist.world_size)
    result = TrainedLora(parts.network, parts.ema, [], 0, 0, total_steps, time.time())
    data = data_fingerprint(dataset, plan)
    at = None  # the boundary of the last optimiser step: where a state would resume
    if resume is not None:
        check_resumable(resume, recipe, backend.family, data)
        at = parts.restore(resume, result, backend.device)
    params = [p for group in parts.optimizer.param_groups for p in group["params"]]
    backward = partial(loss_and_backward, ctx, parts.scaler)
    if ctx.graphed:
        backward = GraphedBackward(backward, params)
    pending, updating, text_encoder_trains = [], False, True
    try:
        with (
            parts.network.applied(),
            speedups(backend.trainable_modules(), recipe.speed),
            _training_mode(backend, parts.network, recipe),
        ):
            for epoch, index, last_of_epoch, indices in _batches(
                plan, cfg, dist.world_size, at, total_epochs
            ):
                result.epochs = epoch
                trains_now = recipe.optimizer.text_encoder_trains_at(result.steps)
                if trains_now != text_encoder_trains:  # optimizer.stop_text_encoder_training
                    set_text_encoder_trainable(parts.optimizer.param_groups, trains_now)
                    text_encoder_trains = trains_now
                pending.append(forward_backward(ctx, backward, indices, epoch, parts.rng, trains_now))
                # As kohya (accelerate syncs at the end of the dataloader), an epoch's last batch
                # steps the optimiser even when fewer batches were accumulated.
                if len(pending) < cfg.gradient_accumulation_steps and not last_of_epoch:
                    continue
                step = result.steps + 1
                loss = checked_loss(ctx, params, parts.optimizer, parts.scaler, pending, step)
                pending, updating = [], True
                skipped = apply_update(
                    ctx,
                    parts.optimizer,
                    parts.scaler,
                    parts.scheduler,
                    parts.ema,
                    step,
                    start.steps_before + step,
                )
                updating = False
                result.steps, result.skipped_steps = step, result.skipped_steps + skipped
                result.losses.append(loss)
                at = Boundary(epoch, index + 1, parts.rng.capture(backend.device))
                if cfg.save_state_every_n_steps and step % cfg.save_state_every_n_steps == 0:
                    save_state(parts.snapshot(result, at, recipe, backend.family, data))
                if on_step:
                    lr = parts.scheduler.get_last_lr()[0]
                    on_step(StepReport(step, total_steps, loss, lr, epoch, result))
                if step >= total_steps:
                    break
    except BaseException as exc:
        result.finished_at = time.time()
        # no state before the first step, nor from the middle of an update
        state = None if at is None or updating else parts.snapshot(result, at, recipe, backend.family, data)
        raise TrainingStopped(f"training stopped after step {result.steps}: {exc}", result, state) from exc
    result.finished_at = time.time()
    return result


def _batches(plan: BucketPlan, cfg: TrainConfig, world_size: int, at: Boundary | None, total_epochs: int):
    """(epoch, index, last of its epoch, indices) of every batch from boundary `at` on."""
    first_epoch, skip = (at.epoch, at.batch) if at is not None else (1, 0)
    for epoch in range(first_epoch, total_epochs + 1):
        # Every rank walks the same global batches and computes its own share of each.
        batches = epoch_batches(plan, cfg.train_batch_size * world_size, cfg.seed, epoch)
        for index in range(skip if epoch == first_epoch else 0, len(batches)):
            yield epoch, index, index + 1 == len(batches), batches[index][1]


def _build_trainables(
    backend, recipe: TrainingRecipe, plan: BucketPlan, start: StartFrom, dist
) -> Trainables:
    cfg = recipe.train
    torch.manual_seed(cfg.seed)  # LoRA init and dropout masks
    network = build_network(backend, recipe)
    if start.weights is not None:
        network.load_kohya_state_dict(start.weights)
    groups = build_param_groups(
        network.named_lora_parameters(), backend.family, recipe.optimizer, recipe.blocks
    )
    optimizer = build_optimizer(groups, recipe.optimizer, backend.device)
    total_steps, _ = total_optimizer_steps(plan, cfg, dist.world_size)
    scheduler = build_lr_scheduler(optimizer, recipe.optimizer, total_steps)
    ema = LoraEMA(network.named_lora_parameters(), recipe.ema) if recipe.ema.enabled else None
    if ema is not None and start.ema is not None:
        ema.load_state_dict(start.ema)
    scaler = torch.amp.GradScaler(backend.device.type, enabled=cfg.mixed_precision == "fp16")
    return Trainables(
        network, optimizer, scheduler, scaler, ema, RandomSources.seeded(cfg.seed, backend.device)
    )


def _alphas_cumprod(backend, recipe: TrainingRecipe) -> torch.Tensor:
    if recipe.loss.zero_terminal_snr:
        return rescale_zero_terminal_snr(backend.alphas_cumprod)
    return backend.alphas_cumprod


def _note_short_batches(plan: BucketPlan, cfg: TrainConfig) -> None:
    largest = max(len(items) for items in plan.buckets.values())
    if cfg.train_batch_size > largest:
        log.warning(
            "train.train_batch_size %d is larger than every bucket (the largest holds %d images with "
            "repeats); a batch takes images of one bucket only, so batches will hold at most %d",
            cfg.train_batch_size,
            largest,
            largest,
        )


def build_network(backend: Backend, recipe: TrainingRecipe) -> LoRANetwork:
    """The LoRA over the backend's kohya targets, minus blocks of LR weight 0 (kohya never makes them)."""
    net = recipe.network
    targets = backend.lora_targets(net.trains_conv, net.train_unet, net.train_text_encoder)
    # an unset BlockWeights (Configure Optimizer's default) asks for nothing block-wise; a DiT has no
    # kohya block numbering to look names up in
    if recipe.blocks is not None and recipe.blocks.is_set:
        dropped = set(excluded_modules([t.name for t in targets], backend.family, recipe.blocks))
        targets = [t for t in targets if t.name not in dropped]
    dims, alphas = per_module_dims(
        [t.name for t in targets],
        backend.family,
        net.block_dims,
        net.block_alphas,
        conv_block_dims=net.conv_block_dims,
        conv_block_alphas=net.conv_block_alphas,
        conv3x3_modules=frozenset(t.name for t in targets if is_conv_kxk(t.module)),
    )
    return LoRANetwork(targets, net, dims, alphas).to(backend.device)


@contextlib.contextmanager
def _training_mode(backend: Backend, network: LoRANetwork, recipe: TrainingRecipe) -> Iterator[None]:
    """Train mode (and gradient checkpointing) for the length of the loop; eval mode after."""
    _set_train_mode(backend, network, recipe, training=True)
    try:
        yield
    finally:
        _set_train_mode(backend, network, recipe, training=False)


def _set_train_mode(backend: Backend, network: LoRANetwork, recipe: TrainingRecipe, training: bool) -> None:
    network.train(training)
    if recipe.train.gradient_checkpointing:
        # speed.cuda_graph runs without dropout (check_speed), so no RNG state need be replayed
        backend.set_gradient_checkpointing(training, preserve_rng_state=not recipe.speed.cuda_graph)
        # diffusers checkpoints only modules in train mode; the frozen base has no dropout to change.
        for module in backend.trainable_modules():
            module.train(training)
