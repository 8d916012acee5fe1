"""Load Dataset, Bucketize and Cache Latents: the data half of a training graph."""

from __future__ import annotations

from pathlib import Path

import folder_paths
from comfy_api.v0_0_2 import io

from ..lora_train_core.data.buckets import BucketConfig, bucket_report, check_steps_for_family, plan_buckets
from ..lora_train_core.data.captions import CaptionConfig
from ..lora_train_core.data.dataset import DatasetConfig, load_dataset
from ..lora_train_core.data.latent_cache import CacheConfig, build_latents
from .comfy_backend import ComfyBackend
from .paths import dataset_folders, resolve_dataset_folder
from .values import CATEGORY, BucketsValue, DatasetValue, LatentsValue, LoraBuckets, LoraDataset, LoraLatents

NO_FOLDER = "(none)"


class LoadDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        folders = dataset_folders(Path(folder_paths.get_input_directory())) or ["(no folders in input/)"]
        return io.Schema(
            node_id="LoRATrainer_LoadDataset",
            display_name="Load Dataset",
            category=f"{CATEGORY}/data",
            description="Images with same-name caption files; kohya N_name sub-folders repeat N times.",
            inputs=[
                io.Combo.Input(
                    "folder",
                    options=folders,
                    tooltip="A folder inside ComfyUI's input/ directory (refresh the page after adding one).",
                ),
                io.String.Input(
                    "custom_path",
                    default="",
                    tooltip="An absolute folder outside input/. Off "
                    "unless ComfyUI runs with LORA_TRAINER_ALLOW_ANY_DATASET_PATH=1.",
                ),
                io.String.Input(
                    "caption_extension",
                    default=".txt",
                    tooltip="Caption file extension, e.g. .txt or .caption.",
                ),
                io.Int.Input(
                    "default_repeats",
                    default=1,
                    min=1,
                    max=1000,
                    tooltip="Repeats per epoch for "
                    "images directly in the folder (N_name sub-folders set their own).",
                ),
                io.Boolean.Input(
                    "shuffle_caption",
                    default=False,
                    tooltip="Shuffle comma-separated tags every step (kohya shuffle_caption).",
                ),
                io.Int.Input(
                    "keep_tokens",
                    default=0,
                    min=0,
                    max=100,
                    tooltip="Leading tags kept in place when shuffling (kohya keep_tokens).",
                ),
                io.Float.Input(
                    "caption_dropout_rate",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Probability of training an image with an empty caption.",
                ),
                io.Float.Input(
                    "caption_tag_dropout_rate",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Probability of dropping each non-kept tag.",
                ),
                io.Combo.Input(
                    "regularization_folder",
                    options=[NO_FOLDER, *folders],
                    default=NO_FOLDER,
                    tooltip="Class images for prior preservation (kohya reg images), a folder in input/; "
                    "their repeats are balanced to the training images'.",
                ),
                io.Float.Input(
                    "prior_loss_weight",
                    default=1.0,
                    min=0.0,
                    max=10.0,
                    step=0.05,
                    tooltip="Loss weight of the regularisation images.",
                ),
            ],
            outputs=[LoraDataset.Output(display_name="dataset", tooltip="The scanned dataset.")],
        )

    @classmethod
    def execute(
        cls,
        folder,
        custom_path,
        caption_extension,
        default_repeats,
        shuffle_caption,
        keep_tokens,
        caption_dropout_rate,
        caption_tag_dropout_rate,
        regularization_folder=NO_FOLDER,
        prior_loss_weight=1.0,
    ) -> io.NodeOutput:
        input_dir = Path(folder_paths.get_input_directory())
        path = resolve_dataset_folder(input_dir, folder, custom_path)
        reg_path = None
        if regularization_folder != NO_FOLDER:
            reg_path = resolve_dataset_folder(input_dir, regularization_folder)
        config = DatasetConfig(
            path=path,
            caption_extension=caption_extension,
            default_repeats=default_repeats,
            reg_path=reg_path,
            prior_loss_weight=prior_loss_weight,
        )
        dataset = load_dataset(config)
        captions = CaptionConfig(
            shuffle_caption=shuffle_caption,
            keep_tokens=keep_tokens,
            caption_dropout_rate=caption_dropout_rate,
            caption_tag_dropout_rate=caption_tag_dropout_rate,
        )
        return io.NodeOutput(DatasetValue(dataset, captions, config))


