"""The training loss and its per-timestep weights, as kohya sd-scripts computes them.

Mirrors `train_network.process_batch`, `train_util.conditional_loss` /
`get_huber_threshold_if_needed` and `custom_train_functions` (see KOHYA_FACTS.md,
"Loss"). Everything is computed in float32 whatever the model's dtype.

One difference from kohya, on purpose: with `zero_terminal_snr`, kohya computes
its SNR table before rescaling the schedule, so Min-SNR and friends see the old
SNR; here the caller rescales once (`rescale_zero_terminal_snr`) and passes the
rescaled schedule to the noising and to every weight alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, check_choice, check_range

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SNR_CAP = 1000.0  # kohya caps SNR here for scale_v / v_pred_like / debiased: SNR is huge near t = 0


@dataclass(frozen=True)
class LossConfig:
    """Loss options; names and meanings are kohya's (0 / False = off)."""

    loss_type: str = "l2"  # the per-element loss (kohya --loss_type)
    huber_schedule: str = "snr"  # how huber / smooth_l1's c varies with the timestep (see `huber_c()`)
    huber_c: float = 0.1  # the c of huber / smooth_l1 (unused by l2 and l1)
    huber_scale: float = 1.0  # scales c in the constant and exponential schedules
    min_snr_gamma: float = 0.0  # γ of Min-SNR weighting (arXiv 2303.09556; 5 in the paper)
    # v-prediction only: scale the loss as an epsilon model's is (kohya's SNR-based scaling)
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float = 0.0  # epsilon only: add a v-prediction-like loss with this weight
    debiased_estimation_loss: bool = False  # weight the loss by 1/√SNR (kohya's debiased estimation)
    zero_terminal_snr: bool = False  # rescale the schedule to ā_T = 0 (arXiv 2305.08891); v-prediction only

    def __post_init__(self) -> None:
        check_choice("loss.loss_type", self.loss_type, LOSS_TYPES)
        check_choice("loss.huber_schedule", self.huber_schedule, HUBER_SCHEDULES)
        check_range("loss.huber_c", self.huber_c, 0, 1, "0.1 is kohya's default", lo_open=True)
        check_range("loss.huber_scale", self.huber_scale, 0, None, "1 is kohya's default", lo_open=True)
        check_range(
            "loss.min_snr_gamma", self.min_snr_gamma, 0, None, "5 is the paper's value; 0 turns it off"
        )
        check_range("loss.v_pred_like_loss", self.v_pred_like_loss, 0, None, "0 turns it off")


def check_loss_for_prediction_type(cfg: LossConfig, prediction_type: str) -> None:
    """Raise ConfigError for options that do not fit the model's prediction type (kohya's checks).

    scale_v_pred_loss_like_noise_pred and zero_terminal_snr need v_prediction (kohya only
    warns for the latter, but an epsilon model cannot predict ε at ā_T = 0); v_pred_like_loss
    needs epsilon.
    """
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        if cfg.scale_v_pred_loss_like_noise_pred:
            raise ConfigError(
                "loss.scale_v_pred_loss_like_noise_pred: True needs a v_prediction model, but this model "
                "predicts epsilon; set it to False"
            )
        if cfg.zero_terminal_snr:
            raise ConfigError(
                "loss.zero_terminal_snr: True needs a v_prediction model, but this model predicts epsilon "
                "(at zero terminal SNR the input is pure noise and ε is undefined); set it to False"
            )
    elif cfg.v_pred_like_loss:
        raise ConfigError(
            f"loss.v_pred_like_loss: {cfg.v_pred_like_loss!r} needs an epsilon model, but this model "
            "predicts v_prediction; set it to 0 (or use scale_v_pred_loss_like_noise_pred)"
        )


def snr_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """SNR_t = ā_t / (1 − ā_t), as float32, computed as kohya does: (√ā / √(1 − ā))²."""
    a = alphas_cumprod.float()
    return (a.sqrt() / (1.0 - a).sqrt()) ** 2


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """ā rescaled to zero terminal SNR: arXiv 2305.08891, Algorithm 1, on s = √ā.

    s ← (s − s_T) · s_0 / (s_0 − s_T), ā ← s², then rebuilt through the betas
    (α_t = ā_t / ā_{t−1}, β = 1 − α, ā = cumprod(1 − β)) exactly as kohya's
    `fix_noise_scheduler_betas_for_zero_terminal_snr` and diffusers' `rescale_betas_zero_snr`
    do, so the result matches theirs bit for bit. ā_T = 0; ā_0 is kept up to rounding.
    """
    s = alphas_cumprod.sqrt()
    s_0, s_T = s[0].clone(), s[-1].clone()
    s = (s - s_T) * (s_0 / (s_0 - s_T))
    abar = s**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    betas = 1 - alphas
    return torch.cumprod(1.0 - betas, dim=0)


def _at(table: Tensor, timesteps: Tensor) -> Tensor:
    return table[timesteps.to(table.device)].to(timesteps.device)


