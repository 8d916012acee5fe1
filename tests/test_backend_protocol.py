"""The backend protocol (model/backend.py): its members by name, DiffusersBackend and
CachedTextEncoder implementing every one of them on the tiny models, and what each returns.

ComfyBackend is held to the same list in tests/integration/test_parity.py.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from lora_train_core.data.text_cache import CachedTextEncoder
from lora_train_core.families import ModelFamily, get_family
from lora_train_core.model.backend import Backend, PipelineParts
from lora_train_core.model.diffusers_backend import load_diffusers_backend
from lora_train_core.model.fingerprint import sampled_weights_fingerprint, weights_fingerprint
from lora_train_core.model.model_config import ModelConfig
from lora_train_core.model.network import LoRANetwork, NetworkConfig
from lora_train_core.model.tiny_models import save_tiny_model, tiny_backend

# The names other code is written against (run/, nodes/): changing one is a protocol change.
ATTRIBUTES = {
    "family": str,
    "family_spec": ModelFamily,
    "prediction_type": str,
    "device": torch.device,
    "alphas_cumprod": torch.Tensor,
    "fp8_base": bool,
    "base_model_name": str,
    "vae_fingerprint": str,
    "text_encoder_fingerprint": str,
}
METHODS = {
    "base_model_fingerprint",
    "encode_images",
    "encode_text",
    "predict",
    "lora_targets",
    "trainable_modules",
    "parkable_modules",
    "set_gradient_checkpointing",
    "pipeline_parts",
}


def protocol_methods() -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in vars(Backend).items()
        if inspect.isfunction(member) and not name.startswith("_")
    }


def test_the_protocol_is_exactly_these_members():
    assert set(Backend.__annotations__) == set(ATTRIBUTES)
    assert set(protocol_methods()) == METHODS


@pytest.fixture(params=["sd15", "sdxl", "sd15 cached"])
def backend(request):
    family, _, cached = request.param.partition(" ")
    inner = tiny_backend(family, seed=0)
    return CachedTextEncoder(inner) if cached else inner


def test_every_member_is_there_with_the_protocols_signature(backend):
    for name, kind in ATTRIBUTES.items():
        assert isinstance(getattr(backend, name), kind), name
    for name, signature in protocol_methods().items():
        implemented = inspect.signature(getattr(type(backend), name))
        assert list(implemented.parameters) == list(signature.parameters), name
        defaults = [p.default for p in implemented.parameters.values()]
        assert defaults == [p.default for p in signature.parameters.values()], name


def test_the_text_cache_delegates_every_member_but_encode_text(sd15_backend):
    cached = CachedTextEncoder(sd15_backend)
    for name in ATTRIBUTES:
        assert getattr(cached, name) is getattr(sd15_backend, name) or (
            getattr(cached, name) == getattr(sd15_backend, name)
        ), name
    assert cached.base_model_fingerprint() == sd15_backend.base_model_fingerprint()
    assert cached.parkable_modules(True, True) == sd15_backend.parkable_modules(True, True)
    assert cached.trainable_modules() == sd15_backend.trainable_modules()
    assert cached.pipeline_parts() == sd15_backend.pipeline_parts()
    names = [t.name for t in cached.lora_targets(include_conv=True, unet=True, text_encoder=True)]
    assert names == [t.name for t in sd15_backend.lora_targets(True, True, True)]
    pixels = torch.zeros(1, 3, 64, 64)
    a = cached.encode_images(pixels, torch.Generator().manual_seed(0))
    assert torch.equal(a, sd15_backend.encode_images(pixels, torch.Generator().manual_seed(0)))


def test_the_family_row_is_the_families_own(sdxl_backend):
    assert sdxl_backend.family_spec is get_family("sdxl") and sdxl_backend.family == "sdxl"


def test_parkable_modules_are_the_vae_with_cached_latents_and_the_encoders_with_cached_text(sdxl_backend):
    vae, encoders = sdxl_backend.vae, sdxl_backend.text_encoders
    assert sdxl_backend.parkable_modules(latents_cached=False, text_cached=False) == []
    assert sdxl_backend.parkable_modules(latents_cached=True, text_cached=False) == [vae]
    assert sdxl_backend.parkable_modules(latents_cached=False, text_cached=True) == encoders
    assert sdxl_backend.parkable_modules(latents_cached=True, text_cached=True) == [vae, *encoders]


def test_pipeline_parts_are_the_backends_own_modules(sdxl_backend):
    parts = sdxl_backend.pipeline_parts()
    assert isinstance(parts, PipelineParts)
    assert (
        parts.family is get_family("sdxl")
        and parts.unet is sdxl_backend.unet
        and parts.vae is sdxl_backend.vae
    )
    assert parts.text_encoders == tuple(sdxl_backend.text_encoders)
    assert parts.tokenizers == tuple(sdxl_backend.tokenizers)
    assert (parts.prediction_type, parts.device, parts.compute_dtype, parts.fp8_base) == (
        "epsilon",
        torch.device("cpu"),
        torch.float32,
        False,
    )


def test_fp8_base_says_whether_the_unet_is_stored_in_float8():
    assert not tiny_backend("sd15").fp8_base
    fp8 = tiny_backend("sd15", weight_dtype=torch.bfloat16, fp8_base=True)
    assert fp8.fp8_base and fp8.pipeline_parts().fp8_base
    assert (
        fp8.base_model_fingerprint()
        != tiny_backend("sd15", weight_dtype=torch.bfloat16).base_model_fingerprint()
    )


def test_fingerprints_identify_the_weights_they_cover():
    same, other = tiny_backend("sd15", seed=0), tiny_backend("sd15", seed=1)
    backend = tiny_backend("sd15", seed=0)
    assert backend.vae_fingerprint == weights_fingerprint(backend.vae.state_dict())
    assert backend.base_model_fingerprint() == sampled_weights_fingerprint(backend.unet.state_dict())
    for name in ("vae_fingerprint", "text_encoder_fingerprint"):
        assert getattr(backend, name) == getattr(same, name) != getattr(other, name), name
    assert backend.base_model_fingerprint() == same.base_model_fingerprint() != other.base_model_fingerprint()


def test_base_model_fingerprint_ignores_the_lora_applied_beside_the_unet(sd15_backend):
    before = sd15_backend.base_model_fingerprint()
    targets = sd15_backend.lora_targets(include_conv=False, unet=True, text_encoder=False)
    network = LoRANetwork(targets, NetworkConfig(network_dim=2))
    with network.applied():
        assert sd15_backend.base_model_fingerprint() == before


def test_base_model_name_is_the_model_paths_name_or_in_memory(tmp_path):
    folder = save_tiny_model(tmp_path / "my-model", "sd15")
    assert load_diffusers_backend(ModelConfig(folder)).base_model_name == "my-model"
    assert tiny_backend("sd15").base_model_name == "in-memory"
