"""Merging kohya LoRAs: several into one file, or one into the base model's weights.

Per module, a kohya LoRA is ΔW = (alpha/r)·up·down (KOHYA_FACTS, "Merging");
for a k×k conv ΔW[o,i,:,:] = Σ_r up[o,r]·down[r,i,:,:]. The merged update of
LoRAs A, B with weights a, b is a·ΔW_A + b·ΔW_B, exactly:

- "concat" stacks the ranks (r = r_A + r_B) with up_i scaled by w_i·alpha_i/r_i
  and alpha = r, so scale is 1. kohya's `merge_lora.py --concat` keeps the
  inputs' alphas instead (wrong scale once the ranks add up), and its default
  mode applies the ratio twice and mixes cross terms: we copy neither.
- "svd" keeps the best rank-k approximation (Eckart–Young) of the sum, as
  kohya's `svd_merge_lora.py`: up = U_k·diag(S_k), down = Vh_k, alpha = k. We do
  not clamp to the 99th percentile as kohya does, and report per module the
  retained energy Σ_{i<k} S_i² / Σ S_i².

`merge_into_backend` adds ΔW to the wrapped modules' weights (kohya's
`merge_lora.py` into a model): the result equals the LoRA applied at strength 1.

Errors about the options name the `merge` command's flags (--mode, --rank, --save-precision,
--out, --overwrite): the CLI is the door that can pass a bad one. The Merge LoRAs node cannot:
its mode and precision are combos, it sends a rank (>= 1) for svd only, and without overwrite
it saves under a free file name.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import ConfigError, ModelError, check_choice, check_int
from ..families import FAMILIES
from ..model.kohya_keys import UNET_PREFIX
from .export import SAVE_DTYPES, read_metadata, save_lora

if TYPE_CHECKING:  # loaded only by the merge into a model: diffusers is slow to import
    from ..model.diffusers_backend import DiffusersBackend

MODES = ("concat", "svd")
# metadata that names the architecture: inputs must agree on it, the merged file keeps it
ARCHITECTURE_KEYS = ("ss_base_model_version", "ss_v2", "modelspec.architecture")
_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


# kohya's prefixes tell the architectures apart: their text encoders' and their UNet blocks' names
# (SD1.x/2.x: `lora_te_`, diffusers paths; SDXL: `lora_te1_`/`lora_te2_`, SGM paths; Flux: `lora_te1_`,
# native double/single blocks). A key may fit several (`lora_te1_` fits SDXL and Flux); families
# with the same scheme (Flux dev and schnell) share one entry.
def _key_schemes() -> dict[str, tuple[str, ...]]:
    by_prefixes: dict[tuple[str, ...], list[str]] = {}
    for family in FAMILIES.values():
        prefixes = (
            *(f"{prefix}_" for prefix in family.text_encoder_prefixes),
            *(f"{UNET_PREFIX}_{root}_" for root in family.unet_block_roots),
        )
        by_prefixes.setdefault(prefixes, []).append(family.title)
    return {" / ".join(titles): prefixes for prefixes, titles in by_prefixes.items()}


_KEY_SCHEMES = _key_schemes()


@dataclass(frozen=True)
class MergeResult:
    """A merged kohya state dict (float32); for "svd", the retained energy of each module."""

    state_dict: dict[str, Tensor]
    mode: str
    retained_energy: dict[str, float] | None = None

    def energy_summary(self) -> str:
        if not self.retained_energy:
            return "exact merge: all energy retained"
        worst = min(self.retained_energy, key=self.retained_energy.__getitem__)
        mean = sum(self.retained_energy.values()) / len(self.retained_energy)
        return (
            f"retained energy over {len(self.retained_energy)} modules: mean {mean:.4f}, "
            f"min {self.retained_energy[worst]:.4f} ({worst})"
        )


def load_lora(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a kohya .safetensors LoRA."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"merge: LoRA file {str(path)!r} does not exist")
    try:
        return load_file(path), read_metadata(path)
    except Exception as exc:
        raise ModelError(f"merge: {str(path)!r} is not a readable .safetensors LoRA ({exc})") from exc


def _modules(sd: Mapping[str, Tensor], source: str = "LoRA") -> dict[str, tuple[Tensor, Tensor, float]]:
    """name → (down, up, alpha) in float32, checked to form LoRA pairs."""
    names = {k.removesuffix(s) for k in sd for s in _SUFFIXES if k.endswith(s)}
    foreign = sorted(k for k in sd if not k.endswith(_SUFFIXES))
    if foreign:
        raise ConfigError(
            f"{source}: {len(foreign)} key(s) are not kohya LoRA keys (<name>.lora_down.weight, "
            f".lora_up.weight, .alpha), e.g. {foreign[:5]}; only plain kohya LoRA files can be merged"
        )
    modules = {}
    for name in sorted(names):
        down, up = sd.get(f"{name}.lora_down.weight"), sd.get(f"{name}.lora_up.weight")
        if down is None or up is None:
            raise ConfigError(f"{source}: {name} lacks its lora_down or lora_up weight; the file is damaged")
        r = down.shape[0]
        if up.ndim != down.ndim or up.shape[1] != r or tuple(up.shape[2:]) not in ((), (1, 1)):
            raise ConfigError(
                f"{source}: {name} has lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)}, "
                "which do not form a LoRA pair; the file is damaged"
            )
        # kohya's LoRAModule: an alpha of 0 or None means alpha = r
        alpha = float(sd.get(f"{name}.alpha", 0)) or float(r)
        modules[name] = (down.float(), up.float(), alpha)
    return modules


def _delta(down: Tensor, up: Tensor, alpha: float) -> Tensor:
    """(alpha/r)·up·down with down's kernel dims kept: (out, in) or (out, in, kh, kw)."""
    flat = up.flatten(1) @ down.flatten(1)
    return (flat * (alpha / down.shape[0])).reshape(up.shape[0], *down.shape[1:])


