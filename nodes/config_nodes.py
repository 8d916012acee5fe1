"""Configure Noise, Optimizer, Network, Flow and Speed: each builds validated core configs.

Widget ids are the core config's field names (kohya's option names), so a
node passes its widgets straight into the dataclass that validates them.
"""

from __future__ import annotations

import dataclasses
import re

from comfy_api.v0_0_2 import io

from ..lora_train_core.errors import ConfigError
from ..lora_train_core.model.network import NetworkConfig
from ..lora_train_core.objective.flow import (
    MODE_SCALE_MAX,
    MODEL_PREDICTION_TYPES,
    TIMESTEP_SAMPLINGS,
    WEIGHTING_SCHEMES,
    FlowConfig,
)
from ..lora_train_core.objective.loss import LossConfig
from ..lora_train_core.objective.noise import NoiseConfig
from ..lora_train_core.optim.ema import EMAConfig
from ..lora_train_core.optim.optimizers import LR_SCHEDULERS, OPTIMIZERS, OptimizerConfig
from ..lora_train_core.optim.param_groups import BlockWeights
from ..lora_train_core.run.speed import COMPILE_BLOCKS, SpeedConfig
from .values import (
    CATEGORY,
    LoraFlow,
    LoraNetwork,
    LoraNoise,
    LoraOptimizer,
    LoraSpeed,
    NoiseValue,
    OptimizerValue,
)

SCHEDULERS = list(LR_SCHEDULERS)


def _fields(widgets: dict, *classes: type) -> tuple[dict, ...]:
    """`widgets` split into one keyword dict per config class, by field name.

    A widget that names no field of any class raises TypeError (a node bug): dropped, its
    setting would be accepted and ignored. A node takes out the widgets it converts itself
    before calling this.
    """
    parts: tuple[dict, ...] = tuple({} for _ in classes)
    names = [{f.name for f in dataclasses.fields(cls)} for cls in classes]
    unmatched = []
    for name, value in widgets.items():
        owners = [part for part, fields in zip(parts, names, strict=True) if name in fields]
        if len(owners) != 1:
            unmatched.append(name)
            continue
        owners[0][name] = value
    if unmatched:
        listed = " or ".join(cls.__name__ for cls in classes)
        raise TypeError(f"widgets {unmatched} name no single field of {listed}; the node must handle them")
    return parts


def _f(name, default, lo, hi, step, tooltip, **extra):
    return io.Float.Input(name, default=default, min=lo, max=hi, step=step, tooltip=tooltip, **extra)


class ConfigureNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRATrainer_ConfigureNoise",
            display_name="Configure Noise",
            category=f"{CATEGORY}/config",
            description="Noise offset, pyramid noise, timestep range and loss weighting (kohya's options).",
            inputs=[
                _f("noise_offset", 0.0, 0.0, 1.0, 0.01, "Offset noise strength (0.05-0.1 typical; 0 = off)."),
                io.Boolean.Input(
                    "noise_offset_random_strength",
                    default=False,
                    tooltip="Scale the offset by U(0,1) each batch.",
                ),
                _f(
                    "adaptive_noise_scale",
                    0.0,
                    -1.0,
                    1.0,
                    0.01,
                    "Adds this x |latent channel mean| to the offset (needs noise_offset).",
                ),
                io.Int.Input(
                    "multires_noise_iterations",
                    default=0,
                    min=0,
                    max=10,
                    tooltip="Pyramid noise levels (6-10 typical; 0 = off).",
                ),
                _f("multires_noise_discount", 0.3, 0.0, 1.0, 0.01, "Weight d^i of pyramid level i."),
                _f("ip_noise_gamma", 0.0, 0.0, 1.0, 0.01, "Input perturbation noise (0.1 typical; 0 = off)."),
                io.Boolean.Input(
                    "ip_noise_gamma_random_strength",
                    default=False,
                    tooltip="Scale ip_noise_gamma by U(0,1) each batch.",
                ),
                io.Int.Input(
                    "min_timestep", default=0, min=0, max=1000, tooltip="Smallest timestep sampled."
                ),
                io.Int.Input(
                    "max_timestep", default=1000, min=0, max=1000, tooltip="Timesteps are drawn below this."
                ),
                _f(
                    "min_snr_gamma",
                    0.0,
                    0.0,
                    20.0,
                    0.5,
                    "Min-SNR-gamma loss weighting (5 recommended; 0 = off).",
                ),
                io.Combo.Input(
                    "loss_type",
                    options=["l2", "l1", "huber", "smooth_l1"],
                    default="l2",
                    tooltip="Per-element loss.",
                ),
                io.Combo.Input(
                    "huber_schedule",
                    options=["snr", "exponential", "constant"],
                    default="snr",
                    tooltip="How huber/smooth_l1's c varies with the timestep.",
                ),
                _f("huber_c", 0.1, 0.0001, 1.0, 0.01, "huber/smooth_l1 c (kohya huber_c)."),
                _f("huber_scale", 1.0, 0.0001, 10.0, 0.1, "Scale of c for constant/exponential schedules."),
                io.Boolean.Input(
                    "debiased_estimation_loss",
                    default=False,
                    tooltip="Weight the loss by 1/sqrt(SNR) (kohya debiased_estimation_loss).",
                ),
                io.Boolean.Input(
                    "scale_v_pred_loss_like_noise_pred",
                    default=False,
                    tooltip="v-prediction models only: scale the loss like an epsilon model's.",
                ),
                _f(
                    "v_pred_like_loss",
                    0.0,
                    0.0,
                    10.0,
                    0.01,
                    "Epsilon models only: add a v-prediction-like loss term with this weight.",
                ),
                io.Boolean.Input(
                    "zero_terminal_snr",
                    default=False,
                    tooltip="v-prediction models only: rescale the schedule to zero terminal SNR.",
                ),
            ],
            outputs=[LoraNoise.Output(display_name="noise", tooltip="Noise and loss settings.")],
        )

    @classmethod
    def execute(cls, **widgets) -> io.NodeOutput:
        noise, loss = _fields(widgets, NoiseConfig, LossConfig)
        return io.NodeOutput(NoiseValue(NoiseConfig(**noise), LossConfig(**loss)))


