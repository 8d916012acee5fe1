"""The flow-matching objective against kohya's formulas (FLOW_FACTS.md §1.2-1.4).

Exact values are rebuilt here from a second generator with the same seed and the formula written
out plainly, or taken from diffusers (whose scheduler table, density and weights kohya copied);
where a value is random by design, the test checks the distribution instead.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from lora_train_core.errors import ConfigError
from lora_train_core.families import get_family
from lora_train_core.objective.flow import (
    FlowConfig,
    apply_model_prediction_type,
    flow_target,
    loss_weighting,
    noisy_flow_input,
    sample_sigmas,
)
from lora_train_core.objective.flow_loss import guidance_scale_for

SEED = 1234
B = 64
HW = (128, 128)  # a 1024 px Flux latent: 64·64 = 4096 packed tokens


def gen(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def same_state(a: torch.Generator, b: torch.Generator) -> bool:
    return torch.equal(a.get_state(), b.get_state())


def sd3_shift(t: torch.Tensor, s: float) -> torch.Tensor:
    return s * t / (1 + (s - 1) * t)


def kohya_table_sigma(u: torch.Tensor, s: float) -> torch.Tensor:
    """kohya's `sigma` mode written out: index ⌊1000u⌋ into shift_S(1000/1000), shift_S(999/1000), …"""
    k = 1000 - (u * 1000).long()
    return sd3_shift(k.double() / 1000, s).float()


def draw(cfg: FlowConfig, batch: int = B, hw: tuple[int, int] = HW, seed: int = SEED) -> torch.Tensor:
    return sample_sigmas(batch, cfg, gen(seed), "cpu", hw)


# --- samplers: exact values ---------------------------------------------------------------------


def test_uniform_sigma_is_one_plain_rand():
    g, ref = gen(), gen()
    sigmas = sample_sigmas(B, FlowConfig(timestep_sampling="uniform"), g, "cpu", HW)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (B,)
    assert torch.equal(sigmas, torch.rand(B, generator=ref))
    assert same_state(g, ref)


def test_sigmoid_sigma_is_logistic_of_scaled_normal():
    g, ref = gen(), gen()
    sigmas = sample_sigmas(B, FlowConfig(timestep_sampling="sigmoid", sigmoid_scale=1.7), g, "cpu", HW)
    z = torch.randn(B, generator=ref)
    expected = 1 / (1 + torch.exp(-1.7 * z.double()))
    torch.testing.assert_close(sigmas.double(), expected, rtol=1e-6, atol=1e-7)
    assert same_state(g, ref)


def test_shift_sigma_is_sd3_shift_of_sigmoid():
    cfg = FlowConfig(timestep_sampling="shift", sigmoid_scale=1.3, discrete_flow_shift=3.1582)
    g, ref = gen(), gen()
    sigmas = sample_sigmas(B, cfg, g, "cpu", HW)
    t = 1 / (1 + torch.exp(-1.3 * torch.randn(B, generator=ref).double()))
    expected = 3.1582 * t / (1 + 2.1582 * t)
    torch.testing.assert_close(sigmas.double(), expected, rtol=1e-6, atol=1e-7)
    assert same_state(g, ref)


@pytest.mark.parametrize(
    ("latent_hw", "mu"),
    [
        ((128, 128), 1.15),  # 4096 tokens: Flux's max shift
        ((32, 32), 0.5),  # 256 tokens: Flux's base shift
        ((64, 96), 0.5 + 0.65 * (32 * 48 - 256) / 3840),
        ((65, 97), 0.5 + 0.65 * (32 * 48 - 256) / 3840),  # odd sides: kohya floors H/2 and W/2
    ],
)
def test_flux_shift_sigma_uses_mu_linear_in_packed_tokens(latent_hw, mu):
    cfg = FlowConfig(timestep_sampling="flux_shift", sigmoid_scale=0.8)
    g, ref = gen(), gen()
    sigmas = sample_sigmas(B, cfg, g, "cpu", latent_hw)
    t = 1 / (1 + torch.exp(-0.8 * torch.randn(B, generator=ref).double()))
    expected = math.exp(mu) / (math.exp(mu) + 1 / t - 1)
    torch.testing.assert_close(sigmas.double(), expected, rtol=1e-5, atol=1e-6)
    assert same_state(g, ref)


