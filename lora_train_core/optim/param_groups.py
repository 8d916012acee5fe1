"""Optimiser parameter groups for kohya-named LoRA weights: per-part lrs, block-wise lrs, LoRA+.

Mirrors sd-scripts networks/lora.py: `get_block_index`, `get_block_lr_weight`,
`prepare_optimizer_params` and `get_block_dims_and_alphas`. The UNet is cut into
kohya's blocks: SD1.5 has 25 (0 unused, 1-11 down, 12 mid, 13-24 up), SDXL 23
(0 time/label embedding, 1-9 input, 10-12 middle, 13-21 output, 22 out).
Block indices come from the kohya module name alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError, check_choice, check_range
from .optimizers import OptimizerConfig

FAMILIES = ("sd15", "sdxl")
PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
# (down/up weights, mid weights, all blocks) per family; SDXL adds blocks 0 and 22 at weight 1.
_BLOCK_COUNTS = {"sd15": (12, 1, 25), "sdxl": (9, 3, 23)}
_SD15_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
_SDXL_BLOCK_START = {
    "time_embed": 0,
    "label_emb": 0,
    "input_blocks": 1,
    "middle_block": 10,
    "output_blocks": 13,
}
_COMPONENTS = {
    "sd15": {"lora_unet_": "unet", "lora_te_": "te"},
    "sdxl": {"lora_unet_": "unet", "lora_te1_": "te1", "lora_te2_": "te2"},
}


@dataclass(frozen=True)
class BlockWeights:
    """kohya's block-wise lr weights (network_args down_lr_weight, mid_lr_weight, up_lr_weight)."""

    # an lr weight per down block, shallow → deep (a short list is padded with 1.0), or a preset
    down_lr_weight: tuple[float, ...] | str | None = None
    mid_lr_weight: tuple[float, ...] | float | None = None  # the lr weight of the mid block(s)
    # an lr weight per up block, deep → shallow (a short list is padded with 1.0), or a preset
    up_lr_weight: tuple[float, ...] | str | None = None
    block_lr_zero_threshold: float = 0.0  # blocks weighted at or below this are not trained

    def __post_init__(self) -> None:
        if isinstance(self.mid_lr_weight, str):
            raise ConfigError(f"blocks.mid_lr_weight: {self.mid_lr_weight!r} must be numbers, not a preset")
        for name in ("down_lr_weight", "mid_lr_weight", "up_lr_weight"):
            value = getattr(self, name)
            if isinstance(value, str):
                _split_preset(f"blocks.{name}", value)
            elif value is not None:
                value = (value,) if isinstance(value, int | float) else tuple(value)
                for v in value:
                    check_range(f"blocks.{name}", v, 0, None, "a weight multiplies the block's lr")
                object.__setattr__(self, name, value)
        check_range("blocks.block_lr_zero_threshold", self.block_lr_zero_threshold, 0, None)
        if self.block_lr_zero_threshold and not self.is_set:
            raise ConfigError(
                "blocks.block_lr_zero_threshold: only means something with down/mid/up_lr_weight"
            )

    @property
    def is_set(self) -> bool:
        return any(w is not None for w in (self.down_lr_weight, self.mid_lr_weight, self.up_lr_weight))


def block_index(kohya_name: str, family: str) -> int | None:
    """kohya's block of a UNet LoRA module (networks/lora.py `get_block_index`); None for text encoders."""
    check_choice("family", family, FAMILIES)
    if _component(kohya_name, family) != "unet":
        return None
    name = kohya_name.removeprefix("lora_unet_")
    if family == "sd15":
        m = _SD15_UPDOWN.search(name)
        if m:
            direction, i, kind, j = m[1], int(m[2]), m[3], int(m[4])
            idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
            return 1 + idx if direction == "down" else 13 + idx
        if name.startswith("mid_block_"):
            return 12
    else:
        for prefix, start in _SDXL_BLOCK_START.items():
            if name.startswith(prefix + "_"):
                return start if start == 0 else start + int(name.split("_")[2])
        if name.startswith("out_"):
            return 22
    raise ValueError(f"{kohya_name!r} lies in no {family} UNet block (kohya get_block_index)")


