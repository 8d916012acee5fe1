"""The metadata of a Flux.1 LoRA is what kohya's Flux trainer writes, as literal strings.

Expected values are copied by hand from sd-scripts at 48d368f: library/flux_utils.py
(MODEL_VERSION_FLUX_V1 "flux1"), library/sai_model_spec.py (ARCH_FLUX_1_DEV / _SCHNELL + "/lora",
IMPL_FLUX, no modelspec.prediction_type for Flux), flux_train_network.py `update_metadata` (the flow
options, str() of kohya's argparse values), and train_network.py (the keys every family gets).
"""

from __future__ import annotations

import pytest
from PIL import Image

from lora_train_core.data.buckets import BucketConfig, plan_buckets
from lora_train_core.data.dataset import DatasetConfig, load_dataset
from lora_train_core.objective.flow import FlowConfig
from lora_train_core.outputs.metadata import training_metadata
from lora_train_core.run.train import TrainConfig, TrainingRecipe

KOHYA_FLUX = {
    "flux_dev": {
        "ss_base_model_version": "flux1",
        "ss_model_type": "flux",
        "modelspec.architecture": "flux-1-dev/lora",
        "modelspec.implementation": "https://github.com/black-forest-labs/flux",
    },
    "flux_schnell": {
        "ss_base_model_version": "flux1",
        "ss_model_type": "flux",
        "modelspec.architecture": "flux-1-schnell/lora",
        "modelspec.implementation": "https://github.com/black-forest-labs/flux",
    },
    # library/chroma_models.py / sai_model_spec.py ARCH_CHROMA, IMPL_CHROMA; kohya asserts
    # apply_t5_attn_mask for Chroma (flux_train_network.py)
    "chroma": {
        "ss_base_model_version": "chroma",
        "ss_model_type": "chroma",
        "ss_apply_t5_attn_mask": "True",
        "modelspec.architecture": "chroma/lora",
        "modelspec.implementation": "https://huggingface.co/lodestones/Chroma",
    },
}
FLOW_KEYS = {
    "ss_apply_t5_attn_mask",
    "ss_weighting_scheme",
    "ss_logit_mean",
    "ss_logit_std",
    "ss_mode_scale",
    "ss_guidance_scale",
    "ss_timestep_sampling",
    "ss_sigmoid_scale",
    "ss_model_prediction_type",
    "ss_discrete_flow_shift",
    "ss_model_type",
}


def _metadata(folder, family: str, prediction_type: str, flow: FlowConfig | None = None) -> dict[str, str]:
    (folder / "1_x").mkdir()
    Image.new("RGB", (64, 64)).save(folder / "1_x" / "a.png")
    dataset = load_dataset(DatasetConfig(path=folder))
    plan = plan_buckets(dataset.images, BucketConfig(resolution=(64, 64), min_bucket_reso=64))
    return training_metadata(
        recipe=TrainingRecipe(TrainConfig(), flow=flow or FlowConfig()),
        family=family,
        prediction_type=prediction_type,
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


@pytest.mark.parametrize("family", sorted(KOHYA_FLUX))
def test_flux_architecture_strings_are_kohyas(family, tmp_path):
    meta = _metadata(tmp_path, family, "flow")
    assert {key: meta[key] for key in KOHYA_FLUX[family]} == KOHYA_FLUX[family]
    assert "modelspec.prediction_type" not in meta  # kohya writes none for Flux
    assert meta["modelspec.resolution"] == "64x64"


def test_flow_options_are_recorded_in_kohyas_format(tmp_path):
    flow = FlowConfig(
        timestep_sampling="sigma",
        weighting_scheme="logit_normal",
        logit_mean=-0.5,
        logit_std=1.5,
        discrete_flow_shift=3.1582,
        model_prediction_type="sigma_scaled",
        guidance_scale=3.5,
    )
    meta = _metadata(tmp_path, "flux_dev", "flow", flow)
    assert {k: meta[k] for k in FLOW_KEYS} == {
        "ss_model_type": "flux",
        "ss_apply_t5_attn_mask": "False",
        "ss_weighting_scheme": "logit_normal",
        "ss_logit_mean": "-0.5",
        "ss_logit_std": "1.5",
        "ss_mode_scale": "1.29",
        "ss_guidance_scale": "3.5",
        "ss_timestep_sampling": "sigma",
        "ss_sigmoid_scale": "1.0",
        "ss_model_prediction_type": "sigma_scaled",
        "ss_discrete_flow_shift": "3.1582",
    }


def test_guidance_is_the_value_fed_to_the_model(tmp_path):
    # unset: Flux-dev trains with 1.0 (kohya's docs); schnell has no guidance input at all
    (tmp_path / "dev").mkdir()
    (tmp_path / "schnell").mkdir()
    dev = _metadata(tmp_path / "dev", "flux_dev", "flow")
    schnell = _metadata(tmp_path / "schnell", "flux_schnell", "flow", FlowConfig(timestep_sampling="shift"))
    assert dev["ss_guidance_scale"] == "1.0"
    assert dev["ss_model_prediction_type"] == "raw" and dev["ss_timestep_sampling"] == "sigma"
    assert schnell["ss_guidance_scale"] == "None"
    assert schnell["ss_timestep_sampling"] == "shift"


def test_the_keys_kohyas_base_trainer_writes_for_every_family_stay(tmp_path):
    # train_network.py writes ss_v2, ss_min_snr_gamma, ss_noise_offset, ... whatever the model
    meta = _metadata(tmp_path, "flux_dev", "flow")
    assert meta["ss_v2"] == "False"
    assert meta["ss_network_module"] == "networks.lora"
    ddpm_keys = {"ss_min_snr_gamma", "ss_noise_offset", "ss_multires_noise_iterations", "ss_v2"}
    assert ddpm_keys <= meta.keys()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_sd_files_get_no_flow_keys_and_keep_their_prediction_type(family, tmp_path):
    meta = _metadata(tmp_path, family, "epsilon")
    assert not FLOW_KEYS & meta.keys()
    assert meta["modelspec.prediction_type"] == "epsilon"
