"""The flow-matching (rectified flow) training objective, as kohya sd-scripts' Flux trainer computes it.

Mirrors `library/flux_train_utils.py` at kohya HEAD 48d368f: `get_noisy_model_input_and_timesteps`
(:471-529), `compute_density_for_timestep_sampling` (:433-451), `compute_loss_weighting_for_sd3`
(:454-468) and `apply_model_prediction_type` (:532-547); FLOW_FACTS.md §1.2-1.4 has the reference
semantics. Notation: x0 = clean latent, ε ~ N(0, I), σ ∈ [0, 1] = noise level,
x_t = (1 − σ)·x0 + σ·ε, and the velocity v = ε − x0 that the model learns to predict.

One step calls, in kohya's order of random draws:

1. ε ~ N(0, I) like the latents;
2. `sample_sigmas`: σ per sample;
3. `noisy_flow_input(x0, ε', σ)`, where ε' is ε perturbed by input-perturbation noise if any;
4. the model on x_t, then `apply_model_prediction_type`, then the loss against
   `flow_target(x0, ε)` (the plain ε), weighted per sample by `loss_weighting(σ, cfg)`.

σ is returned as is; turning it into the model's time input (σ for Flux, 1000σ for SD3, 1 − σ for
Lumina, FLOW_FACTS §1.1) is the model family's business.

Where this differs from kohya, on purpose:
- `model_prediction_type` defaults to `raw`, and an unset `guidance_scale` to the family's value
  (1.0 for Flux-dev), as kohya's docs recommend, not kohya's argparse defaults (`sigma_scaled`,
  3.5); see `FlowConfig`.
- Options kohya accepts and then ignores are rejected: a density scheme (`logit_normal`, `mode`)
  outside `timestep_sampling="sigma"`, a loss-weight scheme (`sigma_sqrt`, `cosmap`) without
  `model_prediction_type="sigma_scaled"`, and a sub-option set away from its default where the chosen
  mode does not read it.
- Every random number comes from the `torch.Generator` passed in, drawn on its device; kohya draws
  from the global RNG (the density on the CPU, the rest on the training device).
- σ stays float32 in every mode; kohya's `sigma` mode casts it to the weight dtype (get_sigmas
  :423-430), so a bf16 run there sees σ rounded to bf16.
- In `sigma` mode the table index is clamped to 0..999: the `mode` density gives u = 1 when its
  uniform draw is exactly 0, which indexes past kohya's 1000-entry table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ..errors import ConfigError, check_choice, check_range

TIMESTEP_SAMPLINGS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")
MODEL_PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
DENSITY_SCHEMES = ("logit_normal", "mode")  # shape the draw of u in `sigma` sampling
LOSS_WEIGHT_SCHEMES = ("sigma_sqrt", "cosmap")  # weight the loss per sample
NUM_TRAIN_TIMESTEPS = 1000  # entries of kohya's flow scheduler table (flux_train_network.py:302)
# Flux's resolution-dependent exponent μ is linear in the packed token count through these two
# points (kohya get_lin_function, flux_train_utils.py:310-313; BFL's and Comfy's ModelSamplingFlux rule).
FLUX_BASE_SEQ, FLUX_BASE_SHIFT = 256, 0.5
FLUX_MAX_SEQ, FLUX_MAX_SHIFT = 4096, 1.15
# above 2/(π − 2) = 1.75194 the mode density's map u' -> u is not monotone (SD3 §3.1); rounded down
# to 4 digits so that the bound `train --list-keys` shows is the one enforced
MODE_SCALE_MAX = 1.7519

# Sub-options and the parent settings that read them; elsewhere they must stay at their defaults.
_READ_BY = {
    "sigmoid_scale": ("timestep_sampling", ("sigmoid", "shift", "flux_shift")),
    "discrete_flow_shift": ("timestep_sampling", ("shift", "sigma")),
    "logit_mean": ("weighting_scheme", ("logit_normal",)),
    "logit_std": ("weighting_scheme", ("logit_normal",)),
    "mode_scale": ("weighting_scheme", ("mode",)),
}


@dataclass(frozen=True)
class FlowConfig:
    """Flow-matching options; names and meanings are kohya's (`flux_train_network.py` arguments).

    Notation: z ~ N(0, 1), u ~ U(0, 1), shift_S(σ) = S·σ / (1 + (S − 1)·σ).

    `model_prediction_type` defaults to `raw` although kohya's Flux default is `sigma_scaled`:
    `sigma_scaled` turns the model's velocity v̂ into an x0 estimate x_t − σ·v̂ and then compares it
    with the velocity target ε − x0, two different quantities (FLOW_FACTS §1.4); kohya's docs
    recommend `raw` (docs/flux_train_network.md:223, 342-347). `sigma_scaled` is kept for
    reproducing kohya runs, and is the only type under which kohya applies `sigma_sqrt` / `cosmap`.

    `guidance_scale` unset means the family's `default_guidance_scale`: 1.0 for Flux-dev, not
    kohya's 3.5, because kohya's docs say to train Flux-dev with 1.0 (docs/flux_train_network.md:
    215-216, 352). Nothing in this module reads it: the step feeds it to models with a guidance
    embedding (`flow_loss.guidance_scale_for`), and refuses it for models without one.
    """

    timestep_sampling: str = "sigma"  # how σ is drawn, see `sample_sigmas`; kohya's default
    sigmoid_scale: float = 1.0  # s in σ = sigmoid(s·z); read by sigmoid, shift and flux_shift
    discrete_flow_shift: float = 3.0  # S of shift_S; read by shift and sigma (kohya's scheduler table)
    weighting_scheme: str = (
        "none"  # logit_normal, mode: density of u (sigma); sigma_sqrt, cosmap: loss weight
    )
    logit_mean: float = 0.0  # logit_normal: u = sigmoid(logit_mean + logit_std·z)
    logit_std: float = 1.0  # logit_normal: the spread of that normal
    mode_scale: float = 1.29  # mode: c in u = 1 − u' − c·(cos²(π·u'/2) − 1 + u'), u' ~ U(0, 1)
    model_prediction_type: str = "raw"  # raw: v̂; additive: v̂ + x_t; sigma_scaled: x_t − σ·v̂
    guidance_scale: float | None = None  # guidance-distilled models' input (Flux-dev); None: the family's

    def __post_init__(self) -> None:
        check_choice("flow.timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS)
        check_choice("flow.weighting_scheme", self.weighting_scheme, WEIGHTING_SCHEMES)
        check_choice("flow.model_prediction_type", self.model_prediction_type, MODEL_PREDICTION_TYPES)
        _check_positive("flow.sigmoid_scale", self.sigmoid_scale, 10, "1.0 is kohya's default and advice")
        _check_positive(
            "flow.discrete_flow_shift",
            self.discrete_flow_shift,
            100,
            "3.0 is kohya's default; 3.1582 = e^1.15 matches Flux-dev's inference shift; 1 is no shift",
        )
        check_range("flow.logit_mean", self.logit_mean, -5, 5, "0.0 is the SD3 paper's")
        _check_positive("flow.logit_std", self.logit_std, 5, "1.0 is the SD3 paper's")
        check_range(
            "flow.mode_scale",
            self.mode_scale,
            -1,
            MODE_SCALE_MAX,
            "the SD3 paper's bounds, -1..2/(π-2); 1.29 is kohya's default",
        )
        if self.guidance_scale is not None:
            check_range(
                "flow.guidance_scale", self.guidance_scale, 0, 100, "1.0 to train Flux-dev, 0.0 for Chroma"
            )
        self._check_weighting_is_used()
        self._check_sub_options_are_read()

    def _check_weighting_is_used(self) -> None:
        scheme = self.weighting_scheme
        if scheme in DENSITY_SCHEMES and self.timestep_sampling != "sigma":
            raise ConfigError(
                f"flow.weighting_scheme: {scheme!r} shapes how timestep_sampling 'sigma' draws σ, "
                f"but timestep_sampling is {self.timestep_sampling!r}, which would ignore it; "
                "set timestep_sampling to 'sigma' or weighting_scheme to 'none'"
            )
        if scheme in LOSS_WEIGHT_SCHEMES and self.model_prediction_type != "sigma_scaled":
            raise ConfigError(
                f"flow.weighting_scheme: {scheme!r} weights the loss only with model_prediction_type "
                f"'sigma_scaled' (as kohya's Flux trainer does), but it is {self.model_prediction_type!r}, "
                "which would ignore it; set weighting_scheme to 'none' (or 'logit_normal' / 'mode' "
                "with timestep_sampling 'sigma') or model_prediction_type to 'sigma_scaled'"
            )

    def _check_sub_options_are_read(self) -> None:
        defaults = {f.name: f.default for f in fields(self)}
        for name, (parent, readers) in _READ_BY.items():
            value, parent_value = getattr(self, name), getattr(self, parent)
            if value != defaults[name] and parent_value not in readers:
                listed = ", ".join(repr(r) for r in readers)
                raise ConfigError(
                    f"flow.{name}: {value!r} has no effect with {parent} {parent_value!r} "
                    f"(only {listed} read it); leave it at {defaults[name]!r}"
                )


def _check_positive(field: str, value: float, hi: float, hint: str) -> None:
    check_range(field, value, 0, hi, hint, lo_open=True)


def sample_sigmas(
    batch: int,
    cfg: FlowConfig,
    generator: torch.Generator,
    device: torch.device | str,
    latent_hw: tuple[int, int],
) -> Tensor:
    """σ ∈ [0, 1] per sample, float32 of shape (batch,), drawn as kohya's Flux trainer does.

    With z ~ N(0, 1), u ~ U(0, 1), s = sigmoid_scale, S = discrete_flow_shift (FLOW_FACTS §1.2;
    kohya flux_train_utils.py:471-512):

    - `uniform`: σ = u.
    - `sigmoid`: σ = sigmoid(s·z) (x-flux's sampling).
    - `shift`: σ = shift_S(sigmoid(s·z)) with shift_S(σ) = S·σ / (1 + (S − 1)·σ).
    - `flux_shift`: σ = e^μ / (e^μ + 1/σ' − 1), σ' = sigmoid(s·z), with μ linear in the packed token
      count ⌊H/2⌋·⌊W/2⌋ of the unpacked latent size `latent_hw` = (H, W), through (256, 0.5) and
      (4096, 1.15): Flux-dev's resolution-dependent shift (get_lin_function :310-313).
    - `sigma`: u from the density of `weighting_scheme` (`logit_normal`: u = sigmoid(logit_mean +
      logit_std·z); `mode`: u = 1 − u' − c·(cos²(π·u'/2) − 1 + u'), u' ~ U(0, 1), c = mode_scale;
      otherwise u ~ U(0, 1); :433-451), then σ = table[⌊1000·u⌋] where table is kohya's flow
      scheduler's descending list shift_S(1), shift_S(0.999), …, shift_S(0.001)
      (sd3_train_utils.py:653-664). Because the table descends, a density that favours large u
      favours small σ: `logit_mean` > 0 means less noise, the opposite of SD3's sampling.

    One draw of `batch` numbers from `generator`, on its device; the result is moved to `device`.
    `latent_hw` is read only by `flux_shift`.
    """
    on = generator.device
    if cfg.timestep_sampling == "uniform":
        sigmas = torch.rand((batch,), generator=generator, device=on, dtype=torch.float32)
    elif cfg.timestep_sampling == "sigma":
        u = _timestep_density(batch, cfg, generator)
        indices = (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
        sigmas = _scheduler_sigmas(cfg.discrete_flow_shift).to(on)[indices]
    else:
        z = torch.randn((batch,), generator=generator, device=on, dtype=torch.float32)
        sigmas = torch.sigmoid(z * cfg.sigmoid_scale)
        if cfg.timestep_sampling == "shift":
            sigmas = _shift(sigmas, cfg.discrete_flow_shift)
        elif cfg.timestep_sampling == "flux_shift":
            e_mu = math.exp(_flux_mu(latent_hw))
            sigmas = e_mu / (e_mu + (1 / sigmas - 1))
    return sigmas.to(device)


def _timestep_density(batch: int, cfg: FlowConfig, generator: torch.Generator) -> Tensor:
    """u ∈ [0, 1] per sample from the weighting scheme's density (kohya / diffusers
    `compute_density_for_timestep_sampling`; Esser et al., arXiv 2403.03206, §3.1)."""
    on = generator.device
    if cfg.weighting_scheme == "logit_normal":
        normal = torch.normal(cfg.logit_mean, cfg.logit_std, (batch,), generator=generator, device=on)
        return torch.sigmoid(normal)
    u = torch.rand((batch,), generator=generator, device=on, dtype=torch.float32)
    if cfg.weighting_scheme == "mode":
        u = 1 - u - cfg.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def _shift(sigmas: Tensor, shift: float) -> Tensor:
    # kohya's operation order, so the table matches its scheduler's bit for bit
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _scheduler_sigmas(shift: float) -> Tensor:
    """kohya's FlowMatchEulerDiscreteScheduler(1000, shift).sigmas: shift_S(k/1000), k = 1000 … 1."""
    steps = torch.arange(NUM_TRAIN_TIMESTEPS, 0, -1, dtype=torch.float32)
    return _shift(steps / NUM_TRAIN_TIMESTEPS, shift)