def lr_weight_per_block(weights: BlockWeights, family: str) -> list[float]:
    """The lr factor of every block (25 for SD1.5, 23 for SDXL), kohya `get_block_lr_weight`."""
    check_choice("family", family, FAMILIES)
    n_updown, n_mid, n_total = _BLOCK_COUNTS[family]
    down = _weights("down_lr_weight", weights.down_lr_weight, n_updown)
    mid = _weights("mid_lr_weight", weights.mid_lr_weight, n_mid)
    up = _weights("up_lr_weight", weights.up_lr_weight, n_updown)
    per_block = down + mid + up
    if family == "sdxl":
        per_block = [1.0, *per_block, 1.0]  # time embedding and out, which kohya never wraps
    assert len(per_block) == n_total
    return [w if w > weights.block_lr_zero_threshold else 0.0 for w in per_block]


def build_param_groups(
    named_params: Sequence[tuple[str, nn.Parameter]],
    family: str,
    opt: OptimizerConfig,
    blocks: BlockWeights | None = None,
) -> list[dict]:
    """Param groups as kohya's `prepare_optimizer_params`, text encoders first.

    Each group: {"params", "lr", "name", "component" ("unet"|"te"|"te1"|"te2"), "is_lora_up"}.
    lr: unet_lr / text_encoder_lr (one per SDXL encoder), else learning_rate; × block weight
    for UNet blocks; × loraplus_lr_ratio for the LoRA+ group of lora_up weights. Parameters
    whose lr is 0 get no group and are frozen; all others are set trainable.
    """
    check_choice("family", family, FAMILIES)
    if family == "sd15" and opt.text_encoder_lr is not None and len(opt.text_encoder_lr) > 1:
        raise ConfigError(
            f"optimizer.text_encoder_lr: {opt.text_encoder_lr} has two values but SD1.5 has one text encoder"
        )
    block_weights = lr_weight_per_block(blocks, family) if blocks is not None and blocks.is_set else None
    if block_weights is not None and opt.adafactor_relative_step:
        raise ConfigError(
            "blocks: Adafactor with relative_step=True ignores block lr weights; "
            "put 'relative_step=False' in optimizer.optimizer_args, or drop the weights"
        )
    groups: dict[str, dict] = {}
    for param_name, param in named_params:
        module, is_up = _split_param_name(param_name)
        component = _component(module, family)
        lr, name = _component_lr(component, opt), component
        if component == "unet" and block_weights is not None:
            idx = block_index(module, family)
            lr, name = lr * block_weights[idx], f"unet block {idx}"
        plus = is_up and opt.loraplus_lr_ratio > 0
        if plus:
            lr, name = lr * opt.loraplus_lr_ratio, f"{name} plus"
        group = {"params": [], "lr": lr, "name": name, "component": component, "is_lora_up": plus}
        groups.setdefault(name, group)["params"].append(param)
    for group in groups.values():
        for p in group["params"]:
            p.requires_grad_(group["lr"] > 0)
    kept = [g for g in groups.values() if g["lr"] > 0]
    return sorted(kept, key=_group_order)


def set_text_encoder_trainable(param_groups: list[dict], trainable: bool) -> None:
    """Freeze or unfreeze the text-encoder groups (stop_text_encoder_training).

    Frozen params keep grad None, so the optimiser skips them (zero grads with set_to_none).
    """
    for group in param_groups:
        if group["component"] != "unet":
            for p in group["params"]:
                p.requires_grad_(trainable)


def excluded_modules(module_names: Sequence[str], family: str, blocks: BlockWeights) -> list[str]:
    """UNet modules in blocks of weight 0, which kohya does not create (`remove_block_dims_and_alphas`)."""
    if not blocks.is_set:
        return []
    weights = lr_weight_per_block(blocks, family)
    return [m for m in module_names if (i := block_index(m, family)) is not None and weights[i] == 0]


