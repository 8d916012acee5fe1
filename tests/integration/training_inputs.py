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


def text_encoder_network(nodes):
    """Configure Network's value for a rank-4 LoRA that trains the text encoder too."""
    return nodes.ConfigureNetwork.execute(
        network_dim=4,
        network_alpha=4.0,
        conv_dim=0,
        conv_alpha=1.0,
        network_dropout=0.0,
        rank_dropout=0.0,
        module_dropout=0.0,
        train_text_encoder=True,
    ).result[0]
