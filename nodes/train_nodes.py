"""Train LoRA, EMA Export and Loss Plot."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import folder_paths
import numpy as np
import torch
from comfy_api.v0_0_2 import io, ui

from ..lora_train_core.config import OutputConfig, RunConfig
from ..lora_train_core.errors import ConfigError
from ..lora_train_core.model.network import NetworkConfig
from ..lora_train_core.objective.flow import FlowConfig
from ..lora_train_core.objective.loss import LossConfig
from ..lora_train_core.objective.noise import NoiseConfig
from ..lora_train_core.optim.ema import EMAConfig
from ..lora_train_core.optim.optimizers import OptimizerConfig
from ..lora_train_core.outputs.export import SAVE_DTYPES, next_free_path, save_dtype, save_lora
from ..lora_train_core.outputs.loss_plot import render_loss_plot
from ..lora_train_core.run.speed import SpeedConfig
from ..lora_train_core.run.stages import StageConfig
from ..lora_train_core.run.state_files import RECORD_FILE, load_training_state, state_folders
from ..lora_train_core.run.train import TrainConfig, TrainingRecipe
from .comfy_sampling import ComfySampleCallback, parse_prompts
from .comfy_training import ComfyInputs, train_lora_in_comfy
from .paths import lora_save_path, state_folder
from .values import (
    CATEGORY,
    LoraFlow,
    LoraLatents,
    LoraNetwork,
    LoraNoise,
    LoraOptimizer,
    LoraSpeed,
    LoraStages,
    LoraTrained,
    OptimizerValue,
)

PRECISIONS = list(SAVE_DTYPES)
# One set of defaults, the core's: the CLI and the nodes train the same run when nothing is set.
_TRAIN, _NETWORK = TrainConfig(), NetworkConfig()


NO_STATE = "(none)"


def states_dir() -> Path:
    return Path(folder_paths.get_output_directory()) / "lora_train_states"


def resumable_states() -> list[str]:
    """Complete training states, newest step last per run name."""
    return [folder.name for _, folder in state_folders(states_dir()) if (folder / RECORD_FILE).is_file()]


def loras_dir() -> Path:
    return Path(folder_paths.get_folder_paths("loras")[0])


def free_save_path(name: str, overwrite: bool) -> Path:
    path = lora_save_path(loras_dir(), name)
    return path if overwrite else next_free_path(path)


class TrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRATrainer_TrainLoRA",
            display_name="Train LoRA",
            category=CATEGORY,
            description="Trains a LoRA on the graph's MODEL and saves it to models/loras/ (kohya format). "
            "The MODEL/CLIP outputs carry the trained LoRA, as LoraLoader would apply the saved file.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The model to train on (from Load Checkpoint)."),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint (encodes the captions)."),
                LoraLatents.Input("latents", tooltip="From Cache Latents."),
                io.Int.Input(
                    "max_train_steps",
                    default=_TRAIN.max_train_steps,
                    min=1,
                    max=1_000_000,
                    tooltip="Optimiser steps.",
                ),
                io.Int.Input(
                    "train_batch_size",
                    default=_TRAIN.train_batch_size,
                    min=1,
                    max=256,
                    tooltip="Images per step (one bucket per batch).",
                ),
                io.Int.Input(
                    "gradient_accumulation_steps",
                    default=_TRAIN.gradient_accumulation_steps,
                    min=1,
                    max=256,
                    tooltip="Batches accumulated per optimiser step.",
                ),
                io.Boolean.Input(
                    "gradient_checkpointing",
                    default=_TRAIN.gradient_checkpointing,
                    tooltip="Save memory for ~30% more time.",
                ),
                io.Int.Input(
                    "seed",
                    default=_TRAIN.seed,
                    min=0,
                    max=2**63 - 1,
                    # No randomize-after-queue widget: a new seed would retrain on every queue.
                    control_after_generate=False,
                    tooltip="Seeds noise, timesteps, captions and the LoRA init: same seed, same result.",
                ),
                io.String.Input(
                    "lora_name",
                    default="my_lora",
                    tooltip="File name in models/loras/ (no "
                    "folders). An existing file is kept: a counter is added unless overwrite.",
                ),
                io.Boolean.Input(
                    "overwrite", default=False, tooltip="Replace an existing file of that name."
                ),
                io.Combo.Input("save_precision", options=PRECISIONS, default="fp16", tooltip="Saved dtype."),
                io.String.Input(
                    "sample_prompts",
                    default="",
                    multiline=True,
                    tooltip="Validation prompts, one "
                    "per line, kohya options: a cat --n blurry --w 512 --h 512 --d 1 --s 20 --l 7 "
                    "(needs the VAE input). Empty = no samples.",
                ),
                io.Int.Input(
                    "sample_every_n_steps",
                    default=0,
                    min=0,
                    max=1_000_000,
                    tooltip="Sample every N steps (0 = only at the end).",
                ),
                io.Boolean.Input(
                    "cache_text_encoder_outputs",
                    default=False,
                    tooltip="Encode each caption once (needs static captions and no text-encoder training).",
                ),
                io.Int.Input(
                    "save_state_every_n_steps",
                    default=0,
                    min=0,
                    max=1_000_000,
                    tooltip="Save a resumable training state every N steps (0 = only when cancelled); "
                    "states go to output/lora_train_states/.",
                ),
                io.Combo.Input(
                    "resume_from",
                    options=[NO_STATE, *resumable_states()],
                    default=NO_STATE,
                    tooltip="Continue a cancelled or saved run from its state (same settings and data); "
                    "the result equals an uninterrupted run.",
                ),
                io.Vae.Input("vae", optional=True, tooltip="The checkpoint's VAE, for validation samples."),
                LoraNetwork.Input(
                    "network",
                    optional=True,
                    tooltip=f"From Configure Network (default: rank {_NETWORK.network_dim}, "
                    f"alpha {_NETWORK.network_alpha:g}, text encoder trained too, as kohya).",
                ),
                LoraOptimizer.Input(
                    "optimizer",
                    optional=True,
                    tooltip="From Configure Optimizer (default: AdamW 1e-4, constant).",
                ),
                LoraStages.Input(
                    "stages",
                    optional=True,
                    tooltip="From Training Stages: train through stages of growing resolution (needs the "
                    "VAE; replaces max_train_steps).",
                ),
                LoraNoise.Input(
                    "noise", optional=True, tooltip="From Configure Noise (default: plain noise, L2 loss)."
                ),
                LoraFlow.Input(
                    "flow",
                    optional=True,
                    tooltip="From Configure Flow, for Flux.1 / Chroma (default: kohya's sigma sampling, "
                    "raw prediction, guidance 1.0 for Flux.1-dev).",
                ),
                LoraSpeed.Input(
                    "speed",
                    optional=True,
                    tooltip="From Configure Speed: CUDA graphs, compiled blocks, cuDNN autotuning "
                    "(default: off).",
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="MODEL", tooltip="The input model with the trained LoRA applied."
                ),
                io.Clip.Output(display_name="CLIP", tooltip="The input CLIP with the LoRA applied."),
                LoraTrained.Output(display_name="trained", tooltip="For EMA Export and Loss Plot."),
                io.String.Output(display_name="lora_path", tooltip="Where the LoRA was saved."),
                io.Image.Output(
                    display_name="samples",
                    tooltip="Validation samples: one row per checkpoint, one column per prompt.",
                ),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(
        cls,
        model,
        clip,
        latents,
        max_train_steps,
        train_batch_size,
        gradient_accumulation_steps,
        gradient_checkpointing,
        seed,
        lora_name,
        overwrite,
        save_precision,
        sample_prompts="",
        sample_every_n_steps=0,
        cache_text_encoder_outputs=False,
        save_state_every_n_steps=0,
        resume_from=NO_STATE,
        vae=None,
        network=None,
        optimizer=None,
        noise=None,
        stages=None,
        flow=None,
        speed=None,
    ) -> io.NodeOutput:
        optimizer = optimizer or OptimizerValue(OptimizerConfig(), EMAConfig(), None)
        recipe = TrainingRecipe(
            train=TrainConfig(
                max_train_steps=max_train_steps,
                train_batch_size=train_batch_size,
                gradient_accumulation_steps=gradient_accumulation_steps,
                gradient_checkpointing=gradient_checkpointing,
                seed=seed,
                mixed_precision=_mixed_precision(model),
                save_state_every_n_steps=save_state_every_n_steps,
            ),
            network=network or NetworkConfig(),
            optimizer=optimizer.optimizer,
            noise=noise.noise if noise else NoiseConfig(),
            loss=noise.loss if noise else LossConfig(),
            flow=flow or FlowConfig(),
            captions=latents.buckets.data.captions,
            ema=optimizer.ema,
            blocks=optimizer.blocks,
            speed=speed or SpeedConfig(),
        )
        prompts = parse_prompts(sample_prompts)
        if prompts and vae is None:
            raise ConfigError(
                "Train LoRA: sample_prompts need the VAE input connected (to decode the samples)"
            )
        save_path = lora_save_path(loras_dir(), lora_name)  # a plain name inside models/loras
        cfg = RunConfig(
            model=None,
            dataset=latents.buckets.data.config,
            buckets=latents.buckets.plan.config,
            cache=dataclasses.replace(
                latents.cache, text_encoder_outputs="ram" if cache_text_encoder_outputs else "none"
            ),
            output=OutputConfig(
                output_dir=save_path.parent,
                output_name=save_path.stem,
                save_precision=save_precision,
                overwrite=overwrite,
                state_dir=states_dir(),
            ),
            recipe=recipe,
            stages=tuple(stages or ()),
        )
        resume = None
        if resume_from != NO_STATE:
            # Read outside inference mode: the optimiser updates the state's tensors in place.
            with torch.inference_mode(False):
                resume = load_training_state(state_folder(states_dir(), resume_from))
        sampler = ComfySampleCallback(model, clip, vae, prompts, sample_every_n_steps, seed)
        trained, model_out, clip_out = train_lora_in_comfy(
            ComfyInputs(model, clip, latents, vae),
            cfg,
            cls.hidden.unique_id if cls.hidden else None,
            sampler=sampler,
            resume=resume,
        )
        grid = sampler.grid() or render_loss_plot([], title="no sample prompts given")
        return io.NodeOutput(model_out, clip_out, trained, str(trained.path), _image_tensor(grid))


def _image_tensor(picture) -> torch.Tensor:
    """A PIL image as ComfyUI's IMAGE: (1, H, W, 3) float in 0..1."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)[None]


