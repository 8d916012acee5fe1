"""Exponential moving average of the LoRA weights (kohya has none; see KOHYA_FACTS "Not in sd-scripts").

The decay follows diffusers' `EMAModel.get_decay`, as SimpleTuner uses it:
k = max(0, step − update_after_step − 1); d = 0 when k = 0 (the first update copies
the weights); otherwise d = 1 − (1 + k/inv_gamma)^(−power) with warmup, or
(1 + k)/(10 + k) without, clamped to [min_decay, decay]. Each update is
e ← e − (1 − d)(e − p), in fp32. Unlike diffusers, frozen parameters are averaged
like the rest instead of copied (the same result for parameters that never train).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, check_choice, check_int, check_range


@dataclass(frozen=True)
class EMAConfig:
    """EMA of LoRA weights (the decay as in the module docstring); steps count optimiser steps from 1."""

    enabled: bool = False  # keep an EMA of the LoRA weights, saved beside the LoRA as <name>_ema
    decay: float = 0.9999  # the largest decay the EMA reaches
    min_decay: float = 0.0  # the smallest decay after the first update
    update_after_step: int = 0  # optimiser steps before the EMA starts to follow the weights
    use_ema_warmup: bool = True  # decay 1 − (1 + k/inv_gamma)^−power; false: (1 + k)/(10 + k)
    inv_gamma: float = 1.0  # the warm-up's inv_gamma
    power: float = 2 / 3  # the warm-up's power
    update_every: int = 1  # update the EMA every N optimiser steps
    device: str = "same"  # where the EMA weights are kept: with the LoRA's, or in CPU memory

    def __post_init__(self) -> None:
        check_range("ema.decay", self.decay, 0, 1, "0.999-0.9999 is typical")
        check_range("ema.min_decay", self.min_decay, 0, self.decay, "at most ema.decay")
        check_int("ema.update_after_step", self.update_after_step, 0, None)
        if not isinstance(self.use_ema_warmup, bool):
            raise ConfigError(f"ema.use_ema_warmup: {self.use_ema_warmup!r} is not true/false")
        check_range("ema.inv_gamma", self.inv_gamma, 1e-8, None, "1.0 is diffusers' default")
        check_range("ema.power", self.power, 1e-8, None, "2/3 for long runs, 3/4 for short ones")
        check_int("ema.update_every", self.update_every, 1, None, "1 = every optimiser step")
        check_choice("ema.device", self.device, ("same", "cpu"))


class LoraEMA:
    """fp32 shadow copies of named LoRA parameters, updated after optimiser steps."""

    def __init__(self, named_params: Sequence[tuple[str, nn.Parameter]], cfg: EMAConfig):
        self.cfg = cfg
        self.names = [name for name, _ in named_params]
        if len(set(self.names)) != len(self.names):
            raise ValueError("LoraEMA: parameter names repeat")
        self.params = [p for _, p in named_params]
        self.shadow = [self._on_shadow_device(p).clone() for p in self.params]
        self.num_updates = 0
        self.last_step = 0

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimiser step `step` (diffusers `EMAModel.get_decay`)."""
        cfg = self.cfg
        k = max(0, step - cfg.update_after_step - 1)
        if k == 0:
            return 0.0
        d = 1 - (1 + k / cfg.inv_gamma) ** (-cfg.power) if cfg.use_ema_warmup else (1 + k) / (10 + k)
        return max(cfg.min_decay, min(d, cfg.decay))

    @torch.no_grad()
    def step(self, step: int) -> None:
        """Update after optimiser step `step` (1-based); does nothing unless step % update_every == 0.

        The decay is that of `step` itself, so with update_every > 1 the first update (k >= 1)
        already blends the weights the EMA started from.
        """
        if step % self.cfg.update_every != 0:
            return
        weight = 1.0 - self.decay_at(step)
        current = [self._on_shadow_device(p) for p in self.params]
        # lerp(e, p, 1 − d) = e − (1 − d)(e − p)
        torch._foreach_lerp_(self.shadow, current, weight)
        self.num_updates += 1
        self.last_step = step

    def shadow_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights (fp32), keyed by the kohya parameter names given at construction."""
        return dict(zip(self.names, self.shadow, strict=True))

    def state_dict(self) -> dict[str, object]:
        """{"shadow": name → tensor, "meta": JSON-able counters}, for resumable training state."""
        meta = {"num_updates": self.num_updates, "last_step": self.last_step, "names": list(self.names)}
        return {"shadow": self.shadow_state_dict(), "meta": meta}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore from `state_dict()`; the parameter names and shapes must match this EMA's."""
        shadow, meta = state["shadow"], state["meta"]
        if sorted(shadow) != sorted(self.names):
            missing = sorted(set(self.names) - set(shadow))[:3]
            extra = sorted(set(shadow) - set(self.names))[:3]
            raise ConfigError(
                f"EMA state does not match this LoRA (missing {missing}, unexpected {extra}); "
                "resume with the same network settings"
            )
        for name, target in zip(self.names, self.shadow, strict=True):
            if shadow[name].shape != target.shape:
                raise ConfigError(
                    f"EMA state: {name} has shape {tuple(shadow[name].shape)}, "
                    f"this LoRA {tuple(target.shape)}; resume with the same network_dim"
                )
            target.copy_(shadow[name])
        self.num_updates = int(meta["num_updates"])
        self.last_step = int(meta["last_step"])

    def _on_shadow_device(self, p: torch.Tensor) -> torch.Tensor:
        device = "cpu" if self.cfg.device == "cpu" else p.device
        return p.detach().to(device=device, dtype=torch.float32)
