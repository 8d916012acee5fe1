"""The ComfyUI door for Flux.1 (dev, schnell) and Chroma: tiny models of ComfyUI's own classes train
through Train LoRA's code and lower the loss (also over float8 weights, with checkpointing), the
file loads in LoraLoader with no key left out and the MODEL output equals LoraLoader's; real-size
models on the meta device get kohya's default targets, every one a key ComfyUI maps; bad inputs
are refused with one clear message before training."""

from __future__ import annotations

import pytest
import torch
from flux_models import flux_ae, tiny_clip, tiny_model
from safetensors.torch import load_file

FAMILIES = ["flux_dev", "flux_schnell", "chroma"]
SIZE = 64  # pixels: 8x8 latents, 16 image tokens


@pytest.fixture(scope="module")
def vae(comfy):
    return flux_ae()


@pytest.fixture(scope="module")
def nodes(comfy):
    return comfy.pack_module("nodes")


def _widgets(node_class, **changes) -> dict:
    defaults = {i.id: i.default for i in node_class.define_schema().inputs if hasattr(i, "default")}
    return {**defaults, **changes}


def latents_for(nodes, model, vae, dataset, step=16):
    with torch.inference_mode():
        data = nodes.LoadDataset.execute(dataset.name, "", ".txt", 1, False, 0, 0.0, 0.0).result[0]
        buckets = nodes.Bucketize.execute(data, SIZE, SIZE, 2 * SIZE, step, False, False).result[0]
        return nodes.CacheLatents.execute(buckets, model, vae, "ram").result[0]


def train(nodes, model, clip, latents, name, steps=12, checkpointing=False, **optional):
    """Train LoRA's code on these inputs: AdamW 3e-3, diffusion model only unless `network` says."""
    optimizer = nodes.ConfigureOptimizer.execute(**_widgets(nodes.ConfigureOptimizer, learning_rate=3e-3))
    unet_only = nodes.ConfigureNetwork.execute(**_widgets(nodes.ConfigureNetwork, train_text_encoder=False))
    optional = {"network": unet_only.result[0], **optional}
    with torch.inference_mode():  # as the executor runs nodes
        args = (model, clip, latents, steps, 2, 1, checkpointing, 3, name, True, "fp32", "", 0)
        return nodes.TrainLoRA.execute(*args, optimizer=optimizer.result[0], **optional).result


def flow_loss(model, latents, text, family) -> float:
    """‖v̂ − (ε − x0)‖² of `model` (a ModelPatcher, its patches applied) at fixed σ and noise:
    written out here from the flow formulas, not from the trainer's code."""
    import comfy.model_management as mm

    mm.load_models_gpu([model], force_full_load=True)
    dm = model.model.diffusion_model
    x0 = torch.stack([s.latents for s in latents.latents.samples]).float()
    generator = torch.Generator().manual_seed(123)
    noise = torch.randn(x0.shape, generator=generator)
    losses = []
    for sigma in (0.2, 0.5, 0.8):
        s = torch.full((x0.shape[0],), sigma)
        x_t = (1 - sigma) * x0 + sigma * noise
        hidden = text.hidden.expand(x0.shape[0], -1, -1)
        kwargs = {"guidance": torch.zeros(x0.shape[0])} if family == "chroma" else {}
        if family != "chroma":
            kwargs["y"] = text.pooled.expand(x0.shape[0], -1)
        if family == "flux_dev":
            kwargs["guidance"] = torch.ones(x0.shape[0])
        dtype = model.model.manual_cast_dtype or torch.float32
        with torch.no_grad():
            v = dm(x_t.to(dtype), s, context=hidden.to(dtype), **{k: w.to(dtype) for k, w in kwargs.items()})
        losses.append(((v.float() - (noise - x0)) ** 2).mean().item())
    return sum(losses) / len(losses)


def caption_conditioning(comfy, model, clip):
    backend_module = comfy.pack_module("nodes.comfy_backend")
    with torch.inference_mode(False), torch.no_grad():
        return backend_module.ComfyBackend(model, clip).encode_text(["a photo"])


