"""Optimiser parameter groups for kohya-named LoRA weights: per-part lrs, block-wise lrs, LoRA+.

Mirrors sd-scripts networks/lora.py: `get_block_index`, `get_block_lr_weight`,
`prepare_optimizer_params` and `get_block_dims_and_alphas`. The UNet is cut into
kohya's blocks, as the family's `blocks` layout says: SD1.5 has 25 (0 unused, 1-11 down,
12 mid, 13-24 up), SDXL 23 (0 time/label embedding, 1-9 input, 10-12 middle, 13-21
output, 22 out). Block indices come from the kohya module name alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError, check_range
from ..families import ModelFamily, get_family
from ..model.kohya_keys import TEXT_ENCODER_COMPONENTS, UNET_PREFIX
from .optimizers import OptimizerConfig

PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
# kohya names from diffusers paths: level i's resnets/attentions j and its sampler (slot 2)
_DIFFUSERS_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


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
    spec = get_family(family, "family")
    if _component(kohya_name, spec) != "unet":
        return None
    name, blocks = kohya_name.removeprefix(f"{UNET_PREFIX}_"), spec.blocks
    if spec.unet_names == "diffusers":
        m = _DIFFUSERS_UPDOWN.search(name)
        if m:
            direction, i, kind, j = m[1], int(m[2]), m[3], int(m[4])
            idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
            return 1 + idx if direction == "down" else blocks.down + blocks.mid + idx
        if name.startswith("mid_block_"):
            return blocks.down
    else:
        starts = {
            "time_embed": 0,
            "label_emb": 0,
            "input_blocks": 1,
            "middle_block": 1 + blocks.down,
            "output_blocks": 1 + blocks.down + blocks.mid,
        }
        for prefix, start in starts.items():
            if name.startswith(prefix + "_"):
                return start if start == 0 else start + int(name.split("_")[2])
        if name.startswith("out_"):
            return blocks.count - 1
    raise ValueError(f"{kohya_name!r} lies in no {family} UNet block (kohya get_block_index)")


def lr_weight_per_block(weights: BlockWeights, family: str) -> list[float]:
    """The lr factor of every block (25 for SD1.5, 23 for SDXL), kohya `get_block_lr_weight`."""
    blocks = get_family(family, "family").blocks
    down = _weights("down_lr_weight", weights.down_lr_weight, blocks.down)
    mid = _weights("mid_lr_weight", weights.mid_lr_weight, blocks.mid)
    up = _weights("up_lr_weight", weights.up_lr_weight, blocks.down)
    per_block = down + mid + up
    if blocks.outer:
        per_block = [1.0, *per_block, 1.0]  # e.g. SDXL's time embedding and out, which kohya never wraps
    assert len(per_block) == blocks.count
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
    spec = get_family(family, "family")
    encoders = len(spec.text_encoder_prefixes)
    if opt.text_encoder_lr is not None and len(opt.text_encoder_lr) > encoders:
        raise ConfigError(
            f"optimizer.text_encoder_lr: {opt.text_encoder_lr} has {len(opt.text_encoder_lr)} values but "
            f"{spec.title} has {encoders} text encoder(s); give one value"
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
        component = _component(module, spec)
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


def check_something_trains(opt: OptimizerConfig, net, blocks: BlockWeights | None, family: str) -> None:
    """ConfigError when every part the network trains has learning rate 0 (build_param_groups would
    make no group); asked before the model loads, from the configs alone."""
    unet_lr = opt.unet_lr if opt.unet_lr is not None else opt.learning_rate
    if blocks is not None and blocks.is_set:
        unet_lr *= max(lr_weight_per_block(blocks, family))
    te_lrs = opt.text_encoder_lr if opt.text_encoder_lr is not None else (opt.learning_rate,)
    if (net.train_unet and unet_lr > 0) or (net.train_text_encoder and max(te_lrs) > 0):
        return
    raise ConfigError(
        "optimizer: nothing would train: every learning rate of the parts network trains "
        f"(unet: {net.train_unet}, text encoder: {net.train_text_encoder}) is 0 or weighted to 0; "
        "set optimizer.learning_rate (1e-4 is typical for LoRA)"
    )


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
) -> tuple[dict[str, int], dict[str, float]]:
    """Rank and alpha of each UNet module from kohya's block_dims / block_alphas / conv_block_*.

    Lists hold one value per block (25 SD1.5, 23 SDXL). Linear and 1×1 modules read
    block_*, modules in `conv3x3_modules` read conv_block_*. Only what the lists decide is
    returned: text-encoder modules, and modules whose list is None, keep network_dim /
    network_alpha (conv_dim / conv_alpha). Dim 0 means "no LoRA here" (modules in blocks of lr
    weight 0 are dropped before, by `excluded_modules`). kohya `get_block_dims_and_alphas`.
    """
    blocks = get_family(family, "family").blocks
    lists = {
        "block_dims": block_dims,
        "block_alphas": block_alphas,
        "conv_block_dims": conv_block_dims,
        "conv_block_alphas": conv_block_alphas,
    }
    if all(values is None for values in lists.values()):
        return {}, {}  # nothing block-wise asked; a DiT's modules have no kohya block to look up
    for field, values in lists.items():
        if values is not None and len(values) != blocks.count:
            raise ConfigError(
                f"network.{field}: {len(values)} values given; {family} needs {blocks.count}, one per UNet "
                f"block ({blocks.description})"
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
            dims[module] = int(dim_list[idx])
        if alpha_list is not None:
            alphas[module] = float(alpha_list[idx])
    return dims, alphas


def _split_param_name(param_name: str) -> tuple[str, bool]:
    for suffix, is_up in ((".lora_down.weight", False), (".lora_up.weight", True)):
        if param_name.endswith(suffix):
            return param_name.removesuffix(suffix), is_up
    raise ValueError(f"{param_name!r} is not '<kohya module>.lora_down.weight' or '.lora_up.weight'")


def _component(kohya_name: str, family: ModelFamily) -> str:
    """ "unet", or the text encoder's component name ("te", "te1", ...), from the key's prefix."""
    prefixes = {UNET_PREFIX: "unet"} | {p: TEXT_ENCODER_COMPONENTS[p] for p in family.text_encoder_prefixes}
    for prefix, component in prefixes.items():
        if kohya_name.startswith(prefix + "_"):
            return component
    listed = ", ".join(p + "_" for p in prefixes)
    raise ValueError(f"{kohya_name!r} has none of the {family.name} prefixes {listed}")


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
