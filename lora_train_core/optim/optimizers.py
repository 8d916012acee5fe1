"""Optimiser choice and construction, mirroring kohya's `--optimizer_type` family.

Names and meanings follow sd-scripts `library/train_util.py` `get_optimizer`:
AdamW (torch), AdamW8bit / Lion8bit (bitsandbytes), Lion (lion-pytorch),
Prodigy (prodigyopt), Adafactor (transformers). `optimizer_args` are kohya's
"key=value" strings with Python-literal values. Where kohya silently rewrites
or ignores an option (Adafactor's relative_step, per-group lrs under Prodigy),
we raise a ConfigError instead.
"""

from __future__ import annotations

import ast
import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError, check_choice, check_int, check_range

OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Lion8bit", "Prodigy", "Adafactor")
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "adafactor",
)
# kohya names we know but do not offer: say so rather than "unknown".
_NOT_IMPLEMENTED = ("dadaptation", "dadapt", "pagedadamw", "sgdnesterov", "pagedlion8bit", "ademamix")
# Constructor arguments that build_optimizer fills in itself (lr comes from learning_rate).
_RESERVED_ARGS = {"self", "params", "lr"}


@dataclass(frozen=True)
class OptimizerConfig:
    """kohya's optimiser, learning-rate and schedule options (same names, same meanings)."""

    optimizer_type: str = "AdamW"  # the optimiser (kohya --optimizer_type)
    learning_rate: float = 1e-4  # the base learning rate (1e-4 is typical for AdamW, 1.0 for Prodigy)
    unet_lr: float | None = None  # the UNet LoRA's learning rate; unset: learning_rate
    # the text-encoder LoRA's learning rate: one value for every text encoder, or one per encoder
    # (SDXL: te1, te2); unset: learning_rate
    text_encoder_lr: tuple[float, ...] | None = None
    # more optimiser arguments as "key=value" (kohya optimizer_args), e.g. ["weight_decay=0.01"]
    optimizer_args: tuple[str, ...] = ()
    max_grad_norm: float = 1.0  # gradient clipping by this norm; 0 turns clipping off
    loraplus_lr_ratio: float = 0.0  # LoRA+: lora_up weights train at learning rate x this ratio; 0 = off
    # the text-encoder LoRA trains while step < N; 0 = always (kohya has it in train_db.py only)
    stop_text_encoder_training: int = 0
    lr_scheduler: str = "constant"  # the learning-rate schedule (kohya --lr_scheduler)
    lr_warmup_steps: float = 0  # warm-up: whole steps, or a number < 1 as a fraction of all steps
    lr_scheduler_num_cycles: int = 1  # restarts of cosine_with_restarts
    lr_scheduler_power: float = 1.0  # the power of the polynomial schedule

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalised values are stored once, here
        set_(self, "optimizer_type", canonical_optimizer_name(self.optimizer_type))
        check_range("optimizer.learning_rate", self.learning_rate, 0, None, "1e-4 is typical for LoRA")
        if self.unet_lr is not None:
            check_range("optimizer.unet_lr", self.unet_lr, 0, None, "0 trains no UNet LoRA")
        set_(self, "text_encoder_lr", _normalise_te_lr(self.text_encoder_lr))
        set_(self, "optimizer_args", tuple(self.optimizer_args))
        kwargs = parse_optimizer_args(self.optimizer_args)
        check_range("optimizer.max_grad_norm", self.max_grad_norm, 0, None, "0 turns clipping off")
        set_(self, "loraplus_lr_ratio", 0.0 if self.loraplus_lr_ratio is None else self.loraplus_lr_ratio)
        check_range("optimizer.loraplus_lr_ratio", self.loraplus_lr_ratio, 0, None, "0 = off; 16 is typical")
        check_int("optimizer.stop_text_encoder_training", self.stop_text_encoder_training, 0, None)
        check_choice("optimizer.lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _check_warmup(self.lr_warmup_steps, self.lr_scheduler)
        if isinstance(self.lr_warmup_steps, float) and self.lr_warmup_steps.is_integer():
            # whole steps are an int however they were written (10, 10.0, a node's float widget),
            # so every door records the same ss_lr_warmup_steps
            set_(self, "lr_warmup_steps", int(self.lr_warmup_steps))
        check_int("optimizer.lr_scheduler_num_cycles", self.lr_scheduler_num_cycles, 1, None)
        check_range("optimizer.lr_scheduler_power", self.lr_scheduler_power, 0, None)
        self._check_adafactor_schedule()
        if not self.optimizer_type.endswith("8bit"):  # bitsandbytes may be absent where configs are built
            check_optimizer_args(self.optimizer_type, kwargs)

    def text_encoder_trains_at(self, step: int) -> bool:
        """True while text-encoder LoRA trains: step (completed optimiser steps) < N, or N == 0.

        kohya train_db.py: `global_step < args.stop_text_encoder_training`.
        """
        return self.stop_text_encoder_training == 0 or step < self.stop_text_encoder_training

    @property
    def optimizer_kwargs(self) -> dict[str, object]:
        """optimizer_args parsed into constructor keyword arguments."""
        return parse_optimizer_args(self.optimizer_args)

    @property
    def adafactor_relative_step(self) -> bool:
        """Adafactor computes its own step size (transformers' default relative_step=True)."""
        return self.optimizer_type == "Adafactor" and bool(self.optimizer_kwargs.get("relative_step", True))

    def _check_adafactor_schedule(self) -> None:
        # kohya silently switches the schedule and drops group lrs; we ask the user to choose.
        relative = self.adafactor_relative_step
        if self.optimizer_type == "Adafactor" and not relative and self.optimizer_kwargs.get("warmup_init"):
            raise ConfigError(
                "optimizer.optimizer_args: warmup_init=True needs relative_step=True (transformers Adafactor)"
            )
        if relative and self.lr_scheduler != "adafactor":
            raise ConfigError(
                f"optimizer.lr_scheduler: {self.lr_scheduler!r} cannot drive Adafactor with "
                "relative_step=True (the default; it computes its own lr): set "
                "optimizer.lr_scheduler='adafactor', or put "
                "'relative_step=False' in optimizer.optimizer_args to use learning_rate with a schedule"
            )
        if self.lr_scheduler == "adafactor" and not relative:
            raise ConfigError(
                "optimizer.lr_scheduler: 'adafactor' only follows Adafactor with relative_step=True "
                f"(optimizer.optimizer_type {self.optimizer_type!r}, optimizer_args {self.optimizer_args}); "
                "choose another schedule"
            )
        if relative and (self.unet_lr or any(self.text_encoder_lr or ()) or self.loraplus_lr_ratio):
            raise ConfigError(
                "optimizer.unet_lr / text_encoder_lr / loraplus_lr_ratio: Adafactor with relative_step=True "
                "ignores per-group learning rates; leave them unset (0 still turns a part off), or put "
                "'relative_step=False' in optimizer.optimizer_args"
            )


def canonical_optimizer_name(name: str) -> str:
    """The supported spelling of `name` (matched case-insensitively), else ConfigError listing them."""
    if not isinstance(name, str):
        raise ConfigError(
            f"optimizer.optimizer_type: {name!r} is not a name; use one of {', '.join(OPTIMIZERS)}"
        )
    for known in OPTIMIZERS:
        if name.lower() == known.lower():
            return known
    supported = ", ".join(OPTIMIZERS)
    if name.lower().startswith(_NOT_IMPLEMENTED):
        raise ConfigError(
            f"optimizer.optimizer_type: {name!r} (a kohya optimiser) is not implemented yet; "
            f"use one of {supported} (Prodigy is the adaptive choice)"
        )
    raise ConfigError(
        f"optimizer.optimizer_type: {name!r} is not supported; use one of {supported}",
        field="optimizer.optimizer_type",
        choices=OPTIMIZERS,
        hint="matched case-insensitively",
    )


def parse_optimizer_args(args: Sequence[str]) -> dict[str, object]:
    """kohya's optimizer_args: each "key=value", value a Python literal ("betas=0.9,0.999" → tuple)."""
    kwargs: dict[str, object] = {}
    for entry in args:
        key, sep, text = entry.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ConfigError(
                f"optimizer.optimizer_args: {entry!r} is not 'key=value' (e.g. 'weight_decay=0.01')"
            )
        if key in kwargs:
            raise ConfigError(f"optimizer.optimizer_args: {key!r} is given more than once")
        try:
            kwargs[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise ConfigError(
                f"optimizer.optimizer_args: {entry!r}: {text.strip()!r} is not a Python literal "
                "(numbers, True/False/None, 'quoted strings', tuples like 0.9,0.999)"
            ) from None
    return kwargs


def check_optimizer_args(optimizer_type: str, kwargs: dict[str, object]) -> None:
    """ConfigError for a key the optimiser's constructor does not take, listing the ones it does."""
    try:
        cls = optimizer_class(optimizer_type)
    except ConfigError:
        return  # optional package missing: build_optimizer reports it
    accepted = sorted(set(inspect.signature(cls.__init__).parameters) - _RESERVED_ARGS - {"args", "kwargs"})
    for key in kwargs:
        if key == "lr":
            raise ConfigError("optimizer.optimizer_args: set lr with optimizer.learning_rate instead")
        if key not in accepted:
            raise ConfigError(
                f"optimizer.optimizer_args: {optimizer_type} takes no {key!r}; "
                f"accepted: {', '.join(accepted)}"
            )


def optimizer_class(optimizer_type: str) -> type[torch.optim.Optimizer]:
    """The class behind a canonical optimiser name; optional packages are imported here, lazily."""
    if optimizer_type == "AdamW":
        return torch.optim.AdamW
    if optimizer_type == "Prodigy":
        import prodigyopt

        return prodigyopt.Prodigy
    if optimizer_type == "Lion":
        try:
            import lion_pytorch
        except ImportError:
            raise ConfigError(
                "optimizer.optimizer_type: Lion needs the lion-pytorch package (pip install lion-pytorch)"
            ) from None
        return lion_pytorch.Lion
    if optimizer_type == "Adafactor":
        import transformers.optimization  # slow to import, so only when asked for

        return transformers.optimization.Adafactor
    if optimizer_type in ("AdamW8bit", "Lion8bit"):
        try:
            import bitsandbytes
        except ImportError:
            raise ConfigError(
                f"optimizer.optimizer_type: {optimizer_type} needs bitsandbytes (pip install bitsandbytes, "
                f"CUDA only); or use {optimizer_type.removesuffix('8bit')}"
            ) from None
        return getattr(bitsandbytes.optim, optimizer_type)
    raise ConfigError(f"optimizer.optimizer_type: {optimizer_type!r} is not one of {', '.join(OPTIMIZERS)}")


def build_optimizer(
    param_groups: list[dict], cfg: OptimizerConfig, device: torch.device
) -> torch.optim.Optimizer:
    """The optimiser of `cfg` over `param_groups` (from `build_param_groups`).

    The default lr is `cfg.learning_rate`, as in kohya; the polynomial schedule reads it.
    AdamW runs fused on CUDA and foreach elsewhere unless optimizer_args say otherwise.
    """
    if not param_groups:
        raise ConfigError("optimizer: no parameters to train (every learning rate or block weight is 0)")
    name = cfg.optimizer_type
    if name.endswith("8bit") and torch.device(device).type != "cuda":
        raise ConfigError(
            f"optimizer.optimizer_type: {name} (bitsandbytes) needs a CUDA device, not {device}; "
            f"use {name.removesuffix('8bit')}"
        )
    cls = optimizer_class(name)
    check_optimizer_args(name, cfg.optimizer_kwargs)
    kwargs = dict(cfg.optimizer_kwargs)
    groups = [_torch_group(g) for g in param_groups]
    lr: float | None = cfg.learning_rate
    if name == "AdamW" and not {"fused", "foreach"} & kwargs.keys():
        kwargs["fused" if torch.device(device).type == "cuda" else "foreach"] = True
    elif name == "Prodigy":
        _check_prodigy(groups, cfg)
    elif cfg.adafactor_relative_step:
        _check_single_lr(groups, "Adafactor with relative_step=True computes its own lr")
        for group in groups:
            group.pop("lr", None)
        lr = None
    try:
        return cls(groups, lr=lr, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"optimizer.optimizer_args: {name} rejected {kwargs}: {err}") from None


def _torch_group(group: dict) -> dict:
    # Our bookkeeping keys (name, component, ...) ride along; torch keeps unknown keys untouched.
    return dict(group, params=list(group["params"]))


def _check_prodigy(groups: list[dict], cfg: OptimizerConfig) -> None:
    lr = groups[0].get("lr", cfg.learning_rate)
    if lr <= 0.1:
        logging.warning("Prodigy adapts the step size; use lr about 1.0 (got %g)", lr)
    _check_single_lr(groups, "Prodigy")


def _check_single_lr(groups: list[dict], who: str) -> None:
    # kohya warns that only the first group's lr counts; prodigyopt >= 1.1 raises at the first step.
    lrs = sorted({g["lr"] for g in groups if "lr" in g})
    if len(lrs) > 1:
        raise ConfigError(
            f"optimizer: {who} needs one learning rate for all parameter groups, got {lrs}; leave "
            "unet_lr / text_encoder_lr unset, loraplus_lr_ratio 0 and block lr weights off"
        )


def _normalise_te_lr(value: object) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = (value,) if isinstance(value, int | float) else tuple(value)
    if not 1 <= len(values) <= 2:
        raise ConfigError(
            f"optimizer.text_encoder_lr: {values} has {len(values)} values; "
            "give one, or two for SDXL (te1, te2)"
        )
    for v in values:
        check_range("optimizer.text_encoder_lr", v, 0, None, "0 trains no text-encoder LoRA")
    return tuple(float(v) for v in values)


def _check_warmup(warmup: float, scheduler: str) -> None:
    check_range("optimizer.lr_warmup_steps", warmup, 0, None, "whole steps, or a fraction < 1 of all steps")
    if isinstance(warmup, float) and warmup >= 1 and not warmup.is_integer():
        raise ConfigError(
            f"optimizer.lr_warmup_steps: {warmup!r} is neither whole steps nor a fraction < 1 of all steps"
        )
    if warmup and scheduler in ("constant", "adafactor"):
        hint = "use 'constant_with_warmup'" if scheduler == "constant" else "Adafactor warms up by itself"
        raise ConfigError(f"optimizer.lr_warmup_steps: {warmup!r} with lr_scheduler {scheduler!r}: {hint}")