def loaded_without_missing_keys(comfy, model, clip, path):
    import comfy.sd as comfy_sd
    import comfy.utils as comfy_utils

    lora = comfy_utils.load_torch_file(str(path), safe_load=True)
    with comfy.capture_logs() as messages:
        out = comfy_sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    unloaded = [m for m in messages if "lora key not loaded" in m or m.startswith("NOT LOADED")]
    return out, unloaded


@pytest.mark.parametrize(
    ("family", "fp8", "checkpointing"),
    [
        ("flux_dev", False, True),
        ("flux_schnell", False, False),
        ("chroma", False, True),
        ("flux_dev", True, True),  # UNETLoader weight_dtype fp8_e4m3fn: float8 storage, bf16 compute
    ],
)
def test_tiny_comfy_model_trains_lowers_the_loss_and_loads_in_lora_loader(
    comfy, nodes, vae, tiny_dataset, family, fp8, checkpointing
):
    dtypes = (torch.float8_e4m3fn, torch.bfloat16) if fp8 else (torch.float32, None)
    model, clip = tiny_model(family, 0, *dtypes), tiny_clip(family)
    if fp8:
        assert model.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    weights_before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    latents = latents_for(nodes, model, vae, tiny_dataset)
    assert latents.latents.samples[0].latents.shape[0] == 16  # the Flux AE's channels
    text = caption_conditioning(comfy, model, clip)
    loss_before = flow_loss(model, latents, text, family)

    model_out, _, _, path, _ = train(
        nodes, model, clip, latents, f"it_{family}_{fp8}", checkpointing=checkpointing
    )

    # the input MODEL is untouched (the fp8 weights too): the LoRA lived beside the layers
    after = model.model.diffusion_model.state_dict()
    assert all(
        torch.equal(after[k].float(), v.float()) and after[k].dtype == v.dtype
        for k, v in weights_before.items()
    )
    saved = load_file(path)
    assert saved and all(k.startswith("lora_unet_") for k in saved)
    assert any(saved[k].abs().sum() > 0 for k in saved if k.endswith("lora_up.weight"))
    lora_out, unloaded = loaded_without_missing_keys(comfy, model, clip, path)
    assert not unloaded, unloaded
    # the MODEL output is LoraLoader's for the saved file: the same patches
    assert model_out.patches.keys() == lora_out[0].patches.keys()
    for key, patches in lora_out[0].patches.items():
        for ours, theirs in zip(model_out.patches[key], patches, strict=True):
            assert ours[0] == theirs[0]
            assert torch.equal(ours[1].weights[0], theirs[1].weights[0])
    assert flow_loss(lora_out[0], latents, text, family) < loss_before


def test_text_encoder_lora_trains_on_flux_clip_l_and_loads(comfy, nodes, vae, tiny_dataset):
    model, clip = tiny_model("flux_schnell"), tiny_clip("flux_schnell")
    latents = latents_for(nodes, model, vae, tiny_dataset)
    network = nodes.ConfigureNetwork.execute(**_widgets(nodes.ConfigureNetwork, train_text_encoder=True))
    _, _, _, path, _ = train(nodes, model, clip, latents, "it_flux_te", steps=2, network=network.result[0])
    saved = load_file(path)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in saved)
    _, unloaded = loaded_without_missing_keys(comfy, model, clip, path)
    assert not unloaded, unloaded


def test_text_encoder_lora_on_chroma_is_refused_before_training(comfy, nodes, vae, tiny_dataset):
    errors = comfy.pack_module("lora_train_core.errors")
    model, clip = tiny_model("chroma"), tiny_clip("chroma")
    latents = latents_for(nodes, model, vae, tiny_dataset)
    network = nodes.ConfigureNetwork.execute(**_widgets(nodes.ConfigureNetwork, train_text_encoder=True))
    with pytest.raises(errors.ConfigError, match=r"network.train_text_encoder: Chroma has no text encoder"):
        train(nodes, model, clip, latents, "it_chroma_te", steps=1, network=network.result[0])