def test_flux_shift_at_4096_tokens_equals_shift_by_e_to_the_1_15():
    # tshift_μ(σ) = shift_{e^μ}(σ) (FLOW_FACTS notation); kohya's docs recommend S = 3.1582 for this
    flux = draw(FlowConfig(timestep_sampling="flux_shift"), hw=(128, 128))
    shift = draw(FlowConfig(timestep_sampling="shift", discrete_flow_shift=math.exp(1.15)))
    torch.testing.assert_close(flux, shift, rtol=1e-5, atol=1e-6)


def test_sigma_mode_indexes_kohya_descending_shifted_table():
    g, ref = gen(), gen()
    sigmas = sample_sigmas(B, FlowConfig(discrete_flow_shift=2.5), g, "cpu", HW)
    u = torch.rand(B, generator=ref)
    torch.testing.assert_close(sigmas, kohya_table_sigma(u, 2.5), rtol=1e-6, atol=1e-7)
    # diffusers' scheduler is the table kohya copied: the same entries, bit for bit
    table = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=2.5).sigmas
    assert torch.equal(sigmas, table[(u * 1000).long()])
    assert same_state(g, ref)


def test_sigma_mode_with_logit_normal_density_matches_formula_and_diffusers():
    cfg = FlowConfig(weighting_scheme="logit_normal", logit_mean=0.3, logit_std=1.4)
    g, ref, ref_diffusers = gen(), gen(), gen()
    sigmas = sample_sigmas(B, cfg, g, "cpu", HW)
    u = 1 / (1 + torch.exp(-torch.normal(0.3, 1.4, (B,), generator=ref)))
    torch.testing.assert_close(sigmas, kohya_table_sigma(u, 3.0), rtol=1e-6, atol=1e-7)
    u_diffusers = compute_density_for_timestep_sampling(
        "logit_normal", B, logit_mean=0.3, logit_std=1.4, generator=ref_diffusers
    )
    table = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).sigmas
    assert torch.equal(sigmas, table[(u_diffusers * 1000).long()])
    assert same_state(g, ref)


def test_sigma_mode_with_mode_density_matches_formula_and_diffusers():
    cfg = FlowConfig(weighting_scheme="mode", mode_scale=0.8)
    g, ref, ref_diffusers = gen(), gen(), gen()
    sigmas = sample_sigmas(B, cfg, g, "cpu", HW)
    v = torch.rand(B, generator=ref)
    u = 1 - v - 0.8 * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
    torch.testing.assert_close(sigmas, kohya_table_sigma(u, 3.0), rtol=1e-6, atol=1e-7)
    u_diffusers = compute_density_for_timestep_sampling("mode", B, mode_scale=0.8, generator=ref_diffusers)
    table = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).sigmas
    assert torch.equal(sigmas, table[(u_diffusers * 1000).long()])


def test_sigma_mode_u_of_one_takes_the_last_table_entry_instead_of_indexing_past_it():
    # sigmoid(5 + 5z) rounds to exactly 1.0 in float32 for z > ~2.4; kohya would index entry 1000
    cfg = FlowConfig(weighting_scheme="logit_normal", logit_mean=5.0, logit_std=5.0)
    n = 4096
    u = torch.sigmoid(torch.normal(5.0, 5.0, (n,), generator=gen()))
    at_one = u == 1.0
    assert at_one.any()
    sigmas = draw(cfg, batch=n)
    smallest = 3.0 * 0.001 / (1 + 2.0 * 0.001)
    torch.testing.assert_close(sigmas[at_one], torch.full((int(at_one.sum()),), smallest))


@pytest.mark.parametrize("mode", ["sigma", "uniform", "sigmoid", "shift", "flux_shift"])
def test_every_sampler_returns_float32_sigmas_in_0_1_on_the_asked_device(mode):
    sigmas = draw(FlowConfig(timestep_sampling=mode), batch=512)
    assert sigmas.dtype == torch.float32 and sigmas.device == torch.device("cpu")
    assert ((sigmas >= 0) & (sigmas <= 1)).all()


# --- samplers: distributions --------------------------------------------------------------------

N = 20_000  # binomial std of a fraction ≤ 0.0036; bounds below are ≥ 4 std


def test_uniform_sigma_has_uniform_mean_and_variance():
    sigmas = draw(FlowConfig(timestep_sampling="uniform"), batch=N).double()
    assert abs(sigmas.mean() - 0.5) < 0.01
    assert abs(sigmas.var() - 1 / 12) < 0.003


