"""The kohya LoRA key scheme: which modules LoRA wraps, and what each is called.

This module owns the name contract of the saved file (kohya sd-scripts
`networks/lora.py`, `LoRANetwork.create_modules`): every other module asks it.

- A name is a prefix (`lora_unet`, `lora_te` for SD1.5's text encoder,
  `lora_te1` / `lora_te2` for SDXL's) plus the module path with "." → "_".
- SD1.x/2.x UNet names use diffusers module paths
  (`lora_unet_down_blocks_0_attentions_0_proj_in`), because kohya trains them on a
  diffusers-layout UNet. SDXL names use the original SGM paths
  (`lora_unet_input_blocks_4_1_proj_in`), because kohya trains SDXL on its own
  SGM-layout UNet; `diffusers_to_sgm_unet_path` translates.
- Targets: every Linear and Conv2d inside a transformer container; with
  `include_conv` also inside resnet, downsampler and upsampler containers.
  Text encoders: every Linear inside CLIP attention and MLP containers.

Containers are recognised by class name, so the same walk works on diffusers'
and transformers' classes and on ComfyUI's own (`SpatialTransformer`,
`ResBlock`, `Downsample`, `Upsample`). Wrapped modules are recognised by
isinstance, so subclasses (ComfyUI's `comfy.ops` layers) count too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from torch import nn

from ..errors import check_choice

if TYPE_CHECKING:  # families/ builds on this module's UNetLayout
    from ..families import ModelFamily

UNET_PREFIX = "lora_unet"
# the top-level UNet modules kohya's names start with, per naming (a family's `unet_names`)
UNET_BLOCK_ROOTS = {
    "diffusers": ("down_blocks", "mid_block", "up_blocks"),
    "sgm": ("input_blocks", "middle_block", "output_blocks"),
}
TEXT_ENCODER_COMPONENTS = {"lora_te": "te", "lora_te1": "te1", "lora_te2": "te2"}

# kohya's UNET_TARGET_REPLACE_MODULE (diffusers/kohya class name, then ComfyUI's)
TRANSFORMER_CONTAINERS = frozenset({"Transformer2DModel", "SpatialTransformer"})
# kohya's UNET_TARGET_REPLACE_MODULE_CONV2D_3X3
CONV_CONTAINERS = frozenset(
    {"ResnetBlock2D", "Downsample2D", "Upsample2D", "ResBlock", "Downsample", "Upsample"}
)
# kohya's TEXT_ENCODER_TARGET_REPLACE_MODULE (older transformers had per-backend attention classes)
TEXT_ENCODER_CONTAINERS = frozenset({"CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP"})

# diffusers ResnetBlock2D member → SGM ResBlock member
_RESNET_TO_SGM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_FROM_SGM = {sgm: diffusers for diffusers, sgm in _RESNET_TO_SGM.items()}


@dataclass(frozen=True)
class LoraTarget:
    """A module LoRA may wrap, under its kohya name.

    `parts`: when the kohya module is one fused Linear that this model splits into several which
    all read the same input (diffusers' `to_q`, `to_k`, `to_v` of Flux's fused `img_attn.qkv`),
    the split Linears in the fused weight's row order; `module` is the first of them. One LoRA
    with one `lora_down` then spans them all, its `lora_up` rows split over the parts, exactly the
    LoRA that kohya trains on the fused layer (model/network.py).
    """

    name: str  # e.g. "lora_unet_down_blocks_0_attentions_0_proj_in"
    module: nn.Module  # an nn.Linear or nn.Conv2d (subclasses included)
    component: str  # "unet", "te" (SD1.5), "te1", "te2" (SDXL)
    parts: tuple[nn.Module, ...] = ()

    def __post_init__(self):
        if self.parts:
            if self.parts[0] is not self.module:
                raise ValueError(f"{self.name}: module must be parts[0]")
            if not all(isinstance(p, nn.Linear) for p in self.parts):
                raise ValueError(f"{self.name}: a split target's parts must all be nn.Linear")

    @property
    def modules(self) -> tuple[nn.Module, ...]:
        """The wrapped modules: `parts`, or the one `module`."""
        return self.parts or (self.module,)


@dataclass(frozen=True)
class UNetLayout:
    """The block structure that decides where a diffusers block sits in SGM numbering.

    layers_per_block[i]: resnets in down block i; up block i has
    reversed(layers_per_block)[i] + 1. The last down/up block has no sampler.
    """

    layers_per_block: tuple[int, ...]
    up_attention: tuple[bool, ...]
    mid_attention: bool = True

    @classmethod
    def from_config(cls, config: Mapping) -> UNetLayout:
        """Read a diffusers `UNet2DConditionModel.config`."""
        down_types, up_types = config["down_block_types"], config["up_block_types"]
        layers = config["layers_per_block"]
        if isinstance(layers, int):
            layers = [layers] * len(down_types)
        return cls(
            layers_per_block=tuple(layers),
            up_attention=tuple("Attn" in t for t in up_types),
            mid_attention="Attn" in str(config.get("mid_block_type", "UNetMidBlock2DCrossAttn")),
        )

    def input_slots(self) -> list[tuple[int, int | None]]:
        """SGM input_blocks index n → (down block i, resnet j), or (i, None) for i's downsampler.

        Slot 0 is conv_in, listed as (-1, None) so that list indices are SGM indices.
        """
        slots: list[tuple[int, int | None]] = [(-1, None)]
        for i, layers in enumerate(self.layers_per_block):
            slots += [(i, j) for j in range(layers)]
            if i < len(self.layers_per_block) - 1:
                slots.append((i, None))
        return slots

    def output_slots(self) -> list[tuple[int, int]]:
        """SGM output_blocks index n → (up block i, resnet j); the upsampler shares the last one's."""
        return [(i, j) for i, layers in enumerate(reversed(self.layers_per_block)) for j in range(layers + 1)]


