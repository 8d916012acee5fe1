"""What the training tests start from: a checkpoint loaded as CheckpointLoaderSimple loads it,
the pack's dataset → buckets → latents values built on it, and a bit-for-bit comparison.

ComfyUI is imported on first use, after `setup_comfy` (see comfy_harness).
"""

from __future__ import annotations

from pathlib import Path

import torch

SIZE = 64  # pixels: 8x8 latents keep the full-size UNet fast on a CPU


def bit_identical(before: dict, after: dict) -> bool:
    """Every tensor unchanged, value for value. NaN equals NaN here: the random checkpoint leaves
    weights it lacks (clip's text_projection) uninitialised, and those may hold NaNs."""
    return before.keys() == after.keys() and all(
        torch.allclose(before[k], after[k], rtol=0, atol=0, equal_nan=True) for k in before
    )


def load_model(checkpoint: Path):
    """(MODEL, CLIP, VAE) of `checkpoint`."""
    import comfy.sd as comfy_sd

    with torch.inference_mode():  # as CheckpointLoaderSimple runs under the executor
        model, clip, vae, *_ = comfy_sd.load_checkpoint_guess_config(str(checkpoint))
    return model, clip, vae


def node_graph_values(comfy, model, vae, dataset: Path):
    """(the pack's nodes module, LORA_LATENTS) for `dataset`, as Load Dataset → Bucketize →
    Cache Latents give them in a graph."""
    nodes = comfy.pack_module("nodes")
    with torch.inference_mode():
        data = nodes.LoadDataset.execute(dataset.name, "", ".txt", 1, False, 0, 0.0, 0.0).result[0]
        buckets = nodes.Bucketize.execute(data, SIZE, SIZE, 2 * SIZE, 64, False, False).result[0]
        latents = nodes.CacheLatents.execute(buckets, model, vae, "ram").result[0]
    return nodes, latents


def text_encoder_network(nodes, train_text_encoder: bool = True):
    """Configure Network's value for a rank-4 LoRA that trains the text encoder too (or, with
    train_text_encoder False, the UNet only)."""
    return nodes.ConfigureNetwork.execute(
        network_dim=4,
        network_alpha=4.0,
        conv_dim=0,
        conv_alpha=1.0,
        network_dropout=0.0,
        rank_dropout=0.0,
        module_dropout=0.0,
        train_text_encoder=train_text_encoder,
    ).result[0]


TINY_SD15_UNET = {  # SD1.5's UNet as ComfyUI detects it, at 32 channels instead of 320
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}


def tiny_sd15_model(seed: int = 0):
    """An SD1.5-shaped MODEL (a ModelPatcher) with 32-channel blocks and seeded weights: the same
    `seed`, the same weights, as a loader reading one file twice. ComfyUI's ops leave weights
    uninitialised, so every one is set here: 1-D weights (the norms') to 1, biases to 0, the rest
    ~ N(0, 1/fan_in)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(TINY_SD15_UNET)
    config.set_inference_dtype(torch.float32, None)
    with torch.inference_mode():  # as a loader runs under the executor
        model = config.get_model({})
        generator = torch.Generator().manual_seed(seed)
        for name, weight in model.diffusion_model.named_parameters():
            if weight.ndim == 1:
                weight.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                fan_in = weight[0].numel()
                weight.copy_(torch.randn(weight.shape, generator=generator) / fan_in**0.5)
    return comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())
