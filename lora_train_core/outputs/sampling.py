"""Validation samples during training, with diffusers' own pipelines and schedulers.

The pipeline is assembled from the backend's own modules (`Backend.pipeline_parts`, no
second copy of the model), so the LoRA layers applied to those modules are in the
picture. The LoRA runs in eval mode (no dropout) and each prompt's seed makes an image
reproducible. A backend without pipeline parts (ComfyUI, which samples with its own
sampler) cannot take `[samples]` prompts.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import diffusers
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from PIL import Image

from ..atomic_io import atomic_write_bytes
from ..errors import ConfigError
from ..model.backend import Backend, PipelineParts
from ..model.diffusers_backend import text_encoder_suffixes
from .sample_prompts import SampleConfig, SamplePrompt

SCHEDULERS = {
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
}
# what each pipeline class needs beyond its models: no safety checker, no watermark
PIPELINE_OPTIONS = {
    "StableDiffusionPipeline": {
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    },
    "StableDiffusionXLPipeline": {"add_watermarker": False},
}


def _scheduler(name: str, prediction_type: str):
    return SCHEDULERS[name](
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type=prediction_type,
        steps_offset=1,
    )


def diffusers_pipeline(parts: PipelineParts, sampler: str):
    """The family's diffusers pipeline over the backend's own modules."""
    models = {"unet": parts.unet, "vae": parts.vae}
    for suffix, encoder, tokenizer in zip(
        text_encoder_suffixes(parts.family), parts.text_encoders, parts.tokenizers, strict=True
    ):
        models[f"text_encoder{suffix}"], models[f"tokenizer{suffix}"] = encoder, tokenizer
    pipeline_class = parts.family.diffusers_pipeline
    return getattr(diffusers, pipeline_class)(
        **models,
        scheduler=_scheduler(sampler, parts.prediction_type),
        **PIPELINE_OPTIONS[pipeline_class],
    )


def sampling_parts(backend: Backend) -> PipelineParts:
    """The backend's pipeline parts; ConfigError where it has none."""
    parts = backend.pipeline_parts()
    if parts is None:
        raise ConfigError(
            "samples: validation samples need a diffusers pipeline, which this backend cannot build; "
            "leave [samples] prompts empty (in ComfyUI, sample the trained MODEL with KSampler)"
        )
    return parts


@torch.no_grad()
def generate_samples(
    backend: Backend, network, prompts: Sequence[SamplePrompt], default_seed: int
) -> list[Image.Image]:
    """One image per prompt with the LoRA applied (eval mode), deterministic per seed."""
    parts = sampling_parts(backend)
    was_training = network.training
    network.eval()
    try:
        images = []
        for prompt in prompts:
            pipe = diffusers_pipeline(parts, prompt.sampler)
            pipe.set_progress_bar_config(disable=True)
            seed = default_seed if prompt.seed is None else prompt.seed
            generator = torch.Generator(parts.device).manual_seed(seed)
            # float8 UNet weights (speed.fp8_base) compute only where autocast casts them up
            with torch.autocast(parts.device.type, dtype=parts.compute_dtype, enabled=parts.fp8_base):
                latents = pipe(
                    prompt.prompt,
                    negative_prompt=prompt.negative_prompt or None,
                    width=prompt.width,
                    height=prompt.height,
                    num_inference_steps=prompt.steps,
                    guidance_scale=prompt.scale,
                    generator=generator,
                    output_type="latent",
                ).images
            images.append(_decode(parts.vae, pipe, latents))
        return images
    finally:
        network.train(was_training)


def _decode(vae, pipe, latents: torch.Tensor) -> Image.Image:
    """Latents → picture with the float32 VAE (the pipelines would feed it latents in the
    UNet's bf16/fp16, which SD1.5's pipeline does not cast back)."""
    pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(pixels, output_type="pil")[0]


def image_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """Images side by side (rows of `columns`), each cell the size of the largest image."""
    columns = columns or len(images)
    rows = -(-len(images) // columns)
    w, h = max(i.width for i in images), max(i.height for i in images)
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for n, image in enumerate(images):
        grid.paste(image, ((n % columns) * w, (n // columns) * h))
    return grid


class SampleWriter:
    """A step callback that renders samples at kohya's cadence and saves `sample/<name>_<step>_<i>.png`."""

    def __init__(self, backend: Backend, cfg: SampleConfig, out_dir: Path, name: str):
        self.backend, self.cfg, self.name = backend, cfg, name
        self.prompts = cfg.load()
        if self.prompts:
            sampling_parts(backend)  # refuse prompts before training, not at the first sample
        self.out_dir = Path(out_dir) / "sample"
        self.written: list[Path] = []

    def __call__(self, report) -> None:
        """Step callback: render at every n-th step and at the last one."""
        every = self.cfg.sample_every_n_steps
        if self.prompts and ((every and report.step % every == 0) or report.step == report.total):
            self.write(report.trained.network, report.step)

    def write(self, network, step: int) -> list[Path]:
        paths = []
        for i, image in enumerate(generate_samples(self.backend, network, self.prompts, self.cfg.seed)):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            path = self.out_dir / f"{self.name}_{step:06d}_{i:02d}.png"
            atomic_write_bytes(path, buffer.getvalue())
            paths.append(path)
        self.written += paths
        return paths
