"""Validation samples inside ComfyUI, drawn with ComfyUI's own sampler.

While training, the LoRA layers sit on the diffusion model's modules, so
`comfy.sample.sample` on the MODEL that trains (`use_model`) already sees the current LoRA. The
network is put in eval mode (no dropout) and each prompt's seed makes an image
reproducible.
"""

from __future__ import annotations

import comfy.sample
import numpy as np
import torch
from PIL import Image

from ..lora_train_core.outputs.sample_prompts import SamplePrompt, parse_prompt_line
from ..lora_train_core.outputs.sampling import image_grid

# kohya's --ss names → ComfyUI sampler names
COMFY_SAMPLERS = {
    "euler": "euler",
    "euler_a": "euler_ancestral",
    "ddim": "ddim",
    "dpmsolver++": "dpmpp_2m",
    "pndm": "ipndm",
}


def parse_prompts(text: str) -> list[SamplePrompt]:
    """One kohya prompt line per non-empty line (`#` starts a comment line)."""
    lines = [line.strip() for line in text.splitlines()]
    return [parse_prompt_line(line) for line in lines if line and not line.startswith("#")]


@torch.no_grad()
def sample_images(model, clip, vae, prompts: list[SamplePrompt], default_seed: int) -> list[Image.Image]:
    images = []
    for prompt in prompts:
        seed = default_seed if prompt.seed is None else prompt.seed
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt.prompt))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(prompt.negative_prompt))
        latent = torch.zeros([1, 4, prompt.height // 8, prompt.width // 8])
        noise = comfy.sample.prepare_noise(latent, seed)
        samples = comfy.sample.sample(
            model,
            noise,
            prompt.steps,
            prompt.scale,
            COMFY_SAMPLERS[prompt.sampler],
            "normal",
            positive,
            negative,
            latent,
            seed=seed,
            disable_pbar=True,
        )
        pixels = vae.decode(samples)[0].clamp(0, 1).float().cpu().numpy()
        images.append(Image.fromarray((pixels * 255).round().astype(np.uint8)))
    return images


class ComfySampleCallback:
    """Step callback: samples every n steps and at the end; keeps one grid row per checkpoint."""

    def __init__(
        self,
        model,
        clip,
        vae,
        prompts: list[SamplePrompt],
        every_n_steps: int,
        seed: int,
    ):
        self.model, self.clip, self.vae = model, clip, vae
        self.fresh: Image.Image | None = None
        self.prompts, self.every, self.seed = prompts, every_n_steps, seed
        self.rows: list[list[Image.Image]] = []

    def use_model(self, model) -> None:
        """Sample through `model`: the MODEL the LoRA layers sit on while training (for a
        dynamic-VRAM MODEL, the non-dynamic clone that trains; comfy_compat.training_patcher)."""
        self.model = model

    def __call__(self, report) -> None:
        if not self.prompts:
            return
        if (self.every and report.step % self.every == 0) or report.step == report.total:
            network = report.trained.network
            was_training = network.training
            network.eval()
            try:
                self.rows.append(sample_images(self.model, self.clip, self.vae, self.prompts, self.seed))
            finally:
                network.train(was_training)
            self.fresh = image_grid(self.rows[-1])

    def take_preview(self) -> Image.Image | None:
        """The samples drawn at this step, once, for the node's progress preview."""
        fresh, self.fresh = self.fresh, None
        return fresh

    def grid(self) -> Image.Image | None:
        """Rows = checkpoints (steps), columns = prompts."""
        if not self.rows:
            return None
        return image_grid([image for row in self.rows for image in row], columns=len(self.prompts))