def test_positive_logit_mean_favours_less_noise_in_sigma_mode():
    # kohya's table descends (FLOW_FACTS §1.2 caveat): median u = sigmoid(1) maps to σ ≈ 1 − sigmoid(1)
    cfg = FlowConfig(discrete_flow_shift=1.0, weighting_scheme="logit_normal", logit_mean=1.0)
    median = draw(cfg, batch=N).median().item()
    assert abs(median - (1 - 1 / (1 + math.exp(-1.0)))) < 0.015


def test_mode_density_puts_the_analytic_mass_in_the_middle():
    c = 1.29

    def u_of(v: float) -> float:  # decreasing in v for c within the SD3 paper's bounds
        return 1 - v - c * (math.cos(math.pi * v / 2) ** 2 - 1 + v)

    def v_where(target: float) -> float:
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if u_of(mid) > target else (lo, mid)
        return lo

    # u in [0.25, 0.75] ⇔ u' in [v(0.75), v(0.25)]; with S = 1, σ = 1 − ⌊1000u⌋/1000
    expected = v_where(0.25) - v_where(0.75)
    sigmas = draw(FlowConfig(discrete_flow_shift=1.0, weighting_scheme="mode", mode_scale=c), batch=N)
    observed = ((sigmas >= 0.25) & (sigmas <= 0.75)).double().mean().item()
    assert expected > 0.6  # c > 0 concentrates on the middle (uniform would give 0.5)
    assert abs(observed - expected) < 0.015


@pytest.mark.parametrize(("latent_hw", "mu"), [((64, 64), 0.5 + 0.65 * 768 / 3840), ((128, 128), 1.15)])
def test_flux_shift_median_sigma_is_e_mu_over_e_mu_plus_one(latent_hw, mu):
    # median of sigmoid(s·z) is 1/2, where tshift_μ gives e^μ / (e^μ + 1): bigger images, more noise
    median = draw(FlowConfig(timestep_sampling="flux_shift"), batch=N, hw=latent_hw).median().item()
    assert abs(median - math.exp(mu) / (math.exp(mu) + 1)) < 0.01


# --- forward process, target, prediction types -------------------------------------------------


def latents_and_noise(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    x0 = torch.randn((3, 16, 4, 6), generator=gen(7)).to(dtype)
    noise = torch.randn((3, 16, 4, 6), generator=gen(8)).to(dtype)
    return x0, noise


def test_noisy_input_interpolates_per_sample_between_latents_and_noise():
    x0, noise = latents_and_noise()
    sigmas = torch.tensor([0.0, 0.3, 1.0])
    x_t = noisy_flow_input(x0, noise, sigmas)
    assert torch.equal(x_t[0], x0[0])
    torch.testing.assert_close(x_t[1], 0.7 * x0[1] + 0.3 * noise[1])
    assert torch.equal(x_t[2], noise[2])


def test_flow_target_is_the_derivative_of_the_noisy_input_in_sigma():
    x0, noise = latents_and_noise()
    assert torch.equal(flow_target(x0, noise), noise - x0)
    # x_t is linear in σ, so a finite difference is exact up to float32 rounding
    s, h = torch.tensor([0.2, 0.5, 0.9]), 0.05
    slope = (noisy_flow_input(x0, noise, s + h) - noisy_flow_input(x0, noise, s)) / h
    torch.testing.assert_close(slope, flow_target(x0, noise), rtol=1e-4, atol=1e-4)


def test_noisy_input_and_target_keep_the_latents_dtype():
    x0, noise = latents_and_noise(torch.bfloat16)
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    assert noisy_flow_input(x0, noise, sigmas).dtype == torch.bfloat16
    assert flow_target(x0, noise).dtype == torch.bfloat16


def test_noisy_input_rejects_sigmas_not_one_per_sample():
    x0, noise = latents_and_noise()
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        noisy_flow_input(x0, noise, torch.tensor([0.5, 0.5]))


def test_raw_prediction_is_returned_untouched():
    pred = torch.randn((3, 16, 4, 6), generator=gen(9))
    out = apply_model_prediction_type(pred, pred + 1, torch.rand(3, generator=gen(1)), FlowConfig())
    assert out is pred


def test_additive_prediction_adds_the_noisy_input():
    x0, _ = latents_and_noise(torch.bfloat16)
    pred = torch.randn(x0.shape, generator=gen(9)).to(torch.bfloat16)
    out = apply_model_prediction_type(
        pred, x0, torch.rand(3, generator=gen(1)), FlowConfig(model_prediction_type="additive")
    )
    assert out.dtype == torch.float32
    assert torch.equal(out, pred.float() + x0.float())


def test_sigma_scaled_prediction_turns_the_true_velocity_into_x0():
    # x_t − σ·v = x0 exactly when v̂ = ε − x0: sigma_scaled is an x0 estimate, raw is the velocity
    x0, noise = latents_and_noise()
    sigmas = torch.tensor([0.1, 0.5, 0.95])
    x_t = noisy_flow_input(x0, noise, sigmas)
    v = flow_target(x0, noise)
    scaled = apply_model_prediction_type(v, x_t, sigmas, FlowConfig(model_prediction_type="sigma_scaled"))
    torch.testing.assert_close(scaled, x0, rtol=1e-5, atol=1e-5)
    s = sigmas.view(-1, 1, 1, 1)
    assert torch.equal(scaled, v * -s + x_t)


# --- loss weighting -----------------------------------------------------------------------------

SIGMAS = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])