def test_chroma_batch_of_unequal_captions_masks_the_padding(comfy):
    """Chroma's T5 is unpadded: a batch of captions of different lengths is zero-padded, and the
    padded rows are masked, so each sample's prediction equals its own unpadded one."""
    backend_module = comfy.pack_module("nodes.comfy_backend")
    model, clip = tiny_model("chroma"), tiny_clip("chroma")
    with torch.inference_mode(False), torch.no_grad():
        backend = backend_module.ComfyBackend(model, clip)
        backend.prepare_for_training()
        captions = ["a cat", "a dog on a long wall under a very blue sky"]
        batch = backend.encode_text(captions)
        x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
        sigmas = torch.tensor([0.3, 0.6])
        together = backend.predict(x, sigmas, batch, None)
        alone = [
            backend.predict(x[i : i + 1], sigmas[i : i + 1], backend.encode_text([c]), None)
            for i, c in enumerate(captions)
        ]
    assert batch.hidden.shape[0] == 2 and (batch.hidden[0] == 0).all(-1).any()
    assert torch.allclose(together, torch.cat(alone), atol=1e-5)


# --- real size, on the meta device ----------------------------------------------------------------

REAL = dict(
    in_channels=16,
    out_channels=16,
    patch_size=2,
    context_in_dim=4096,
    hidden_size=3072,
    mlp_ratio=4.0,
    num_heads=24,
    depth=19,
    depth_single_blocks=38,
    axes_dim=[16, 56, 56],
    theta=10000,
    qkv_bias=True,
)
REAL_UNETS = {  # ComfyUI's model_detection for the published files (comfy/model_detection.py:176-215)
    "flux_dev": ("Flux", {"image_model": "flux", "guidance_embed": True, "vec_in_dim": 768, **REAL}),
    "flux_schnell": (
        "FluxSchnell",
        {"image_model": "flux", "guidance_embed": False, "vec_in_dim": 768, **REAL},
    ),
    "chroma": (
        "Chroma",
        {
            "image_model": "chroma",
            **REAL,
            "in_channels": 64,
            "out_channels": 64,
            "in_dim": 64,
            "out_dim": 3072,
            "hidden_dim": 5120,
            "n_layers": 5,
        },
    ),
}