def _mixed_precision(model) -> str:
    """Autocast (and, for fp16, a grad scaler) matching the dtype ComfyUI runs the model in."""
    dtype = model.model.manual_cast_dtype or model.model.get_dtype()
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no")


class TrainingStages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRATrainer_TrainingStages",
            display_name="Training Stages",
            category=f"{CATEGORY}/config",
            description="Progressive training: one LoRA through stages of growing resolution, each with "
            "its own steps and learning rate; each stage re-buckets and re-encodes at its resolution.",
            inputs=[
                io.String.Input(
                    "stages",
                    default="512 300\n768 200\n1024 100 5e-5",
                    multiline=True,
                    tooltip="One stage per line: resolution, steps, and optionally a learning rate "
                    "(else the optimizer's).",
                ),
            ],
            outputs=[LoraStages.Output(display_name="stages", tooltip="For Train LoRA's stages input.")],
        )

    @classmethod
    def execute(cls, stages) -> io.NodeOutput:
        return io.NodeOutput(parse_stages(stages))


def parse_stages(text: str) -> tuple[StageConfig, ...]:
    """ "512 300 1e-4" per line → StageConfig(resolution=512, max_train_steps=300, learning_rate=1e-4)."""
    parsed = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        try:
            if len(fields) not in (2, 3):
                raise ValueError
            resolution, steps = int(fields[0]), int(fields[1])
            lr = float(fields[2]) if len(fields) == 3 else None
        except ValueError:
            raise ConfigError(
                f"Training Stages: line {number} {line.strip()!r} is not 'resolution steps [learning_rate]', "
                "e.g. '768 200' or '1024 100 5e-5'"
            ) from None
        parsed.append(StageConfig(resolution=resolution, max_train_steps=steps, learning_rate=lr))
    if not parsed:
        raise ConfigError("Training Stages: give at least one stage line, e.g. '512 300'")
    return tuple(parsed)