class Bucketize(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRATrainer_Bucketize",
            display_name="Bucketize",
            category=f"{CATEGORY}/data",
            description="kohya aspect-ratio buckets: each image goes to the bucket of nearest aspect ratio.",
            inputs=[
                LoraDataset.Input("dataset", tooltip="From Load Dataset."),
                io.Int.Input(
                    "resolution",
                    default=512,
                    min=64,
                    max=4096,
                    step=64,
                    tooltip="Training area is resolution x resolution (512 for SD1.5, 1024 for SDXL).",
                ),
                io.Int.Input(
                    "min_bucket_reso", default=256, min=64, max=4096, step=64, tooltip="Smallest bucket side."
                ),
                io.Int.Input(
                    "max_bucket_reso", default=1024, min=64, max=8192, step=64, tooltip="Largest bucket side."
                ),
                io.Int.Input(
                    "bucket_reso_steps",
                    default=64,
                    min=16,
                    max=256,
                    step=16,
                    tooltip="Bucket sides are multiples of this (64 for SD1.5; 32 allowed for SDXL; 16 "
                    "for Flux.1 / Chroma). Cache Latents refuses a step the model cannot use.",
                ),
                io.Boolean.Input(
                    "bucket_no_upscale",
                    default=False,
                    tooltip="Never enlarge small images; buckets follow the image sizes.",
                ),
                io.Boolean.Input(
                    "random_crop",
                    default=False,
                    tooltip="Random instead of centre crop (needs Cache Latents mode 'none').",
                ),
            ],
            outputs=[
                LoraBuckets.Output(display_name="buckets", tooltip="The bucket plan."),
                io.String.Output(display_name="report", tooltip="Bucket resolution -> image count."),
            ],
        )

    @classmethod
    def execute(
        cls,
        dataset,
        resolution,
        min_bucket_reso,
        max_bucket_reso,
        bucket_reso_steps,
        bucket_no_upscale,
        random_crop,
    ) -> io.NodeOutput:
        config = BucketConfig(
            resolution=(resolution, resolution),
            min_bucket_reso=min_bucket_reso,
            max_bucket_reso=max_bucket_reso,
            bucket_reso_steps=bucket_reso_steps,
            bucket_no_upscale=bucket_no_upscale,
            random_crop=random_crop,
        )
        plan = plan_buckets(dataset.dataset.images, config)
        report = bucket_report(plan)
        print(report)
        return io.NodeOutput(BucketsValue(dataset, plan), report)


class CacheLatents(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRATrainer_CacheLatents",
            display_name="Cache Latents",
            category=f"{CATEGORY}/data",
            description="Encode every image once with the graph's VAE (RAM or disk cache).",
            inputs=[
                LoraBuckets.Input("buckets", tooltip="From Bucketize."),
                io.Model.Input("model", tooltip="The model to train (its latent scale is applied)."),
                io.Vae.Input("vae", tooltip="The VAE from the same checkpoint."),
                io.Combo.Input(
                    "mode",
                    options=["ram", "disk", "none"],
                    default="ram",
                    tooltip="ram: keep in "
                    "memory; disk: safetensors under output/lora_latent_cache (reused across runs "
                    "when image, crop and VAE are unchanged); none: encode every step.",
                ),
            ],
            outputs=[LoraLatents.Output(display_name="latents", tooltip="Latents ready for Train LoRA.")],
        )

    @classmethod
    def execute(cls, buckets, model, vae, mode) -> io.NodeOutput:
        backend = ComfyBackend(model, vae=vae)
        check_steps_for_family(buckets.plan.config, backend.family)
        cache_dir = Path(folder_paths.get_output_directory()) / "lora_latent_cache"
        cache = CacheConfig(mode, cache_dir)
        latents = build_latents(buckets.data.dataset, buckets.plan, backend, cache)
        return io.NodeOutput(LatentsValue(buckets, latents, cache))
