"""The sigma convention (DESIGN.md): ComfyBackend on a ComfyUI-loaded checkpoint computes what
DiffusersBackend computes on the same weights: schedule, noisy input, text conditioning,
latents, raw network output and loss.

Both sides load the random SD1.5 checkpoint of the `sd15_checkpoint` fixture in float32 on
the CPU (the files are fp16, so both hold bit-identical weights); latents are 1×4×8×8.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest
import torch

from lora_train_core.model.backend import Backend
from lora_train_core.model.diffusers_backend import load_diffusers_backend
from lora_train_core.model.model_config import ModelConfig
from lora_train_core.objective.loss import LossConfig, training_loss
from lora_train_core.objective.noise import add_noise

pytestmark = pytest.mark.slow
CAPTIONS = ["a red circle, blue background, flat colors", "a photo of a cat"]
TIMESTEPS = torch.tensor([17, 801])


@pytest.fixture(scope="module")
def diffusers_backend(sd15_checkpoint):
    return load_diffusers_backend(ModelConfig(path=sd15_checkpoint.diffusers), device="cpu")


@pytest.fixture(scope="module")
def comfy_model(comfy, sd15_checkpoint):
    """(ModelPatcher, CLIP, VAE) as CheckpointLoaderSimple loads them, but in float32."""
    import comfy.sd as comfy_sd  # `as`: a bare `import comfy.sd` would rebind the `comfy` fixture name

    fp32 = {"dtype": torch.float32}
    loaded = comfy_sd.load_checkpoint_guess_config(
        str(sd15_checkpoint.path),
        output_vae=True,
        output_clip=True,
        model_options=fp32,
        te_model_options=fp32,
    )
    return loaded[:3]


@pytest.fixture(scope="module")
def comfy_backend(comfy, comfy_model):
    backend_module = comfy.pack_module("nodes.comfy_backend")
    with torch.inference_mode(False):
        return backend_module.ComfyBackend(*comfy_model)


def latents_and_noise(batch=2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 4, 8, 8, generator=g)


def test_comfy_backend_describes_the_model_as_diffusers_does(comfy_backend, diffusers_backend):
    for attribute in ("family", "prediction_type"):
        assert getattr(comfy_backend, attribute) == getattr(diffusers_backend, attribute), attribute
    # the pack's modules as ComfyUI loaded them are other objects than this test's: compare values
    comfy_row, diffusers_row = comfy_backend.family_spec, diffusers_backend.family_spec
    assert dataclasses.astuple(comfy_row) == dataclasses.astuple(diffusers_row)
    assert (comfy_backend.family, comfy_backend.prediction_type) == ("sd15", "epsilon")


def test_comfy_backend_implements_every_protocol_member(comfy_backend):
    for name in Backend.__annotations__:
        getattr(comfy_backend, name)  # raises AttributeError where a member is missing
    for name, member in vars(Backend).items():
        if inspect.isfunction(member) and not name.startswith("_"):
            implemented = inspect.signature(getattr(type(comfy_backend), name)).parameters
            assert list(implemented) == list(inspect.signature(member).parameters), name


def test_comfy_backend_parks_nothing_builds_no_pipeline_and_refuses_weighted_captions(comfy, comfy_backend):
    assert comfy_backend.parkable_modules(latents_cached=True, text_cached=True) == []
    assert comfy_backend.pipeline_parts() is None
    config_error = comfy.pack_module("lora_train_core.errors").ConfigError  # the class the pack raises
    with pytest.raises(config_error, match=r"weighted_captions is not implemented yet in the ComfyUI door"):
        comfy_backend.encode_text(CAPTIONS, weighted=True)


def test_comfy_backend_identifies_its_weights(comfy_backend, comfy_model):
    fingerprint = comfy_backend.base_model_fingerprint()
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint)
    assert fingerprint == comfy_backend.base_model_fingerprint()
    assert comfy_backend.base_model_name == f"ComfyUI MODEL {fingerprint[:12]}"
    for name in ("vae_fingerprint", "text_encoder_fingerprint"):
        assert re.fullmatch(r"[0-9a-f]{64}", getattr(comfy_backend, name)), name
    assert not comfy_backend.fp8_base  # loaded in float32


def test_fp8_base_is_true_for_a_comfyui_model_stored_in_float8(comfy):
    import comfy.model_patcher as model_patcher  # `as`: keep the `comfy` fixture's name
    import comfy.supported_models as supported_models

    backend_module = comfy.pack_module("nodes.comfy_backend")
    unet_config = {  # a tiny SD1.5-shaped UNet: two levels, 32 channels
        "image_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "num_res_blocks": [1, 1],
        "channel_mult": [1, 2],
        "transformer_depth": [1, 0],
        "transformer_depth_output": [1, 1, 0, 0],
        "transformer_depth_middle": 1,
        "use_spatial_transformer": True,
        "legacy": False,
        "context_dim": 32,
        "use_linear_in_transformer": False,
        "adm_in_channels": None,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }
    for dtype, expected in ((torch.float8_e4m3fn, True), (torch.float32, False)):
        config = supported_models.SD15(dict(unet_config))
        config.set_inference_dtype(dtype, torch.float32)
        cpu = torch.device("cpu")
        patcher = model_patcher.ModelPatcher(config.get_model({}), load_device=cpu, offload_device=cpu)
        with torch.inference_mode(False):
            backend = backend_module.ComfyBackend(patcher)
        assert backend.fp8_base is expected, dtype
        assert re.fullmatch(r"[0-9a-f]{64}", backend.base_model_fingerprint())


def test_alphas_cumprod_match_the_ddpm_scaled_linear_schedule(comfy_backend, diffusers_backend):
    # SD1.5's schedule written out: betas linear in sqrt between 0.00085 and 0.012 over 1000 steps.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1 - betas, dim=0)
    for backend in (comfy_backend, diffusers_backend):
        assert backend.alphas_cumprod.shape == (1000,)
        torch.testing.assert_close(backend.alphas_cumprod.double().cpu(), expected, rtol=0, atol=1e-6)


def test_ddpm_noisy_latents_are_comfys_scaled_sigma_input(comfy_backend, diffusers_backend, comfy_model):
    x0, eps = latents_and_noise()
    ours = add_noise(x0, eps, TIMESTEPS, comfy_backend.alphas_cumprod.cpu())
    theirs = add_noise(x0, eps, TIMESTEPS, diffusers_backend.alphas_cumprod.cpu())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # ComfyUI's own path: x = x0 + σ·ε, network input x/√(σ² + 1) (model_sampling.calculate_input).
    sampling = comfy_model[0].get_model_object("model_sampling")
    sigma = sampling.sigma(TIMESTEPS.float())
    comfy_input = sampling.calculate_input(sigma, x0 + sigma.reshape(-1, 1, 1, 1) * eps)
    torch.testing.assert_close(ours, comfy_input, rtol=0, atol=1e-5)


def test_text_conditioning_matches(comfy_backend, diffusers_backend):
    with torch.no_grad():
        ours, theirs = comfy_backend.encode_text(CAPTIONS), diffusers_backend.encode_text(CAPTIONS)
    assert ours.hidden.shape == theirs.hidden.shape == (2, 77, 768)
    assert ours.pooled is None and theirs.pooled is None
    torch.testing.assert_close(ours.hidden.cpu(), theirs.hidden, rtol=1e-4, atol=1e-4)


def test_encode_images_draws_the_same_posterior_sample(comfy_backend, diffusers_backend):
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ours = comfy_backend.encode_images(pixels, torch.Generator().manual_seed(7))
    theirs = diffusers_backend.encode_images(pixels, torch.Generator().manual_seed(7))
    assert ours.shape == theirs.shape == (1, 4, 8, 8)
    torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def predictions(comfy_backend, diffusers_backend):
    """Each backend end to end: its own ā for x_t, its own text encoding, its own predict."""
    x0, eps = latents_and_noise()
    out = {}
    with torch.no_grad():
        for name, backend in (("comfy", comfy_backend), ("diffusers", diffusers_backend)):
            alphas = backend.alphas_cumprod.cpu()
            x_t = add_noise(x0, eps, TIMESTEPS, alphas)
            pred = backend.predict(x_t, TIMESTEPS, backend.encode_text(CAPTIONS), None)
            loss = training_loss(pred.cpu(), eps, TIMESTEPS, alphas, backend.prediction_type, LossConfig())
            out[name] = (pred.cpu(), float(loss))
    return out


def test_raw_prediction_matches(predictions):
    (ours, _), (theirs, _) = predictions["comfy"], predictions["diffusers"]
    assert ours.shape == theirs.shape == (2, 4, 8, 8)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4)


def test_training_loss_matches(predictions):
    (_, ours), (_, theirs) = predictions["comfy"], predictions["diffusers"]
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert ours > 0.1  # a random UNet is far from predicting the noise: the loss is not trivially equal
