"""Noise, timesteps and the forward process against kohya's formulas (KOHYA_FACTS.md, "Noise and timesteps").

Each expected value is rebuilt here from a second generator with the same seed,
drawing in the documented order, and the formula written out plainly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from lora_train_core.errors import ConfigError
from lora_train_core.objective.noise import (
    NoiseConfig,
    add_noise,
    perturbed_noise,
    pyramid_noise_like,
    sample_noise,
    sample_timesteps,
    velocity_target,
)

SEED = 1234
SHAPE = (2, 4, 8, 8)


def gen(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def same_state(a: torch.Generator, b: torch.Generator) -> bool:
    return torch.equal(a.get_state(), b.get_state())


def scaled_linear_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def latents_with_channel_means(means: list[float]) -> torch.Tensor:
    base = torch.randn(SHAPE, generator=gen(99))
    base = base - base.mean(dim=(2, 3), keepdim=True)
    return base + torch.tensor(means).view(1, -1, 1, 1)


def test_default_noise_is_exactly_one_plain_randn():
    g, ref = gen(), gen()
    noise = sample_noise(torch.zeros(SHAPE), NoiseConfig(), g)
    assert torch.equal(noise, torch.randn(SHAPE, generator=ref))
    assert same_state(g, ref)


def test_default_timesteps_are_exactly_one_plain_randint():
    g, ref = gen(), gen()
    t = sample_timesteps(5, NoiseConfig(), g, "cpu")
    assert t.dtype == torch.long
    assert torch.equal(t, torch.randint(0, 1000, (5,), generator=ref))
    assert same_state(g, ref)


def test_timesteps_stay_within_min_and_exclusive_max():
    g, ref = gen(), gen()
    t = sample_timesteps(64, NoiseConfig(min_timestep=200, max_timestep=300), g, "cpu")
    assert torch.equal(t, torch.randint(200, 300, (64,), generator=ref))
    assert int(t.min()) >= 200 and int(t.max()) <= 299


def test_equal_min_and_max_timestep_fixes_t_and_draws_nothing():
    g = gen()
    t = sample_timesteps(3, NoiseConfig(min_timestep=500, max_timestep=500), g, "cpu")
    assert t.tolist() == [500, 500, 500]
    assert same_state(g, gen())


def test_noise_offset_shifts_each_sample_channel_by_drawn_offset():
    g, ref = gen(), gen()
    noise = sample_noise(torch.zeros(SHAPE), NoiseConfig(noise_offset=0.1), g)
    eps = torch.randn(SHAPE, generator=ref)
    z = torch.randn((2, 4, 1, 1), generator=ref)
    assert torch.allclose(noise, eps + 0.1 * z, atol=0, rtol=0)
    shift = noise - eps  # constant over H, W within each (sample, channel)
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-7)
    assert same_state(g, ref)


def test_noise_offset_random_strength_scales_by_one_uniform_draw():
    g, ref = gen(), gen()
    cfg = NoiseConfig(noise_offset=0.2, noise_offset_random_strength=True)
    noise = sample_noise(torch.zeros(SHAPE), cfg, g)
    eps = torch.randn(SHAPE, generator=ref)
    u = torch.rand(1, generator=ref).item()
    z = torch.randn((2, 4, 1, 1), generator=ref)
    assert torch.allclose(noise, eps + (u * 0.2) * z, atol=1e-7, rtol=0)
    assert same_state(g, ref)


def test_adaptive_noise_scale_adds_abs_channel_mean_of_latents():
    means = [0.5, -1.0, 0.0, 2.0]
    latents = latents_with_channel_means(means)
    g, ref = gen(), gen()
    noise = sample_noise(latents, NoiseConfig(noise_offset=0.1, adaptive_noise_scale=0.05), g)
    eps = torch.randn(SHAPE, generator=ref)
    z = torch.randn((2, 4, 1, 1), generator=ref)
    offsets = torch.tensor([0.1 + 0.05 * abs(m) for m in means]).view(1, 4, 1, 1)
    assert torch.allclose(noise, eps + offsets * z, atol=1e-6, rtol=0)


def test_negative_adaptive_noise_scale_clamps_offset_at_zero():
    latents = latents_with_channel_means([0.5, -1.0, 0.0, 2.0])
    g, ref = gen(), gen()
    noise = sample_noise(latents, NoiseConfig(noise_offset=0.1, adaptive_noise_scale=-0.1), g)
    eps = torch.randn(SHAPE, generator=ref)
    z = torch.randn((2, 4, 1, 1), generator=ref)
    # max(0, 0.1 - 0.1·|m|): 0.05, 0, 0.1, 0 (the last would be -0.1 unclamped)
    offsets = torch.tensor([0.05, 0.0, 0.1, 0.0]).view(1, 4, 1, 1)
    assert torch.allclose(noise, eps + offsets * z, atol=1e-6, rtol=0)


def test_multires_one_iteration_is_full_resolution_draw_then_unit_std():
    g, ref = gen(), gen()
    eps0 = torch.randn(SHAPE, generator=gen(7))
    out = pyramid_noise_like(eps0, 1, 0.3, g)
    torch.rand(1, generator=ref)  # r_0, unused at level 0
    level0 = torch.randn(SHAPE, generator=ref)
    summed = eps0 + level0
    assert torch.allclose(out, summed / summed.std(), atol=1e-6, rtol=0)
    assert out.std().item() == pytest.approx(1.0, abs=1e-6)
    assert same_state(g, ref)


def test_multires_with_zero_discount_keeps_only_level_zero():
    eps0 = torch.randn(SHAPE, generator=gen(7))
    ref = gen()
    torch.rand(1, generator=ref)
    summed = eps0 + torch.randn(SHAPE, generator=ref)
    out = pyramid_noise_like(eps0, 3, 0.0, gen())
    assert torch.allclose(out, summed / summed.std(), atol=1e-6, rtol=0)


def test_multires_levels_shrink_by_random_ratio_and_upsample_bilinearly():
    shape = (1, 2, 32, 32)
    eps0 = torch.randn(shape, generator=gen(7))
    ref = gen()
    summed = eps0.clone()
    for i in range(2):
        r = torch.rand(1, generator=ref).item() * 2 + 2
        side = max(1, int(32 / r**i))
        level = torch.randn((1, 2, side, side), generator=ref)
        summed += 0.5**i * F.interpolate(level, size=(32, 32), mode="bilinear", align_corners=False)
    g = gen()
    out = pyramid_noise_like(eps0, 2, 0.5, g)
    assert torch.allclose(out, summed / summed.std(), atol=1e-6, rtol=0)
    assert same_state(g, ref)


def test_multires_stops_after_the_first_one_pixel_level():
    shape = (1, 2, 4, 1)  # width 1: level 0 is already one pixel wide
    eps0 = torch.randn(shape, generator=gen(7))
    g, ref = gen(), gen()
    out = pyramid_noise_like(eps0, 10, 0.3, g)
    torch.rand(1, generator=ref)
    summed = eps0 + torch.randn(shape, generator=ref)
    assert torch.allclose(out, summed / summed.std(), atol=1e-6, rtol=0)
    assert same_state(g, ref)


def test_sample_noise_applies_offset_before_multires():
    g, ref = gen(), gen()
    noise = sample_noise(torch.zeros(SHAPE), NoiseConfig(noise_offset=0.1, multires_noise_iterations=1), g)
    eps = torch.randn(SHAPE, generator=ref) + 0.1 * torch.randn((2, 4, 1, 1), generator=ref)
    torch.rand(1, generator=ref)
    summed = eps + torch.randn(SHAPE, generator=ref)
    assert torch.allclose(noise, summed / summed.std(), atol=1e-6, rtol=0)


def test_half_precision_latents_get_half_noise_from_the_float32_draw():
    noise = sample_noise(torch.zeros(SHAPE, dtype=torch.float16), NoiseConfig(), gen())
    assert noise.dtype == torch.float16
    assert torch.equal(noise, torch.randn(SHAPE, generator=gen()).half())


def test_add_noise_matches_forward_process_and_diffusers():
    abar = scaled_linear_alphas_cumprod()
    x0 = torch.randn(3, 4, 2, 2, generator=gen(1))
    eps = torch.randn(3, 4, 2, 2, generator=gen(2))
    t = torch.tensor([0, 500, 999])
    a = abar[t].view(-1, 1, 1, 1)
    expected = torch.sqrt(a) * x0 + torch.sqrt(1 - a) * eps
    out = add_noise(x0, eps, t, abar)
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.equal(out, scheduler.add_noise(x0, eps, t))


def test_velocity_target_matches_formula_and_diffusers():
    abar = scaled_linear_alphas_cumprod()
    x0 = torch.randn(3, 4, 2, 2, generator=gen(1))
    eps = torch.randn(3, 4, 2, 2, generator=gen(2))
    t = torch.tensor([0, 500, 999])
    a = abar[t].view(-1, 1, 1, 1)
    out = velocity_target(x0, eps, t, abar)
    assert torch.allclose(out, torch.sqrt(a) * eps - torch.sqrt(1 - a) * x0, atol=1e-6, rtol=0)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.equal(out, scheduler.get_velocity(x0, eps, t))


def test_add_noise_returns_latent_dtype():
    abar = scaled_linear_alphas_cumprod()
    x0 = torch.ones(1, 4, 2, 2, dtype=torch.bfloat16)
    out = add_noise(x0, torch.zeros_like(x0), torch.tensor([10]), abar)
    assert out.dtype == torch.bfloat16


def test_perturbed_noise_is_the_same_object_and_draws_nothing_when_off():
    eps = torch.randn(SHAPE, generator=gen(3))
    g = gen()
    assert perturbed_noise(eps, NoiseConfig(), g) is eps
    assert same_state(g, gen())


def test_perturbed_noise_adds_gamma_times_fresh_gaussian():
    eps = torch.randn(SHAPE, generator=gen(3))
    g, ref = gen(), gen()
    out = perturbed_noise(eps, NoiseConfig(ip_noise_gamma=0.1), g)
    assert torch.allclose(out, eps + 0.1 * torch.randn(SHAPE, generator=ref), atol=1e-7, rtol=0)


def test_perturbed_noise_random_strength_draws_uniform_before_gaussian():
    eps = torch.randn(SHAPE, generator=gen(3))
    g, ref = gen(), gen()
    out = perturbed_noise(eps, NoiseConfig(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True), g)
    u = torch.rand(1, generator=ref).item()
    assert torch.allclose(out, eps + (u * 0.1) * torch.randn(SHAPE, generator=ref), atol=1e-7, rtol=0)
    assert same_state(g, ref)


@pytest.mark.parametrize(
    ("kwargs", "field", "value"),
    [
        ({"adaptive_noise_scale": 0.05}, "noise.adaptive_noise_scale", "0.05"),
        ({"noise_offset": 1.7}, "noise.noise_offset", "1.7"),
        ({"min_timestep": 600, "max_timestep": 400}, "noise.min_timestep", "600"),
        ({"max_timestep": 1001}, "noise.max_timestep", "1001"),
        ({"min_timestep": 1000}, "noise.max_timestep", "1000"),
        ({"multires_noise_iterations": 2.5}, "noise.multires_noise_iterations", "2.5"),
        ({"multires_noise_discount": -0.1}, "noise.multires_noise_discount", "-0.1"),
        ({"ip_noise_gamma": -0.1}, "noise.ip_noise_gamma", "-0.1"),
    ],
)
def test_invalid_noise_config_names_field_and_value(kwargs, field, value):
    with pytest.raises(ConfigError) as err:
        NoiseConfig(**kwargs)
    assert field in str(err.value)
    assert value in str(err.value)