def test_sigma_sqrt_weight_is_inverse_sigma_squared():
    cfg = FlowConfig(weighting_scheme="sigma_sqrt", model_prediction_type="sigma_scaled")
    w = loss_weighting(SIGMAS[1:], cfg)
    torch.testing.assert_close(w, torch.tensor([100.0, 4.0, 1 / 0.81, 1.0]))
    assert torch.isinf(loss_weighting(SIGMAS[:1], cfg)).all()  # σ = 0, as kohya
    torch.testing.assert_close(w, compute_loss_weighting_for_sd3("sigma_sqrt", SIGMAS[1:]))


def test_cosmap_weight_matches_the_sd3_paper():
    cfg = FlowConfig(weighting_scheme="cosmap", model_prediction_type="sigma_scaled")
    w = loss_weighting(SIGMAS, cfg)
    expected = [2 / (math.pi * (1 - 2 * s + 2 * s * s)) for s in SIGMAS.tolist()]
    torch.testing.assert_close(w, torch.tensor(expected))
    torch.testing.assert_close(w[[0, 2, 4]], torch.tensor([2 / math.pi, 4 / math.pi, 2 / math.pi]))
    torch.testing.assert_close(w, compute_loss_weighting_for_sd3("cosmap", SIGMAS))


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode"])
def test_density_schemes_and_none_weight_the_loss_by_one(scheme):
    w = loss_weighting(SIGMAS, FlowConfig(weighting_scheme=scheme))
    assert w.dtype == torch.float32
    assert torch.equal(w, torch.ones(5))


# --- config -------------------------------------------------------------------------------------


