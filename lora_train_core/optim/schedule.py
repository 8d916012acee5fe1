"""Learning-rate schedules, as kohya's `--lr_scheduler` (train_util.py `get_scheduler_fix`).

Every schedule is diffusers' (the same functions kohya reaches through transformers),
a `LambdaLR` whose factor f(s) multiplies each group's own lr. With warmup W, total
steps T and p = (s − W)/(T − W), f(s) = s/W while s < W, then:

- constant: 1 (no warmup: kohya refuses one; use constant_with_warmup)
- constant_with_warmup: 1
- linear: max(0, (T − s)/(T − W))
- cosine: ½(1 + cos πp)
- cosine_with_restarts: ½(1 + cos(π·((cycles·p) mod 1))), and 0 once p ≥ 1
- polynomial: ((lr₀ − 1e-7)(1 − p)^power + 1e-7)/lr₀, as KOHYA_FACTS states, where
  lr₀ is the optimiser's default lr (`optimizer.defaults["lr"]`, which
  `build_optimizer` sets to `learning_rate`, as kohya does), not each group's lr.
  So a group whose lr differs from learning_rate (unet_lr, block weights, LoRA+)
  ends at group_lr·1e-7/lr₀ rather than at 1e-7; diffusers also requires
  learning_rate > 1e-7.
- adafactor: transformers' AdafactorSchedule, which only reports the lr that
  Adafactor (relative_step=True) computes; before the first step it reports
  learning_rate, as kohya's "adafactor:<lr>" does.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .optimizers import OptimizerConfig

POLYNOMIAL_LR_END = 1e-7  # diffusers' default lr_end, which kohya leaves in place


def warmup_steps(cfg: OptimizerConfig, total_steps: int) -> int:
    """Warmup steps: lr_warmup_steps as is, or a fraction < 1 of total_steps (truncated, as kohya)."""
    warmup = cfg.lr_warmup_steps
    steps = int(warmup * total_steps) if isinstance(warmup, float) and warmup < 1 else int(warmup)
    if steps > total_steps:
        raise ConfigError(
            f"optimizer.lr_warmup_steps: {steps} warmup steps exceed the {total_steps} training steps; "
            "use fewer, or a fraction such as 0.05"
        )
    return steps


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule `cfg.lr_scheduler` over `total_steps` optimiser steps; call `.step()` after each one."""
    if total_steps < 1:
        raise ConfigError(f"total training steps: {total_steps} is too few; train at least 1 step")
    if cfg.lr_scheduler == "adafactor":
        from transformers.optimization import Adafactor, AdafactorSchedule  # slow import, rarely needed

        if not isinstance(optimizer, Adafactor):
            raise ConfigError("optimizer.lr_scheduler: 'adafactor' needs optimizer_type Adafactor")
        return AdafactorSchedule(optimizer, initial_lr=cfg.learning_rate)
    if cfg.lr_scheduler == "polynomial" and not optimizer.defaults["lr"] > POLYNOMIAL_LR_END:
        raise ConfigError(
            f"optimizer.learning_rate: {optimizer.defaults['lr']!r} must exceed the polynomial schedule's "
            f"end lr {POLYNOMIAL_LR_END:g}"
        )
    # imported here: diffusers takes seconds to import, and reading a config (which imports
    # this module through run/train.py) must not pay for it
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=warmup_steps(cfg, total_steps),
        num_training_steps=total_steps,
        num_cycles=cfg.lr_scheduler_num_cycles,
        power=cfg.lr_scheduler_power,
    )
