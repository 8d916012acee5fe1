"""Training inside ComfyUI: the core's `train()` run on the graph's MODEL/CLIP.

What ComfyUI forces here (DESIGN.md, "ComfyUI facts that bite"): nodes run under
torch.inference_mode(), so training runs inside inference_mode(False) with
grad enabled and clones the inference tensors it receives; LoRA layers are
removed in `finally` by the network itself, so the input MODEL is unchanged on
success, error and cancel; progress goes to ComfyUI's ProgressBar (with a live
loss plot) and Cancel is checked every step, keeping a partial LoRA.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import comfy.model_management as mm
import comfy.sd
import comfy.utils
import torch

from ..lora_train_core.data.buckets import plan_buckets
from ..lora_train_core.data.latent_cache import CacheConfig, CachedLatents, LatentSample, build_latents
from ..lora_train_core.data.text_cache import maybe_cache_text
from ..lora_train_core.errors import ConfigError
from ..lora_train_core.outputs.export import next_free_path, save_dtype, save_lora
from ..lora_train_core.outputs.loss_plot import render_loss_plot
from ..lora_train_core.outputs.metadata import run_metadata
from ..lora_train_core.run.stages import (
    StageConfig,
    StepOffset,
    check_stages,
    stage_buckets,
    stage_recipe,
    stage_record,
    stages_metadata,
)
from ..lora_train_core.run.state_files import StateWriter, load_training_state
from ..lora_train_core.run.train import (
    StepReport,
    TrainedLora,
    TrainingRecipe,
    TrainingStopped,
    total_optimizer_steps,
    train,
)
from . import comfy_compat
from .comfy_backend import ComfyBackend
from .values import LatentsValue, TrainedValue

log = logging.getLogger(__name__)
PREVIEW_EVERY = 10


def train_lora_in_comfy(
    model,
    clip,
    latents: LatentsValue,
    recipe: TrainingRecipe,
    save_path: Path,
    save_precision: str,
    node_id: str | None,
    *,
    states_dir: Path,
    also_on_step: Sequence[Callable[[StepReport], None]] = (),
    cache_text: bool = False,
    resume: Path | None = None,
    stages: Sequence[StageConfig] = (),
    vae=None,
):
    """Train (stage by stage if `stages`), save to `save_path` (a free name), and return
    (TrainedValue, MODEL, CLIP) carrying the LoRA."""
    dataset = latents.buckets.data.dataset
    check_stages(tuple(stages), recipe, resume is not None)
    if stages and vae is None:
        raise ConfigError(
            "Train LoRA: training stages re-encode the images at each resolution; connect the VAE"
        )
    with torch.inference_mode(False), torch.enable_grad():
        comfy_backend = ComfyBackend(model, clip, vae)
        try:
            comfy_backend.prepare_for_training(text_encoder=recipe.network.train_text_encoder)
            for callback in also_on_step:  # samples come from the MODEL the LoRA layers sit on
                getattr(callback, "use_model", lambda _model: None)(comfy_backend.model)
            text_cache = CacheConfig(text_encoder_outputs="ram" if cache_text else "none")
            backend = maybe_cache_text(comfy_backend, dataset, text_cache, recipe)
            runs = _stage_runs(backend, latents, recipe, stages)
            writer = StateWriter(states_dir, save_path.stem, recipe.train.save_last_n_states)
            state = load_training_state(resume) if resume is not None else None
            session = _Session(backend, dataset, save_path, save_precision, writer)
            with comfy_compat.training_flag():
                trained = session.train(runs, _Progress(node_id, also_on_step), state)
        finally:  # on success, error and Cancel (a BaseException in newer ComfyUI) alike
            comfy_backend.release()  # the shared CLIP modules get their own forward back
            comfy_compat.release_training_patcher(comfy_backend.model, model)
    metadata = session.save(save_path, trained)
    # The in-graph result is exactly what LoraLoader gives for the saved file: same tensors, same loader.
    lora = comfy.utils.load_torch_file(str(save_path), safe_load=True)
    model_out, clip_out = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    return TrainedValue(trained, metadata, save_path), model_out, clip_out


class _Session:
    """One Train LoRA run: its stages in order, each continuing the previous stage's LoRA."""

    def __init__(self, backend, dataset, save_path: Path, save_precision: str, states: StateWriter):
        self.backend, self.dataset, self.save_path = backend, dataset, save_path
        self.save_precision, self.states = save_precision, states
        self.records: list[dict] = []
        self.plan = self.recipe = None

    def train(self, runs, progress, state) -> TrainedLora:
        total = sum(total_optimizer_steps(plan, recipe.train)[0] for plan, _, recipe, _ in runs)
        done, weights, losses = 0, None, []
        for self.plan, stage_latents, self.recipe, stage in runs:
            try:
                trained = train(
                    self.backend,
                    self.dataset,
                    self.plan,
                    stage_latents,
                    self.recipe,
                    on_step=StepOffset([progress], done, total),
                    resume=state,
                    save_state=self.states,
                    initial_weights=weights,
                )
            except TrainingStopped as stop:
                self.keep_stopped(stop)
                raise (stop.__cause__ or stop) from None
            done, weights = done + trained.steps, trained.network.kohya_state_dict()
            losses += trained.losses
            if stage is not None:
                self.records.append(stage_record(stage, self.recipe, trained.steps))
        trained.losses = losses  # the whole run's curve, across stages
        return trained

    def keep_stopped(self, stop: TrainingStopped) -> None:
        """A cancelled or failed run keeps a `-partial` LoRA and its training state."""
        if stop.partial.steps > 0:
            partial = next_free_path(self.save_path.with_name(f"{self.save_path.stem}-partial.safetensors"))
            self.save(partial, stop.partial)
            log.warning("training stopped at step %d; partial LoRA saved to %s", stop.partial.steps, partial)
        if stop.state is not None:
            log.warning(
                "training state saved to %s; pick it in resume_from to continue", self.states(stop.state)
            )

    def save(self, path: Path, trained: TrainedLora) -> dict[str, str]:
        backend = self.backend
        metadata = run_metadata(
            self.recipe, backend, self.dataset, self.plan, trained, path.stem, "ComfyUI MODEL"
        )
        metadata["ss_ema_weights"] = "False"
        metadata.update(stages_metadata(self.records))
        save_lora(path, trained.kohya_state_dict(), metadata, save_dtype(self.save_precision))
        return metadata


