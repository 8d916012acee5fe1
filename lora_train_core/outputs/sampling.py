"""Validation samples during training, with diffusers' own pipelines and schedulers.

The pipeline is assembled from the backend's modules (no second copy of the
model), so the LoRA layers applied to those modules are in the picture. The
LoRA runs in eval mode (no dropout) and each prompt's seed makes an image
reproducible.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from ..atomic_io import atomic_write_bytes
from ..errors import check_int
from .sample_prompts import SamplePrompt

SCHEDULERS = {
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "ddim": DDIMScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
}


@dataclass(frozen=True)
class SampleConfig:
    """[samples] section: when to render validation images (kohya sample_every_n_*)."""

    prompts: tuple[str, ...] = ()  # validation prompts, kohya prompt lines ("a cat --n blurry --d 1 --s 20")
    prompts_file: Path | None = None  # a .txt/.toml/.json file of prompts in kohya's format
    sample_every_n_steps: int = 0  # render the samples every N steps; 0 = only at the end (if prompts)
    seed: int = 0  # the seed of prompts without --d

    def __post_init__(self):
        check_int("samples.sample_every_n_steps", self.sample_every_n_steps, 0)
        check_int("samples.seed", self.seed, 0)

    def load(self) -> list[SamplePrompt]:
        from .sample_prompts import load_prompts, parse_prompt_line

        prompts = [parse_prompt_line(p) for p in self.prompts]
        return prompts + (load_prompts(self.prompts_file) if self.prompts_file else [])


def _scheduler(name: str, prediction_type: str):
    return SCHEDULERS[name](
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type=prediction_type,
        steps_offset=1,
    )


def diffusers_pipeline(backend, sampler: str):
    """A diffusers pipeline over the DiffusersBackend's own modules."""
    scheduler = _scheduler(sampler, backend.prediction_type)
    if backend.family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=backend.vae,
            text_encoder=backend.text_encoders[0],
            text_encoder_2=backend.text_encoders[1],
            tokenizer=backend.tokenizers[0],
            tokenizer_2=backend.tokenizers[1],
            unet=backend.unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    return StableDiffusionPipeline(
        vae=backend.vae,
        text_encoder=backend.text_encoders[0],
        tokenizer=backend.tokenizers[0],
        unet=backend.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@torch.no_grad()
def generate_samples(
    backend, network, prompts: Sequence[SamplePrompt], default_seed: int
) -> list[Image.Image]:
    """One image per prompt with the LoRA applied (eval mode), deterministic per seed."""
    was_training = network.training
    network.eval()
    try:
        images = []
        for prompt in prompts:
            pipe = diffusers_pipeline(backend, prompt.sampler)
            pipe.set_progress_bar_config(disable=True)
            seed = default_seed if prompt.seed is None else prompt.seed
            generator = torch.Generator(backend.device).manual_seed(seed)
            with _fp8_autocast(backend):
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
            images.append(_decode(backend, pipe, latents))
        return images
    finally:
        network.train(was_training)


def _decode(backend, pipe, latents: torch.Tensor) -> Image.Image:
    """Latents → picture with the float32 VAE (the pipelines would feed it latents in the
    UNet's bf16/fp16, which SD1.5's pipeline does not cast back)."""
    vae = backend.vae
    pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(pixels, output_type="pil")[0]


def _fp8_autocast(backend):
    """float8 UNet weights (speed.fp8_base) compute only where autocast casts them up."""
    fp8 = getattr(backend, "fp8_unet", False)
    return torch.autocast(backend.device.type, dtype=backend.weight_dtype, enabled=fp8)


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

    def __init__(self, backend, cfg: SampleConfig, out_dir: Path, name: str):
        self.backend, self.cfg, self.name = backend, cfg, name
        self.prompts = cfg.load()
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