def per_module_dims(
    module_names: Sequence[str],
    family: str,
    block_dims: Sequence[int] | None,
    block_alphas: Sequence[float] | None = None,
    *,
    conv_block_dims: Sequence[int] | None = None,
    conv_block_alphas: Sequence[float] | None = None,
    conv3x3_modules: frozenset[str] = frozenset(),
    block_lr_weights: Sequence[float] | None = None,
) -> tuple[dict[str, int], dict[str, float]]:
    """Rank and alpha of each UNet module from kohya's block_dims / block_alphas / conv_block_*.

    Lists hold one value per block (25 SD1.5, 23 SDXL). Linear and 1×1 modules read
    block_*, modules in `conv3x3_modules` read conv_block_*. Only what the lists decide is
    returned: text-encoder modules, and modules whose list is None, keep network_dim /
    network_alpha (conv_dim / conv_alpha). Dim 0 (also where block_lr_weights is 0) means
    "no LoRA here". kohya `get_block_dims_and_alphas`, `remove_block_dims_and_alphas`.
    """
    check_choice("family", family, FAMILIES)
    n_total = _BLOCK_COUNTS[family][2]
    lists = {
        "block_dims": block_dims,
        "block_alphas": block_alphas,
        "conv_block_dims": conv_block_dims,
        "conv_block_alphas": conv_block_alphas,
        "block_lr_weights": block_lr_weights,
    }
    for field, values in lists.items():
        if values is not None and len(values) != n_total:
            raise ConfigError(
                f"network.{field}: {len(values)} values given; {family} needs {n_total}, one per UNet block "
                f"({_layout_hint(family)})"
            )
        for v in values or ():
            check_range(f"network.{field}", v, 0, None)
    dims: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for module in module_names:
        idx = block_index(module, family)
        if idx is None:
            continue
        conv = module in conv3x3_modules
        dim_list, alpha_list = (conv_block_dims, conv_block_alphas) if conv else (block_dims, block_alphas)
        if dim_list is not None:
            dropped = block_lr_weights is not None and block_lr_weights[idx] == 0
            dims[module] = 0 if dropped else int(dim_list[idx])
        if alpha_list is not None:
            alphas[module] = float(alpha_list[idx])
    return dims, alphas


def _split_param_name(param_name: str) -> tuple[str, bool]:
    for suffix, is_up in ((".lora_down.weight", False), (".lora_up.weight", True)):
        if param_name.endswith(suffix):
            return param_name.removesuffix(suffix), is_up
    raise ValueError(f"{param_name!r} is not '<kohya module>.lora_down.weight' or '.lora_up.weight'")


def _component(kohya_name: str, family: str) -> str:
    for prefix, component in _COMPONENTS[family].items():
        if kohya_name.startswith(prefix):
            return component
    raise ValueError(f"{kohya_name!r} has none of the {family} prefixes {', '.join(_COMPONENTS[family])}")


def _component_lr(component: str, opt: OptimizerConfig) -> float:
    if component == "unet":
        return opt.learning_rate if opt.unet_lr is None else opt.unet_lr
    te = opt.text_encoder_lr
    if te is None:
        return opt.learning_rate
    return te[1] if component == "te2" and len(te) == 2 else te[0]


def _group_order(group: dict) -> tuple:
    component_rank = ("te", "te1", "te2", "unet").index(group["component"])
    block = int(group["name"].split()[2]) if group["name"].startswith("unet block") else -1
    return component_rank, block, group["is_lora_up"]


def _weights(field: str, value: tuple[float, ...] | str | None, n: int) -> list[float]:
    if value is None:
        return [1.0] * n
    if isinstance(value, str):
        return _preset(*_split_preset(f"blocks.{field}", value), n)
    if len(value) > n:
        raise ConfigError(f"blocks.{field}: {len(value)} values given; this model has {n} blocks there")
    return [float(v) for v in value] + [1.0] * (n - len(value))


def _split_preset(field: str, text: str) -> tuple[str, float]:
    name, _, base = text.partition("+")
    if name not in PRESETS:
        raise ConfigError(
            f"{field}: {text!r} is not a preset; use one of {', '.join(PRESETS)}, e.g. 'sine+.5'",
            field=field,
            choices=PRESETS,
            hint="a preset may add '+base', e.g. 'sine+.5'",
        )
    try:
        return name, float(base) if base else 0.0
    except ValueError:
        raise ConfigError(f"{field}: {text!r}: the part after '+' must be a number, e.g. 'sine+.5'") from None


def _preset(name: str, base: float, n: int) -> list[float]:
    # kohya get_block_lr_weight's get_list: quarter sine/cosine or linear ramps over n blocks.
    ramp = {
        "sine": [math.sin(math.pi * (i / (n - 1)) / 2) for i in range(n)],
        "linear": [i / (n - 1) for i in range(n)],
        "zeros": [0.0] * n,
    }
    ramp["cosine"] = ramp["sine"][::-1]
    ramp["reverse_linear"] = ramp["linear"][::-1]
    return [w + base for w in ramp[name]]


def _layout_hint(family: str) -> str:
    if family == "sd15":
        return "0 unused, 1-11 down, 12 mid, 13-24 up"
    return "0 time embedding, 1-9 input, 10-12 middle, 13-21 output, 22 out"
