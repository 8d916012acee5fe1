"""The family table (families/): each row's facts against kohya's own strings and the published
architectures, and the registry's refusal of an unknown name."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from lora_train_core.data.buckets import BucketConfig, plan_buckets
from lora_train_core.data.dataset import DatasetConfig, load_dataset
from lora_train_core.errors import ConfigError
from lora_train_core.families import FAMILIES, get_family
from lora_train_core.model.kohya_keys import unet_targets
from lora_train_core.model.published_configs import CLIP_BIGG, CLIP_L, SD15_UNET, SDXL_UNET
from lora_train_core.optim.param_groups import block_index
from lora_train_core.outputs.metadata import training_metadata
from lora_train_core.run.train import TrainConfig, TrainingRecipe

# What sd-scripts writes (library/train_util.py, sdxl_model_util.py, sai_model_spec.py
# determine_architecture / determine_implementation for a LoRA), copied out by hand.
KOHYA = {
    "sd15": {
        "ss_base_model_version": "sd_v1",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
    },
    "sdxl": {
        "ss_base_model_version": "sdxl_base_v1-0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
    },
}
PUBLISHED_UNETS = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}
TEXT_ENCODERS = {"sd15": [CLIP_L], "sdxl": [CLIP_L, CLIP_BIGG]}


def test_the_registry_holds_every_family_under_its_own_name():
    assert list(FAMILIES) == ["sd15", "sdxl", "flux_dev", "flux_schnell", "chroma"]
    assert all(get_family(name).name == name for name in FAMILIES)


def test_an_unknown_family_is_refused_naming_the_field_and_the_known_names():
    with pytest.raises(ConfigError, match=r"model\.family: 'flux' is not one of 'sd15', 'sdxl', 'flux_dev'"):
        get_family("flux")
    with pytest.raises(ConfigError, match=r"buckets family: 'sd3'"):
        get_family("sd3", "buckets family")


def _metadata(folder, family: str, **given) -> dict[str, str]:
    (folder / "1_x").mkdir()
    Image.new("RGB", (64, 64)).save(folder / "1_x" / "a.png")
    dataset = load_dataset(DatasetConfig(path=folder))
    plan = plan_buckets(dataset.images, BucketConfig(resolution=(64, 64), min_bucket_reso=64))
    fields = dict(
        recipe=TrainingRecipe(TrainConfig()),
        family=family,
        prediction_type="epsilon",
        fp8_base=False,
        dataset=dataset,
        plan=plan,
        output_name="x",
        model_name="m",
        steps=1,
        epochs=1,
        total_steps=1,
        started_at=0.0,
        finished_at=0.0,
    )
    return training_metadata(**(fields | given))


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_metadata_strings_are_the_ones_kohya_writes(name, tmp_path):
    meta = _metadata(tmp_path, name)
    assert {key: meta[key] for key in KOHYA[name]} == KOHYA[name]
    assert meta["ss_v2"] == "False"
    assert "ss_new_sd_model_hash" not in meta


def test_metadata_records_float8_weights_and_the_base_models_fingerprint(tmp_path):
    meta = _metadata(tmp_path, "sd15", fp8_base=True, model_hash="ab" * 32)
    assert meta["ss_fp8_base"] == "True" and meta["ss_new_sd_model_hash"] == "ab" * 32


def test_ss_v2_marks_the_v_prediction_members_of_sd1x_2x_only():
    # kohya's ss_v2 is its --v2 flag: SD2.x, whose v-prediction models this family covers
    assert get_family("sd15").v_prediction_is_v2
    assert not get_family("sdxl").v_prediction_is_v2


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_conditioning_facts_match_the_published_unet(name):
    family, unet = get_family(name), PUBLISHED_UNETS[name]
    encoders = TEXT_ENCODERS[name]
    assert len(family.text_encoder_prefixes) == len(encoders)
    assert unet["cross_attention_dim"] == sum(e["hidden_size"] for e in encoders)  # concatenated states
    assert family.size_conditioning == (unet.get("addition_embed_type") == "text_time")
    if family.pooled_text:  # the pooled projection of the last encoder joins the six size embeddings
        pooled = encoders[-1]["projection_dim"]
        assert unet["projection_class_embeddings_input_dim"] == 6 * unet["addition_time_embed_dim"] + pooled
    assert family.latent_channels == unet["in_channels"] == unet["out_channels"]


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_bucket_step_is_the_vae_factor_times_the_unets_halvings(name):
    family, levels = get_family(name), len(PUBLISHED_UNETS[name]["block_out_channels"])
    assert family.latent_downscale == 8
    assert family.bucket_reso_step == family.latent_downscale * 2 ** (levels - 1)
    assert family.bucket_reso_step == {"sd15": 64, "sdxl": 32}[name]  # KOHYA_FACTS, "Buckets"


def test_vae_scaling_factors_are_kohyas():
    # KOHYA_FACTS: latents are VAE output × 0.18215 (SD1.5) or × 0.13025 (SDXL)
    assert get_family("sd15").vae_scaling_factor == 0.18215
    assert get_family("sdxl").vae_scaling_factor == 0.13025


@pytest.mark.parametrize(
    ("name", "count", "hit"),
    # kohya: SD1.5 block 0 unused; SDXL blocks 0 (time embedding), 1 (conv_in) and 22 (out) hold no LoRA
    [("sd15", 25, set(range(1, 25))), ("sdxl", 23, set(range(2, 22)))],
)
def test_block_layout_numbers_every_lora_module_of_the_published_unet(name, count, hit):
    family = get_family(name)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**PUBLISHED_UNETS[name])
    targets = unet_targets(unet, family, include_conv=True)
    assert family.blocks.count == count
    assert {block_index(t.name, name) for t in targets} == hit


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"name": "SD 1.5"}, "lowercase identifier"),
        ({"text_encoder_prefixes": ("lora_te9",)}, "text_encoder_prefixes"),
        ({"unet_names": "bfl"}, "unet_names"),
        ({"unet_names": "native"}, "UNet layout"),
        ({"objective": "edm"}, "objective"),
        ({"guidance_input": True}, "default_guidance_scale"),
        ({"text_hidden_state": "first"}, "text_hidden_state"),
        ({"bucket_reso_step": 36}, "bucket_reso_step"),
        ({"modelspec_architecture": "stable-diffusion-v1"}, "modelspec_architecture"),
    ],
)
def test_a_malformed_family_row_is_refused_naming_the_field(change, named):
    with pytest.raises(ValueError, match=named):
        dataclasses.replace(get_family("sd15"), **change)