class ConfigureOptimizer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRATrainer_ConfigureOptimizer",
            display_name="Configure Optimizer",
            category=f"{CATEGORY}/config",
            description="Optimiser, learning rates, LR schedule, block-wise LR weights and EMA.",
            inputs=[
                io.Combo.Input(
                    "optimizer_type",
                    options=list(OPTIMIZERS),
                    default="AdamW",
                    tooltip="AdamW (default), Prodigy (use lr 1.0), Lion, Adafactor, 8-bit (CUDA).",
                ),
                _f(
                    "learning_rate",
                    1e-4,
                    0.0,
                    10.0,
                    1e-5,
                    "Base learning rate (1e-4 for AdamW; 1.0 for Prodigy).",
                    round=1e-7,
                ),
                _f("unet_lr", 0.0, 0.0, 10.0, 1e-5, "UNet LoRA lr; 0 = learning_rate.", round=1e-7),
                _f(
                    "text_encoder_lr",
                    0.0,
                    0.0,
                    10.0,
                    1e-5,
                    "Text-encoder LoRA lr; 0 = learning_rate.",
                    round=1e-7,
                ),
                io.String.Input(
                    "optimizer_args",
                    default="",
                    tooltip="kohya optimizer_args, space separated "
                    "key=value, e.g. 'weight_decay=0.01 betas=0.9,0.99'.",
                ),
                io.Combo.Input(
                    "lr_scheduler", options=SCHEDULERS, default="constant", tooltip="LR schedule."
                ),
                _f(
                    "lr_warmup_steps",
                    0.0,
                    0.0,
                    100000.0,
                    1.0,
                    "Warm-up: whole steps, or a fraction < 1 of all "
                    "steps (not with 'constant': use constant_with_warmup).",
                ),
                io.Int.Input(
                    "lr_scheduler_num_cycles",
                    default=1,
                    min=1,
                    max=1000,
                    tooltip="Restarts of cosine_with_restarts.",
                ),
                _f("lr_scheduler_power", 1.0, 0.0, 10.0, 0.1, "Power of the polynomial schedule."),
                _f("max_grad_norm", 1.0, 0.0, 100.0, 0.1, "Gradient clipping norm (0 = off)."),
                _f(
                    "loraplus_lr_ratio",
                    0.0,
                    0.0,
                    64.0,
                    1.0,
                    "LoRA+: lora_up weights train at lr x ratio (16 typical; 0 = off).",
                ),
                io.Int.Input(
                    "stop_text_encoder_training",
                    default=0,
                    min=0,
                    max=1_000_000,
                    tooltip="Text-encoder LoRA stops training after this step (0 = never).",
                ),
                io.String.Input(
                    "down_lr_weight",
                    default="",
                    tooltip="Block-wise LR weights of the down blocks: "
                    "numbers separated by commas, or a preset (cosine, sine, linear, "
                    "reverse_linear, zeros, optionally +base). Empty = off.",
                ),
                io.String.Input(
                    "mid_lr_weight", default="", tooltip="LR weight of the mid block(s). Empty = off."
                ),
                io.String.Input(
                    "up_lr_weight", default="", tooltip="Block-wise LR weights of the up blocks."
                ),
                _f(
                    "block_lr_zero_threshold",
                    0.0,
                    0.0,
                    1.0,
                    0.01,
                    "Blocks weighted at or below this do not train.",
                ),
                _f(
                    "ema_decay",
                    0.0,
                    0.0,
                    0.99999,
                    0.0001,
                    "Keep an EMA of the LoRA weights with this decay (0.999 typical; 0 = off).",
                    round=1e-5,
                ),
                io.Int.Input(
                    "ema_update_every",
                    default=1,
                    min=1,
                    max=1000,
                    tooltip="Update the EMA every N optimiser steps.",
                ),
                io.Boolean.Input("ema_on_cpu", default=False, tooltip="Keep the EMA weights in CPU memory."),
            ],
            outputs=[LoraOptimizer.Output(display_name="optimizer", tooltip="Optimiser settings.")],
        )

    @classmethod
    def execute(cls, **w) -> io.NodeOutput:
        # the block and EMA widgets are taken out here; every other one is an OptimizerConfig field
        blocks = BlockWeights(
            down_lr_weight=_block_weights(w.pop("down_lr_weight")),
            mid_lr_weight=_block_weights(w.pop("mid_lr_weight")),
            up_lr_weight=_block_weights(w.pop("up_lr_weight")),
            block_lr_zero_threshold=w.pop("block_lr_zero_threshold"),
        )
        ema_decay = w.pop("ema_decay")
        ema = EMAConfig(
            enabled=ema_decay > 0,
            decay=ema_decay or EMAConfig.decay,
            update_every=w.pop("ema_update_every"),
            device="cpu" if w.pop("ema_on_cpu") else "same",
        )
        (fields,) = _fields(w, OptimizerConfig)
        optimizer = OptimizerConfig(
            **{
                **fields,
                "unet_lr": w["unet_lr"] or None,
                "text_encoder_lr": (w["text_encoder_lr"],) if w["text_encoder_lr"] > 0 else None,
                "optimizer_args": tuple(w["optimizer_args"].split()),
            }
        )
        return io.NodeOutput(OptimizerValue(optimizer, ema, blocks if blocks.is_set else None))


def _block_weights(text: str) -> tuple[float, ...] | str | None:
    """ "1, 0.5, 0" → (1.0, 0.5, 0.0); a preset name passes through to BlockWeights; "" → None."""
    text = text.strip()
    if not text:
        return None
    if re.fullmatch(r"[0-9.,\s+-]+", text):
        return tuple(float(v) for v in text.split(",") if v.strip())
    return text