def unet_targets(unet: nn.Module, family: ModelFamily, include_conv: bool) -> list[LoraTarget]:
    """Targets of a diffusers `UNet2DConditionModel` under kohya's names for `family`
    (its `unet_names`: diffusers paths as they are, or translated to SGM paths)."""
    rename: Callable[[str], str] = str
    if family.unet_names == "sgm":
        rename = partial(diffusers_to_sgm_unet_path, layout=UNetLayout.from_config(unet.config))
    return _container_targets(unet, _unet_containers(include_conv), UNET_PREFIX, "unet", rename)


def sgm_unet_targets(
    unet: nn.Module,
    prefix: str = UNET_PREFIX,
    include_conv: bool = False,
    rename: Callable[[str], str] = str,
) -> list[LoraTarget]:
    """Targets of a UNet whose module paths already are SGM names (ComfyUI's `UNetModel`).

    kohya name = prefix + rename(path) with "." → "_". For SDXL `rename` is the
    identity; for SD1.x/2.x kohya's names are diffusers-style, so pass
    `partial(sgm_to_diffusers_unet_path, layout=<the UNet's layout>)`.
    """
    return _container_targets(unet, _unet_containers(include_conv), prefix, "unet", rename)


def text_encoder_targets(text_encoder: nn.Module, prefix: str) -> list[LoraTarget]:
    """Linear layers in the CLIP attention and MLP blocks of a text encoder.

    Names are `<prefix>_text_model_encoder_layers_N_self_attn_q_proj` (and k, v,
    out_proj, mlp_fc1, mlp_fc2) whatever the root: transformers' CLIPTextModel or
    CLIPTextModelWithProjection, or ComfyUI's CLIP model.
    """
    check_choice("text_encoder_targets(prefix)", prefix, TEXT_ENCODER_COMPONENTS)
    component = TEXT_ENCODER_COMPONENTS[prefix]
    return _container_targets(text_encoder, TEXT_ENCODER_CONTAINERS, prefix, component, _kohya_text_path)


def _kohya_text_path(path: str) -> str:
    """Re-root a CLIP layer path at `text_model.encoder.layers.`, where kohya's names start.

    kohya's names are relative to transformers 4's CLIPTextModel; transformers 5's
    CLIPTextModel has no `text_model` level, and wrappers (ComfyUI's) add levels.
    """
    _, found, tail = path.partition("encoder.layers.")
    if not found:
        raise ValueError(f"CLIP module path {path!r} is not under encoder.layers")
    return "text_model.encoder.layers." + tail


