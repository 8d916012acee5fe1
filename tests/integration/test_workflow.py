"""The shipped SD1.5 workflow, run by ComfyUI's own executor on a random-weight SD1.5 checkpoint.

It trains a few steps, saves a kohya LoRA in models/loras/, and the image KSampler
makes from Train LoRA's MODEL equals the one from LoraLoader + the saved file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from training_inputs import SIZE, bit_identical, load_model, node_graph_values, text_encoder_network

from lora_train_core.outputs.export import read_metadata

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "sd15_train_then_sample.json"


def _training_prompt(comfy, checkpoint_name: str, dataset: Path, lora_name: str) -> dict:
    prompt = comfy.ui_workflow_to_api_prompt(json.loads(WORKFLOW.read_text()))
    by_type = {node["class_type"]: node["inputs"] for node in prompt.values()}
    by_type["CheckpointLoaderSimple"]["ckpt_name"] = checkpoint_name
    by_type["LoRATrainer_LoadDataset"].update(folder=dataset.name, default_repeats=1)
    by_type["LoRATrainer_Bucketize"].update(resolution=SIZE, min_bucket_reso=SIZE, max_bucket_reso=2 * SIZE)
    by_type["LoRATrainer_TrainLoRA"].update(
        max_train_steps=2,
        train_batch_size=1,
        lora_name=lora_name,
        sample_prompts=f"a red circle --w {SIZE} --h {SIZE} --s 2 --d 1",
        sample_every_n_steps=1,
    )
    by_type["EmptyLatentImage"].update(width=SIZE, height=SIZE)
    by_type["KSampler"].update(steps=2)
    by_type["SaveImage"]["filename_prefix"] = f"{lora_name}_trained"
    by_type["LoRATrainer_EMAExport"]["lora_name"] = f"{lora_name}_ema"
    return prompt


def _loraloader_prompt(training_prompt: dict, checkpoint_name: str, lora_file: str, prefix: str) -> dict:
    """The same sampling graph, but the LoRA comes from LoraLoader on the saved file."""
    ksampler = next(n for n in training_prompt.values() if n["class_type"] == "KSampler")["inputs"]
    positive, negative = (training_prompt[ksampler[k][0]]["inputs"]["text"] for k in ("positive", "negative"))
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint_name}},
        "2": {
            "class_type": "LoraLoader",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "lora_name": lora_file,
                "strength_model": 1.0,
                "strength_clip": 1.0,
            },
        },
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": positive}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": negative}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "6": {
            "class_type": "KSampler",
            "inputs": {
                **{
                    k: v
                    for k, v in ksampler.items()
                    if k not in ("model", "positive", "negative", "latent_image")
                },
                "model": ["2", 0],
                "positive": ["3", 0],
                "negative": ["4", 0],
                "latent_image": ["5", 0],
            },
        },
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }


def _saved_image(comfy, prefix: str) -> np.ndarray:
    [path] = sorted(comfy.output_dir().glob(f"{prefix}_*.png"))
    return np.asarray(Image.open(path))


def test_sd15_workflow_trains_saves_and_samples_exactly_like_loraloader(comfy, sd15_checkpoint, tiny_dataset):
    prompt = _training_prompt(comfy, sd15_checkpoint.name, tiny_dataset, "it_sd15")
    result = comfy.run_prompt(prompt)
    assert result.success, result.describe()
    saved = comfy.models_dir("loras") / "it_sd15.safetensors"
    assert saved.is_file()
    assert (comfy.models_dir("loras") / "it_sd15_ema.safetensors").is_file()
    loss_plot_nodes = [k for k, n in prompt.items() if n["class_type"] == "LoRATrainer_LossPlot"]
    assert result.outputs[loss_plot_nodes[0]]["images"], "the loss plot shows in the graph"
    # Train LoRA's sample grid (one row per checkpoint: steps 1 and 2) reaches the PreviewImage node
    [preview] = [k for k, n in prompt.items() if n["class_type"] == "PreviewImage"]
    [grid] = result.outputs[preview]["images"]
    import folder_paths

    grid_image = Image.open(Path(folder_paths.get_temp_directory()) / grid["subfolder"] / grid["filename"])
    assert grid_image.size == (SIZE, 2 * SIZE)

    with comfy.capture_logs() as messages:
        again = comfy.run_prompt(
            _loraloader_prompt(prompt, sd15_checkpoint.name, saved.name, "it_sd15_loader")
        )
    assert again.success, again.describe()
    assert not [m for m in messages if "lora key not loaded" in m or m.startswith("NOT LOADED")], messages
    trained_image = _saved_image(comfy, "it_sd15_trained")
    loader_image = _saved_image(comfy, "it_sd15_loader")
    assert np.array_equal(trained_image, loader_image)


@pytest.mark.parametrize("interrupt_base", [BaseException, Exception])
def test_cancel_keeps_a_loadable_partial_lora_and_leaves_the_input_model_unchanged(
    comfy, sd15_checkpoint, tiny_dataset, monkeypatch, interrupt_base
):
    """Cancel, whichever base class ComfyUI's interrupt has: an Exception up to 0.3.x, a
    BaseException from about April 2026 (comfy/model_management.py in Comfy-Org/ComfyUI at a7631e35)."""
    import comfy.model_management as mm
    import comfy.sd as comfy_sd
    import comfy.utils as comfy_utils

    class Interrupt(interrupt_base):
        """What throw_exception_if_processing_interrupted raises, looked up when it raises."""

    monkeypatch.setattr(mm, "InterruptProcessingException", Interrupt)
    model, clip, vae = load_model(sd15_checkpoint.path)
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    nodes, latents = node_graph_values(comfy, model, vae, tiny_dataset)
    name, total = f"it_cancel_{interrupt_base.__name__}", 10

    def cancel(value, total, preview, node_id=None):
        # Cancel on whichever progress update arrives: newer ProgressBars drop updates within 100 ms
        # or 0.5% of the last, but never the first (comfy/utils.py at b3be02d6).
        mm.interrupt_current_processing(True)

    comfy_utils.set_progress_bar_global_hook(cancel)
    try:
        with torch.inference_mode(), pytest.raises(Interrupt):
            nodes.TrainLoRA.execute(model, clip, latents, total, 1, 1, False, 1, name, False, "fp16")
    finally:
        comfy_utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    partial = comfy.models_dir("loras") / f"{name}-partial.safetensors"
    assert partial.is_file()
    assert not (comfy.models_dir("loras") / f"{name}.safetensors").exists()
    assert 1 <= int(read_metadata(partial)["ss_steps"]) < total
    lora = comfy_utils.load_torch_file(str(partial), safe_load=True)
    with comfy.capture_logs() as messages:
        comfy_sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    assert not [m for m in messages if "lora key not loaded" in m], messages
    after = model.model.diffusion_model.state_dict()
    assert bit_identical(before, after)
    assert all("forward" not in vars(m) for m in model.model.diffusion_model.modules())


def test_a_finished_run_leaves_the_input_model_bit_identical(comfy, sd15_checkpoint, tiny_dataset):
    model, clip, vae = load_model(sd15_checkpoint.path)
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    nodes, latents = node_graph_values(comfy, model, vae, tiny_dataset)
    with torch.inference_mode():
        out = nodes.TrainLoRA.execute(
            model, clip, latents, 1, 1, 1, False, 1, "it_identity", False, "fp16"
        ).result
    assert Path(out[3]).is_file()
    after = model.model.diffusion_model.state_dict()
    assert bit_identical(before, after)
    assert all("forward" not in vars(m) for m in model.model.diffusion_model.modules())


def test_text_encoder_lora_trains_and_leaves_the_input_clip_bit_identical(
    comfy, sd15_checkpoint, tiny_dataset
):
    import comfy.sd as comfy_sd
    from safetensors.torch import load_file

    model, clip, vae = load_model(sd15_checkpoint.path)
    before = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    nodes, latents = node_graph_values(comfy, model, vae, tiny_dataset)
    with torch.inference_mode():
        network = text_encoder_network(nodes)
        out = nodes.TrainLoRA.execute(
            model, clip, latents, 1, 1, 1, False, 1, "it_te", False, "fp32", network=network
        ).result
    lora = load_file(out[3])
    te_ups = [k for k in lora if k.startswith("lora_te_") and k.endswith("lora_up.weight")]
    assert len(te_ups) == 72 and all(lora[k].abs().sum() > 0 for k in te_ups)
    after = clip.cond_stage_model.state_dict()
    assert bit_identical(before, after)
    assert all("forward" not in vars(m) for m in clip.cond_stage_model.modules())
    with comfy.capture_logs() as messages:
        comfy_sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    assert not [m for m in messages if "lora key not loaded" in m], messages
