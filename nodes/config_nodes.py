"""Configure Noise, Configure Optimizer and Configure Network: each builds one validated core config."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..lora_train_core.ema import EMAConfig
from ..lora_train_core.loss import LossConfig
from ..lora_train_core.network import NetworkConfig
from ..lora_train_core.noise import NoiseConfig
from ..lora_train_core.optim import OPTIMIZERS, OptimizerConfig
from .values import CATEGORY, LoraNetwork, LoraNoise, LoraOptimizer, NoiseValue

SCHEDULERS = [
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "adafactor",
]


class ConfigureNoise(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRATrainer_ConfigureNoise",
            display_name="Configure Noise",
            category=f"{CATEGORY}/config",
            description="Noise offset, pyramid noise, timestep range and loss weighting (kohya's options).",
            inputs=[
                io.Float.Input(
                    "noise_offset",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Offset noise strength (0.05-0.1 typical; 0 = off).",
                ),
                io.Boolean.Input(
                    "noise_offset_random_strength",
                    default=False,
                    tooltip="Scale the offset by U(0,1) each batch.",
                ),
                io.Float.Input(
                    "adaptive_noise_scale",
                    default=0.0,
                    min=-1.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Adds this x |latent channel mean| to the offset (needs noise_offset).",
                ),
                io.Int.Input(
                    "multires_noise_iterations",
                    default=0,
                    min=0,
                    max=10,
                    tooltip="Pyramid noise levels (6-10 typical; 0 = off).",
                ),
                io.Float.Input(
                    "multires_noise_discount",
                    default=0.3,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Weight d^i of pyramid level i.",
                ),
                io.Float.Input(
                    "ip_noise_gamma",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Input perturbation noise (0.1 typical; 0 = off).",
                ),
                io.Int.Input(
                    "min_timestep", default=0, min=0, max=1000, tooltip="Smallest timestep sampled."
                ),
                io.Int.Input(
                    "max_timestep", default=1000, min=0, max=1000, tooltip="Timesteps are drawn below this."
                ),
                io.Float.Input(
                    "min_snr_gamma",
                    default=0.0,
                    min=0.0,
                    max=20.0,
                    step=0.5,
                    tooltip="Min-SNR-gamma loss weighting (5 recommended; 0 = off).",
                ),
                io.Combo.Input(
                    "loss_type",
                    options=["l2", "l1", "huber", "smooth_l1"],
                    default="l2",
                    tooltip="Per-element loss.",
                ),
                io.Boolean.Input(
                    "debiased_estimation_loss",
                    default=False,
                    tooltip="Weight the loss by 1/sqrt(SNR) (kohya debiased_estimation_loss).",
                ),
            ],
            outputs=[LoraNoise.Output(display_name="noise", tooltip="Noise and loss settings.")],
        )

    @classmethod
    def execute(
        cls,
        noise_offset,
        noise_offset_random_strength,
        adaptive_noise_scale,
        multires_noise_iterations,
        multires_noise_discount,
        ip_noise_gamma,
        min_timestep,
        max_timestep,
        min_snr_gamma,
        loss_type,
        debiased_estimation_loss,
    ) -> io.NodeOutput:
        noise = NoiseConfig(
            noise_offset=noise_offset,
            noise_offset_random_strength=noise_offset_random_strength,
            adaptive_noise_scale=adaptive_noise_scale,
            multires_noise_iterations=multires_noise_iterations,
            multires_noise_discount=multires_noise_discount,
            ip_noise_gamma=ip_noise_gamma,
            min_timestep=min_timestep,
            max_timestep=max_timestep,
        )
        loss = LossConfig(
            loss_type=loss_type,
            min_snr_gamma=min_snr_gamma,
            debiased_estimation_loss=debiased_estimation_loss,
        )
        return io.NodeOutput(NoiseValue(noise, loss))


class ConfigureOptimizer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRATrainer_ConfigureOptimizer",
            display_name="Configure Optimizer",
            category=f"{CATEGORY}/config",
            description="Optimiser, learning rates, LR schedule and EMA of the LoRA weights.",
            inputs=[
                io.Combo.Input(
                    "optimizer_type",
                    options=list(OPTIMIZERS),
                    default="AdamW",
                    tooltip="AdamW (default), Prodigy (use lr 1.0), Lion, Adafactor, 8-bit (CUDA).",
                ),
                io.Float.Input(
                    "learning_rate",
                    default=1e-4,
                    min=0.0,
                    max=10.0,
                    step=1e-5,
                    round=1e-7,
                    tooltip="Base learning rate (1e-4 for AdamW; 1.0 for Prodigy).",
                ),
                io.Float.Input(
                    "text_encoder_lr",
                    default=0.0,
                    min=0.0,
                    max=10.0,
                    step=1e-5,
                    round=1e-7,
                    tooltip="Text-encoder LoRA lr; 0 = same as learning_rate.",
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
                io.Int.Input(
                    "lr_warmup_steps",
                    default=0,
                    min=0,
                    max=100000,
                    tooltip="Warm-up steps (not with 'constant': use constant_with_warmup).",
                ),
                io.Float.Input(
                    "max_grad_norm",
                    default=1.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    tooltip="Gradient clipping norm (0 = off).",
                ),
                io.Float.Input(
                    "ema_decay",
                    default=0.0,
                    min=0.0,
                    max=0.99999,
                    step=0.0001,
                    round=1e-5,
                    tooltip="Keep an EMA of the LoRA weights with this decay (0.999 typical; 0 = off).",
                ),
            ],
            outputs=[LoraOptimizer.Output(display_name="optimizer", tooltip="Optimiser settings.")],
        )

    @classmethod
    def execute(
        cls,
        optimizer_type,
        learning_rate,
        text_encoder_lr,
        optimizer_args,
        lr_scheduler,
        lr_warmup_steps,
        max_grad_norm,
        ema_decay,
    ) -> io.NodeOutput:
        optimizer = OptimizerConfig(
            optimizer_type=optimizer_type,
            learning_rate=learning_rate,
            text_encoder_lr=(text_encoder_lr,) if text_encoder_lr > 0 else None,
            optimizer_args=tuple(optimizer_args.split()),
            lr_scheduler=lr_scheduler,
            lr_warmup_steps=lr_warmup_steps,
            max_grad_norm=max_grad_norm,
        )
        ema = EMAConfig(enabled=True, decay=ema_decay) if ema_decay > 0 else EMAConfig()
        return io.NodeOutput((optimizer, ema))


class ConfigureNetwork(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoRATrainer_ConfigureNetwork",
            display_name="Configure Network",
            category=f"{CATEGORY}/config",
            description="LoRA rank, alpha, conv layers, dropouts and which parts train.",
            inputs=[
                io.Int.Input("network_dim", default=16, min=1, max=1024, tooltip="LoRA rank."),
                io.Float.Input(
                    "network_alpha",
                    default=8.0,
                    min=0.0,
                    max=1024.0,
                    step=0.5,
                    tooltip="Scale is alpha/rank (0 = rank).",
                ),
                io.Int.Input(
                    "conv_dim",
                    default=0,
                    min=0,
                    max=1024,
                    tooltip="Rank for 3x3 ResNet convolutions (0 = off).",
                ),
                io.Float.Input(
                    "conv_alpha", default=1.0, min=0.0, max=1024.0, step=0.5, tooltip="Conv alpha."
                ),
                io.Float.Input(
                    "network_dropout",
                    default=0.0,
                    min=0.0,
                    max=0.99,
                    step=0.01,
                    tooltip="Dropout on the LoRA down projection's output.",
                ),
                io.Float.Input(
                    "rank_dropout",
                    default=0.0,
                    min=0.0,
                    max=0.99,
                    step=0.01,
                    tooltip="Drop whole ranks per sample (rescaled).",
                ),
                io.Float.Input(
                    "module_dropout",
                    default=0.0,
                    min=0.0,
                    max=0.99,
                    step=0.01,
                    tooltip="Skip a whole LoRA module with this probability.",
                ),
                io.Boolean.Input(
                    "train_text_encoder",
                    default=False,
                    tooltip="Also train text-encoder LoRA "
                    "(not yet supported inside ComfyUI: train from the CLI).",
                ),
            ],
            outputs=[LoraNetwork.Output(display_name="network", tooltip="LoRA network settings.")],
        )

    @classmethod
    def execute(
        cls,
        network_dim,
        network_alpha,
        conv_dim,
        conv_alpha,
        network_dropout,
        rank_dropout,
        module_dropout,
        train_text_encoder,
    ) -> io.NodeOutput:
        return io.NodeOutput(
            NetworkConfig(
                network_dim=network_dim,
                network_alpha=network_alpha,
                conv_dim=conv_dim,
                conv_alpha=conv_alpha,
                network_dropout=network_dropout,
                rank_dropout=rank_dropout,
                module_dropout=module_dropout,
                train_text_encoder=train_text_encoder,
            )
        )
