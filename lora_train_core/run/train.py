"""The training recipe: one readable loop over the components.

`train()` wires a backend, a dataset with its bucket plan and latents, and the
configs of the network, optimiser, noise, loss and EMA into kohya's LoRA
training loop (train_network.py); step.py runs its steps. Everything random
flows from the seed, so a CPU run is reproducible, and a run resumed from a
saved state (state.py) ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ..data.buckets import BucketPlan, epoch_batches
from ..data.captions import CaptionConfig
from ..data.dataset import Dataset
from ..data.latent_cache import CachedLatents, OnTheFlyLatents
from ..errors import ConfigError, check_choice, check_int
from ..model.backend import Backend
from ..model.network import LoRANetwork, NetworkConfig, is_conv_kxk
from ..objective.loss import LossConfig, check_loss_for_prediction_type, rescale_zero_terminal_snr
from ..objective.noise import NoiseConfig
from ..optim.ema import EMAConfig, LoraEMA
from ..optim.optimizers import OptimizerConfig, build_optimizer
from ..optim.param_groups import BlockWeights, build_param_groups, excluded_modules, per_module_dims
from ..optim.schedule import build_lr_scheduler
from .distributed import SINGLE_PROCESS, DataParallel
from .speed import SpeedConfig, check_speed, speedups
from .state import TrainingState, check_resumable, data_fingerprint
from .step import MIXED_PRECISION, StepRunner
from .trained import NonFiniteError, StepCallback, StepReport, TrainedLora, TrainingStopped

log = logging.getLogger(__name__)
__all__ = [
    "MIXED_PRECISION",
    "NonFiniteError",
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
    max_train_epochs: int = 0
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no, bf16, fp16 (fp16 uses a grad scaler)
    gradient_checkpointing: bool = False
    seed: int = 42
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


def train(
    backend: Backend,
    dataset: Dataset,
    plan: BucketPlan,
    latents: CachedLatents | OnTheFlyLatents,
    recipe: TrainingRecipe,
    on_step: StepCallback | None = None,
    resume: TrainingState | None = None,
    save_state: Callable[[TrainingState], object] | None = None,
    initial_weights: Mapping[str, torch.Tensor] | None = None,
    dist: DataParallel = SINGLE_PROCESS,
) -> TrainedLora:
    """Train a LoRA; on any exception (Cancel included, whatever it derives from) raise TrainingStopped
    carrying the partial result and state; KeyboardInterrupt and SystemExit pass through unwrapped.

    resume: continue from this state (its settings must match `recipe`, see state.check_resumable).
    save_state: called with the state every train.save_state_every_n_steps optimiser steps.
    initial_weights: a kohya state dict the LoRA starts from (a previous stage's result).
    dist: this process's place in a data-parallel run (distributed.py); one process by default.
    """
    cfg = recipe.train
    if cfg.save_state_every_n_steps and save_state is None:
        raise ConfigError(
            "train.save_state_every_n_steps: set, but this caller has nowhere to save states; set it to 0"
        )
    check_loss_for_prediction_type(recipe.loss, backend.prediction_type)
    check_speed(recipe, backend, dist.world_size)
    if dist.world_size > 1 and isinstance(latents, OnTheFlyLatents):
        raise ConfigError(
            "cache.mode: 'none' is not implemented yet for multi-process training; use 'ram' or 'disk'"
        )
    _note_short_batches(plan, cfg)
    torch.manual_seed(cfg.seed)  # LoRA init and dropout masks
    network = build_network(backend, recipe)
    if initial_weights is not None:
        network.load_kohya_state_dict(initial_weights)
    groups = build_param_groups(
        network.named_lora_parameters(), backend.family, recipe.optimizer, recipe.blocks
    )
    optimizer = build_optimizer(groups, recipe.optimizer, backend.device)
    total_steps, total_epochs = total_optimizer_steps(plan, cfg, dist.world_size)
    scheduler = build_lr_scheduler(optimizer, recipe.optimizer, total_steps)
    ema = LoraEMA(network.named_lora_parameters(), recipe.ema) if recipe.ema.enabled else None
    alphas_cumprod = backend.alphas_cumprod
    if recipe.loss.zero_terminal_snr:
        alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
    result = TrainedLora(network, ema, [], 0, 0, total_steps, time.time())
    step_fn = StepRunner(
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
        dist,
    )
    start_epoch, skip = 1, 0
    if resume is not None:
        check_resumable(resume, recipe, backend.family, data_fingerprint(dataset, plan))
        start_epoch, skip = step_fn.restore(resume, result)
    try:
        with network.applied(), speedups(backend.trainable_modules(), recipe.speed):
            _set_train_mode(backend, network, recipe, training=True)
            for epoch in range(start_epoch, total_epochs + 1):
                if result.steps >= total_steps:  # a state saved at the last step
                    break
                result.epochs = epoch
                if step_fn.run_epoch(plan, epoch, result, on_step, skip if epoch == start_epoch else 0):
                    break
    except (KeyboardInterrupt, SystemExit):
        raise  # the process is asked to end now (the CLI's second Ctrl-C): nothing is saved
    except BaseException as exc:  # ComfyUI's InterruptProcessingException is a BaseException since 2026
        result.finished_at = time.time()
        state = step_fn.stop_state(result, plan)
        raise TrainingStopped(f"training stopped after step {result.steps}: {exc}", result, state) from exc
    finally:
        _set_train_mode(backend, network, recipe, training=False)
    result.finished_at = time.time()
    return result


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
    if recipe.blocks is not None:
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


def _set_train_mode(backend: Backend, network: LoRANetwork, recipe: TrainingRecipe, training: bool) -> None:
    network.train(training)
    if recipe.train.gradient_checkpointing:
        # speed.cuda_graph runs without dropout (check_speed), so no RNG state need be replayed
        backend.set_gradient_checkpointing(training, preserve_rng_state=not recipe.speed.cuda_graph)
        # diffusers checkpoints only modules in train mode; the frozen base has no dropout to change.
        for module in backend.trainable_modules():
            module.train(training)