_NET = NetworkConfig()  # the core's defaults: the node without edits trains what the CLI trains


class ConfigureNetwork(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRATrainer_ConfigureNetwork",
            display_name="Configure Network",
            category=f"{CATEGORY}/config",
            description="LoRA rank, alpha, conv layers, dropouts and which parts train.",
            inputs=[
                io.Int.Input("network_dim", default=_NET.network_dim, min=1, max=1024, tooltip="LoRA rank."),
                _f("network_alpha", _NET.network_alpha, 0.0, 1024.0, 0.5, "Scale is alpha/rank (0 = rank)."),
                io.Int.Input(
                    "conv_dim",
                    default=_NET.conv_dim,
                    min=0,
                    max=1024,
                    tooltip="Rank for 3x3 ResNet convolutions (0 = off).",
                ),
                _f("conv_alpha", _NET.conv_alpha, 0.0, 1024.0, 0.5, "Conv alpha."),
                _f("network_dropout", 0.0, 0.0, 0.99, 0.01, "Dropout on the LoRA down projection's output."),
                _f("rank_dropout", 0.0, 0.0, 0.99, 0.01, "Drop whole ranks per sample (rescaled)."),
                _f("module_dropout", 0.0, 0.0, 0.99, 0.01, "Skip a whole LoRA module with this probability."),
                io.Boolean.Input(
                    "train_text_encoder",
                    default=_NET.train_text_encoder,
                    tooltip="Also train LoRA on the text encoder(s) (kohya's default); "
                    "off trains the UNet only.",
                ),
                *(
                    io.String.Input(
                        name,
                        default="",
                        tooltip=f"kohya {name}: one value per UNet block, "
                        "comma separated (25 for SD1.5, 23 for SDXL); empty = off.",
                    )
                    for name in BLOCK_LISTS
                ),
            ],
            outputs=[LoraNetwork.Output(display_name="network", tooltip="LoRA network settings.")],
        )

    @classmethod
    def execute(cls, **widgets) -> io.NodeOutput:
        lists = {name: _numbers(name, widgets.pop(name, "")) for name in BLOCK_LISTS}
        for name in ("block_dims", "conv_block_dims"):
            if lists[name] is not None:
                if not all(v.is_integer() for v in lists[name]):
                    raise ConfigError(f"Configure Network: {name} must be whole numbers (ranks)")
                lists[name] = tuple(int(v) for v in lists[name])
        return io.NodeOutput(NetworkConfig(**widgets, **lists))


BLOCK_LISTS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")


def _numbers(field: str, text: str) -> tuple[float, ...] | None:
    """ "4, 4, 8" → (4.0, 4.0, 8.0); "" → None."""
    if not text.strip():
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(
            f"Configure Network: {field} {text!r} is not a comma-separated list of numbers"
        ) from None


_FLOW = FlowConfig()
FAMILY_GUIDANCE = -1.0  # guidance_scale widget value meaning "unset: the family's default"


