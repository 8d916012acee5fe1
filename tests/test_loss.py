"""Loss types, Huber schedules and SNR weights against kohya's formulas and the papers.

KOHYA_FACTS.md "Loss"; Min-SNR: arXiv 2303.09556; zero terminal SNR: arXiv 2305.08891.
Expected values are hand-computed or written out as the formula.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from lora_train_core.errors import ConfigError
from lora_train_core.objective.loss import (
    LossConfig,
    check_loss_for_prediction_type,
    elementwise_loss,
    huber_c,
    loss_weights,
    rescale_zero_terminal_snr,
    snr_from_alphas_cumprod,
    training_loss,
)


def scaled_linear_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def alphas_cumprod_for_snrs(snrs: list[float]) -> torch.Tensor:
    """ā with SNR = ā/(1−ā) equal to the given values: ā = SNR/(SNR+1)."""
    return torch.tensor([s / (s + 1) for s in snrs], dtype=torch.float64).float()


def pred_and_target(shape=(3, 4, 4, 4)):
    g = torch.Generator().manual_seed(5)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_snr_from_hand_made_alphas_cumprod():
    snr = snr_from_alphas_cumprod(torch.tensor([0.9, 0.5, 0.1]))
    assert torch.allclose(snr, torch.tensor([9.0, 1.0, 1 / 9]), rtol=1e-6)


def test_min_snr_weight_matches_paper_for_epsilon():
    abar = alphas_cumprod_for_snrs([10.0, 2.0])
    w = loss_weights(torch.tensor([0, 1]), abar, "epsilon", LossConfig(min_snr_gamma=5))
    assert torch.allclose(w, torch.tensor([5 / 10, 1.0]), rtol=1e-5)


def test_min_snr_weight_matches_paper_for_v_prediction():
    abar = alphas_cumprod_for_snrs([10.0, 2.0])
    w = loss_weights(torch.tensor([0, 1]), abar, "v_prediction", LossConfig(min_snr_gamma=5))
    assert torch.allclose(w, torch.tensor([5 / 11, 2 / 3]), rtol=1e-5)


def test_scale_v_pred_loss_uses_snr_over_snr_plus_one_capped_at_1000():
    abar = alphas_cumprod_for_snrs([10.0, 4000.0])
    cfg = LossConfig(scale_v_pred_loss_like_noise_pred=True)
    w = loss_weights(torch.tensor([0, 1]), abar, "v_prediction", cfg)
    assert torch.allclose(w, torch.tensor([10 / 11, 1000 / 1001]), rtol=1e-5)


def test_v_pred_like_loss_adds_k_times_loss_over_scale():
    abar = alphas_cumprod_for_snrs([10.0, 1.0])
    w = loss_weights(torch.tensor([0, 1]), abar, "epsilon", LossConfig(v_pred_like_loss=0.2))
    # loss + k·loss/s_t with s_t = SNR/(SNR+1)
    assert torch.allclose(w, torch.tensor([1 + 0.2 * 11 / 10, 1 + 0.2 * 2]), rtol=1e-5)


def test_debiased_estimation_weight_for_epsilon_and_v():
    abar = alphas_cumprod_for_snrs([4.0, 4000.0])
    t = torch.tensor([0, 1])
    cfg = LossConfig(debiased_estimation_loss=True)
    eps_w = loss_weights(t, abar, "epsilon", cfg)
    v_w = loss_weights(t, abar, "v_prediction", cfg)
    assert torch.allclose(eps_w, torch.tensor([1 / 2, 1 / math.sqrt(1000)]), rtol=1e-5)
    assert torch.allclose(v_w, torch.tensor([1 / 5, 1 / 1001]), rtol=1e-5)


def test_weights_multiply_in_kohya_order():
    abar = alphas_cumprod_for_snrs([10.0])
    cfg = LossConfig(min_snr_gamma=5, v_pred_like_loss=0.1, debiased_estimation_loss=True)
    w = loss_weights(torch.tensor([0]), abar, "epsilon", cfg)
    after_min_snr = 5 / 10
    after_v_like = after_min_snr + 0.1 * after_min_snr / (10 / 11)
    assert w.item() == pytest.approx(after_v_like / math.sqrt(10), rel=1e-5)


def test_weights_are_all_one_when_every_option_is_off():
    w = loss_weights(torch.tensor([0, 500, 999]), scaled_linear_alphas_cumprod(), "epsilon", LossConfig())
    assert torch.equal(w, torch.ones(3))


def test_default_training_loss_is_mean_of_per_sample_mse():
    pred, target = pred_and_target()
    pred = pred.to(torch.bfloat16)
    loss = training_loss(
        pred, target, torch.tensor([1, 2, 3]), scaled_linear_alphas_cumprod(), "epsilon", LossConfig()
    )
    expected = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)).mean()
    assert loss.dtype == torch.float32
    assert torch.equal(loss, expected)


def test_training_loss_multiplies_sample_weights_then_snr_weights():
    pred, target = pred_and_target()
    abar = alphas_cumprod_for_snrs([10.0, 2.0, 20.0])
    t = torch.tensor([0, 1, 2])
    sample_weights = torch.tensor([1.0, 0.5, 2.0])
    loss = training_loss(pred, target, t, abar, "epsilon", LossConfig(min_snr_gamma=5), sample_weights)
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    snr_w = torch.tensor([5 / 10, 1.0, 5 / 20])
    assert loss.item() == pytest.approx((per_sample * sample_weights * snr_w).mean().item(), rel=1e-5)


def test_l1_loss_is_absolute_difference():
    pred, target = pred_and_target()
    out = elementwise_loss(pred, target, LossConfig(loss_type="l1"), None)
    assert torch.allclose(out, (pred - target).abs(), atol=0, rtol=0)


def test_huber_and_smooth_l1_match_pseudo_huber_formulas():
    pred, target = pred_and_target()
    c = torch.tensor([0.1, 0.5, 1.0])
    cb = c.view(-1, 1, 1, 1)
    d2 = (pred - target) ** 2
    huber = elementwise_loss(pred, target, LossConfig(loss_type="huber"), c)
    smooth = elementwise_loss(pred, target, LossConfig(loss_type="smooth_l1"), c)
    assert torch.allclose(huber, 2 * cb * (torch.sqrt(d2 + cb**2) - cb), atol=1e-6)
    assert torch.allclose(smooth, 2 * (torch.sqrt(d2 + cb**2) - cb), atol=1e-6)


def test_huber_needs_c():
    pred, target = pred_and_target()
    with pytest.raises(ValueError, match="huber_c"):
        elementwise_loss(pred, target, LossConfig(loss_type="huber"), None)


def test_huber_training_loss_uses_scheduled_c():
    pred, target = pred_and_target()
    abar = alphas_cumprod_for_snrs([1.0, 1.0, 1.0])  # ā = 0.5, σ = 1: c = (1 − 0.1)/4 + 0.1
    loss = training_loss(
        pred, target, torch.tensor([0, 1, 2]), abar, "epsilon", LossConfig(loss_type="huber")
    )
    c = 0.9 / 4 + 0.1
    expected = (2 * c * (torch.sqrt((pred - target) ** 2 + c**2) - c)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_huber_c_constant_schedule_is_c_times_scale():
    cfg = LossConfig(loss_type="huber", huber_schedule="constant", huber_c=0.2, huber_scale=3.0)
    c = huber_c(torch.tensor([0, 999]), scaled_linear_alphas_cumprod(), cfg)
    assert torch.allclose(c, torch.tensor([0.6, 0.6]))


def test_huber_c_exponential_schedule_decays_from_scale_to_c_times_scale():
    cfg = LossConfig(loss_type="huber", huber_schedule="exponential", huber_c=0.04, huber_scale=2.0)
    c = huber_c(torch.tensor([0, 500, 1000]), scaled_linear_alphas_cumprod(), cfg)
    # exp(ln(c)·t/T)·scale: t = T/2 gives √c·scale
    assert torch.allclose(c, torch.tensor([2.0, 0.2 * 2.0, 0.04 * 2.0]), rtol=1e-5)


def test_huber_c_snr_schedule_follows_sigma_and_ignores_scale():
    abar = torch.tensor([0.5, 0.2, 0.0])
    cfg = LossConfig(loss_type="huber", huber_schedule="snr", huber_c=0.1, huber_scale=7.0)
    c = huber_c(torch.tensor([0, 1, 2]), abar, cfg)
    sigma = math.sqrt(0.8 / 0.2)  # = 2
    expected = torch.tensor([0.9 / (1 + 1) ** 2 + 0.1, 0.9 / (1 + sigma) ** 2 + 0.1, 0.1])
    assert torch.allclose(c, expected, rtol=1e-6)


def test_zero_terminal_snr_zeroes_last_alpha_and_keeps_first():
    abar = scaled_linear_alphas_cumprod()
    fixed = rescale_zero_terminal_snr(abar)
    assert fixed[-1].item() == 0.0
    assert fixed[0].item() == pytest.approx(abar[0].item(), rel=1e-6)
    snr_0 = abar[0] / (1 - abar[0])
    assert snr_from_alphas_cumprod(fixed)[0].item() == pytest.approx(snr_0.item(), rel=1e-3)
    s, s0, sT = abar.double().sqrt(), abar[0].double().sqrt(), abar[-1].double().sqrt()
    expected = ((s - sT) * s0 / (s0 - sT)) ** 2  # Alg. 1 of arXiv 2305.08891
    assert torch.allclose(fixed.double(), expected, rtol=1e-4, atol=1e-7)


def test_zero_terminal_snr_matches_diffusers_rescale_bit_for_bit():
    kw = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    plain = DDPMScheduler(**kw).alphas_cumprod
    rescaled = DDPMScheduler(**kw, rescale_betas_zero_snr=True).alphas_cumprod
    assert torch.equal(rescale_zero_terminal_snr(plain), rescaled)


@pytest.mark.parametrize(
    ("cfg", "prediction_type", "field", "value"),
    [
        (
            LossConfig(scale_v_pred_loss_like_noise_pred=True),
            "epsilon",
            "scale_v_pred_loss_like_noise_pred",
            "True",
        ),
        (LossConfig(zero_terminal_snr=True), "epsilon", "loss.zero_terminal_snr", "True"),
        (LossConfig(v_pred_like_loss=0.3), "v_prediction", "loss.v_pred_like_loss", "0.3"),
        (LossConfig(), "flow", "prediction_type", "'flow'"),
    ],
)
def test_option_for_the_other_prediction_type_is_rejected(cfg, prediction_type, field, value):
    with pytest.raises(ConfigError) as err:
        check_loss_for_prediction_type(cfg, prediction_type)
    assert field in str(err.value)
    assert value in str(err.value)


def test_matching_prediction_type_options_are_accepted():
    check_loss_for_prediction_type(
        LossConfig(zero_terminal_snr=True, scale_v_pred_loss_like_noise_pred=True), "v_prediction"
    )
    check_loss_for_prediction_type(LossConfig(v_pred_like_loss=0.1, min_snr_gamma=5), "epsilon")


@pytest.mark.parametrize(
    ("kwargs", "field", "value"),
    [
        ({"loss_type": "l3"}, "loss.loss_type", "'l3'"),
        ({"huber_schedule": "cosine"}, "loss.huber_schedule", "'cosine'"),
        ({"huber_c": 0.0}, "loss.huber_c", "0"),
        ({"huber_c": 1.5}, "loss.huber_c", "1.5"),
        ({"huber_scale": 0.0}, "loss.huber_scale", "0"),
        ({"min_snr_gamma": -1.0}, "loss.min_snr_gamma", "-1.0"),
        ({"v_pred_like_loss": -0.1}, "loss.v_pred_like_loss", "-0.1"),
    ],
)
def test_invalid_loss_config_names_field_and_value(kwargs, field, value):
    with pytest.raises(ConfigError) as err:
        LossConfig(**kwargs)
    assert field in str(err.value)
    assert value in str(err.value)
