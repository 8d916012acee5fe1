"""One training run from a RunConfig: the path shared by the CLI and the demo.

load dataset → buckets → latents → train → save, once per `[[stages]]` entry
(each stage continuing the previous stage's LoRA). Step callbacks, validation
samples (`[samples]`) and intermediate saves (`output.save_every_n_steps`)
count steps across stages. Training states go to
`<output_dir>/state/<name>-step<N>/` every train.save_state_every_n_steps
steps. A run that stops early (cancel, error) still saves what it trained, as
`<name>-partial.safetensors`, and its state, to resume from.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import OutputConfig, RunConfig
from ..data.buckets import bucket_report, plan_buckets
from ..data.dataset import Dataset, load_dataset
from ..data.latent_cache import OnTheFlyLatents, build_latents
from ..data.text_cache import CachedTextEncoder, maybe_cache_text
from ..errors import ConfigError
from ..model.backend import Backend
from ..outputs.export import next_free_path, save_dtype, save_lora
from ..outputs.metadata import run_metadata
from ..outputs.sampling import SampleWriter
from .distributed import DataParallel
from .intermediate_saves import IntermediateSaver
from .parking import Parking
from .stages import (
    StageConfig,
    StepOffset,
    check_stages,
    stage_buckets,
    stage_recipe,
    stage_record,
    stages_metadata,
)
from .state import TrainingState
from .state_files import StateWriter
from .train import StepCallback, TrainedLora, TrainingStopped, total_optimizer_steps, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    path: Path
    trained: TrainedLora


def run_training(
    cfg: RunConfig,
    backend: Backend,
    on_step: StepCallback | None = None,
    say: Callable[[str], None] = print,
    resume: TrainingState | None = None,
    dataset: Dataset | None = None,
) -> RunResult:
    """Train per `cfg` on `backend` (stage by stage if `cfg.stages`) and save the LoRA.

    resume: a state to continue from (state_files.load_training_state). dataset: the loaded
    `cfg.dataset`, when the caller checked it before loading the model.
    """
    if cfg.output.path.exists() and not cfg.output.overwrite:
        raise ConfigError(
            f"output: {cfg.output.path} already exists; choose another output.output_name "
            "or set output.overwrite = true"
        )
    check_stages(cfg.stages, cfg.recipe, resume is not None)
    dist = DataParallel.from_environment()
    if not dist.is_main:  # only rank 0 prints and writes
        say, on_step = _quiet, None
    dataset = dataset or load_dataset(cfg.dataset)
    backend = maybe_cache_text(backend, dataset, cfg.cache, cfg.recipe)
    cfg = _with_lr_rule(cfg, dist.world_size)
    stages = [_Stage(cfg, dataset, stage, dist.world_size) for stage in (cfg.stages or (None,))]
    say(_batch_report(cfg, dist, stages[0].total_batch))
    if resume is not None:
        say(f"resuming after step {resume.step} (epoch {resume.epoch})")
    run = _Run(cfg, backend, dataset, dist, on_step, say, total=sum(s.total for s in stages))
    for stage in stages:
        trained = run.train_stage(stage, resume)
    if not dist.is_main:
        return RunResult(cfg.output.path, trained)
    path = run.save(cfg.output.path, trained, stage, overwrite=cfg.output.overwrite)
    if trained.ema is not None:
        ema_path = path.with_name(f"{path.stem}_ema.safetensors")
        run.save(ema_path, trained, stage, overwrite=cfg.output.overwrite, use_ema=True)
        say(f"EMA weights saved to {ema_path}")
    return RunResult(path, trained)


def _batch_report(cfg: RunConfig, dist: DataParallel, total_batch: int) -> str:
    train_cfg = cfg.recipe.train
    lr_rule = (
        f"x {dist.world_size} (train.scale_lr_by_processes)"
        if train_cfg.scale_lr_by_processes and dist.world_size > 1
        else "as given (not scaled with the batch)"
    )
    return (
        f"effective batch: {train_cfg.train_batch_size} per process x {dist.world_size} process(es) x "
        f"{train_cfg.gradient_accumulation_steps} accumulation = {total_batch}; learning rate {lr_rule}"
    )


class _Run:
    """What the stages of one run share: output writers, the LoRA carried over, the step count."""

    def __init__(
        self, cfg: RunConfig, backend: Backend, dataset: Dataset, dist: DataParallel, on_step, say, total: int
    ):
        self.cfg, self.backend, self.dataset, self.dist, self.say = cfg, backend, dataset, dist, say
        out = cfg.output
        self.states = StateWriter(
            out.output_dir / "state", out.output_name, cfg.recipe.train.save_last_n_states
        )
        samples = SampleWriter(backend, cfg.samples, out.output_dir, out.output_name)
        self.writers = [on_step, samples] if dist.is_main else []
        self.total, self.done, self.weights, self.records, self.losses = total, 0, None, [], []

    def train_stage(self, stage: _Stage, resume: TrainingState | None) -> TrainedLora:
        cfg, dist = self.cfg, self.dist
        self.say(bucket_report(stage.plan))
        t0 = time.time()
        with dist.main_first():  # rank 0 fills a disk cache; the others then read it
            latents = build_latents(self.dataset, stage.plan, self.backend, cfg.cache)
        self.say(f"latents ready ({cfg.cache.mode}) in {time.time() - t0:.1f}s")
        out = cfg.output
        saver = IntermediateSaver(
            out.output_dir,
            out.output_name,
            out.save_every_n_steps,
            out.save_last_n_saves,
            lambda path, run: self.save(path, run, stage),
        )
        text_cached = isinstance(self.backend, CachedTextEncoder)
        idle = self.backend.parkable_modules(not isinstance(latents, OnTheFlyLatents), text_cached)
        parking = Parking(idle, self.backend.device)
        # a validation sample calls the parked modules back; they go back to the CPU after it
        writers = [*self.writers, saver, lambda _report: parking.park()] if dist.is_main else []
        callbacks = StepOffset(writers, self.done, self.total)
        states = self.states if dist.is_main else _quiet
        try:
            with parking:
                trained = train(
                    self.backend,
                    self.dataset,
                    stage.plan,
                    latents,
                    stage.recipe,
                    callbacks,
                    resume,
                    states,
                    self.weights,
                    dist,
                )
        except TrainingStopped as stop:
            if dist.is_main:
                self.keep_stopped(stop, stage)
            raise
        self.done += trained.steps
        self.weights = trained.network.kohya_state_dict()
        self.losses += trained.losses
        trained.losses = list(self.losses)  # the whole run's curve, across stages
        if stage.config is not None:
            self.records.append(stage_record(stage.config, stage.recipe, trained.steps))
        return trained

    def keep_stopped(self, stop: TrainingStopped, stage: _Stage) -> None:
        """A stopped run keeps a partial LoRA and its state; a failed save is logged, not raised."""
        out = self.cfg.output
        if stop.partial.steps > 0:
            partial = next_free_path(out.output_dir / f"{out.output_name}-partial.safetensors")
            try:
                self.save(partial, stop.partial, stage)
                self.say(f"training stopped after step {stop.partial.steps}; partial LoRA saved to {partial}")
            except OSError as exc:
                log.error("could not save the partial LoRA to %s: %s", partial, exc)
        if stop.state is not None:
            try:
                self.say(f"training state saved to {self.states(stop.state)}; resume from it to continue")
            except OSError as exc:
                log.error("could not save the training state: %s", exc)

    def save(
        self, path: Path, trained: TrainedLora, stage: _Stage, overwrite: bool = False, use_ema: bool = False
    ) -> Path:
        """Save with kohya metadata; a multi-stage run records its stages and total steps."""
        cfg, backend = self.cfg, self.backend
        model_name = cfg.model.path.name if cfg.model else "in-memory"
        metadata = run_metadata(
            stage.recipe, backend, stage.dataset, stage.plan, trained, cfg.output.output_name, model_name
        )
        metadata["ss_ema_weights"] = str(use_ema)
        metadata.update(stages_metadata(self.records))
        metadata["ss_num_processes"] = str(stage.world_size)
        metadata["ss_total_batch_size"] = str(stage.total_batch)
        dtype = save_dtype(cfg.output.save_precision)
        return save_lora(path, trained.kohya_state_dict(use_ema), metadata, dtype, overwrite=overwrite)


def _with_lr_rule(cfg: RunConfig, world_size: int) -> RunConfig:
    """train.scale_lr_by_processes: every learning rate x the number of processes (linear scaling)."""
    if not cfg.recipe.train.scale_lr_by_processes or world_size == 1:
        return cfg
    opt = cfg.recipe.optimizer
    scaled = dataclasses.replace(
        opt,
        learning_rate=opt.learning_rate * world_size,
        unet_lr=None if opt.unet_lr is None else opt.unet_lr * world_size,
        text_encoder_lr=None
        if opt.text_encoder_lr is None
        else tuple(lr * world_size for lr in opt.text_encoder_lr),
    )
    return dataclasses.replace(cfg, recipe=dataclasses.replace(cfg.recipe, optimizer=scaled))


def _quiet(*_args) -> None:
    """Stands in for printing and writing on ranks other than 0."""


class _Stage:
    """A stage's bucket plan and recipe (the whole run is one stage without `[[stages]]`)."""

    def __init__(self, cfg: RunConfig, dataset: Dataset, config: StageConfig | None, world_size: int = 1):
        self.config, self.dataset, self.world_size = config, dataset, world_size
        buckets = stage_buckets(cfg.buckets, config) if config else cfg.buckets
        self.recipe = stage_recipe(cfg.recipe, config) if config else cfg.recipe
        self.plan = plan_buckets(dataset.images, buckets)
        self.total = total_optimizer_steps(self.plan, self.recipe.train, world_size)[0]
        train_cfg = self.recipe.train
        self.total_batch = train_cfg.train_batch_size * world_size * train_cfg.gradient_accumulation_steps


__all__ = ["OutputConfig", "RunResult", "run_training"]