class ConfigureFlow(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRATrainer_ConfigureFlow",
            display_name="Configure Flow",
            category=f"{CATEGORY}/config",
            description="Flow-matching options for Flux.1 / Chroma (kohya's flux_train_network options): "
            "how the noise level σ is drawn, loss weighting, prediction type, guidance. Refused for "
            "SD1.x/SDXL models.",
            inputs=[
                io.Combo.Input(
                    "timestep_sampling",
                    options=list(TIMESTEP_SAMPLINGS),
                    default=_FLOW.timestep_sampling,
                    tooltip="sigma: kohya's scheduler table (shaped by discrete_flow_shift and the "
                    "density weighting schemes); uniform; sigmoid; shift; flux_shift (resolution-dependent).",
                ),
                _f(
                    "sigmoid_scale",
                    _FLOW.sigmoid_scale,
                    0.01,
                    10.0,
                    0.01,
                    "s in sigmoid(s·z) (sigmoid/shift/flux_shift).",
                ),
                _f(
                    "discrete_flow_shift",
                    _FLOW.discrete_flow_shift,
                    0.01,
                    100.0,
                    0.01,
                    "Shift S for 'shift' and 'sigma' (3.1582 matches Flux-dev's inference shift).",
                ),
                io.Combo.Input(
                    "weighting_scheme",
                    options=list(WEIGHTING_SCHEMES),
                    default=_FLOW.weighting_scheme,
                    tooltip="logit_normal/mode: density of σ (timestep_sampling 'sigma'); "
                    "sigma_sqrt/cosmap: loss weight (model_prediction_type 'sigma_scaled').",
                ),
                _f("logit_mean", _FLOW.logit_mean, -5.0, 5.0, 0.01, "logit_normal: mean."),
                _f("logit_std", _FLOW.logit_std, 0.01, 5.0, 0.01, "logit_normal: standard deviation."),
                _f("mode_scale", _FLOW.mode_scale, -1.0, MODE_SCALE_MAX, 0.01, "mode: scale c."),
                io.Combo.Input(
                    "model_prediction_type",
                    options=list(MODEL_PREDICTION_TYPES),
                    default=_FLOW.model_prediction_type,
                    tooltip="raw (recommended by kohya's docs): the velocity as is; sigma_scaled: "
                    "kohya's Flux default, for reproducing kohya runs.",
                ),
                _f(
                    "guidance_scale",
                    FAMILY_GUIDANCE,
                    FAMILY_GUIDANCE,
                    100.0,
                    0.1,
                    "Flux.1-dev's guidance input; -1 = the model's default (1.0 for Flux.1-dev). "
                    "Models without a guidance input refuse any other value.",
                ),
            ],
            outputs=[LoraFlow.Output(display_name="flow", tooltip="For Train LoRA's flow input.")],
        )

    @classmethod
    def execute(cls, guidance_scale=FAMILY_GUIDANCE, **widgets) -> io.NodeOutput:
        (flow,) = _fields(widgets, FlowConfig)
        guidance = None if guidance_scale == FAMILY_GUIDANCE else guidance_scale
        return io.NodeOutput(FlowConfig(**flow, guidance_scale=guidance))


class ConfigureSpeed(io.ComfyNode):
    """The core's [speed] options (run/speed.py) in the ComfyUI door. float8 weights are not here:
    in ComfyUI the loader's weight_dtype decides them (Load Diffusion Model's fp8_e4m3fn)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRATrainer_ConfigureSpeed",
            display_name="Configure Speed",
            category=f"{CATEGORY}/config",
            description="Faster steps on an NVIDIA GPU; none changes what a step computes. The first "
            "steps of each bucket shape are slower (recording; compiling takes 0.5-2 minutes once).",
            inputs=[
                io.Boolean.Input(
                    "cuda_graph",
                    default=False,
                    tooltip="Replay forward + backward from one CUDA graph per bucket shape (CUDA only; "
                    "no text-encoder training, no network dropout, no fp16 model). Holds ~1 GiB more.",
                ),
                io.Combo.Input(
                    "compile_blocks",
                    options=list(COMPILE_BLOCKS),
                    default="none",
                    tooltip="torch.compile each repeated block of the model (transformer blocks; with "
                    "+resnet also the UNet's ResBlocks).",
                ),
                io.Boolean.Input(
                    "cudnn_benchmark",
                    default=False,
                    tooltip="cuDNN times its convolution algorithms per shape.",
                ),
            ],
            outputs=[LoraSpeed.Output(display_name="speed", tooltip="Speed settings, into Train LoRA.")],
        )

    @classmethod
    def execute(cls, cuda_graph, compile_blocks, cudnn_benchmark) -> io.NodeOutput:
        return io.NodeOutput(SpeedConfig(cuda_graph, compile_blocks, cudnn_benchmark))
