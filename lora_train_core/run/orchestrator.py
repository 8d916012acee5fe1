"""One training run, the same for both doors: stages, saves, states, stops and metadata.

`prepare_run` (preflight.py) checks a run before the model loads; `run_training` executes
it: per stage, latents → `train()` → the LoRA and its EMA carried into the next stage, step
callbacks counting steps across stages. Intermediate files (`output.save_every_n_steps`, the
newest `output.save_last_n_saves` kept, also across resumes) and training states
(`<state_dir>/<name>-step<N>/`) are written as it goes. A run that stops (cancel, NaN, error)
keeps `<name>-partial.safetensors` and the state to resume from, even in a later stage. The
final file goes where the plan says; if that folder refuses the write, the LoRA goes to the
states folder or the temp folder and the run ends with a message naming it (SavedElsewhere).

A door supplies the backend, its step callbacks (progress, Cancel, samples of its own) and,
in ComfyUI, the latents its Cache Latents node made; everything else happens here.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig
from ..data.buckets import bucket_report
from ..data.dataset import Dataset, load_dataset
from ..data.latent_cache import CachedLatents, OnTheFlyLatents, build_latents
from ..data.text_cache import maybe_cache_text
from ..errors import LoraTrainError
from ..model.backend import Backend, ModelFacts
from ..outputs.export import next_free_path, save_dtype, save_lora
from ..outputs.metadata import run_metadata
from ..outputs.sampling import SampleWriter
from .distributed import DataParallel
from .parking import Parking
from .preflight import RunPlan, Stage, prepare_run
from .saves import IntermediateSaver, SavedElsewhere, fallback_message, save_with_fallback
from .stages import StepOffset, stage_record, stages_metadata
from .state import TrainingState
from .state_files import StateWriter
from .train import StartFrom, StepCallback, TrainedLora, TrainingStopped, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    path: Path  # the LoRA file
    trained: TrainedLora  # the last stage's result; `losses` holds the whole run's
    metadata: dict[str, str]  # the saved file's
    ema_path: Path | None = None


def run_training(
    cfg: RunConfig,
    backend: Backend,
    on_step: StepCallback | None = None,
    say: Callable[[str], None] = print,
    resume: TrainingState | None = None,
    dataset: Dataset | None = None,
    latents: CachedLatents | OnTheFlyLatents | None = None,
    plan: RunPlan | None = None,
) -> RunResult:
    """Train per `cfg` on `backend` (stage by stage if `cfg.stages`) and save the LoRA.

    plan: the caller's `prepare_run` result, when it checked the run before loading the model
    (else it is made here). resume: a state to continue from (state_files.load_training_state).
    dataset: the loaded `cfg.dataset`. latents: the caller's latents for a run without stages.
    Raises TrainingStopped (after saving the partial LoRA) when training stops early, and
    SavedElsewhere when the LoRA had to be written to a fallback path.
    """
    dist = DataParallel.from_environment()
    if not dist.is_main:  # only rank 0 prints and writes
        say, on_step = _quiet, None
    if plan is None:
        dataset = dataset or load_dataset(cfg.dataset)
        plan = prepare_run(cfg, dataset, ModelFacts.of(backend), resume, dist.world_size)
    return _Run(plan, backend, dist, on_step, say).execute(latents)


class _Run:
    """What the stages of one run share: the writers, the losses so far, the metadata's model hash."""

    def __init__(self, plan: RunPlan, backend: Backend, dist: DataParallel, on_step, say):
        self.plan, self.dist, self.say, self.on_step = plan, dist, say, on_step
        cfg, out = plan.cfg, plan.cfg.output
        self.backend = maybe_cache_text(backend, plan.dataset, cfg.cache, cfg.recipe)
        self.states = StateWriter(plan.states_dir, plan.name, cfg.recipe.train.save_last_n_states)
        resumed_at = (
            None if plan.resume is None else plan.steps_before(self._first_stage()) + plan.resume.step
        )
        self.intermediate = IntermediateSaver(
            out.output_dir,
            plan.name,
            out.save_every_n_steps,
            out.save_last_n_saves,
            lambda path, trained: self.save(path, trained, self.stage),
            resumed_at,
        )
        self.samples = SampleWriter(self.backend, cfg.samples, out.output_dir, plan.name)
        self.earlier_losses = list(plan.resume.earlier_losses) if plan.resume else []
        self.records = []  # ss_stages: one record per completed stage
        self.stage = self._first_stage()
        self._model: tuple[str, str] | None = None  # base_model_name, base_model_fingerprint()

    def _first_stage(self) -> Stage:
        return self.plan.stages[self.plan.resume.stage if self.plan.resume else 0]

    def execute(self, latents) -> RunResult:
        plan = self.plan
        first = self._first_stage()
        self.say(_batch_report(plan, first))
        if plan.resume is not None:
            self.say(f"resuming after step {plan.steps_before(first) + plan.resume.step}")
        self.records = [_record(s, s.total_steps) for s in plan.stages[: first.index] if s.config]
        start = StartFrom(steps_before=plan.steps_before(first))
        for stage in plan.stages[first.index :]:
            self.stage = stage
            resume = plan.resume if stage is first else None
            trained = self.train_stage(stage, start, resume, latents if stage.config is None else None)
            ema = trained.ema.state_dict() if trained.ema is not None else None
            start = StartFrom(trained.network.kohya_state_dict(), ema, start.steps_before + trained.steps)
        return self.finish(trained)

    def train_stage(self, stage: Stage, start: StartFrom, resume, latents) -> TrainedLora:
        cfg, dist, backend = self.plan.cfg, self.dist, self.backend
        self.say(bucket_report(stage.plan))
        if latents is None:
            t0 = time.time()
            with dist.main_first():  # rank 0 fills a disk cache; the others then read it
                latents = build_latents(self.plan.dataset, stage.plan, backend, cfg.cache)
            self.say(f"latents ready ({cfg.cache.mode}) in {time.time() - t0:.1f}s")
        idle = backend.parkable_modules(
            latents_cached=not isinstance(latents, OnTheFlyLatents),
            text_cached=cfg.cache.text_encoder_outputs != "none",
        )
        parking = Parking(idle, backend.device)
        # a validation sample calls the parked modules back; they go back to the CPU after it
        writers = [self.on_step, self.samples, self.intermediate, lambda _report: parking.park()]
        callbacks = StepOffset(writers if dist.is_main else [], start.steps_before, self.plan.total_steps)
        save_state = self._periodic_state if dist.is_main else _quiet
        try:
            with parking:
                trained = train(
                    backend, self.plan.dataset, stage.plan, latents, stage.recipe,
                    callbacks, resume, save_state, start, dist,
                )  # fmt: skip
        except TrainingStopped as stop:
            if dist.is_main:
                self.keep_stopped(stop, start.steps_before)
            raise
        if stage.config is not None:
            self.records.append(_record(stage, trained.steps))
        self.earlier_losses += trained.losses
        trained.losses = list(self.earlier_losses)  # the whole run's curve, across stages
        return trained

    # --- states -------------------------------------------------------------------------------
    def _save_state(self, state: TrainingState) -> Path:
        """Write `state`, stamped with its stage, under the run's overall step count."""
        stamped = dataclasses.replace(state, stage=self.stage.index, earlier_losses=list(self.earlier_losses))
        return self.states(stamped, step=self.plan.steps_before(self.stage) + state.step)

    def _periodic_state(self, state: TrainingState) -> None:
        try:
            self._save_state(state)
        except OSError as exc:  # a state is a convenience; the run it would resume goes on
            log.error("could not save the training state of step %d: %s; training goes on", state.step, exc)

    def keep_stopped(self, stop: TrainingStopped, steps_before: int) -> None:
        """A stopped run keeps a partial LoRA and its state; nothing here raises."""
        out, steps = self.plan.cfg.output, steps_before + stop.partial.steps
        if steps > 0:
            partial = next_free_path(out.output_dir / f"{self.plan.name}-partial.safetensors")
            try:
                saved, fell_back = self._keep(partial, stop.partial, self.metadata(stop.partial, self.stage))
                if fell_back:
                    self.say(fell_back)
                self.say(f"training stopped after step {steps}; partial LoRA saved to {saved}")
            except LoraTrainError as exc:
                log.error("%s", exc)
        if stop.state is not None:
            try:
                folder = self._save_state(stop.state)
                self.say(f"training state saved to {folder}; resume from it to continue")
            except OSError as exc:
                log.error("could not save the training state: %s", exc)

    # --- files --------------------------------------------------------------------------------
    def finish(self, trained: TrainedLora) -> RunResult:
        """The final file (and the EMA file), each falling back if its folder refuses the write."""
        if not self.dist.is_main:
            return RunResult(self.plan.lora_path, trained, {})
        metadata = self.metadata(trained, self.stage)
        path, fell_back = self._keep(self._final_path(), trained, metadata)
        messages = [fell_back]
        ema_path = None
        if trained.ema is not None:
            wanted = path.with_name(f"{path.stem}_ema.safetensors")
            ema_meta = {**metadata, "ss_ema_weights": "True"}
            ema_path, fell_back = self._keep(wanted, trained, ema_meta, use_ema=True)
            messages.append(fell_back)
            self.say(f"EMA weights saved to {ema_path}")
        if any(messages):
            raise SavedElsewhere("; ".join(m for m in messages if m))
        return RunResult(path, trained, metadata, ema_path)

    def _final_path(self) -> Path:
        """The planned path, unless another file took that name during the run (and no overwrite)."""
        path = self.plan.lora_path
        if path.exists() and not self.plan.cfg.output.overwrite:
            return next_free_path(path)
        return path

    def _keep(
        self, wanted: Path, trained: TrainedLora, metadata: dict[str, str], use_ema: bool = False
    ) -> tuple[Path, str | None]:
        """Write a file that must not be lost: where it was written, and the message if that is
        not `wanted` (save_with_fallback)."""
        path, error = save_with_fallback(
            lambda p: self._write(p, trained, metadata, use_ema), wanted, self.plan.fallback_dirs
        )
        return path, None if error is None else fallback_message(wanted, path, error)

    def save(self, path: Path, trained: TrainedLora, stage: Stage) -> Path:
        """An intermediate file (no fallback: the run goes on if it fails)."""
        return self._write(path, trained, self.metadata(trained, stage))

    def _write(
        self, path: Path, trained: TrainedLora, metadata: dict[str, str], use_ema: bool = False
    ) -> Path:
        dtype = save_dtype(self.plan.cfg.output.save_precision)
        return save_lora(path, trained.kohya_state_dict(use_ema), metadata, dtype, overwrite=True)

    def metadata(self, trained: TrainedLora, stage: Stage) -> dict[str, str]:
        """kohya's record of the run, with the steps counted over the whole run."""
        backend, plan = self.backend, self.plan
        if self._model is None:  # asked once per run: a fingerprint reads every tensor of the model
            self._model = (backend.base_model_name, backend.base_model_fingerprint())
        name, model_hash = self._model
        meta = run_metadata(
            stage.recipe, backend, plan.dataset, stage.plan, trained, plan.name, name, model_hash
        )
        meta.update(stages_metadata(self.records))
        meta["ss_steps"] = str(plan.steps_before(stage) + trained.steps)
        meta["ss_max_train_steps"] = str(plan.total_steps)
        meta["ss_ema_weights"] = "False"
        meta["ss_num_processes"] = str(plan.world_size)
        meta["ss_total_batch_size"] = str(stage.total_batch)
        return meta


def _record(stage: Stage, steps: int) -> dict:
    return stage_record(stage.config, stage.recipe, steps)


def _batch_report(plan: RunPlan, stage: Stage) -> str:
    train_cfg, n = stage.recipe.train, plan.world_size
    lr_rule = (
        f"x {n} (train.scale_lr_by_processes)"
        if train_cfg.scale_lr_by_processes and n > 1
        else "as given (not scaled with the batch)"
    )
    return (
        f"effective batch: {train_cfg.train_batch_size} per process x {n} process(es) x "
        f"{train_cfg.gradient_accumulation_steps} accumulation = {stage.total_batch}; learning rate {lr_rule}"
    )


def _quiet(*_args) -> None:
    """Stands in for printing and writing on ranks other than 0."""


__all__ = ["RunResult", "run_training"]
