"""kohya's LoRA layer and its injection into any torch module tree (sd-scripts `networks/lora.py`).

A `LoRAModule` wraps one Linear or Conv2d by replacing its `forward` (the
module itself stays in the model, so its weights, hooks and dtype are
untouched), and adds the low-rank path on the activations:

    y = f(x) + up(drop(down(x))) · multiplier · scale',   scale = alpha / rank

W + up·down is never materialised. `LoRANetwork` builds one module per
`LoraTarget` (see kohya_keys.py) and owns the kohya state dict.

Randomness: the three dropouts draw from torch's default generators (CPU for
module dropout, the activation's device for the others), as kohya does;
`torch.manual_seed` makes a step reproducible.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, check_int, check_range
from .kohya_keys import LoraTarget

LORA_DTYPE = torch.float32
_KEY_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


def _check_probability(field: str, value: float) -> None:
    check_range(field, value, 0, 1, "0 disables it; 0.1 is typical", hi_open=True)


@dataclass(frozen=True)
class NetworkConfig:
    """kohya's LoRA network options, with kohya's names and meanings (the block-wise lists are
    kohya's network_args; their lengths are checked against the family in `per_module_dims`)."""

    network_dim: int = 16  # the LoRA rank of Linear and 1×1 conv modules
    network_alpha: float = 1.0  # the update is scaled by alpha / rank; 0 means alpha = rank (scale 1)
    conv_dim: int = 0  # the rank of k×k (k > 1) conv modules, as in the ResNets; 0 = no conv LoRA
    conv_alpha: float = 1.0  # alpha of the conv LoRA; 0 means alpha = conv_dim
    network_dropout: float = 0.0  # dropout on the output of each LoRA's down projection
    rank_dropout: float = 0.0  # drop whole ranks, per sample
    module_dropout: float = 0.0  # skip the whole LoRA path of a module, per step
    train_unet: bool = True  # train LoRA on the UNet
    train_text_encoder: bool = True  # train LoRA on the text encoder(s)
    # one rank per UNet block (25 for SD1.5, 23 for SDXL), 0 leaves a block out; unset: network_dim
    block_dims: tuple[int, ...] | None = None
    block_alphas: tuple[float, ...] | None = None  # one alpha per UNet block; unset: network_alpha
    conv_block_dims: tuple[int, ...] | None = None  # one conv rank per UNet block; unset: conv_dim
    conv_block_alphas: tuple[float, ...] | None = None  # one conv alpha per UNet block; unset: conv_alpha

    @property
    def trains_conv(self) -> bool:
        """k×k convs get LoRA when conv_dim or conv_block_dims asks for it (kohya)."""
        return self.conv_dim > 0 or self.conv_block_dims is not None

    def __post_init__(self) -> None:
        check_int("network.network_dim", self.network_dim, 1, None, "4-128 is typical")
        check_range("network.network_alpha", self.network_alpha, 0, None, "0 means alpha = network_dim")
        check_int("network.conv_dim", self.conv_dim, 0, None, "0 disables conv LoRA; 4-32 is typical")
        check_range("network.conv_alpha", self.conv_alpha, 0, None, "0 means alpha = conv_dim")
        _check_probability("network.network_dropout", self.network_dropout)
        _check_probability("network.rank_dropout", self.rank_dropout)
        _check_probability("network.module_dropout", self.module_dropout)
        for name in ("block_dims", "conv_block_dims"):
            for value in getattr(self, name) or ():
                check_int(f"network.{name}", value, 0, None, "ranks per block; 0 leaves a block out")
        for name in ("block_alphas", "conv_block_alphas"):
            for value in getattr(self, name) or ():
                check_range(f"network.{name}", value, 0, None)
        if not (self.train_unet or self.train_text_encoder):
            raise ConfigError(
                "network.train_unet, network.train_text_encoder: both False leaves nothing to train; "
                "enable at least one"
            )


class LoRAModule(nn.Module):
    """One LoRA adapter on a Linear or Conv2d, in kohya's layout (`lora_down`, `lora_up`, `alpha`).

    lora_down: Linear(in, r) or Conv2d(in, r) with the original's kernel, stride,
    padding and dilation; lora_up: Linear(r, out) or 1×1 Conv2d(r, out). Init as
    kohya/Microsoft LoRA: down Kaiming-uniform (a = √5), up zeros, so the wrapped
    module's output is unchanged until training moves `lora_up`.

    org_module may also be a sequence of Linears that read the same input and together make up
    one fused layer (diffusers' split q/k/v of Flux's fused qkv; `LoraTarget.parts`): then
    lora_up is Linear(r, Σ out) and each part adds its own rows of up·down(x). That is exactly the
    LoRA kohya trains on the fused layer, saved under the fused layer's name with no rescaling. With
    a dropout on, the parts share one down(x) (one draw, as the fused layer makes) while they are
    called with the same input tensor; without, each computes it (the same value, and no Python
    state between calls for torch.compile or a CUDA graph to trace).

    The parameters are float32 whatever the wrapped module's dtype: LoRA updates
    are tiny next to the weights and would round away in bf16. The input is cast
    to float32 and the LoRA output back to the wrapped module's output dtype, so
    the model downstream sees the dtype it was built for.
    """

    def __init__(
        self,
        name: str,
        org_module: nn.Module | Sequence[nn.Module],
        dim: int,
        alpha: float | None,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        multiplier: float = 1.0,
    ):
        super().__init__()
        self.name = name
        parts = tuple(org_module) if isinstance(org_module, Sequence) else (org_module,)
        in_size, out_sizes, fan_in = _parts_sizes(name, parts)
        out_size = sum(out_sizes)
        if dim > min(fan_in, out_size):
            raise ConfigError(
                f"{name}: rank {dim} is larger than min(in={fan_in}, out={out_size}); "
                f"use a rank of at most {min(fan_in, out_size)} for this module"
            )
        first = parts[0]
        factory = {"device": first.weight.device, "dtype": LORA_DTYPE}
        if isinstance(first, nn.Conv2d):
            self.lora_down = nn.Conv2d(
                in_size,
                dim,
                first.kernel_size,
                first.stride,
                first.padding,
                first.dilation,
                bias=False,
                padding_mode=first.padding_mode,
                **factory,
            )
            self.lora_up = nn.Conv2d(dim, out_size, 1, bias=False, **factory)
        else:
            self.lora_down = nn.Linear(in_size, dim, bias=False, **factory)
            self.lora_up = nn.Linear(dim, out_size, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

        self.dim = dim
        self.register_buffer("alpha", torch.zeros((), **factory))
        self.set_alpha(alpha)
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.multiplier = multiplier
        # the rank axis of down(x): last for Linear, channels for Conv2d
        self._rank_axis = -3 if isinstance(first, nn.Conv2d) else -1
        # a tuple, so nn.Module does not register the wrapped modules as our children
        self._org_modules = parts
        bounds = [0, *itertools.accumulate(out_sizes)]
        self._rows = tuple(itertools.pairwise(bounds))  # each part's rows of lora_up
        self._org_forwards: list | None = None
        self._installed: list = []
        self._had_instance_forward: list[bool] = []
        self._shared: tuple[Tensor, Tensor | None, float, int] | None = None  # (x, down(x), scale, uses)

    def set_alpha(self, alpha: float | Tensor | None) -> None:
        """kohya: scale = alpha / rank, where alpha 0 or None means alpha = rank."""
        alpha = float(alpha or self.dim)
        self.alpha.fill_(alpha)
        self.scale = alpha / self.dim

    def buffers_and_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """lora_down.weight, lora_up.weight, alpha: the order of `_KEY_SUFFIXES`."""
        return self.lora_down.weight, self.lora_up.weight, self.alpha

    @property
    def org_module(self) -> nn.Module:
        """The wrapped module (the first part of a split one)."""
        return self._org_modules[0]

    @property
    def org_modules(self) -> tuple[nn.Module, ...]:
        return self._org_modules

    @property
    def is_applied(self) -> bool:
        return self._org_forwards is not None

    def apply_to(self) -> None:
        """Route each wrapped module's forward through ours (kohya's `apply_to`)."""
        if self.is_applied:
            raise RuntimeError(f"{self.name}: LoRA is already applied to this module")
        self._had_instance_forward = ["forward" in org.__dict__ for org in self._org_modules]
        self._org_forwards = [org.forward for org in self._org_modules]
        if len(self._org_modules) == 1:
            self._installed = [self.forward]
        else:
            self._installed = [partial(self._part_forward, i) for i in range(len(self._org_modules))]
        for org, forward in zip(self._org_modules, self._installed, strict=True):
            org.forward = forward

    def restore(self) -> None:
        """Give the wrapped modules back their own forward; a no-op when not applied."""
        if not self.is_applied:
            return
        for org, installed in zip(self._org_modules, self._installed, strict=True):
            if org.__dict__.get("forward") is not installed:
                raise RuntimeError(
                    f"{self.name}: another wrapper replaced forward after ours; restore it first"
                )
        for org, had, own in zip(
            self._org_modules, self._had_instance_forward, self._org_forwards, strict=True
        ):
            if had:
                org.forward = own
            else:
                del org.forward  # back to the class's forward, as before apply_to
        self._org_forwards, self._installed, self._shared = None, [], None

    def forward(self, x: Tensor) -> Tensor:
        """kohya's `LoRAModule.forward`; the dropouts act only in training mode."""
        if self._org_forwards is None:
            raise RuntimeError(f"{self.name}: call apply_to() before running the LoRA module")
        org_out = self._org_forwards[0](x)
        lx, scale = self._down(x)
        if lx is None:
            return org_out
        return org_out + (_in_dtype_of(self.lora_up, lx) * (self.multiplier * scale)).to(org_out.dtype)

    def _part_forward(self, i: int, x: Tensor) -> Tensor:
        """Part i of a split module: its own output plus its rows of up·down(x)."""
        org_out = self._org_forwards[i](x)
        lx, scale = self._shared_down(x) if self._draws_dropout else self._down(x)
        if lx is None:
            return org_out
        start, stop = self._rows[i]
        up = self.lora_up.weight[start:stop]
        lora = F.linear(lx, up.to(lx.dtype)) if lx.dtype != up.dtype else F.linear(lx, up)
        return org_out + (lora * (self.multiplier * scale)).to(org_out.dtype)

    @property
    def _draws_dropout(self) -> bool:
        return self.training and (self.dropout > 0 or self.rank_dropout > 0 or self.module_dropout > 0)

    def _shared_down(self, x: Tensor) -> tuple[Tensor | None, float]:
        """down(x) once for all parts called with this very tensor (the parts of a fused qkv are),
        so they share one module-dropout and rank-dropout draw as the fused layer would; a part
        called with another tensor (checkpointing's recompute) starts a new share."""
        shared = self._shared
        if shared is not None and shared[0] is x:
            _, lx, scale, uses = shared
        else:
            lx, scale = self._down(x)
            uses = 0
        uses += 1
        # dropped once every part has read it, so no activation outlives the forward
        self._shared = None if uses == len(self._org_modules) else (x, lx, scale, uses)
        return lx, scale

    def _down(self, x: Tensor) -> tuple[Tensor | None, float]:
        """down(x) after dropout and rank dropout, and the scale to apply; None when module
        dropout skips the LoRA path this time."""
        # drawn on the CPU so that the branch does not wait for the GPU
        if self.training and self.module_dropout > 0 and torch.rand(()) < self.module_dropout:
            return None, self.scale
        lx = _in_dtype_of(self.lora_down, x)
        if self.training and self.dropout > 0:
            lx = F.dropout(lx, p=self.dropout)
        scale = self.scale
        if self.training and self.rank_dropout > 0:
            # one keep/drop draw per (sample, rank), shared by all tokens or pixels of the sample
            shape = [1] * lx.ndim
            shape[0] = lx.shape[0]
            shape[self._rank_axis] = self.dim
            keep = torch.rand(shape, device=lx.device) > self.rank_dropout
            lx = lx * keep.to(lx.dtype)
            scale = scale / (1.0 - self.rank_dropout)  # kohya: as if the rank were (1 - p)·r
        return lx, scale


def _in_dtype_of(layer: nn.Module, x: Tensor) -> Tensor:
    """`layer(x)` computed in x's dtype: the fp32 LoRA weights are cast down for a bf16/fp16
    activation (autograd casts their gradients back), so the activation is never copied to
    fp32 and kept for backward. Measured in bench/: about 28% less peak memory on SDXL."""
    weight = layer.weight
    if x.dtype == weight.dtype or not x.is_floating_point():
        return layer(x.to(weight.dtype))
    weight = weight.to(x.dtype)
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, None)  # honours padding_mode, unlike F.conv2d
    return F.linear(x, weight)


def _parts_sizes(name: str, parts: Sequence[nn.Module]) -> tuple[int, tuple[int, ...], int]:
    """(in, out of each part, fan-in) of one module or of the split parts of a fused Linear."""
    sizes = [_module_sizes(name, part) for part in parts]
    if len(parts) > 1 and not all(isinstance(p, nn.Linear) for p in parts):
        raise ValueError(f"{name}: only Linear modules can be split parts of one LoRA")
    if len({(size[0], size[2]) for size in sizes}) != 1:
        raise ValueError(f"{name}: the split parts of one LoRA must share their input size, got {sizes}")
    return sizes[0][0], tuple(size[1] for size in sizes), sizes[0][2]


def _module_sizes(name: str, module: nn.Module) -> tuple[int, int, int]:
    """(in, out, fan-in of the weight matrix) of a Linear or a groups=1 Conv2d."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ConfigError(
                f"{name}: LoRA on a grouped conv (groups={module.groups}) is not implemented yet"
            )
        kh, kw = module.kernel_size
        return module.in_channels, module.out_channels, module.in_channels * kh * kw
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.in_features
    raise ConfigError(f"{name}: LoRA wraps nn.Linear or nn.Conv2d, not {type(module).__name__}")


def is_conv_kxk(module: nn.Module) -> bool:
    """kohya gives k×k convs (k > 1) conv_dim; Linear and 1×1 convs get network_dim."""
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


class LoRANetwork(nn.Module):
    """kohya's `LoRANetwork`: one `LoRAModule` per target, registered under its kohya name.

    dims / alphas: per-module overrides by kohya name (block-wise dims); a dim of
    0 leaves the module out, as kohya's `block_dims` do. Otherwise k×k convs get
    conv_dim / conv_alpha and every other target network_dim / network_alpha.
    The dropouts act while this network is in training mode (`network.train()`).
    """

    def __init__(
        self,
        targets: Sequence[LoraTarget],
        cfg: NetworkConfig,
        dims: Mapping[str, int] | None = None,
        alphas: Mapping[str, float] | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        dims, alphas = dict(dims or {}), dict(alphas or {})
        _check_known_names("dims", dims, targets)
        _check_known_names("alphas", alphas, targets)
        self.modules_by_name: dict[str, LoRAModule] = {}
        for target in targets:
            if not (cfg.train_unet if target.component == "unet" else cfg.train_text_encoder):
                continue
            if target.name in self.modules_by_name:
                raise ValueError(f"duplicate LoRA target name {target.name!r}")
            dim, alpha = _dim_and_alpha(target, cfg, dims, alphas)
            if dim == 0:
                continue
            module = LoRAModule(
                target.name,
                target.modules,
                dim,
                alpha,
                cfg.network_dropout,
                cfg.rank_dropout,
                cfg.module_dropout,
            )
            # registered under the kohya name, so that parameter names are the file's keys
            self.add_module(target.name, module)
            self.modules_by_name[target.name] = module
        if not self.modules_by_name:
            raise ConfigError("network: no module to train; check train_unet / train_text_encoder and dims")

    def apply_to(self) -> None:
        """Wrap every target; if one fails, the ones this call wrapped are restored."""
        done: list[LoRAModule] = []
        try:
            for module in self.modules_by_name.values():
                module.apply_to()
                done.append(module)
        except BaseException:
            for module in reversed(done):
                module.restore()
            raise

    def restore(self) -> None:
        """Unwrap every applied module (unapplied ones are skipped), then report any that refused."""
        failures = []
        for module in reversed(self.modules_by_name.values()):
            try:
                module.restore()
            except RuntimeError as err:
                failures.append(err)
        if failures:
            raise failures[0]

    @contextmanager
    def applied(self) -> Iterator[LoRANetwork]:
        self.apply_to()
        try:
            yield self
        finally:
            self.restore()

    def named_lora_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """("<kohya name>.lora_down.weight" / ".lora_up.weight", parameter) pairs."""
        return list(self.named_parameters())

    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The saved file's tensors (kohya `save_weights`): detached contiguous CPU copies.

        `<name>.alpha` is a 0-d tensor; dtype (all three tensors) defaults to each tensor's own.
        """
        out = {}
        for name, module in self.modules_by_name.items():
            for suffix, tensor in zip(_KEY_SUFFIXES, module.buffers_and_weights(), strict=True):
                copy = tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype, copy=True)
                out[f"{name}.{suffix}"] = copy.contiguous()
        return out

    def load_kohya_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        """Inverse of `kohya_state_dict`: every key must be present and none extra, with matching shapes."""
        expected = {f"{name}.{suffix}" for name in self.modules_by_name for suffix in _KEY_SUFFIXES}
        missing, unknown = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
        if missing or unknown:
            raise ConfigError(
                f"LoRA state dict does not match the network: {len(missing)} missing key(s) "
                f"{missing[:5]}, {len(unknown)} unknown key(s) {unknown[:5]}; "
                "was it trained on another model or with other targets?"
            )
        with torch.no_grad():
            for name, module in self.modules_by_name.items():
                for suffix, param in zip(_KEY_SUFFIXES, module.buffers_and_weights(), strict=True):
                    value = sd[f"{name}.{suffix}"]
                    # alpha may come as shape (1,) from other tools; weights must match exactly
                    if value.numel() != param.numel() or (param.ndim > 0 and value.shape != param.shape):
                        raise ConfigError(
                            f"{name}.{suffix}: shape {tuple(value.shape)} does not match the network's "
                            f"{tuple(param.shape)}; the file was trained with another rank or model"
                        )
                    param.copy_(value.reshape(param.shape))
                module.set_alpha(module.alpha)


