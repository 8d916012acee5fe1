"""Configure Speed: the core's [speed] options in the ComfyUI door, refused clearly where they
cannot run, and (on a CUDA GPU) the same training as the eager step."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from training_inputs import node_graph_values, text_encoder_network, tiny_sd15_model


def test_configure_speed_gives_each_widget_to_the_speed_field_of_its_name(comfy):
    nodes = comfy.pack_module("nodes")
    speed = nodes.ConfigureSpeed.execute(
        cuda_graph=True, compile_blocks="transformer+resnet", cudnn_benchmark=True
    ).result[0]
    assert dataclasses.asdict(speed) == {
        "cuda_graph": True,
        "compile_blocks": "transformer+resnet",
        "cudnn_benchmark": True,
        "fp8_base": False,  # in ComfyUI the loader's weight_dtype decides float8 weights
    }


@pytest.fixture(scope="module")
def graph(comfy, sd15_checkpoint, tiny_dataset):
    """(MODEL, CLIP, the pack's nodes, LORA_LATENTS): a tiny SD1.5-shaped MODEL with the random
    checkpoint's CLIP and VAE."""
    import comfy.sd as comfy_sd

    with torch.inference_mode():
        _, clip, vae, _ = comfy_sd.load_checkpoint_guess_config(str(sd15_checkpoint.path), output_model=False)
    model = tiny_sd15_model()
    nodes, latents = node_graph_values(comfy, model, vae, tiny_dataset)
    return model, clip, nodes, latents


def _train(nodes, model, clip, latents, name, speed=None, steps=3):
    with torch.inference_mode():
        args = (model, clip, latents, steps, 2, 1, False, 1, name, True, "fp32")
        network = text_encoder_network(nodes, train_text_encoder=False)
        return nodes.TrainLoRA.execute(*args, network=network, speed=speed).result


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a run without CUDA")
def test_cuda_graph_without_a_cuda_device_is_refused_before_training(comfy, graph):
    model, clip, nodes, latents = graph
    errors = comfy.pack_module("lora_train_core.errors")
    speed = nodes.ConfigureSpeed.execute(cuda_graph=True, compile_blocks="none", cudnn_benchmark=False)
    refusal = r"speed\.cuda_graph: needs a CUDA device; this run is on cpu"
    with pytest.raises(errors.ConfigError, match=refusal):
        _train(nodes, model, clip, latents, "it_speed_refused", speed.result[0])
    assert not list(comfy.models_dir("loras").glob("it_speed_refused*"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and compiled blocks need a CUDA GPU")
def test_graphed_and_compiled_run_trains_what_the_eager_run_trains(comfy, graph):
    """The same seed through the ComfyUI door, eager and with every speed option: the same LoRA
    to a bf16-level tolerance (the compiled kernels fuse and reorder float operations)."""
    model, clip, nodes, latents = graph
    eager = load_file(_train(nodes, model, clip, latents, "it_speed_eager")[3])
    speed = nodes.ConfigureSpeed.execute(
        cuda_graph=True, compile_blocks="transformer+resnet", cudnn_benchmark=True
    ).result[0]
    fast = load_file(_train(nodes, model, clip, latents, "it_speed_fast", speed)[3])
    assert fast.keys() == eager.keys()
    for key in eager:
        torch.testing.assert_close(fast[key].float(), eager[key].float(), rtol=2e-2, atol=2e-4, msg=key)
