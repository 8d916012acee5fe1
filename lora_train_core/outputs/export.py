"""Saving a trained LoRA as a kohya-format .safetensors file.

Tensors are `<kohya name>.lora_down.weight`, `.lora_up.weight` and `.alpha`
(KOHYA_FACTS, "Saved file"). The header carries the `ss_*` training record,
the `sshs_*` hashes kohya computes, and the SAI model-spec keys.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from ..atomic_io import atomic_write_bytes
from ..errors import ConfigError

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_dtype(name: str) -> torch.dtype:
    if name not in SAVE_DTYPES:
        raise ConfigError(
            f"output.save_precision: {name!r} is not one of {', '.join(map(repr, SAVE_DTYPES))}"
        )
    return SAVE_DTYPES[name]


def kohya_hashes(tensors: dict[str, torch.Tensor], ss_metadata: dict[str, str]) -> dict[str, str]:
    """kohya's `sshs_model_hash` and `sshs_legacy_hash` (train_util.precalculate_safetensors_hashes).

    Both hash the file as serialised with only the `ss_*` metadata: the model
    hash covers the bytes after the header, the legacy hash bytes 0x100000..0x10FFFF.
    """
    data = safetensors_bytes(tensors, metadata={k: v for k, v in ss_metadata.items() if k.startswith("ss_")})
    (header_len,) = struct.unpack("<Q", data[:8])
    model_hash = hashlib.sha256(data[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}


def save_lora(
    path: Path,
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, str],
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
) -> Path:
    """Write the LoRA atomically; refuse to replace an existing file unless `overwrite`."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"output: {str(path)!r} must end in .safetensors")
    if path.exists() and not overwrite:
        raise ConfigError(f"{path!s} already exists; choose another name, or allow overwriting it")
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be strings: {bad}")
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state_dict.items()}
    full = {**metadata, **kohya_hashes(tensors, metadata)}
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=full))
    return path


def next_free_path(path: Path) -> Path:
    """`name.safetensors`, else `name_1.safetensors`, `name_2...`: never an existing file."""
    path = Path(path)
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
    return candidate


def read_metadata(path: Path) -> dict[str, str]:
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    return header.get("__metadata__", {})
