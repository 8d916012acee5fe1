"""Weight fingerprints (model/fingerprint.py): what each one hashes, written out plainly."""

from __future__ import annotations

import hashlib

import torch

from lora_train_core.model.fingerprint import (
    sampled_weights_fingerprint,
    text_encoders_fingerprint,
    weights_fingerprint,
)


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"b.weight": torch.randn(10, 30, generator=g), "a.bias": torch.randn(7, generator=g).half()}


def test_weights_fingerprint_is_sha256_of_names_and_float32_values_in_name_order():
    weights = _weights()
    digest = hashlib.sha256()
    for name in ("a.bias", "b.weight"):
        digest.update(name.encode())
        digest.update(weights[name].float().numpy().tobytes())
    assert weights_fingerprint(weights) == digest.hexdigest()


def test_text_encoders_fingerprint_covers_family_stored_bytes_and_tokenizers():
    weights = _weights()
    expected = hashlib.sha256(b"sdxl")
    expected.update(b"0.a.bias:torch.float16:(7,)" + weights["a.bias"].numpy().tobytes())
    expected.update(b"0.b.weight:torch.float32:(10, 30)" + weights["b.weight"].numpy().tobytes())
    expected.update(b"1.a.bias:torch.float16:(7,)" + weights["a.bias"].numpy().tobytes())
    expected.update(b"1.b.weight:torch.float32:(10, 30)" + weights["b.weight"].numpy().tobytes())
    expected.update(b"CLIPTokenizer:77")
    assert text_encoders_fingerprint("sdxl", [weights, weights], ["CLIPTokenizer:77"]) == expected.hexdigest()


def test_sampled_fingerprint_hashes_a_fixed_stride_of_each_tensor():
    weights = _weights()
    flat = weights["b.weight"].reshape(-1)  # 300 values, 4 samples: stride 75 → indices 0, 75, 150, 225
    expected = hashlib.sha256()
    expected.update(b"a.bias:torch.float16:(7,)" + weights["a.bias"][:4].numpy().tobytes())
    expected.update(b"b.weight:torch.float32:(10, 30)" + flat[[0, 75, 150, 225]].numpy().tobytes())
    assert sampled_weights_fingerprint(weights, samples_per_tensor=4) == expected.hexdigest()


def test_sampled_fingerprint_tells_dtypes_and_sampled_values_apart_but_not_unsampled_ones():
    weights = _weights()
    base = sampled_weights_fingerprint(weights, samples_per_tensor=4)
    assert sampled_weights_fingerprint(_weights(seed=1), samples_per_tensor=4) != base
    assert sampled_weights_fingerprint({**weights, "a.bias": weights["a.bias"].float()}, 4) != base
    fp8 = {name: w.to(torch.float8_e4m3fn) for name, w in weights.items()}
    assert sampled_weights_fingerprint(fp8, 4) != base
    unsampled = weights["b.weight"].clone()
    unsampled.view(-1)[1] += 1.0
    assert sampled_weights_fingerprint({**weights, "b.weight": unsampled}, 4) == base
