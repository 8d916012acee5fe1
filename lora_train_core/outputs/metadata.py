"""The `ss_*` training record and `modelspec.*` keys of a saved LoRA (kohya's train_network.py).

All values are strings, as safetensors metadata requires; lists and dicts are JSON.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Iterable
from typing import Any

from ..data.buckets import BucketPlan
from ..data.captions import tag_frequency
from ..data.dataset import Dataset, ImageRecord
from ..families import ModelFamily, get_family
from ..objective.flow import FlowConfig
from ..objective.flow_loss import guidance_scale_for


def _s(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "None"
    if isinstance(value, tuple | list | dict):
        return json.dumps(value)
    return str(value)


def dataset_tag_frequency(dataset: Dataset) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency, per folder name: training folders and every
    regularisation folder (kohya's `set_tag_frequency` runs for reg subsets too, and
    merges folders of the same name)."""
    by_folder: dict[str, list[str]] = {}
    for image in (*_training_images(dataset), *dataset.reg_images):
        by_folder.setdefault(image.path.parent.name, []).append(image.caption)
    return tag_frequency(by_folder)


def dataset_dirs(dataset: Dataset) -> dict[str, dict[str, int]]:
    """kohya's ss_dataset_dirs: per training folder, its repeats and image count."""
    return _dirs(_training_images(dataset))


def reg_dataset_dirs(dataset: Dataset) -> dict[str, dict[str, int]]:
    """kohya's ss_reg_dataset_dirs: per regularisation folder, its own repeats (before
    balancing) and every image in it, used or not."""
    return _dirs(dataset.reg_images)


def _training_images(dataset: Dataset) -> list[ImageRecord]:
    return [image for image in dataset.images if not image.is_reg]


def _dirs(images: Iterable[ImageRecord]) -> dict[str, dict[str, int]]:
    dirs: dict[str, dict[str, int]] = {}
    for image in images:
        entry = dirs.setdefault(image.path.parent.name, {"n_repeats": image.repeats, "img_count": 0})
        entry["img_count"] += 1
    return dirs