def _dim_and_alpha(
    target: LoraTarget, cfg: NetworkConfig, dims: Mapping[str, int], alphas: Mapping[str, float]
) -> tuple[int, float]:
    if is_conv_kxk(target.module):
        if cfg.conv_dim == 0 and target.name not in dims:
            raise ConfigError(
                f"network.conv_dim: 0, but the targets include the {tuple(target.module.kernel_size)} conv "
                f"{target.name}; set conv_dim >= 1, or build the targets with include_conv=False"
            )
        dim, alpha = cfg.conv_dim, cfg.conv_alpha
    else:
        dim, alpha = cfg.network_dim, cfg.network_alpha
    dim, alpha = dims.get(target.name, dim), alphas.get(target.name, alpha)
    check_int(f"LoRANetwork dims[{target.name!r}]", dim, 0, None, "0 leaves the module out")
    check_range(f"LoRANetwork alphas[{target.name!r}]", alpha, 0, None, "0 means alpha = dim")
    return dim, alpha


def _check_known_names(field: str, overrides: Mapping[str, object], targets: Sequence[LoraTarget]) -> None:
    unknown = sorted(set(overrides) - {t.name for t in targets})
    if unknown:
        raise ConfigError(
            f"LoRANetwork {field}: {len(unknown)} name(s) match no LoRA target, e.g. {unknown[:3]}; "
            "use kohya names such as lora_unet_..._proj_in"
        )