def _flux_mu(latent_hw: tuple[int, int]) -> float:
    h, w = latent_hw
    slope = (FLUX_MAX_SHIFT - FLUX_BASE_SHIFT) / (FLUX_MAX_SEQ - FLUX_BASE_SEQ)
    return slope * ((h // 2) * (w // 2)) + (FLUX_BASE_SHIFT - slope * FLUX_BASE_SEQ)


def _per_sample(sigmas: Tensor, like: Tensor) -> Tensor:
    """σ as float32 on `like`'s device, shaped (B, 1, …) to broadcast over `like`."""
    if sigmas.shape != like.shape[:1]:
        raise ValueError(
            f"sigmas must have shape ({like.shape[0]},), one per sample, got {tuple(sigmas.shape)}"
        )
    return sigmas.to(device=like.device, dtype=torch.float32).reshape(-1, *([1] * (like.ndim - 1)))


def noisy_flow_input(x0: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """x_t = (1 − σ)·x0 + σ·ε per sample (FLOW_FACTS §1.2; kohya flux_train_utils.py:527).

    Pass the input-perturbed noise here if input perturbation is on, and the plain ε to
    `flow_target`. float32 math, returned in x0's dtype.
    """
    s = _per_sample(sigmas, x0)
    return ((1.0 - s) * x0.float() + s * noise.float()).to(x0.dtype)


def flow_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The velocity v = ε − x0 that the model predicts (kohya flux_train_network.py:399).

    float32 math, returned in x0's dtype.
    """
    return (noise.float() - x0.float()).to(x0.dtype)


def loss_weighting(sigmas: Tensor, cfg: FlowConfig) -> Tensor:
    """Per-sample loss weight, float32 of σ's shape (kohya `compute_loss_weighting_for_sd3`,
    flux_train_utils.py:454-468; Esser et al., arXiv 2403.03206, §3.1).

    `sigma_sqrt`: w = σ⁻²; `cosmap`: w = 2 / (π·(1 − 2σ + 2σ²)); any other scheme: w = 1.
    `FlowConfig` admits the first two only with `model_prediction_type="sigma_scaled"`, the one
    type under which kohya's Flux trainer applies them (FLOW_FACTS §1.4), so the step can always
    multiply by this. σ = 0, which `uniform` sampling can draw, gives an infinite `sigma_sqrt`
    weight, as in kohya.
    """
    s = sigmas.float()
    if cfg.weighting_scheme == "sigma_sqrt":
        return s**-2.0
    if cfg.weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * s + 2 * s**2))
    return torch.ones_like(s)


def apply_model_prediction_type(pred: Tensor, noisy: Tensor, sigmas: Tensor, cfg: FlowConfig) -> Tensor:
    """The prediction compared with `flow_target` (kohya `apply_model_prediction_type`,
    flux_train_utils.py:532-547; FLOW_FACTS §1.4).

    `raw`: v̂ itself (returned as is); `additive`: v̂ + x_t; `sigma_scaled`: x_t − σ·v̂, an estimate
    of x0, although the target stays the velocity ε − x0 (see `FlowConfig`). `noisy` is x_t, the
    model's input; the last two are computed in float32 and returned as float32, the loss's dtype.
    """
    if cfg.model_prediction_type == "raw":
        return pred
    if cfg.model_prediction_type == "additive":
        return pred.float() + noisy.float()
    return pred.float() * -_per_sample(sigmas, pred) + noisy.float()
