"""Fingerprints of model weights: what a cache key or a saved LoRA says about the model it came from.

Three strengths, for three uses:

- `weights_fingerprint`: every value, as float32 (the latent cache key: a cached latent is
  valid only for the VAE that made it).
- `text_encoders_fingerprint`: every value's bytes, with each tensor's name, dtype and shape,
  and the tokenizers and the family (the text-encoder cache key).
- `sampled_weights_fingerprint`: each tensor's name, dtype and shape and a fixed strided sample
  of its values (the base model's identity in a saved LoRA, `ss_new_sd_model_hash`): cheap on
  a multi-GB denoiser, also on GPU weights, where only the samples are copied to the CPU.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch

SAMPLES_PER_TENSOR = 256


def weights_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name and float32 values, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def text_encoders_fingerprint(
    family: str, state_dicts: Sequence[Mapping[str, torch.Tensor]], tokenizers: Sequence[str]
) -> str:
    """SHA-256 over what a text-encoder output depends on: the family's name; each encoder's
    tensors in name order, as "<index>.<name>:<dtype>:<shape>" and the value bytes as stored;
    then one line per tokenizer (e.g. "CLIPTokenizer:77", its class and length)."""
    digest = hashlib.sha256(family.encode())
    for index, state_dict in enumerate(state_dicts):
        for name, tensor in sorted(state_dict.items()):
            digest.update(f"{index}.{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(_raw_bytes(tensor.detach().reshape(-1)))
    for tokenizer in tokenizers:
        digest.update(tokenizer.encode())
    return digest.hexdigest()


def sampled_weights_fingerprint(
    state_dict: Mapping[str, torch.Tensor], samples_per_tensor: int = SAMPLES_PER_TENSOR
) -> str:
    """SHA-256 over each tensor, in name order: "<name>:<dtype>:<shape>", then the raw bytes of
    `samples_per_tensor` values taken at a fixed stride (flat indices 0, s, 2s, … with
    s = max(1, numel // samples_per_tensor); all values of a smaller tensor).

    Any change of architecture, names or storage dtype changes it, and so does any change to
    the weights that reaches a sampled value (fine-tuning and merging change nearly all of them);
    an edit confined to unsampled values does not.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // samples_per_tensor)
        digest.update(_raw_bytes(flat[::stride][:samples_per_tensor]))
    return digest.hexdigest()


def _raw_bytes(flat: torch.Tensor) -> bytes:
    """The values' bytes as stored (float8 and bfloat16 included, which numpy cannot hold)."""
    return flat.to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