def bucket_info(plan: BucketPlan, dataset: Dataset) -> dict[str, Any]:
    """kohya's ss_bucket_info: each bucket's resolution and count (with repeats), and the mean
    |bucket aspect − image aspect| over the images (BucketManager's mean_img_ar_error)."""
    buckets = {
        str(i): {"resolution": list(reso), "count": len(indices)}
        for i, (reso, indices) in enumerate(sorted(plan.buckets.items()))
    }
    errors = [
        abs(a.bucket[0] / a.bucket[1] - image.size[0] / image.size[1])
        for a, image in zip(plan.assignments, dataset.images, strict=True)
    ]
    return {"buckets": buckets, "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}


def training_metadata(
    *,
    recipe,
    family: str,
    prediction_type: str,
    fp8_base: bool,
    dataset: Dataset,
    plan: BucketPlan,
    output_name: str,
    model_name: str,
    steps: int,
    epochs: int,
    total_steps: int,
    started_at: float,
    finished_at: float,
    model_hash: str | None = None,
) -> dict[str, str]:
    """The metadata dict for a saved LoRA, kohya's keys first; `family` names its ModelFamily.

    fp8_base: the base model's denoiser weights were float8 (`Backend.fp8_base`).
    model_hash: `ss_new_sd_model_hash`, what identifies the base model's weights
    (`Backend.base_model_fingerprint()`; kohya writes the checkpoint file's SHA-256 there).
    """
    spec = get_family(family)
    net, opt, noise, loss, train = recipe.network, recipe.optimizer, recipe.noise, recipe.loss, recipe.train
    bucket_cfg = plan.config
    network_args = {"conv_dim": net.conv_dim, "conv_alpha": net.conv_alpha} if net.conv_dim else {}
    for name in (
        "rank_dropout",
        "module_dropout",
        "block_dims",
        "block_alphas",
        "conv_block_dims",
        "conv_block_alphas",
    ):
        if getattr(net, name):
            network_args[name] = getattr(net, name)
    meta = {
        "ss_session_id": str(uuid.uuid4().int % 2**31),
        "ss_training_started_at": started_at,
        "ss_training_finished_at": finished_at,
        "ss_output_name": output_name,
        "ss_sd_model_name": model_name,
        "ss_base_model_version": spec.base_model_version,
        "ss_v2": spec.v_prediction_is_v2 and prediction_type == "v_prediction",
        "ss_network_module": "networks.lora",
        "ss_network_dim": net.network_dim,
        "ss_network_alpha": net.network_alpha,
        "ss_network_dropout": net.network_dropout,
        "ss_network_args": network_args,
        "ss_network_train_unet_only": not net.train_text_encoder,
        "ss_network_train_text_encoder_only": not net.train_unet,
        "ss_learning_rate": opt.learning_rate,
        "ss_unet_lr": opt.unet_lr if opt.unet_lr is not None else opt.learning_rate,
        "ss_text_encoder_lr": list(opt.text_encoder_lr) if opt.text_encoder_lr else opt.learning_rate,
        "ss_optimizer": _optimizer_record(opt),
        "ss_lr_scheduler": opt.lr_scheduler,
        "ss_lr_warmup_steps": opt.lr_warmup_steps,
        "ss_max_grad_norm": opt.max_grad_norm,
        "ss_steps": steps,
        "ss_epoch": epochs,
        "ss_max_train_steps": total_steps,
        "ss_num_train_images": sum(img.repeats for img in _training_images(dataset)),
        # kohya counts reg images with their folder repeats, before balancing.
        "ss_num_reg_images": sum(img.repeats for img in dataset.reg_images),
        "ss_prior_loss_weight": dataset.reg_images[0].loss_weight if dataset.reg_images else 1.0,
        "ss_batch_size_per_device": train.train_batch_size,
        "ss_gradient_accumulation_steps": train.gradient_accumulation_steps,
        "ss_gradient_checkpointing": train.gradient_checkpointing,
        "ss_mixed_precision": train.mixed_precision,
        "ss_fp8_base": fp8_base,  # changes results: the base weights were float8
        "ss_seed": train.seed,
        "ss_resolution": f"({bucket_cfg.resolution[0]}, {bucket_cfg.resolution[1]})",
        "ss_enable_bucket": bucket_cfg.enable_bucket,
        "ss_min_bucket_reso": bucket_cfg.min_bucket_reso,
        "ss_max_bucket_reso": bucket_cfg.max_bucket_reso,
        "ss_bucket_no_upscale": bucket_cfg.bucket_no_upscale,
        "ss_bucket_info": bucket_info(plan, dataset),
        "ss_tag_frequency": dataset_tag_frequency(dataset),
        "ss_dataset_dirs": dataset_dirs(dataset),
        "ss_reg_dataset_dirs": reg_dataset_dirs(dataset),
        "ss_noise_offset": noise.noise_offset,
        "ss_adaptive_noise_scale": noise.adaptive_noise_scale,
        "ss_multires_noise_iterations": noise.multires_noise_iterations,
        "ss_multires_noise_discount": noise.multires_noise_discount,
        "ss_ip_noise_gamma": noise.ip_noise_gamma,
        "ss_min_timestep": noise.min_timestep,
        "ss_max_timestep": noise.max_timestep,
        "ss_min_snr_gamma": loss.min_snr_gamma,
        "ss_loss_type": loss.loss_type,
        "ss_huber_schedule": loss.huber_schedule,
        "ss_huber_c": loss.huber_c,
        "ss_zero_terminal_snr": loss.zero_terminal_snr,
        "ss_debiased_estimation": loss.debiased_estimation_loss,
        "ss_scale_v_pred_loss_like_noise_pred": loss.scale_v_pred_loss_like_noise_pred,
        "ss_ema": dataclasses.asdict(recipe.ema) if recipe.ema.enabled else None,
    }
    if spec.is_flow:
        meta.update(_flow_record(recipe.flow, spec))
    if model_hash is not None:
        meta["ss_new_sd_model_hash"] = model_hash
    meta.update(_modelspec(spec, prediction_type, output_name, bucket_cfg, finished_at))
    return {k: _s(v) for k, v in meta.items()}


def _flow_record(flow: FlowConfig, family: ModelFamily) -> dict[str, Any]:
    """What kohya's Flux trainer adds to the record (flux_train_network.py `update_metadata`), on
    top of the keys its base trainer writes for every family (ss_v2, ss_min_snr_gamma, ... stay).

    `ss_guidance_scale` is the value the model was fed: the family's default when unset, and None
    for a model without a guidance input (kohya writes its argparse 3.5 there, which schnell
    ignores). `ss_apply_t5_attn_mask` is the family's: Flux's T5 encodes its padding unmasked in both
    doors (kohya's default), Chroma's is masked (kohya asserts it for Chroma); there is no option.
    """
    return {
        "ss_model_type": family.kohya_model_type,
        "ss_apply_t5_attn_mask": family.t5_attention_mask,
        "ss_weighting_scheme": flow.weighting_scheme,
        "ss_logit_mean": flow.logit_mean,
        "ss_logit_std": flow.logit_std,
        "ss_mode_scale": flow.mode_scale,
        "ss_guidance_scale": guidance_scale_for(flow, family),
        "ss_timestep_sampling": flow.timestep_sampling,
        "ss_sigmoid_scale": flow.sigmoid_scale,
        "ss_model_prediction_type": flow.model_prediction_type,
        "ss_discrete_flow_shift": flow.discrete_flow_shift,
    }


def _optimizer_record(opt) -> str:
    args = " ".join(opt.optimizer_args)
    return f"{opt.optimizer_type}({args})" if args else opt.optimizer_type


def _modelspec(
    family: ModelFamily, prediction_type: str, title: str, bucket_cfg, finished_at: float
) -> dict[str, str]:
    width, height = bucket_cfg.resolution
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{width}x{height}",
    }
    # kohya writes no prediction type for Flux (sai_model_spec.py build_metadata_dataclass): the
    # SAI spec's values (epsilon, v) do not describe a flow model
    if not family.is_flow:
        spec["modelspec.prediction_type"] = "v" if prediction_type == "v_prediction" else "epsilon"
    spec["modelspec.date"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(finished_at))
    return spec


def run_metadata(
    recipe,
    backend,
    dataset: Dataset,
    plan: BucketPlan,
    trained,
    output_name: str,
    model_name: str,
    model_hash: str | None = None,
) -> dict[str, str]:
    """`training_metadata` of a run (`trained`, a TrainedLora) on `backend`; `model_hash`: the
    backend's `base_model_fingerprint()`, computed once per run by the caller."""
    return training_metadata(
        recipe=recipe,
        family=backend.family,
        prediction_type=backend.prediction_type,
        fp8_base=backend.fp8_base,
        dataset=dataset,
        plan=plan,
        output_name=output_name,
        model_name=model_name,
        steps=trained.steps,
        epochs=trained.epochs,
        total_steps=trained.total_steps,
        started_at=trained.started_at,
        finished_at=trained.finished_at,
        model_hash=model_hash,
    )