def test_defaults_are_kohyas_except_raw_prediction_and_the_familys_guidance():
    cfg = FlowConfig()
    assert (cfg.timestep_sampling, cfg.sigmoid_scale, cfg.discrete_flow_shift) == ("sigma", 1.0, 3.0)
    assert (cfg.weighting_scheme, cfg.logit_mean, cfg.logit_std, cfg.mode_scale) == ("none", 0.0, 1.0, 1.29)
    assert (cfg.model_prediction_type, cfg.guidance_scale) == ("raw", None)
    assert guidance_scale_for(cfg, get_family("flux_dev")) == 1.0  # kohya's docs: 1.0 for dev
    assert guidance_scale_for(FlowConfig(guidance_scale=3.5), get_family("flux_dev")) == 3.5
    assert guidance_scale_for(cfg, get_family("flux_schnell")) is None
    with pytest.raises(ConfigError, match=r"flow\.guidance_scale: 3\.5, but Flux\.1-schnell has no guidance"):
        guidance_scale_for(FlowConfig(guidance_scale=3.5), get_family("flux_schnell"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.guidance_scale = 3.5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("timestep_sampling", "qinglong", "'sigma', 'uniform', 'sigmoid', 'shift', 'flux_shift'"),
        ("weighting_scheme", "uniform", "'none', 'sigma_sqrt', 'logit_normal', 'mode', 'cosmap'"),
        ("model_prediction_type", "epsilon", "'raw', 'additive', 'sigma_scaled'"),
    ],
)
def test_unknown_choice_names_field_value_and_choices(field, value, allowed):
    with pytest.raises(ConfigError) as err:
        FlowConfig(**{field: value})
    assert str(err.value) == f"flow.{field}: {value!r} is not one of {allowed}"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"timestep_sampling": "shift", "sigmoid_scale": 0.0},
            "flow.sigmoid_scale: 0.0 is out of range; use 0..10 exclusive of 0",
        ),
        (
            {"timestep_sampling": "shift", "sigmoid_scale": -1.0},
            r"flow.sigmoid_scale: -1.0 is out of range; use 0..10",
        ),
        ({"discrete_flow_shift": 0}, "flow.discrete_flow_shift: 0 is out of range"),
        ({"discrete_flow_shift": 101.0}, r"flow.discrete_flow_shift: 101.0 is out of range; use 0..100"),
        ({"weighting_scheme": "logit_normal", "logit_std": 0.0}, "flow.logit_std: 0.0 is out of range"),
        (
            {"weighting_scheme": "logit_normal", "logit_mean": math.nan},
            "flow.logit_mean: nan is out of range",
        ),
        (
            {"weighting_scheme": "mode", "mode_scale": 1.8},
            r"flow.mode_scale: 1.8 is out of range; use -1..1.75",
        ),
        ({"weighting_scheme": "mode", "mode_scale": -1.5}, "flow.mode_scale: -1.5 is out of range"),
        ({"guidance_scale": -1.0}, r"flow.guidance_scale: -1.0 is out of range; use 0..100"),
        ({"guidance_scale": "3.5"}, "flow.guidance_scale: '3.5' is not a number"),
    ],
)
def test_out_of_range_value_names_field_value_and_range(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FlowConfig(**kwargs)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode"])
@pytest.mark.parametrize("sampling", ["uniform", "sigmoid", "shift", "flux_shift"])
def test_density_scheme_outside_sigma_sampling_is_rejected_not_ignored(scheme, sampling):
    with pytest.raises(ConfigError, match=rf"flow.weighting_scheme: '{scheme}' .* '{sampling}'"):
        FlowConfig(timestep_sampling=sampling, weighting_scheme=scheme)


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap"])
@pytest.mark.parametrize("prediction", ["raw", "additive"])
def test_loss_weight_scheme_without_sigma_scaled_is_rejected_not_ignored(scheme, prediction):
    with pytest.raises(ConfigError, match=rf"flow.weighting_scheme: '{scheme}' .*'sigma_scaled'"):
        FlowConfig(weighting_scheme=scheme, model_prediction_type=prediction)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigmoid_scale": 2.0}, r"flow.sigmoid_scale: 2.0 has no effect with timestep_sampling 'sigma'"),
        (
            {"timestep_sampling": "flux_shift", "discrete_flow_shift": 3.1582},
            r"flow.discrete_flow_shift: 3.1582 has no effect with timestep_sampling 'flux_shift' "
            r"\(only 'shift', 'sigma' read it\); leave it at 3.0",
        ),
        ({"logit_mean": 0.5}, r"flow.logit_mean: 0.5 has no effect with weighting_scheme 'none'"),
        ({"weighting_scheme": "logit_normal", "mode_scale": 1.0}, "flow.mode_scale: 1.0 has no effect"),
        ({"weighting_scheme": "mode", "logit_std": 2.0}, "flow.logit_std: 2.0 has no effect"),
    ],
)
def test_sub_option_that_its_mode_does_not_read_is_rejected(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FlowConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timestep_sampling": "shift", "sigmoid_scale": 1.5, "discrete_flow_shift": 3.1582},
        {"timestep_sampling": "flux_shift", "sigmoid_scale": 0.5},
        {
            "discrete_flow_shift": 5.0,
            "weighting_scheme": "logit_normal",
            "logit_mean": -0.5,
            "logit_std": 2.0,
        },
        {"weighting_scheme": "mode", "mode_scale": -1.0},
        {
            "timestep_sampling": "uniform",
            "weighting_scheme": "cosmap",
            "model_prediction_type": "sigma_scaled",
        },
        {"model_prediction_type": "sigma_scaled", "guidance_scale": 3.5},
    ],
)
def test_options_that_their_modes_read_are_accepted(kwargs):
    FlowConfig(**kwargs)