def delta_weights(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """ΔW = (alpha/r)·up·down of every module of a kohya state dict, in float32."""
    return {name: _delta(*parts) for name, parts in _modules(sd).items()}


def merge_loras(
    loras: Sequence[tuple[Mapping[str, Tensor], float]],
    mode: str = "concat",
    rank: int | None = None,
    *,
    metadata: Sequence[Mapping[str, str]] | None = None,
    names: Sequence[str] | None = None,
) -> MergeResult:
    """One LoRA whose update is Σ w_i·ΔW_i ("concat", exact) or its best rank-`rank` approximation ("svd").

    A module missing from some inputs counts as zero there. `metadata` and
    `names` (one per input) serve the architecture checks and their messages.
    """
    check_choice("merge --mode", mode, MODES)
    if mode == "svd":
        if rank is None:
            raise ConfigError("merge --mode svd needs --rank N, the merged LoRA's rank (16-64 is typical)")
        check_int("merge --rank", rank, 1, None, "the merged LoRA's rank; 16-64 is typical")
    elif rank is not None:
        raise ConfigError(
            f"merge --rank: {rank!r} applies only to --mode svd; an exact (concat) merge's rank is the sum"
        )
    if not loras:
        raise ConfigError("merge: no LoRA given; give at least one FILE:WEIGHT")
    names = list(names or [f"input {i + 1}" for i in range(len(loras))])
    check_same_architecture(names, [sd for sd, _ in loras], metadata)
    parsed = [(_modules(sd, name), float(w)) for name, (sd, w) in zip(names, loras, strict=True)]
    _check_shapes(names, [mods for mods, _ in parsed])
    out: dict[str, Tensor] = {}
    energy: dict[str, float] = {}
    for module in sorted({m for mods, _ in parsed for m in mods}):
        parts = [(mods[module], w) for mods, w in parsed if module in mods]
        # each input's up carries its w·alpha/r, so the stacked pair needs scale 1
        down = torch.cat([d for (d, _, _), _ in parts])
        up = torch.cat([u * (w * a / d.shape[0]) for (d, u, a), w in parts], dim=1)
        if mode == "svd":
            down, up, energy[module] = _low_rank(down, up, rank)
        out.update(
            {
                f"{module}.lora_down.weight": down.contiguous(),
                f"{module}.lora_up.weight": up.contiguous(),
                f"{module}.alpha": torch.tensor(float(down.shape[0])),
            }
        )
    return MergeResult(out, mode, energy if mode == "svd" else None)


def _low_rank(down: Tensor, up: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Truncated SVD of ΔW = up·down → (down_k, up_k, retained energy), in float64.

    ΔW has rank ≤ R (the stacked rank), so its SVD comes from QR factors and an
    R×R SVD, exactly as the full matrix's but without forming it:
    up = Q₁R₁, downᵀ = Q₂R₂ ⇒ ΔW = Q₁ (R₁R₂ᵀ) Q₂ᵀ.
    """
    q1, r1 = torch.linalg.qr(up.flatten(1).double())
    q2, r2 = torch.linalg.qr(down.flatten(1).double().T)
    u, s, vh = torch.linalg.svd(r1 @ r2.T)
    k = min(rank, s.numel())
    total = float((s**2).sum())
    retained = float((s[:k] ** 2).sum()) / total if total > 0 else 1.0
    new_up = (q1 @ u[:, :k]) * s[:k]
    new_down = vh[:k] @ q2.T
    return (
        new_down.float().reshape(k, *down.shape[1:]),
        new_up.float().reshape(up.shape[0], k, *up.shape[2:]),
        retained,
    )


def check_same_architecture(
    names: Sequence[str],
    state_dicts: Sequence[Mapping[str, Tensor]],
    metadata: Sequence[Mapping[str, str]] | None = None,
) -> None:
    """ConfigError unless the inputs agree on the architecture metadata and kohya's key scheme."""
    for key in ARCHITECTURE_KEYS:
        seen = {n: m[key] for n, m in zip(names, metadata or [{}] * len(names), strict=True) if key in m}
        if len(set(seen.values())) > 1:
            listed = ", ".join(f"{n}: {v!r}" for n, v in seen.items())
            raise ConfigError(
                f"merge: the LoRAs were trained for different base models ({key} {listed}); "
                "merge only LoRAs of one architecture"
            )
    fits: set[str] = set(_KEY_SCHEMES)  # the architectures every key seen so far fits
    first: dict[str, tuple[str, str]] = {}  # architecture → the first (file, key) that fits it
    for name, sd in zip(names, state_dicts, strict=True):
        for key in sd:
            schemes = {s for s, prefixes in _KEY_SCHEMES.items() if key.startswith(prefixes)}
            if not schemes:
                continue
            for scheme in schemes:
                first.setdefault(scheme, (name, key))
            if fits & schemes:
                fits &= schemes
                continue
            earlier = sorted(fits)[0]
            listed = "; ".join(
                f"{s} in {n} ({k.split('.')[0]})"
                for s, (n, k) in ((earlier, first[earlier]), (" or ".join(sorted(schemes)), (name, key)))
            )
            raise ConfigError(
                f"merge: the LoRAs use the key names of different architectures: {listed}; "
                "merge only LoRAs of one architecture"
            )


def _check_shapes(names: Sequence[str], parsed: Sequence[Mapping[str, tuple[Tensor, Tensor, float]]]):
    first: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, modules in zip(names, parsed, strict=True):
        for module, (down, up, _) in modules.items():
            shape = (up.shape[0], *down.shape[1:])
            seen_in, seen = first.setdefault(module, (name, shape))
            if seen != shape:
                raise ConfigError(
                    f"merge: {module} has ΔW shape {seen} in {seen_in} but {shape} in {name}; "
                    "the LoRAs were trained for different architectures"
                )


def merge_into_backend(
    backend: DiffusersBackend, sd: Mapping[str, Tensor], multiplier: float = 1.0
) -> list[str]:
    """W ← W + multiplier·ΔW for every module of `sd`, in place; returns the merged names.

    Modules are found by kohya name among `backend.lora_targets(...)`. Every name
    and shape is checked before any weight changes, so a bad LoRA leaves the
    model untouched. ΔW is added in float32 and rounded once to the weight's dtype.
    """
    found = backend.lora_targets(include_conv=True, unet=True, text_encoder=True)
    targets = {t.name: t.modules for t in found}
    deltas = delta_weights(sd)
    unknown = sorted(set(deltas) - set(targets))
    if unknown:
        raise ConfigError(
            f"merge: {len(unknown)} of {len(deltas)} LoRA module(s) match no module of this "
            f"{backend.family} model, e.g. {unknown[:5]}; the LoRA was made for another architecture"
        )
    for name, delta in deltas.items():
        weights = [m.weight for m in targets[name]]
        shape = (sum(w.shape[0] for w in weights), *weights[0].shape[1:])
        # a Linear LoRA on a 1×1 conv (or the reverse) differs only by trailing 1×1 dims
        if delta.shape[:2] != shape[:2] or delta.numel() != math.prod(shape):
            raise ConfigError(
                f"merge: {name}: the LoRA's ΔW has shape {tuple(delta.shape)} but the model's weight "
                f"{shape}; the LoRA was made for another model"
            )
    with torch.no_grad():
        for name, delta in deltas.items():
            # a layer this model splits (diffusers' q/k/v of a fused qkv) takes its rows of ΔW
            start = 0
            for module in targets[name]:
                weight = module.weight
                rows = delta[start : start + weight.shape[0]]
                start += weight.shape[0]
                merged = weight.float() + multiplier * rows.to(weight.device).reshape(weight.shape)
                weight.copy_(merged.to(weight.dtype))
    return list(deltas)


def save_merged_lora(
    path: Path,
    result: MergeResult,
    sources: Sequence[tuple[str, float]],
    input_metadata: Sequence[Mapping[str, str]] = (),
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
) -> Path:
    """Save with export.save_lora; `ss_merged_from` records (file name, weight) of each source."""
    ranks = [int(v) for k, v in result.state_dict.items() if k.endswith(".alpha")]
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(ranks, default=0)),
        "ss_network_alpha": str(max(ranks, default=0)),
        "ss_merge_mode": result.mode,
        "ss_merged_from": json.dumps([{"file": Path(n).name, "weight": w} for n, w in sources]),
    }
    for key in ARCHITECTURE_KEYS:
        values = {m[key] for m in input_metadata if key in m}
        if len(values) == 1:
            meta[key] = values.pop()
    return save_lora(path, result.state_dict, meta, dtype, overwrite)


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """Parse FILE:WEIGHT (or FILE alone, weight 1) into (path, weight)."""
    head, sep, tail = spec.rpartition(":")
    if not sep or "/" in tail or "\\" in tail:  # no weight, or the ":" of a Windows drive
        return Path(spec), 1.0
    try:
        weight = float(tail)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight):
        raise ConfigError(
            f"merge: {spec!r}: weight {tail!r} is not a number; write FILE:WEIGHT, e.g. a.safetensors:0.7"
        )
    return Path(head), weight


