"""Training inside ComfyUI: the core's one run (`run_training`) on the graph's MODEL/CLIP.

Only what is ComfyUI's happens here (DESIGN.md, "ComfyUI facts that bite"): nodes run under
torch.inference_mode(), so training runs inside inference_mode(False) with grad enabled and
clones the inference tensors it receives; `load_models_gpu` loads the model; progress goes
to ComfyUI's ProgressBar (with a live loss plot or the newest samples) and Cancel is checked
every step; the output MODEL/CLIP carry the saved file through `load_lora_for_models`, as
LoraLoader would apply it. Stages, saves, states, the partial LoRA on Cancel and metadata are
the core's, as in the CLI. LoRA layers are removed in `finally` by the network itself, so the
input MODEL is unchanged on success, error and cancel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.sd
import comfy.utils
import torch

from ..lora_train_core.config import RunConfig
from ..lora_train_core.data.buckets import check_steps_for_family
from ..lora_train_core.data.latent_cache import CachedLatents, LatentSample
from ..lora_train_core.errors import ConfigError
from ..lora_train_core.model.backend import ModelFacts
from ..lora_train_core.outputs.loss_plot import render_loss_plot
from ..lora_train_core.run.orchestrator import run_training
from ..lora_train_core.run.preflight import prepare_run
from ..lora_train_core.run.state import TrainingState
from ..lora_train_core.run.train import StepReport, TrainingStopped
from . import comfy_compat
from .comfy_backend import ComfyBackend
from .comfy_sampling import ComfySampleCallback
from .values import LatentsValue, TrainedValue

log = logging.getLogger(__name__)
PREVIEW_EVERY = 10


@dataclass(frozen=True)
class ComfyInputs:
    """The graph's objects a run trains on (MODEL, CLIP, VAE) and the Cache Latents output."""

    model: object
    clip: object
    latents: LatentsValue
    vae: object = None


def train_lora_in_comfy(
    inputs: ComfyInputs,
    cfg: RunConfig,
    node_id: str | None,
    *,
    sampler: ComfySampleCallback | None = None,
    resume: TrainingState | None = None,
):
    """Train per `cfg` (stage by stage if `cfg.stages`) and return (TrainedValue, MODEL, CLIP)
    carrying the saved LoRA. A Cancel re-raises ComfyUI's own interrupt after the core kept
    the partial LoRA and its state."""
    model, clip, latents = inputs.model, inputs.clip, inputs.latents
    dataset = latents.buckets.data.dataset
    if cfg.stages and inputs.vae is None:
        raise ConfigError(
            "Train LoRA: training stages re-encode the images at each resolution; connect the VAE"
        )
    with torch.inference_mode(False), torch.enable_grad():
        backend = ComfyBackend(model, clip, inputs.vae)
        # the latents may come from Cache Latents run on another MODEL: check the step against this one
        check_steps_for_family(cfg.buckets, backend.family)
        plan = prepare_run(cfg, dataset, ModelFacts.of(backend), resume)  # before any weight moves
        try:
            backend.prepare_for_training(text_encoder=cfg.recipe.network.train_text_encoder)
            if sampler is not None:  # samples come from the MODEL the LoRA layers sit on
                sampler.use_model(backend.model)
            with comfy_compat.training_flag():
                result = run_training(
                    cfg,
                    backend,
                    on_step=_Progress(node_id, sampler),
                    dataset=dataset,
                    latents=None if cfg.stages else _trainable(latents.latents),
                    plan=plan,
                )
        except TrainingStopped as stop:
            # ComfyUI's executor must see its own interrupt (or the error) to report it as such.
            raise (stop.__cause__ or stop) from None
        finally:  # on success, error and Cancel (a BaseException in newer ComfyUI) alike
            backend.release()  # the shared CLIP modules get their own forward back
            comfy_compat.release_training_patcher(backend.model, model)
    # The in-graph result is exactly what LoraLoader gives for the saved file: same tensors, same loader.
    lora = comfy.utils.load_torch_file(str(result.path), safe_load=True)
    model_out, clip_out = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    return TrainedValue(result.trained, result.metadata, result.path), model_out, clip_out


class _Progress:
    """Step callback: Cancel check, the samples, then ProgressBar with a preview (the samples
    drawn at this step if any, else every few steps the live loss plot), Cancel check again."""

    def __init__(self, node_id: str | None, sampler: ComfySampleCallback | None):
        self.node_id, self.sampler = node_id, sampler
        self.bar: comfy.utils.ProgressBar | None = None
        self.losses: list[float] = []

    def __call__(self, report: StepReport) -> None:
        mm.throw_exception_if_processing_interrupted()
        step, total, loss = report.step, report.total, report.loss
        self.losses.append(loss)
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(total, node_id=self.node_id)
        fresh = None
        if self.sampler is not None:
            self.sampler(report)
            fresh = self.sampler.take_preview()
        preview = None
        if fresh is not None:
            preview = ("JPEG", fresh, 512)
        elif step == 1 or step % PREVIEW_EVERY == 0 or step == total:
            plot = render_loss_plot(self.losses, title=f"loss {loss:.4f} (step {step}/{total})")
            preview = ("JPEG", plot, 512)
        self.bar.update_absolute(step, total, preview)
        # A Cancel pressed while this step was reported (samples, preview, progress hook) stops
        # the run at this step, as Ctrl-C does in the CLI, not after one more step.
        mm.throw_exception_if_processing_interrupted()


def _trainable(latents):
    """Latents made under inference_mode are inference tensors; autograd needs normal ones."""
    if not isinstance(latents, CachedLatents):
        return latents
    return CachedLatents(
        [LatentSample(s.latents.clone(), s.original_size, s.crop_left_top, s.bucket) for s in latents.samples]
    )
