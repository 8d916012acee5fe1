"""Train LoRA on a dynamic-VRAM MODEL (newer ComfyUI), met through the stand-in in dynamic_vram.py.

The pack trains on a non-dynamic clone (comfy_compat.training_patcher) and leaves the graph's
dynamic MODEL alone, or refuses with the setting to change where no clone can be made.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dynamic_vram import dynamic_model_patcher, reload_tiny_model
from safetensors.torch import load_file
from training_inputs import SIZE, node_graph_values, text_encoder_network, tiny_sd15_model

pytestmark = pytest.mark.slow
SAMPLE = f"a red circle --w {SIZE} --h {SIZE} --s 1 --d 3"


def module_state(module: torch.nn.Module) -> dict:
    """Each parameter's tensor object and version counter (bumped by any in-place write; an
    inference tensor has none, and refuses in-place writes outside inference mode), and the
    attributes training or loading would set on a module."""
    attributes = {"forward", "comfy_cast_weights", "weight_function", "bias_function"}
    return {
        "parameters": {
            name: (p, None if p.is_inference() else p._version) for name, p in module.named_parameters()
        },
        "set": [sorted(attributes & vars(m).keys()) for m in module.modules()],
    }


@pytest.fixture(scope="module")
def graph(comfy, sd15_checkpoint, tiny_dataset):
    """(MODEL, CLIP, VAE, the pack's nodes, LORA_LATENTS): a tiny SD1.5-shaped MODEL (a dynamic
    MODEL's clone is a second copy of it) with the random SD1.5 checkpoint's CLIP and VAE."""
    import comfy.sd as comfy_sd

    with torch.inference_mode():
        path = str(sd15_checkpoint.path)
        _, clip, vae, _ = comfy_sd.load_checkpoint_guess_config(path, output_model=False)
    model = tiny_sd15_model()
    nodes, latents = node_graph_values(comfy, model, vae, tiny_dataset)
    return model, clip, vae, nodes, latents


def test_the_stand_in_cannot_be_trained_through_directly(comfy):
    """What the pack must avoid: a backward through a lazily loaded dynamic MODEL reads weights
    that later ops' casts have overwritten."""
    import comfy.model_management as mm

    dynamic = dynamic_model_patcher(tiny_sd15_model())
    with torch.inference_mode(False):
        mm.load_models_gpu([dynamic])
        x = torch.randn(1, 4, SIZE // 8, SIZE // 8, requires_grad=True)
        out = dynamic.model.diffusion_model(x, torch.tensor([500.0]), context=torch.randn(1, 77, 768))
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.float().square().mean().backward()
    mm.unload_all_models()


def test_a_dynamic_model_trains_on_a_clone_like_the_plain_model_and_is_left_alone(graph):
    model, clip, vae, nodes, latents = graph
    # Loaded again by the loader's factory, as newer ComfyUI's clone(disable_dynamic=True) does.
    dynamic = dynamic_model_patcher(model, (reload_tiny_model, (0,)))
    before = module_state(dynamic.model)

    def train(on, name):
        with torch.inference_mode():
            args = (on, clip, latents, 2, 1, 1, False, 1, name, False, "fp32", SAMPLE, 0)
            return nodes.TrainLoRA.execute(*args, vae=vae).result

    model_out, _, _, path, samples = train(dynamic, "it_dynamic")
    after = module_state(dynamic.model)
    assert after["set"] == before["set"]  # never loaded, wrapped or checkpointed
    assert after["parameters"].keys() == before["parameters"].keys()
    for name, (parameter, version) in before["parameters"].items():  # the same tensors, never written
        assert after["parameters"][name][0] is parameter and after["parameters"][name][1] == version, name
    assert model_out.is_dynamic() and model_out.model is dynamic.model
    assert model_out.patches and model_out.patches.keys() <= dynamic.model.state_dict().keys()

    # The same run on the plain MODEL (the same weights): the same file and the same samples.
    _, _, _, plain_path, plain_samples = train(model, "it_dynamic_plain")
    trained, plain = load_file(path), load_file(plain_path)
    assert trained.keys() == plain.keys() and all(torch.equal(trained[k], plain[k]) for k in plain)
    assert any(plain[k].abs().sum() > 0 for k in plain if k.endswith("lora_up.weight"))
    assert np.array_equal(samples.numpy(), plain_samples.numpy())


def test_a_dynamic_model_its_loader_cannot_reload_is_refused_naming_the_setting(comfy, graph):
    errors = comfy.pack_module("lora_train_core.errors")
    model, clip, _, nodes, latents = graph
    dynamic = dynamic_model_patcher(model)  # no cached_patcher_init, as from a custom loader
    before = module_state(dynamic.model)
    with torch.inference_mode(), pytest.raises(errors.ModelError, match="--disable-dynamic-vram"):
        nodes.TrainLoRA.execute(dynamic, clip, latents, 1, 1, 1, False, 1, "it_refused", False, "fp16")
    assert module_state(dynamic.model)["set"] == before["set"]
    assert not list(comfy.models_dir("loras").glob("it_refused*"))


def test_text_encoder_training_on_a_dynamic_clip_is_refused_naming_the_setting(comfy, graph):
    errors = comfy.pack_module("lora_train_core.errors")
    model, clip, _, nodes, latents = graph
    dynamic_clip = clip.clone()
    dynamic_clip.patcher = dynamic_model_patcher(clip.patcher)
    with torch.inference_mode():
        network = text_encoder_network(nodes)
        with pytest.raises(errors.ConfigError, match="--disable-dynamic-vram"):
            args = (model, dynamic_clip, latents, 1, 1, 1, False, 1, "it_te_refused", False, "fp16")
            nodes.TrainLoRA.execute(*args, network=network)
    assert not list(comfy.models_dir("loras").glob("it_te_refused*"))