def huber_c(
    timesteps: Tensor, alphas_cumprod: Tensor, cfg: LossConfig, num_train_timesteps: int = 1000
) -> Tensor:
    """Per-sample c of the huber / smooth_l1 loss (kohya `get_huber_threshold_if_needed`), float32.

    constant: c = huber_c·huber_scale; exponential: c = exp(ln(huber_c)·t/T)·huber_scale;
    snr: σ_t = √((1 − ā_t)/ā_t), c = (1 − huber_c)/(1 + σ_t)² + huber_c (huber_scale unused, as kohya).
    Source: Khrapov et al., "Improving Diffusion Models's Data-Corruption Resistance using
    Scheduled Pseudo-Huber Loss" (arXiv 2403.16728).
    """
    if cfg.huber_schedule == "constant":
        return torch.full(timesteps.shape, cfg.huber_c * cfg.huber_scale, device=timesteps.device)
    if cfg.huber_schedule == "exponential":
        rate = -math.log(cfg.huber_c) / num_train_timesteps
        return torch.exp(-rate * timesteps.float()) * cfg.huber_scale
    a = _at(alphas_cumprod.float(), timesteps)
    sigmas = ((1.0 - a) / a) ** 0.5
    return (1 - cfg.huber_c) / (1 + sigmas) ** 2 + cfg.huber_c


def elementwise_loss(pred: Tensor, target: Tensor, cfg: LossConfig, c: Tensor | None) -> Tensor:
    """Per-element loss by cfg.loss_type, float32 (kohya `conditional_loss`, reduction "none").

    l2: (p − y)²; l1: |p − y|; huber: 2c(√((p − y)² + c²) − c); smooth_l1: 2(√((p − y)² + c²) − c),
    with c per sample (shape (B,)), required for huber and smooth_l1.
    """
    pred, target = pred.float(), target.float()
    if cfg.loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if cfg.loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if c is None:
        raise ValueError(f"loss_type {cfg.loss_type!r} needs the per-sample c from huber_c()")
    c = c.float().reshape(-1, *([1] * (pred.ndim - 1)))
    pseudo_huber = torch.sqrt((pred - target) ** 2 + c**2) - c
    return 2 * c * pseudo_huber if cfg.loss_type == "huber" else 2 * pseudo_huber


def loss_weights(timesteps: Tensor, alphas_cumprod: Tensor, prediction_type: str, cfg: LossConfig) -> Tensor:
    """Per-sample factor of kohya's `post_process_loss`, float32, all ones when every option is off.

    Applied in kohya's order to w = 1, with SNR' = min(SNR_t, 1000) and s_t = SNR'/(SNR' + 1):
    Min-SNR-γ: × min(SNR_t, γ)/SNR_t (epsilon) or × min(SNR_t, γ)/(SNR_t + 1) (v)
    (arXiv 2303.09556, Eq. for ε- and v-prediction); scale_v_pred_loss_like_noise_pred: × s_t;
    v_pred_like_loss k: w ← w + k·w/s_t; debiased_estimation_loss: × 1/√SNR' (epsilon) or
    × 1/(SNR' + 1) (v) (arXiv 2310.08442).
    """
    v_pred = prediction_type == "v_prediction"
    snr = _at(snr_from_alphas_cumprod(alphas_cumprod), timesteps)
    snr_capped = torch.clamp(snr, max=SNR_CAP)
    scale = snr_capped / (snr_capped + 1)
    w = torch.ones_like(snr)
    if cfg.min_snr_gamma:
        w = w * torch.clamp(snr, max=cfg.min_snr_gamma) / (snr + 1 if v_pred else snr)
    if cfg.scale_v_pred_loss_like_noise_pred:
        w = w * scale
    if cfg.v_pred_like_loss:
        w = w + w / scale * cfg.v_pred_like_loss
    if cfg.debiased_estimation_loss:
        w = w * (1 / (snr_capped + 1) if v_pred else 1 / torch.sqrt(snr_capped))
    return w


def training_loss(
    pred: Tensor,
    target: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    prediction_type: str,
    cfg: LossConfig,
    sample_weights: Tensor | None = None,
) -> Tensor:
    """The scalar training loss in kohya's order (`train_network.process_batch`), float32.

    elementwise loss → mean over all but the batch dim → × sample_weights (e.g. prior_loss_weight
    of regularisation images) → × `loss_weights` → mean over the batch. With every option off
    and no sample_weights this is exactly
    `F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=non-batch dims).mean()`
    (a mean of per-sample means, which can differ from `F.mse_loss(...)` in the last bits).
    """
    c = None
    if cfg.loss_type in ("huber", "smooth_l1"):
        c = huber_c(timesteps, alphas_cumprod, cfg)
    loss = elementwise_loss(pred, target, cfg, c)
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    if sample_weights is not None:
        loss = loss * sample_weights.float()
    return (loss * loss_weights(timesteps, alphas_cumprod, prediction_type, cfg).to(loss.device)).mean()
