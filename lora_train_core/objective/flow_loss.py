"""The flow-matching loss and the options it refuses: the counterpart of loss.py for flow families.

kohya's Flux trainer (flux_train_network.py `get_noise_pred_and_target`, train_network.py:467-480):
the prediction goes through `model_prediction_type`, the per-element loss (`loss_type`) is weighted
by the `weighting_scheme` (sigma_sqrt / cosmap, only with sigma_scaled), averaged per sample,
times the per-sample loss weights (prior_loss_weight), averaged over the batch; `post_process_loss`
is the identity. FLOW_FACTS.md §1.1, §1.4.

kohya accepts the DDPM-only options (Min-SNR, v-prediction losses, noise offset, multires noise,
timestep bounds, ...) under its flow trainers and silently does nothing with them (FLOW_FACTS §1.7).
Here each is refused with the reason, so no setting is accepted and ignored. Input perturbation
(`ip_noise_gamma`) and the loss types are applied, as kohya applies them.
"""

from __future__ import annotations

from dataclasses import fields

from torch import Tensor

from ..errors import ConfigError
from .flow import FlowConfig, apply_model_prediction_type, loss_weighting
from .loss import LossConfig, elementwise_loss, huber_c
from .noise import NoiseConfig

# DDPM-only settings: (section, field, why it means nothing for a flow model)
_DDPM_ONLY = (
    ("loss", "min_snr_gamma", "Min-SNR weights DDPM timesteps by their SNR"),
    ("loss", "scale_v_pred_loss_like_noise_pred", "it rescales a v-prediction loss by the DDPM SNR"),
    ("loss", "v_pred_like_loss", "it adds a DDPM v-prediction-like loss"),
    ("loss", "debiased_estimation_loss", "it weights DDPM timesteps by 1/√SNR"),
    ("loss", "zero_terminal_snr", "it rescales a DDPM noise schedule"),
    ("noise", "noise_offset", "kohya's flow trainers ignore it"),
    ("noise", "noise_offset_random_strength", "kohya's flow trainers ignore it"),
    ("noise", "adaptive_noise_scale", "kohya's flow trainers ignore it"),
    ("noise", "multires_noise_iterations", "kohya's flow trainers ignore it"),
    ("noise", "multires_noise_discount", "kohya's flow trainers ignore it"),
    ("noise", "min_timestep", "σ is drawn by flow.timestep_sampling, not from DDPM timesteps"),
    ("noise", "max_timestep", "σ is drawn by flow.timestep_sampling, not from DDPM timesteps"),
)


def check_options_for_flow(noise: NoiseConfig, loss: LossConfig, family_title: str) -> None:
    """ConfigError naming the first DDPM-only setting that is not at its default."""
    sections = {"noise": noise, "loss": loss}
    defaults = {name: {f.name: f.default for f in fields(cfg)} for name, cfg in sections.items()}
    for section, name, why in _DDPM_ONLY:
        value, default = getattr(sections[section], name), defaults[section][name]
        if value != default:
            raise ConfigError(
                f"{section}.{name}: {value!r} has no meaning for {family_title}, a flow-matching model "
                f"({why}); leave it at {default!r}"
            )
    if loss.loss_type in ("huber", "smooth_l1") and loss.huber_schedule == "snr":
        raise ConfigError(
            f"loss.huber_schedule: 'snr' needs a DDPM schedule's SNR, which {family_title} (a "
            "flow-matching model) does not have (kohya raises too); use 'constant' or 'exponential'"
        )


def check_flow_unused(flow: FlowConfig, family_title: str) -> None:
    """ConfigError if a [flow] option is set for a DDPM family, which would ignore it."""
    for f in fields(flow):
        if getattr(flow, f.name) != f.default:
            raise ConfigError(
                f"flow.{f.name}: {getattr(flow, f.name)!r} applies to flow-matching models, but "
                f"{family_title} is trained with the DDPM objective; remove the [flow] section"
            )


def guidance_scale_for(flow: FlowConfig, family) -> float | None:
    """The guidance value fed to the model: flow.guidance_scale, or the family's default when
    unset; None for a family without a guidance input, where setting it is refused."""
    if not family.guidance_input:
        if flow.guidance_scale is not None:
            raise ConfigError(
                f"flow.guidance_scale: {flow.guidance_scale!r}, but {family.title} has no guidance "
                "input (only guidance-distilled models such as Flux.1-dev do); remove it"
            )
        return None
    return family.default_guidance_scale if flow.guidance_scale is None else flow.guidance_scale


def flow_training_loss(
    pred: Tensor,
    target: Tensor,
    noisy: Tensor,
    sigmas: Tensor,
    flow: FlowConfig,
    cfg: LossConfig,
    sample_weights: Tensor | None = None,
) -> Tensor:
    """The scalar flow-matching loss in kohya's order, float32.

    pred: the model's raw velocity v̂; target: `flow.flow_target` (ε − x0); noisy: x_t; sigmas: σ (B,).
    `model_prediction_type` → elementwise loss (huber's c from t = 1000σ, kohya's time scale for
    its exponential schedule) → × `loss_weighting(σ)` → mean over all but the batch dim →
    × sample_weights → mean over the batch. With the defaults this is the mean of per-sample
    MSEs between v̂ and ε − x0.
    """
    pred = apply_model_prediction_type(pred, noisy, sigmas, flow)
    c = None
    if cfg.loss_type in ("huber", "smooth_l1"):
        c = huber_c(sigmas.float() * 1000, None, cfg)
    loss = elementwise_loss(pred, target, cfg, c)
    weighting = loss_weighting(sigmas, flow).to(loss.device)
    loss = loss * weighting.reshape(-1, *([1] * (loss.ndim - 1)))
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    if sample_weights is not None:
        loss = loss * sample_weights.float()
    return loss.mean()