def merge_lora_files(
    specs: Sequence[tuple[Path, float]],
    out: Path,
    mode: str = "concat",
    rank: int | None = None,
    save_precision: str = "fp16",
    overwrite: bool = False,
) -> tuple[Path, MergeResult]:
    """Load, merge and save: the `merge` command without --into-model."""
    check_choice("merge --save-precision", save_precision, SAVE_DTYPES)
    out = Path(out)
    if out.exists() and not overwrite:  # before the work, and in the flags' words (save_lora checks again)
        raise ConfigError(f"merge: {out} already exists; choose another --out or pass --overwrite")
    loaded = [load_lora(path) for path, _ in specs]
    result = merge_loras(
        [(sd, w) for (sd, _), (_, w) in zip(loaded, specs, strict=True)],
        mode,
        rank,
        metadata=[meta for _, meta in loaded],
        names=[str(path) for path, _ in specs],
    )
    sources = [(str(p), w) for p, w in specs]
    return save_merged_lora(
        out, result, sources, [m for _, m in loaded], SAVE_DTYPES[save_precision], overwrite
    ), result


def merge_into_model_folder(
    specs: Sequence[tuple[Path, float]], model_dir: Path, out_dir: Path, overwrite: bool = False
) -> list[str]:
    """Merge LoRAs (weight = multiplier) into a diffusers folder's UNet and text encoders, saved at `out_dir`.

    The other parts (vae, tokenizers, scheduler, model_index.json) are copied.
    The folder is built beside `out_dir` and moved in only once complete.
    """
    from ..model.diffusers_backend import load_diffusers_backend, text_encoder_suffixes
    from ..model.model_config import ModelConfig

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not model_dir.is_dir():
        raise ModelError(f"merge: --into-model {str(model_dir)!r} is not a diffusers model folder")
    if model_dir.resolve() in (out_dir.resolve(), *out_dir.resolve().parents):
        raise ConfigError("merge: --out must lie outside --into-model; the source model is never changed")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(
            f"merge: {str(out_dir)!r} exists and is not empty; choose another --out or pass --overwrite"
        )
    loaded = [load_lora(path) for path, _ in specs]
    check_same_architecture([str(p) for p, _ in specs], [sd for sd, _ in loaded], [m for _, m in loaded])
    backend = load_diffusers_backend(ModelConfig(model_dir))
    merged: list[str] = []
    for (sd, _), (_, weight) in zip(loaded, specs, strict=True):
        merged += merge_into_backend(backend, sd, weight)
    te_folders = [f"text_encoder{suffix}" for suffix in text_encoder_suffixes(backend.family_spec)]
    components = {"unet": backend.unet, **dict(zip(te_folders, backend.text_encoders, strict=True))}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for entry in model_dir.iterdir():
            if entry.name not in components:
                copy = shutil.copytree if entry.is_dir() else shutil.copy2
                copy(entry, staging / entry.name)
        for name, module in components.items():
            module.save_pretrained(staging / name)
        out_dir.mkdir(exist_ok=True)
        for entry in staging.iterdir():
            _remove(out_dir / entry.name)
            os.replace(entry, out_dir / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return merged


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
