"""Training noise and timesteps, as kohya sd-scripts draws them.

Mirrors `train_util.get_noise_noisy_latents_and_timesteps` and the helpers in
`custom_train_functions` (see KOHYA_FACTS.md, "Noise and timesteps"). One step
calls, in this order (kohya's order, and the order of the random draws):

1. `sample_noise`: ε ~ N(0, I) like the latents, then noise offset, then multires noise;
2. `sample_timesteps`: t ~ U{min_timestep, …, max_timestep − 1};
3. `perturbed_noise`: ε + γ·ξ for the noisy input only (input perturbation);
4. `add_noise` on the perturbed noise, and `velocity_target` (or ε) on the plain noise.

Every random number comes from the `torch.Generator` passed in, drawn on the
generator's device and then moved, so a step is reproducible from a seed; kohya
draws multires scales with Python's `random` instead. With every option at its
default, a step draws exactly one `torch.randn` for ε and one `torch.randint`
for t, so it is bit-identical to a plain DDPM training step.

With `zero_terminal_snr`, pass the rescaled schedule (`loss.rescale_zero_terminal_snr`)
to `add_noise` and `velocity_target`, the same one the loss weights use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, check_int, check_range

NUM_TRAIN_TIMESTEPS = 1000  # DDPM T for SD1.5 and SDXL


@dataclass(frozen=True)
class NoiseConfig:
    """Noise and timestep options; names and meanings are kohya's (0 = off).

    Sub-options (the two random strengths, the discount) only act with their parent option.
    """

    noise_offset: float = 0.0  # offset noise o: ε ← ε + o·z, z ~ N(0, 1) per sample and channel
    noise_offset_random_strength: bool = False  # o ← U(0,1)·o, one draw per batch
    # a in o_bc ← max(0, o + a·|mean_hw x0_bc|), the offset grows with the latent's channel mean;
    # may be negative, needs noise_offset > 0 (kohya raises the same error)
    adaptive_noise_scale: float = 0.0
    multires_noise_iterations: int = 0  # levels of pyramid (multi-resolution) noise
    multires_noise_discount: float = 0.3  # pyramid level i is weighted d^i
    ip_noise_gamma: float = 0.0  # γ of input perturbation noise (arXiv 2301.11706)
    ip_noise_gamma_random_strength: bool = False  # γ ← U(0,1)·γ, one draw per batch
    min_timestep: int = 0  # timesteps t ~ U{min_timestep, …, max_timestep − 1}
    max_timestep: int = NUM_TRAIN_TIMESTEPS  # exclusive upper end of t; min == max fixes t = min

    def __post_init__(self) -> None:
        check_range("noise.noise_offset", self.noise_offset, 0, 1, "0.05-0.1 is typical; 0 turns it off")
        check_range(
            "noise.adaptive_noise_scale", self.adaptive_noise_scale, -1, 1, "a small value such as 0.01"
        )
        if self.adaptive_noise_scale != 0 and self.noise_offset == 0:
            raise ConfigError(
                f"noise.adaptive_noise_scale: {self.adaptive_noise_scale!r} needs noise_offset > 0, "
                "but noise_offset is 0; set noise.noise_offset (e.g. 0.1) or set adaptive_noise_scale to 0"
            )
        check_int(
            "noise.multires_noise_iterations",
            self.multires_noise_iterations,
            0,
            10,
            "6-10 is typical; 0 turns it off",
        )
        check_range("noise.multires_noise_discount", self.multires_noise_discount, 0, 1, "0.3 is typical")
        check_range("noise.ip_noise_gamma", self.ip_noise_gamma, 0, 1, "about 0.1 is typical; 0 turns it off")
        self._check_timesteps()

    def _check_timesteps(self) -> None:
        t_max = NUM_TRAIN_TIMESTEPS
        check_int("noise.min_timestep", self.min_timestep, 0, t_max, "0 is the default")
        check_int("noise.max_timestep", self.max_timestep, 0, t_max, f"exclusive; {t_max} is the default")
        if self.min_timestep > self.max_timestep:
            raise ConfigError(
                f"noise.min_timestep: {self.min_timestep} is greater than max_timestep "
                f"{self.max_timestep}; use min_timestep <= max_timestep (max is exclusive)"
            )
        if self.min_timestep == self.max_timestep == t_max:
            raise ConfigError(
                f"noise.max_timestep: {t_max} equals min_timestep, which fixes t = {t_max}, past the "
                f"last timestep {t_max - 1}; lower both to a fixed t of 0..{t_max - 1}"
            )


def _randn(shape: tuple[int, ...] | torch.Size, generator: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=generator, device=generator.device)


def _rand_scalar(generator: torch.Generator) -> Tensor:
    return torch.rand(1, generator=generator, device=generator.device)


def sample_noise(latents: Tensor, cfg: NoiseConfig, generator: torch.Generator) -> Tensor:
    """ε ~ N(0, I) shaped like `latents`, then noise offset, then multires noise (kohya's order).

    Drawn in float32 on the generator's device; returned on the latents' device and dtype.
    With the defaults this is exactly `torch.randn(latents.shape, generator=generator)`.
    """
    noise = _randn(latents.shape, generator).to(latents.device)
    noise = apply_noise_offset(noise, latents, cfg, generator)
    if cfg.multires_noise_iterations:
        noise = pyramid_noise_like(
            noise, cfg.multires_noise_iterations, cfg.multires_noise_discount, generator
        )
    return noise.to(latents.dtype)


def apply_noise_offset(
    noise: Tensor, latents: Tensor, cfg: NoiseConfig, generator: torch.Generator
) -> Tensor:
    """ε + o_bc·z_bc with z ~ N(0, 1) of shape (B, C, 1, 1): kohya's `apply_noise_offset`.

    o = noise_offset, times one U(0,1) draw if noise_offset_random_strength; with
    adaptive_noise_scale a, o_bc = max(0, o + a·|mean over spatial dims of latents_bc|).
    Draw order: the strength (if random), then z. Returns `noise` unchanged when the offset is 0.
    Source: crosslabs.org "Diffusion with offset noise"; kohya `--noise_offset`.
    """
    if cfg.noise_offset == 0:
        return noise
    offset: float | Tensor = cfg.noise_offset
    if cfg.noise_offset_random_strength:
        offset = _rand_scalar(generator).to(noise.device) * cfg.noise_offset
    spatial = tuple(range(2, latents.ndim))
    if cfg.adaptive_noise_scale:
        channel_mean = latents.float().mean(dim=spatial, keepdim=True).abs()
        offset = (offset + cfg.adaptive_noise_scale * channel_mean).clamp(min=0.0)
    z = _randn((*latents.shape[:2], *(1 for _ in spatial)), generator).to(noise.device)
    return (noise.float() + offset * z).to(noise.dtype)


def pyramid_noise_like(noise: Tensor, iterations: int, discount: float, generator: torch.Generator) -> Tensor:
    """Multires (pyramid) noise, kohya's `pyramid_noise_like`, on (B, C, H, W) noise.

    For level i = 0..iterations−1: r_i ~ U(2, 4) (one `torch.rand` draw, made at
    every level including i = 0 where it is unused, as kohya does), size
    (max(1, ⌊H / r_i^i⌋), max(1, ⌊W / r_i^i⌋)), then ξ_i ~ N(0, I) of that size;
    ε ← ε + discount^i · bilinear_upsample(ξ_i) (align_corners=False). Stops after the first
    level with a side of 1 pixel. Finally ε ← ε / std(ε) (unbiased, whole tensor).
    Source: Whitaker, "Multi-Resolution Noise for Diffusion Model Training"; kohya
    `--multires_noise_iterations`, `--multires_noise_discount`.
    """
    if noise.ndim != 4:
        raise ValueError(f"pyramid_noise_like needs (B, C, H, W) noise, got shape {tuple(noise.shape)}")
    b, c, h, w = noise.shape
    out = noise.float()
    for i in range(iterations):
        r = float(_rand_scalar(generator)) * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        level = _randn((b, c, hn, wn), generator).to(noise.device)
        out = out + F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hn == 1 or wn == 1:
            break
    return (out / out.std()).to(noise.dtype)


def sample_timesteps(
    batch_size: int, cfg: NoiseConfig, generator: torch.Generator, device: torch.device | str
) -> Tensor:
    """t ~ U{min_timestep, …, max_timestep − 1} per sample, int64 (kohya's `get_timesteps`).

    Exactly `torch.randint(min, max, (B,), generator=generator)` (then moved to `device`);
    when min == max, every t is that value and nothing is drawn.
    """
    if cfg.min_timestep == cfg.max_timestep:
        return torch.full((batch_size,), cfg.max_timestep, dtype=torch.long, device=device)
    t = torch.randint(
        cfg.min_timestep, cfg.max_timestep, (batch_size,), generator=generator, device=generator.device
    )
    return t.to(device)


def perturbed_noise(noise: Tensor, cfg: NoiseConfig, generator: torch.Generator) -> Tensor:
    """ε + γ·ξ with fresh ξ ~ N(0, I), for the noisy input only (kohya `--ip_noise_gamma`).

    γ = ip_noise_gamma, times one U(0,1) draw (made before ξ) if ip_noise_gamma_random_strength.
    The training target keeps the unperturbed ε (Ning et al., arXiv 2301.11706).
    Returns `noise` itself, drawing nothing, when γ is 0.
    """
    if cfg.ip_noise_gamma == 0:
        return noise
    gamma: float | Tensor = cfg.ip_noise_gamma
    if cfg.ip_noise_gamma_random_strength:
        gamma = _rand_scalar(generator).to(noise.device) * cfg.ip_noise_gamma
    xi = _randn(noise.shape, generator).to(noise.device)
    return (noise.float() + gamma * xi).to(noise.dtype)


def _schedule_at(alphas_cumprod: Tensor, timesteps: Tensor, ndim: int, device: torch.device) -> Tensor:
    """ā_t per sample as float32 on `device`, shaped (B, 1, …) to broadcast over ndim dims."""
    a = alphas_cumprod.to(device=device, dtype=torch.float32)[timesteps.to(device)]
    return a.reshape(-1, *([1] * (ndim - 1)))


def add_noise(latents: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """x_t = √ā_t · x0 + √(1 − ā_t) · ε (DDPM forward process; diffusers `DDPMScheduler.add_noise`).

    Computed in float32, returned in the latents' dtype.
    """
    a = _schedule_at(alphas_cumprod, timesteps, latents.ndim, latents.device)
    x_t = a**0.5 * latents.float() + (1 - a) ** 0.5 * noise.float()
    return x_t.to(latents.dtype)


def velocity_target(latents: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """v = √ā_t · ε − √(1 − ā_t) · x0, the v-prediction target (Salimans & Ho, arXiv 2202.00512).

    Matches diffusers `DDPMScheduler.get_velocity`; float32 math, returned in the latents' dtype.
    """
    a = _schedule_at(alphas_cumprod, timesteps, latents.ndim, latents.device)
    v = a**0.5 * noise.float() - (1 - a) ** 0.5 * latents.float()
    return v.to(latents.dtype)
