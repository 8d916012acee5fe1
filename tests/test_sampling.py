"""Validation samples: kohya prompt options, produced at the requested steps, reproducible per seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lora_train_core.data.buckets import BucketConfig, plan_buckets
from lora_train_core.data.dataset import DatasetConfig, load_dataset
from lora_train_core.data.latent_cache import CacheConfig, build_latents
from lora_train_core.errors import ConfigError
from lora_train_core.model.network import NetworkConfig
from lora_train_core.model.tiny_models import tiny_backend
from lora_train_core.optim.optimizers import OptimizerConfig
from lora_train_core.outputs.sample_prompts import SampleConfig, SamplePrompt, load_prompts, parse_prompt_line
from lora_train_core.outputs.sampling import SampleWriter, image_grid
from lora_train_core.run.train import TrainConfig, TrainingRecipe, train


def test_prompt_line_options_follow_kohya():
    p = parse_prompt_line("a red cat --n blurry, bad --w 100 --h 30 --d 7 --s 12 --l 4.5 --ss ddim")
    assert p == SamplePrompt("a red cat", "blurry, bad", 96, 64, 7, 12, 4.5, "ddim")
    assert parse_prompt_line("plain") == SamplePrompt("plain")


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("x --q 1", "unknown option --q"),
        ("x --w big", "--w needs a number"),
        ("x --s 0", "steps 0 is out of range"),
        ("x --ss magic", "sampler"),
    ],
)
def test_bad_prompt_options_are_named(line, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_prompt_line(line)


def test_prompt_files_in_txt_toml_and_json(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\na cat --d 1\n\nzebra\n", encoding="utf-8")
    (tmp_path / "p.toml").write_text('[[prompt]]\nprompt = "a cat"\nseed = 1\n', encoding="utf-8")
    (tmp_path / "p.json").write_text('[{"prompt": "a cat", "seed": 1}]', encoding="utf-8")
    assert [p.prompt for p in load_prompts(tmp_path / "p.txt")] == ["a cat", "zebra"]
    assert (
        load_prompts(tmp_path / "p.toml")
        == load_prompts(tmp_path / "p.json")
        == [SamplePrompt("a cat", seed=1)]
    )


def _run_with_samples(dataset_dir, out_dir, mixed_precision="no"):
    weight_dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    backend = tiny_backend("sd15", seed=0, weight_dtype=weight_dtype)
    dataset = load_dataset(DatasetConfig(path=dataset_dir))
    plan = plan_buckets(
        dataset.images, BucketConfig(resolution=(128, 128), min_bucket_reso=64, max_bucket_reso=256)
    )
    latents = build_latents(dataset, plan, backend, CacheConfig(mode="ram"))
    writer = SampleWriter(
        backend,
        SampleConfig(
            prompts=("a red circle --w 64 --h 64 --s 3 --d 5", "a blue square --w 64 --h 64 --s 3"),
            sample_every_n_steps=2,
            seed=9,
        ),
        out_dir,
        "lora",
    )
    recipe = TrainingRecipe(
        train=TrainConfig(max_train_steps=3, train_batch_size=2, seed=1, mixed_precision=mixed_precision),
        network=NetworkConfig(network_dim=4, network_alpha=4.0),
        optimizer=OptimizerConfig(learning_rate=1e-2),
    )
    train(backend, dataset, plan, latents, recipe, on_step=writer)
    return writer.written


def test_samples_are_written_at_the_requested_steps_and_identical_across_runs(shapes_dataset, tmp_path):
    first = _run_with_samples(shapes_dataset, tmp_path / "a")
    second = _run_with_samples(shapes_dataset, tmp_path / "b")
    assert [p.name for p in first] == [
        "lora_000002_00.png",
        "lora_000002_01.png",
        "lora_000003_00.png",
        "lora_000003_01.png",
    ]
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), a.name
    # the LoRA changed between step 2 and 3, so the pictures did too
    assert not np.array_equal(np.asarray(Image.open(first[0])), np.asarray(Image.open(first[2])))


def test_samples_are_drawn_when_training_in_bf16(shapes_dataset, tmp_path):
    """The UNet's bf16 latents are decoded by the float32 VAE (SD1.5's pipeline would not cast)."""
    written = _run_with_samples(shapes_dataset, tmp_path, mixed_precision="bf16")
    assert len(written) == 4
    assert np.asarray(Image.open(written[0])).std() > 0


def test_image_grid_places_images_in_rows():
    images = [Image.new("RGB", (10, 20), c) for c in ("red", "green", "blue")]
    grid = image_grid(images, columns=2)
    assert grid.size == (20, 40)
    assert grid.getpixel((15, 5)) == (0, 128, 0) and grid.getpixel((5, 25)) == (0, 0, 255)


def test_prompts_for_a_backend_that_builds_no_pipeline_are_refused_when_the_writer_is_made(
    tmp_path, sd15_backend, monkeypatch
):
    monkeypatch.setattr(sd15_backend, "pipeline_parts", lambda: None)  # as ComfyBackend answers
    cfg = SampleConfig(prompts=("a red circle",))
    with pytest.raises(ConfigError, match=r"samples: validation samples need a diffusers pipeline"):
        SampleWriter(sd15_backend, cfg, tmp_path, "lora")
    assert SampleWriter(sd15_backend, SampleConfig(), tmp_path, "lora").prompts == []
