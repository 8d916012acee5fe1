"""One training run from a RunConfig: the path shared by the CLI and the demo.

load dataset → buckets → latents → train → save. Training states go to
`<output_dir>/state/<name>-step<N>/` every train.save_state_every_n_steps
steps. A run that stops early (cancel, error) still saves what it trained, as
`<name>-partial.safetensors`, and its state, to resume from.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .backends.base import Backend
from .buckets import bucket_report, plan_buckets
from .config import OutputConfig, RunConfig
from .dataset import Dataset, load_dataset
from .export import next_free_path, save_dtype, save_lora
from .latent_cache import build_latents
from .metadata import training_metadata
from .state import TrainingState
from .state_files import StateWriter
from .text_cache import maybe_cache_text
from .train import StepCallback, TrainedLora, TrainingStopped, train

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
    """Train per `cfg` on `backend` and save the LoRA; returns where it went.

    resume: a state to continue from (state_files.load_training_state). dataset: the loaded
    `cfg.dataset`, when the caller checked it before loading the model.
    """
    if cfg.output.path.exists() and not cfg.output.overwrite:
        from .errors import ConfigError

        raise ConfigError(
            f"output: {cfg.output.path} already exists; choose another output.output_name "
            "or set output.overwrite = true"
        )
    if dataset is None:
        dataset = load_dataset(cfg.dataset)
    backend = maybe_cache_text(backend, dataset, cfg.cache, cfg.recipe)
    plan = plan_buckets(dataset.images, cfg.buckets)
    say(bucket_report(plan))
    t0 = time.time()
    latents = build_latents(dataset, plan, backend, cfg.cache)
    say(f"latents ready ({cfg.cache.mode}) in {time.time() - t0:.1f}s")
    states = StateWriter(
        cfg.output.output_dir / "state", cfg.output.output_name, cfg.recipe.train.save_last_n_states
    )
    if resume is not None:
        say(f"resuming after step {resume.step} (epoch {resume.epoch})")
    try:
        trained = train(backend, dataset, plan, latents, cfg.recipe, on_step, resume, states)
    except TrainingStopped as stop:
        _save_stopped(stop, states, cfg, backend, dataset, plan, say)
        raise
    path = _save(cfg.output.path, trained, cfg, backend, dataset, plan, overwrite=cfg.output.overwrite)
    if trained.ema is not None:
        ema_path = path.with_name(f"{path.stem}_ema.safetensors")
        _save(ema_path, trained, cfg, backend, dataset, plan, overwrite=cfg.output.overwrite, use_ema=True)
        say(f"EMA weights saved to {ema_path}")
    return RunResult(path, trained)


def _save_stopped(stop: TrainingStopped, states: StateWriter, cfg, backend, dataset, plan, say) -> None:
    """Keep what a stopped run trained: a partial LoRA and its state; a failed save is logged, not raised."""
    if stop.partial.steps > 0:
        partial = next_free_path(cfg.output.output_dir / f"{cfg.output.output_name}-partial.safetensors")
        try:
            _save(partial, stop.partial, cfg, backend, dataset, plan, overwrite=False)
            say(f"training stopped after step {stop.partial.steps}; partial LoRA saved to {partial}")
        except OSError as exc:
            log.error("could not save the partial LoRA to %s: %s", partial, exc)
    if stop.state is not None:
        try:
            say(f"training state saved to {states(stop.state)}; resume from it to continue")
        except OSError as exc:
            log.error("could not save the training state: %s", exc)


def _save(
    path: Path,
    trained: TrainedLora,
    cfg: RunConfig,
    backend: Backend,
    dataset: Dataset,
    plan,
    overwrite: bool,
    use_ema: bool = False,
) -> Path:
    metadata = training_metadata(
        recipe=cfg.recipe,
        family=backend.family,
        base_model_version=backend.base_model_version,
        modelspec_architecture=backend.modelspec_architecture,
        prediction_type=backend.prediction_type,
        dataset=dataset,
        plan=plan,
        output_name=cfg.output.output_name,
        model_name=cfg.model.path.name if cfg.model else "in-memory",
        steps=trained.steps,
        epochs=trained.epochs,
        total_steps=trained.total_steps,
        started_at=trained.started_at,
        finished_at=trained.finished_at,
    )
    metadata["ss_ema_weights"] = str(use_ema)
    return save_lora(
        path,
        trained.kohya_state_dict(use_ema),
        metadata,
        save_dtype(cfg.output.save_precision),
        overwrite=overwrite,
    )


__all__ = ["OutputConfig", "RunResult", "run_training"]
