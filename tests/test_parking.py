"""Parking: idle frozen modules live in CPU memory while steps run, and come back when called.

Needs a CUDA GPU (on a CPU-only run there is nothing to free and Parking does nothing).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_train_core.config import run_config_from_dict
from lora_train_core.model.tiny_models import tiny_backend
from lora_train_core.run.orchestrator import run_training
from lora_train_core.run.parking import Parking

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="parking frees GPU memory: needs a GPU")
CUDA = torch.device("cuda")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4))).to(CUDA)


def _device(module: nn.Module) -> str:
    return {p.device.type for p in module.parameters()}.pop()


def test_parked_modules_leave_the_gpu_and_come_back_after():
    model = _model()
    before = torch.cuda.memory_allocated()
    with Parking([model], CUDA):
        assert _device(model) == "cpu"
        assert torch.cuda.memory_allocated() < before
    assert _device(model) == "cuda"


def test_a_call_brings_a_parked_module_back_with_the_same_result():
    model = _model()
    x = torch.randn(2, 8, device=CUDA)
    expected = model(x)
    with Parking([model], CUDA) as parking:
        assert torch.equal(model(x), expected)  # the first layer's pre-hook moved all of it back
        assert _device(model) == "cuda"
        hidden = torch.relu(model[0](x))
        parking.park()
        assert _device(model) == "cpu"
        assert torch.equal(model[2](hidden), expected)  # a call into a nested layer brings it all back
        assert _device(model) == "cuda"


def test_a_cached_run_parks_the_vae_and_text_encoders_and_still_samples(shapes_dataset, tmp_path):
    """run_training with cached latents and text: both idle during steps, back for the samples."""
    backend = tiny_backend("sd15", device="cuda", weight_dtype=torch.bfloat16)
    seen = []

    def where(_report) -> None:
        seen.append((_device(backend.vae), _device(backend.text_encoders[0])))

    raw = {
        "model": {"path": str(tmp_path)},
        "dataset": {"path": str(shapes_dataset)},
        "output": {"output_dir": str(tmp_path / "out"), "output_name": "lora"},
        "train": {"max_train_steps": 3, "train_batch_size": 2, "mixed_precision": "bf16"},
        "network": {"network_dim": 4, "train_text_encoder": False},
        "cache": {"mode": "ram", "text_encoder_outputs": "ram"},
        "samples": {"prompts": ["a red circle --w 64 --h 64 --s 3"], "sample_every_n_steps": 2},
    }
    result = run_training(run_config_from_dict(raw), backend, on_step=where, say=lambda _line: None)
    assert result.path.exists()
    assert seen == [("cpu", "cpu")] * 3  # parked at every step (on_step runs before the samples)
    assert list((tmp_path / "out").rglob("*.png"))  # the sample at step 2 was drawn
    assert (_device(backend.vae), _device(backend.text_encoders[0])) == ("cuda", "cuda")