def kohya_default_targets(family: str) -> set[str]:
    """kohya's networks/lora_flux.py default: every Linear of the 19 double and 38 single blocks,
    written out from FLOW_FACTS §2.1 (Chroma: the same minus the modulation Linears)."""
    double = [
        "img_attn_qkv",
        "img_attn_proj",
        "img_mlp_0",
        "img_mlp_2",
        "txt_attn_qkv",
        "txt_attn_proj",
        "txt_mlp_0",
        "txt_mlp_2",
    ]
    single = ["linear1", "linear2"]
    if family != "chroma":
        double += ["img_mod_lin", "txt_mod_lin"]
        single += ["modulation_lin"]
    return {f"lora_unet_double_blocks_{i}_{m}" for i in range(19) for m in double} | {
        f"lora_unet_single_blocks_{i}_{m}" for i in range(38) for m in single
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_real_size_targets_are_kohyas_default_and_every_key_maps_in_comfyui(comfy, family):
    import comfy.lora as comfy_lora
    import comfy.supported_models as supported_models

    backend_module = comfy.pack_module("nodes.comfy_backend")
    flux_module = comfy.pack_module("nodes.comfy_flux")
    class_name, unet_config = REAL_UNETS[family]
    config = getattr(supported_models, class_name)(dict(unet_config))
    config.set_inference_dtype(torch.bfloat16, None)
    with torch.device("meta"):
        base = config.get_model({})
    assert flux_module.flux_family(base) == family
    assert backend_module.model_family(type("M", (), {"model": base})()) == family
    targets = flux_module.FluxAdapter(family).unet_targets(
        type("B", (), {"diffusion_model": base.diffusion_model})(), False
    )
    names = {t.name for t in targets}
    assert len(names) == len(targets)
    assert names == kohya_default_targets(family)
    accepted = comfy_lora.model_lora_keys_unet(base, {})
    exported = {
        f"{name}.{part}" for name in names for part in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    unloaded = [
        k for k in exported if k.rsplit(".", 2)[0] not in accepted and k.rsplit(".", 1)[0] not in accepted
    ]
    assert not unloaded, unloaded[:5]
    assert names <= set(accepted)


# --- bad inputs, refused before training ---------------------------------------------------------


def test_flux_model_with_an_sd_clip_is_refused_naming_both(comfy, nodes, vae, tiny_dataset):
    errors = comfy.pack_module("lora_train_core.errors")
    model = tiny_model("flux_dev")
    latents = latents_for(nodes, model, vae, tiny_dataset)
    import comfy.sd as comfy_sd
    import comfy.sd1_clip as sd1_clip
    import comfy.supported_models_base as base

    with torch.inference_mode():
        sd_clip = comfy_sd.CLIP(base.ClipTarget(sd1_clip.SD1Tokenizer, sd1_clip.SD1ClipModel))
    with pytest.raises(
        errors.ConfigError, match=r"CLIP: this is a SD1ClipModel .* Flux.1-dev MODEL needs clip_l \+ t5xxl"
    ):
        train(nodes, model, sd_clip, latents, "it_bad_clip", steps=1)


def test_configure_flow_on_an_sd_model_is_refused(comfy, nodes, tiny_dataset):
    from training_inputs import tiny_sd15_model

    errors = comfy.pack_module("lora_train_core.errors")
    backend_module = comfy.pack_module("nodes.comfy_backend")
    checks = comfy.pack_module("lora_train_core.run.checks")
    flow = nodes.ConfigureFlow.execute(**_widgets(nodes.ConfigureFlow, timestep_sampling="sigmoid")).result[0]
    train_module = comfy.pack_module("lora_train_core.run.train")
    recipe = train_module.TrainingRecipe(train=train_module.TrainConfig(), flow=flow)
    with torch.inference_mode(False):
        backend = backend_module.ComfyBackend(tiny_sd15_model())
    with pytest.raises(errors.ConfigError, match=r"flow\.timestep_sampling"):
        checks.check_recipe(recipe, backend.family, backend.prediction_type, torch.device("cpu"), False)


def test_configure_flow_defaults_are_the_cores(comfy, nodes):
    flow_module = comfy.pack_module("lora_train_core.objective.flow")
    assert nodes.ConfigureFlow.execute(**_widgets(nodes.ConfigureFlow)).result[0] == flow_module.FlowConfig()
    set_guidance = nodes.ConfigureFlow.execute(**_widgets(nodes.ConfigureFlow, guidance_scale=3.5)).result[0]
    assert set_guidance.guidance_scale == 3.5


def test_bucket_step_8_for_flux_is_refused_by_cache_latents_and_train_lora(comfy, nodes, vae, tiny_dataset):
    errors = comfy.pack_module("lora_train_core.errors")
    model = tiny_model("flux_schnell")
    message = r"bucket_reso_steps: 8 is not a multiple of 16, which Flux.1-schnell"
    with pytest.raises(errors.ConfigError, match=message):
        latents_for(nodes, model, vae, tiny_dataset, step=8)
    # latents bucketed at 8 (here made for an SD model would need 64; built directly) reach Train LoRA
    values = comfy.pack_module("nodes.values")
    good = latents_for(nodes, model, vae, tiny_dataset, step=16)
    import dataclasses

    plan = dataclasses.replace(
        good.buckets.plan, config=dataclasses.replace(good.buckets.plan.config, bucket_reso_steps=8)
    )
    bad = values.LatentsValue(values.BucketsValue(good.buckets.data, plan), good.latents, good.cache)
    with pytest.raises(errors.ConfigError, match=message):
        train(nodes, model, tiny_clip("flux_schnell"), bad, "it_bad_step", steps=1)


def test_an_unsupported_model_class_is_refused_naming_it_and_the_supported_families(comfy):
    import comfy.supported_models as supported_models

    errors = comfy.pack_module("lora_train_core.errors")
    backend_module = comfy.pack_module("nodes.comfy_backend")
    config = supported_models.SD3(
        {
            "in_channels": 16,
            "depth": 2,
            "patch_size": 2,
            "pos_embed_max_size": 8,
            "adm_in_channels": 16,
            "context_embedder_config": {
                "target": "torch.nn.Linear",
                "params": {"in_features": 16, "out_features": 128},
            },
        }
    )
    config.set_inference_dtype(torch.float32, None)
    with torch.device("meta"):
        base = config.get_model({})
    with pytest.raises(
        errors.ModelError,
        match=r"SD3 models are not supported; this trainer supports SD1.x/2.x, SDXL, Flux.1-dev, "
        r"Flux.1-schnell, Chroma",
    ):
        backend_module.model_family(type("M", (), {"model": base})())


def test_cache_latents_scale_the_flux_aes_16_channels_as_comfyui_does(comfy, vae):
    """With the AE's log-variance pinned near 0 std, our posterior sample is ComfyUI's own encode
    (its mode) put through Flux's latent format: (z − 0.1159)·0.3611."""
    backend_module = comfy.pack_module("nodes.comfy_backend")
    conv_out = vae.first_stage_model.encoder.conv_out
    with torch.inference_mode():
        saved = conv_out.weight.clone(), conv_out.bias.clone()
    try:
        with torch.inference_mode():  # the loader's weights are inference tensors
            conv_out.weight[16:] = 0.0
            conv_out.bias[16:] = -30.0  # log σ² at the clamp: σ = e^-15
        pixels = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            mode = vae.encode(pixels)  # ComfyUI's own encoder path, raw AE latents
            ours = backend_module.ComfyBackend(tiny_model("flux_dev"), vae=vae).encode_images(
                pixels.movedim(-1, 1) * 2 - 1, torch.Generator().manual_seed(1)
            )
    finally:
        with torch.inference_mode():
            conv_out.weight.copy_(saved[0])
            conv_out.bias.copy_(saved[1])
    assert ours.shape == (1, 16, 4, 4)
    assert torch.allclose(ours, (mode.float() - 0.1159) * 0.3611, atol=1e-4)


def test_configure_flow_reaches_the_run_and_a_guidance_scale_on_schnell_is_refused(
    comfy, nodes, vae, tiny_dataset
):
    errors = comfy.pack_module("lora_train_core.errors")
    flow = nodes.ConfigureFlow.execute(
        **_widgets(nodes.ConfigureFlow, timestep_sampling="flux_shift", guidance_scale=3.5)
    ).result[0]
    model, clip = tiny_model("flux_dev"), tiny_clip("flux_dev")
    latents = latents_for(nodes, model, vae, tiny_dataset)
    _, _, trained, _, _ = train(nodes, model, clip, latents, "it_flow_options", steps=2, flow=flow)
    assert len(trained.trained.losses) == 2
    schnell = tiny_model("flux_schnell")
    with pytest.raises(
        errors.ConfigError, match=r"flow.guidance_scale: 3.5, but Flux.1-schnell has no guidance"
    ):
        train(nodes, schnell, tiny_clip("flux_schnell"), latents, "it_flow_schnell", steps=1, flow=flow)


def test_a_flux_model_whose_sampling_is_not_const_flow_is_refused(comfy):
    import comfy.model_sampling as sampling

    errors = comfy.pack_module("lora_train_core.errors")
    backend_module = comfy.pack_module("nodes.comfy_backend")
    model = tiny_model("flux_dev")

    class EpsDiscrete(sampling.ModelSamplingDiscrete, sampling.EPS):
        pass

    patched = model.clone()
    patched.add_object_patch("model_sampling", EpsDiscrete(model.model.model_config))
    with pytest.raises(errors.ModelError, match=r"model_sampling EpsDiscrete; flow training needs"):
        backend_module.ComfyBackend(patched)
    assert backend_module.ComfyBackend(model).prediction_type == "flow"
