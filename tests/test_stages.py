"""Progressive stages, intermediate saves and samples from the run config (run_training)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from lora_train_core.config import OutputConfig
from lora_train_core.demo import demo_config
from lora_train_core.errors import ConfigError
from lora_train_core.model.tiny_models import tiny_backend
from lora_train_core.outputs.export import read_metadata
from lora_train_core.outputs.sample_prompts import SampleConfig
from lora_train_core.run.orchestrator import run_training
from lora_train_core.run.stages import StageConfig


def _cfg(tmp_path, shapes_dataset, **changes):
    cfg = demo_config("sd15", tmp_path, steps=2)
    cfg = dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, path=shapes_dataset))
    return dataclasses.replace(cfg, **changes)


def test_two_stages_at_different_resolutions_train_one_lora_recording_both(tmp_path, shapes_dataset):
    stages = (
        StageConfig(resolution=64, max_train_steps=2, learning_rate=5e-4),
        StageConfig(resolution=128, max_train_steps=3),  # takes optimizer.learning_rate
    )
    cfg = _cfg(tmp_path, shapes_dataset, stages=stages)
    optimizer = dataclasses.replace(cfg.recipe.optimizer, learning_rate=1e-3)
    cfg = dataclasses.replace(cfg, recipe=dataclasses.replace(cfg.recipe, optimizer=optimizer))
    seen = []
    result = run_training(
        cfg,
        tiny_backend("sd15"),
        on_step=lambda r: seen.append((r.step, r.total)),
        say=lambda _: None,
    )
    assert seen == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    meta = read_metadata(result.path)
    assert json.loads(meta["ss_stages"]) == [
        {"resolution": 64, "steps": 2, "learning_rate": 5e-4},
        {"resolution": 128, "steps": 3, "learning_rate": 1e-3},
    ]
    assert meta["ss_steps"] == "5"
    assert "128" in meta["ss_resolution"]
    # the cache holds latents of both resolutions: 64x64 images → 8x8 latents, 128x128 → 16x16
    assert load_file(result.path)  # a loadable kohya file


def test_the_second_stage_continues_from_the_first_stages_weights(tmp_path, shapes_dataset):
    one = run_training(
        _cfg(tmp_path / "a", shapes_dataset, stages=(StageConfig(64, max_train_steps=2),)),
        tiny_backend("sd15"),
        say=lambda _: None,
    )
    both = run_training(
        _cfg(
            tmp_path / "b",
            shapes_dataset,
            stages=(
                StageConfig(64, max_train_steps=2),
                StageConfig(64, max_train_steps=1, learning_rate=1e-9),
            ),
        ),
        tiny_backend("sd15"),
        say=lambda _: None,
    )
    first, second = load_file(one.path), load_file(both.path)
    ups = [k for k in first if k.endswith("lora_up.weight")]
    assert any(first[k].abs().sum() > 0 for k in ups)  # stage 1 moved lora_up away from its zero init
    # stage 2 (lr 1e-9) started from stage 1's weights, not from a fresh zero-up LoRA; both files
    # are fp16, so a weight may round to the neighbouring fp16 value (relative step 2^-10)
    assert all(torch.allclose(first[k].float(), second[k].float(), rtol=2**-10, atol=1e-5) for k in first)


def test_stage_options_are_validated():
    with pytest.raises(ConfigError, match=r"exactly one of max_train_steps or max_train_epochs"):
        StageConfig(resolution=512)
    with pytest.raises(ConfigError, match=r"stages\.resolution"):
        StageConfig(resolution=10, max_train_steps=1)


def test_intermediate_saves_keep_the_newest_n(tmp_path, shapes_dataset):
    output = OutputConfig(output_dir=tmp_path, output_name="run", save_every_n_steps=1, save_last_n_saves=2)
    cfg = _cfg(tmp_path, shapes_dataset, output=output)
    cfg = dataclasses.replace(
        cfg,
        recipe=dataclasses.replace(
            cfg.recipe, train=dataclasses.replace(cfg.recipe.train, max_train_steps=4)
        ),
    )
    run_training(cfg, tiny_backend("sd15"), say=lambda _: None)
    names = sorted(p.name for p in tmp_path.glob("run*.safetensors"))
    assert names == ["run-step00000002.safetensors", "run-step00000003.safetensors", "run.safetensors"]
    assert read_metadata(tmp_path / "run-step00000003.safetensors")["ss_steps"] == "3"


def test_samples_section_writes_images_next_to_the_lora(tmp_path, shapes_dataset):
    samples = SampleConfig(prompts=("a red circle --w 64 --h 64 --s 2 --d 1",), sample_every_n_steps=1)
    run_training(_cfg(tmp_path, shapes_dataset, samples=samples), tiny_backend("sd15"), say=lambda _: None)
    assert sorted(p.name for p in (tmp_path / "sample").iterdir()) == [
        "demo_sd15_lora_000001_00.png",
        "demo_sd15_lora_000002_00.png",
    ]