def _stage_runs(backend, latents: LatentsValue, recipe: TrainingRecipe, stages: Sequence[StageConfig]):
    """(plan, latents, recipe, stage) per stage; without stages, the graph's own plan and latents."""
    plan = latents.buckets.plan
    if not stages:
        return [(plan, _trainable(latents.latents), recipe, None)]
    dataset = latents.buckets.data.dataset
    runs = []
    for stage in stages:
        stage_plan = plan_buckets(dataset.images, stage_buckets(plan.config, stage))
        stage_latents = build_latents(dataset, stage_plan, backend, CacheConfig(mode="ram"))
        runs.append((stage_plan, stage_latents, stage_recipe(recipe, stage), stage))
    return runs


class _Progress:
    """Step callback: Cancel check, the other callbacks, then ProgressBar with a preview: samples
    drawn at this step if any (`take_preview`), else every few steps the live loss plot."""

    def __init__(self, node_id: str | None, also: Sequence[Callable[[StepReport], None]] = ()):
        self.node_id, self.also = node_id, tuple(also)
        self.bar: comfy.utils.ProgressBar | None = None
        self.losses: list[float] = []

    def __call__(self, report: StepReport) -> None:
        mm.throw_exception_if_processing_interrupted()
        step, total, loss = report.step, report.total, report.loss
        self.losses.append(loss)
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(total, node_id=self.node_id)
        for callback in self.also:
            callback(report)
        samples = [
            s for s in (getattr(c, "take_preview", lambda: None)() for c in self.also) if s is not None
        ]
        preview = None
        if samples:
            preview = ("JPEG", samples[0], 512)
        elif step == 1 or step % PREVIEW_EVERY == 0 or step == total:
            plot = render_loss_plot(self.losses, title=f"loss {loss:.4f} (step {step}/{total})")
            preview = ("JPEG", plot, 512)
        self.bar.update_absolute(step, total, preview)


def _trainable(latents):
    """Latents made under inference_mode are inference tensors; autograd needs normal ones."""
    if not isinstance(latents, CachedLatents):
        return latents
    return CachedLatents(
        [LatentSample(s.latents.clone(), s.original_size, s.crop_left_top, s.bucket) for s in latents.samples]
    )