def diffusers_to_sgm_unet_path(path: str, layout: UNetLayout) -> str:
    """`down_blocks.1.attentions.0.proj_in` → `input_blocks.4.1.proj_in`, for any module in a block.

    Indices follow the SGM UNet (and kohya's `sdxl_original_unet.py`): input
    blocks count conv_in, then per level its resnets and its downsampler;
    resnet members are renamed (`conv1` → `in_layers.2`, ...).
    """
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = layout.input_slots().index((i, j))
        return f"input_blocks.{n}.{_member_to_sgm(kind, rest)}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path):
        return f"input_blocks.{layout.input_slots().index((int(m[1]), None))}.0.op"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path):
        kind, k, rest = m[1], int(m[2]), m[3]
        n = 2 * k + (kind == "attentions") if layout.mid_attention else k
        return f"middle_block.{n}.{_sgm_member(kind, rest)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{layout.output_slots().index((i, j))}.{_member_to_sgm(kind, rest)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path):
        i = int(m[1])
        n = layout.output_slots().index((i, layout.layers_per_block[::-1][i]))
        return f"output_blocks.{n}.{1 + layout.up_attention[i]}.conv"
    raise ValueError(f"no SGM name for UNet module path {path!r}: only paths inside blocks are mapped")


def sgm_to_diffusers_unet_path(path: str, layout: UNetLayout) -> str:
    """Inverse of `diffusers_to_sgm_unet_path`.

    `input_blocks.4.1.proj_in` → `down_blocks.1.attentions.0.proj_in`.
    """
    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", path):
        slots = layout.input_slots()
        n, sub, rest = int(m[1]), int(m[2]), m[3]
        if 0 < n < len(slots):
            i, j = slots[n]
            if j is None and sub == 0 and rest == "op":
                return f"down_blocks.{i}.downsamplers.0.conv"
            if j is not None and sub in (0, 1):
                return f"down_blocks.{i}.{_member_from_sgm(sub, rest, j)}"
    if m := re.fullmatch(r"middle_block\.(\d+)\.(.+)", path):
        n, rest = int(m[1]), m[2]
        if layout.mid_attention and n % 2 == 1:
            return f"mid_block.attentions.{n // 2}.{rest}"
        k = n // 2 if layout.mid_attention else n
        return f"mid_block.resnets.{k}.{_sgm_member('resnets', rest, inverse=True)}"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", path):
        slots = layout.output_slots()
        n, sub, rest = int(m[1]), int(m[2]), m[3]
        if n < len(slots):
            i, j = slots[n]
            is_last_resnet = j == layout.layers_per_block[::-1][i]
            has_upsampler = is_last_resnet and i < len(layout.up_attention) - 1
            if has_upsampler and sub == 1 + layout.up_attention[i] and rest == "conv":
                return f"up_blocks.{i}.upsamplers.0.conv"
            if sub == 0 or (sub == 1 and layout.up_attention[i]):
                return f"up_blocks.{i}.{_member_from_sgm(sub, rest, j)}"
    raise ValueError(f"no diffusers name for SGM UNet module path {path!r} in layout {layout}")


def _member_to_sgm(kind: str, rest: str) -> str:
    """`resnets`/`attentions` member → `<sub>.<member>` within an SGM block (resnet 0, attention 1)."""
    return f"{int(kind == 'attentions')}.{_sgm_member(kind, rest)}"


def _member_from_sgm(sub: int, rest: str, j: int) -> str:
    kind = "attentions" if sub == 1 else "resnets"
    return f"{kind}.{j}.{_sgm_member(kind, rest, inverse=True)}"


def _sgm_member(kind: str, rest: str, inverse: bool = False) -> str:
    """Rename a resnet member between diffusers and SGM; transformer members are named alike."""
    if kind == "attentions":
        return rest
    table = _RESNET_FROM_SGM if inverse else _RESNET_TO_SGM
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    raise ValueError(f"unknown resnet member {rest!r}")


def _unet_containers(include_conv: bool) -> frozenset[str]:
    return TRANSFORMER_CONTAINERS | CONV_CONTAINERS if include_conv else TRANSFORMER_CONTAINERS


def _container_targets(
    root: nn.Module,
    containers: frozenset[str],
    prefix: str,
    component: str,
    rename: Callable[[str], str],
) -> list[LoraTarget]:
    """kohya's `create_modules` walk: Linear/Conv2d children of containers, in module order."""
    targets: dict[str, LoraTarget] = {}
    for path, container in root.named_modules():
        if type(container).__name__ not in containers:
            continue
        for child_path, child in container.named_modules():
            if not isinstance(child, nn.Linear | nn.Conv2d):
                continue
            full_path = ".".join(p for p in (path, child_path) if p)
            name = f"{prefix}_{rename(full_path)}".replace(".", "_")
            # a container nested in another one is reached twice: keep the first
            targets.setdefault(name, LoraTarget(name, child, component))
    return list(targets.values())
