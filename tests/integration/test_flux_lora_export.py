"""ComfyUI loads our Flux LoRA file (trained on diffusers' split layers, saved fused under kohya's
native names) with no key left out, and its own Flux model then computes what the diffusers
transformer computed with our LoRA applied: the two doors' files are one file.

The ComfyUI model is `comfy.ldm.flux.model.Flux` built from a tiny config by
`comfy.supported_models.Flux`, holding the tiny diffusers transformer's weights as ComfyUI's own
diffusers→native map converts them (`comfy.model_detection.convert_diffusers_mmdit`, which uses
`comfy.utils.flux_to_diffusers`: split q/k/v rows into the fused qkv / linear1, FLOW_FACTS §3.4).
The LoRA is applied as LoraLoader does: `comfy.sd.load_lora_for_models`, then `patch_model`.

ComfyUI's Flux takes latents (B, 16, H, W) and σ and packs 2×2 patches itself; diffusers takes the
packed tokens (B, H/2·W/2, 64) with their position ids. The packing below is diffusers'
`FluxPipeline._pack_latents`, written out.
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file

from lora_train_core.families.flux import diffusers_targets
from lora_train_core.model.network import LoRANetwork, NetworkConfig
from lora_train_core.outputs.export import save_lora

HIDDEN, HEADS, CONTEXT, POOLED, AXES = 16, 2, 16, 16, (2, 2, 4)
DIFFUSERS_CONFIG = dict(
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=HIDDEN // HEADS,
    num_attention_heads=HEADS,
    joint_attention_dim=CONTEXT,
    pooled_projection_dim=POOLED,
    axes_dims_rope=AXES,
    guidance_embeds=True,
)
# the same architecture in ComfyUI's terms (comfy/ldm/flux/model.py FluxParams)
COMFY_CONFIG = {
    "image_model": "flux",
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": 2,
    "vec_in_dim": POOLED,
    "context_in_dim": CONTEXT,
    "hidden_size": HIDDEN,
    "mlp_ratio": 4.0,
    "num_heads": HEADS,
    "depth": 2,
    "depth_single_blocks": 2,
    "axes_dim": list(AXES),
    "theta": 10000,
    "qkv_bias": True,
    "guidance_embed": True,
}
RANK, ALPHA = 4, 2.0


def _lora_file(transformer, path) -> LoRANetwork:
    network = LoRANetwork(
        diffusers_targets(transformer),
        NetworkConfig(network_dim=RANK, network_alpha=ALPHA, train_text_encoder=False),
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero lora_up (kohya inits it to zero), so the comparison can fail
        for module in network.modules_by_name.values():
            module.lora_down.weight.copy_(torch.randn(module.lora_down.weight.shape, generator=g) * 0.3)
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=g) * 0.3)
    save_lora(path, network.kohya_state_dict(), {"ss_network_module": "networks.lora"}, torch.float32)
    return network


def _comfy_model(diffusers_state_dict):
    import comfy.model_detection as model_detection
    import comfy.model_patcher as model_patcher
    import comfy.supported_models as supported_models

    config = supported_models.Flux(dict(COMFY_CONFIG))
    config.set_inference_dtype(torch.float32, torch.float32)
    model = config.get_model({})
    # copies: the converter writes the scale/shift swap of norm_out into its input tensor in place
    # (model_detection.py `w[:] = fun(weight)`), which would change the diffusers model's weights
    copies = {key: value.detach().clone() for key, value in diffusers_state_dict.items()}
    native = model_detection.convert_diffusers_mmdit(copies, "")
    # strict: every native weight comes from the diffusers model (comfy's ops leave them unset)
    model.diffusion_model.load_state_dict(native, strict=True)
    cpu = torch.device("cpu")
    return model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def _pack(latents):
    """diffusers' FluxPipeline._pack_latents: (B, C, H, W) → (B, H/2·W/2, 4C), and the image ids."""
    b, c, h, w = latents.shape
    packed = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, 4 * c)
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return packed, ids.reshape(-1, 3)


def _unpack(tokens, c, h, w):
    b = tokens.shape[0]
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def test_comfyui_loads_every_key_and_computes_what_diffusers_computes_with_our_lora(comfy, tmp_path):
    import comfy.lora as comfy_lora
    import comfy.sd as comfy_sd

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**DIFFUSERS_CONFIG).eval()
    path = tmp_path / "flux.safetensors"
    network = _lora_file(transformer, path)
    patcher = _comfy_model(transformer.state_dict())
    lora = load_file(path)

    key_map = comfy_lora.model_lora_keys_unet(patcher.model, {})
    with comfy.capture_logs() as warnings:
        patches = comfy_lora.load_lora(lora, key_map)
        patched, _ = comfy_sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    assert not warnings  # "lora key not loaded: …" / "NOT LOADED …" for any key left out
    # every Linear of ComfyUI's double and single blocks (kohya's default targets), whole: a key
    # with an offset would be a slice of a fused weight, which a fused export must not need
    diffusion_model = patcher.model.diffusion_model
    expected = {
        f"diffusion_model.{root}.{index}.{name}.weight"
        for root in ("double_blocks", "single_blocks")
        for index, block in enumerate(getattr(diffusion_model, root))
        for name, module in block.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    assert set(patches) == expected
    assert len(expected) == len(network.modules_by_name) == 2 * 10 + 2 * 3

    g = torch.Generator().manual_seed(2)
    b, c, h, w, text_tokens = 1, 16, 4, 6, 5
    latents = torch.randn(b, c, h, w, generator=g)
    context = torch.randn(b, text_tokens, CONTEXT, generator=g)
    pooled = torch.randn(b, POOLED, generator=g)
    sigma, guidance = torch.tensor([0.6]), torch.tensor([1.0])
    tokens, img_ids = _pack(latents)

    def diffusers_out():
        out = transformer(
            hidden_states=tokens,
            encoder_hidden_states=context,
            pooled_projections=pooled,
            timestep=sigma,
            img_ids=img_ids,
            txt_ids=torch.zeros(text_tokens, 3),
            guidance=guidance,
        ).sample
        return _unpack(out, c, h, w)

    def comfy_out(model_patcher):
        # ComfyUI's Flux takes σ itself (ModelSamplingFlux.timestep(σ) = σ) and scales by 1000 inside
        return model_patcher.model.diffusion_model(latents, sigma, context, y=pooled, guidance=guidance)

    with torch.no_grad():
        plain = diffusers_out()
        with network.applied():
            ours = diffusers_out()
        torch.testing.assert_close(comfy_out(patcher), plain, rtol=1e-4, atol=1e-5)  # same base weights
        patched.patch_model(device_to=torch.device("cpu"))
        try:
            theirs = comfy_out(patched)
        finally:
            patched.unpatch_model()

    # float32 throughout; ComfyUI adds (α/r)·up·down to the fused weights, we add the LoRA's output
    # to the split layers', so they agree to rounding, far below the LoRA's own effect
    assert (ours - plain).abs().max() > 1e-2
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