class EMAExport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRATrainer_EMAExport",
            display_name="EMA Export",
            category=CATEGORY,
            description="Saves the trained LoRA's EMA (or raw) weights as another file in models/loras/.",
            is_output_node=True,
            inputs=[
                LoraTrained.Input("trained", tooltip="From Train LoRA."),
                io.Boolean.Input(
                    "use_ema",
                    default=True,
                    tooltip="Save the EMA weights (needs ema_decay > 0 "
                    "in Configure Optimizer); off saves the raw weights.",
                ),
                io.String.Input("lora_name", default="my_lora_ema", tooltip="File name in models/loras/."),
                io.Boolean.Input(
                    "overwrite", default=False, tooltip="Replace an existing file of that name."
                ),
                io.Combo.Input("save_precision", options=PRECISIONS, default="fp16", tooltip="Saved dtype."),
            ],
            outputs=[io.String.Output(display_name="lora_path", tooltip="Where the file was saved.")],
        )

    @classmethod
    def execute(cls, trained, use_ema, lora_name, overwrite, save_precision) -> io.NodeOutput:
        path = free_save_path(lora_name, overwrite)
        metadata = {**trained.metadata, "ss_output_name": path.stem, "ss_ema_weights": str(use_ema)}
        save_lora(
            path,
            trained.trained.kohya_state_dict(use_ema),
            metadata,
            save_dtype(save_precision),
            overwrite=overwrite,
        )
        return io.NodeOutput(str(path))


class LossPlot(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRATrainer_LossPlot",
            display_name="Loss Plot",
            category=CATEGORY,
            description="The loss curve of a training run (raw and smoothed), as an IMAGE.",
            is_output_node=True,
            inputs=[LoraTrained.Input("trained", tooltip="From Train LoRA.")],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="The loss plot.")],
        )

    @classmethod
    def execute(cls, trained) -> io.NodeOutput:
        image = _image_tensor(render_loss_plot(trained.trained.losses))
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))
