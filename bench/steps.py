"""The two training steps the benchmark compares, built on the same UNet weights and inputs.

Baseline: the textbook step of diffusers' example LoRA scripts
(`examples/text_to_image/train_text_to_image_lora.py`): float32 UNet, peft LoRA
added with `unet.add_adapter`, `torch.autocast(bfloat16)`, MSE against ε,
`clip_grad_norm_`, `torch.optim.AdamW(fused=True)`, and the loss read back with
`.item()` every step for the log.

Ours: `lora_train_core`'s components as `train.py` and `step.py` wire them (bf16 frozen UNet,
kohya LoRA with float32 weights from `network.py`, AdamW from `optim.py`,
`noise.py` and `loss.py` for the noising and the loss), with the options of
`FastPath` on top: the core's [speed] options (`speed.py`, `cuda_graphs.py`: the
same functions `train()` uses) and a few bench-only prototypes. Both draw ε and t
from a generator seeded alike, so they see the same noise and timesteps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_train_core.families import get_family
from lora_train_core.model.diffusers_backend import kohya_alphas_cumprod
from lora_train_core.model.fp8 import store_in_fp8
from lora_train_core.model.kohya_keys import unet_targets
from lora_train_core.model.network import LoRAModule, LoRANetwork, NetworkConfig
from lora_train_core.objective.loss import LossConfig, training_loss
from lora_train_core.objective.noise import NoiseConfig, add_noise, sample_noise, sample_timesteps
from lora_train_core.optim.optimizers import OptimizerConfig, build_optimizer
from lora_train_core.optim.param_groups import build_param_groups
from lora_train_core.run.cuda_graphs import GraphedBackward
from lora_train_core.run.distributed import SINGLE_PROCESS, DataParallel

from .models import Case, StepInputs, build_unet

RANK = 32
LEARNING_RATE = 1e-4
MAX_GRAD_NORM = 1.0
# kohya's default UNet targets: every Linear / 1×1 conv inside a Transformer2DModel
PEFT_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
LORA_PATHS = ("core", "compute_dtype")


@dataclass(frozen=True)
class FastPath:
    """Options of our step; the defaults are the core's step as `step.py` runs it today.

    autocast: run the bf16 UNet under `torch.autocast(bfloat16)`, as step.py does with
        mixed_precision="bf16"; False runs it in plain bf16 (norms stay bf16).
    channels_last: UNet, LoRA convs and the noisy latents in NHWC, so cuDNN skips transposes.
    host_sync: read the loss and the gradient norm back every step, as step.py's NaN guard
        does; False keeps the step free of host syncs, so the CPU queues the next step early.
    lora_path: "core" is network.py's LoRAModule.forward (input cast to float32, LoRA in
        float32 unless autocast recasts it); "compute_dtype" is a bench prototype of a
        proposed change: LoRA weights cast to the activation dtype, up-projection and the add
        fused into one addmm (Linear targets).
    cudnn_benchmark: let cuDNN time its convolution algorithms (`torch.backends.cudnn.benchmark`).
    cuda_graph: speed.cuda_graph: forward, loss and backward replayed from a CUDA graph
        (cuda_graphs.GraphedBackward); clipping and the optimiser step stay eager, as in
        step.py; the noise is drawn outside the graph and copied into its input buffers.
    compile: speed.compile_blocks: torch.compile each block named in COMPILE_BLOCKS[compile].
    optimizer_type: an OptimizerConfig optimizer_type (AdamW is fused on CUDA).
    fp8_base: speed.fp8_base: the frozen Linear/Conv2d weights stored as float8 e4m3fn.
    """

    autocast: bool = True
    channels_last: bool = False
    host_sync: bool = True
    lora_path: str = "core"
    cudnn_benchmark: bool = False
    cuda_graph: bool = False
    compile: str = "none"
    optimizer_type: str = "AdamW"
    fp8_base: bool = False


@dataclass
class StepSetup:
    """A ready training step: `step(generator)` runs one and returns the loss."""

    unet: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    step: Callable[[torch.Generator], Tensor | float]
    network: LoRANetwork | None = None


def build_baseline(case: Case, inputs: StepInputs, device: torch.device, tiny: bool) -> StepSetup:
    """diffusers' example: float32 UNet + peft LoRA (r = α = 32, kohya's modules) + fused AdamW."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    unet = build_unet(case.family, tiny, device)
    unet.add_adapter(
        LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=PEFT_TARGET_MODULES)
    )
    if case.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, fused=device.type == "cuda")
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    step = partial(_baseline_step, unet, inputs, params, optimizer, scheduler)
    return StepSetup(unet, params, optimizer, step)


def _baseline_step(unet, inputs: StepInputs, params, optimizer, scheduler, generator) -> float:
    latents = inputs.latents
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device)
    timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator, device=generator.device)
    noisy = scheduler.add_noise(latents, noise, timesteps.to(latents.device))
    with torch.autocast(latents.device.type, dtype=torch.bfloat16):
        pred = unet(
            noisy,
            timesteps,
            encoder_hidden_states=inputs.text_hidden,
            added_cond_kwargs=inputs.added_cond_kwargs(torch.float32),
        ).sample
    loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach().item()


def build_ours(
    case: Case,
    inputs: StepInputs,
    device: torch.device,
    tiny: bool,
    fast: FastPath,
    weight_dtype: torch.dtype = torch.bfloat16,
) -> StepSetup:
    """lora_train_core's step on a frozen `weight_dtype` UNet, with the options of `fast`."""
    unet = build_unet(case.family, tiny, device).to(weight_dtype)
    if fast.fp8_base:
        store_in_fp8(unet)
    network = LoRANetwork(
        unet_targets(unet, get_family(case.family), include_conv=False),
        NetworkConfig(network_dim=RANK, network_alpha=RANK),
    )
    if case.gradient_checkpointing:
        # as train() with speed.cuda_graph: no dropout, so no RNG state to save (nor to read
        # while a graph records)
        unet.enable_gradient_checkpointing(_checkpoint_without_rng if fast.cuda_graph else None)
    unet.train()
    network.train()
    if fast.channels_last:
        unet.to(memory_format=torch.channels_last)
        network.to(memory_format=torch.channels_last)
    if fast.lora_path == "compute_dtype":
        install_compute_dtype_lora(network)
    else:
        network.apply_to()
    opt_cfg = OptimizerConfig(
        optimizer_type=fast.optimizer_type, learning_rate=LEARNING_RATE, max_grad_norm=MAX_GRAD_NORM
    )
    groups = build_param_groups(network.named_lora_parameters(), case.family, opt_cfg)
    optimizer = build_optimizer(groups, opt_cfg, device)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    step = OurStep(unet, inputs, params, optimizer, kohya_alphas_cumprod().to(device), weight_dtype, fast)
    return StepSetup(unet, params, optimizer, step, network)


def _checkpoint_without_rng(module, *args):
    return torch.utils.checkpoint.checkpoint(
        module.__call__, *args, use_reentrant=False, preserve_rng_state=False
    )


@dataclass
class OurStep:
    """One optimiser step as step.py's `forward_backward` + `optimizer_step` (default options).

    `draw` makes ε, t and x_t from the generator (noise.py); `loss_and_backward` is the part
    step.py records as a CUDA graph with speed.cuda_graph (forward, loss, backward); `update`
    is the eager rest (clipping, optimiser step). Gradients are cleared at the start of
    `train_on`, in place when graphed as step.py does, so that they can be inspected after.
    Calling the step returns the loss as a float with `fast.host_sync`, else as a 0-d tensor.
    """

    unet: nn.Module
    inputs: StepInputs
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    alphas_cumprod: Tensor
    weight_dtype: torch.dtype
    fast: FastPath
    backward_fn: Callable[..., Tensor] | None = None  # a GraphedBackward once use_graphs() ran
    dist: DataParallel = SINGLE_PROCESS  # several processes: gradients averaged as step.py does

    def use_graphs(self) -> None:
        """From the next step on, record (once per shape) and replay `loss_and_backward`."""
        self.backward_fn = GraphedBackward(self.loss_and_backward, self.params)

    def __call__(self, generator: torch.Generator) -> Tensor | float:
        return self.train_on(*self.draw(generator))

    def draw(self, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        latents, noise_cfg = self.inputs.latents, NoiseConfig()
        noise = sample_noise(latents, noise_cfg, generator)
        timesteps = sample_timesteps(latents.shape[0], noise_cfg, generator, latents.device)
        noisy = add_noise(latents, noise, timesteps, self.alphas_cumprod).to(self.weight_dtype)
        if self.fast.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        return noisy, timesteps, noise

    def train_on(self, noisy: Tensor, timesteps: Tensor, noise: Tensor) -> Tensor | float:
        self.optimizer.zero_grad(set_to_none=self.backward_fn is None)
        loss = (self.backward_fn or self.loss_and_backward)(noisy, timesteps, noise)
        self.dist.average_gradients(self.params)
        return self.update(loss)

    def loss_and_backward(self, noisy: Tensor, timesteps: Tensor, noise: Tensor) -> Tensor:
        loss = self.loss(self.predict(noisy, timesteps), timesteps, noise)
        loss.backward()
        return loss.detach()

    def predict(self, noisy: Tensor, timesteps: Tensor) -> Tensor:
        # a recorded graph must not keep autocast's cache of cast weights (as in step.py)
        autocast = torch.autocast(
            noisy.device.type,
            torch.bfloat16,
            enabled=self.fast.autocast,
            cache_enabled=self.backward_fn is None,
        )
        with autocast:
            return self.unet(
                noisy,
                timesteps,
                encoder_hidden_states=self.inputs.text_hidden.to(self.weight_dtype),
                added_cond_kwargs=self.inputs.added_cond_kwargs(self.weight_dtype),
            ).sample

    def loss(self, pred: Tensor, timesteps: Tensor, noise: Tensor) -> Tensor:
        return training_loss(pred, noise, timesteps, self.alphas_cumprod, "epsilon", LossConfig())

    def update(self, loss: Tensor) -> Tensor | float:
        """Clip and step; with host_sync, read the loss and norm back first as step.py's NaN guard
        does (one read for both) and return the loss as a float."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        if self.fast.host_sync:
            loss, norm_value = torch.stack([loss, norm.float()]).tolist()
            if not math.isfinite(loss + norm_value):
                raise FloatingPointError(f"loss {loss}, gradient norm {norm_value}")
        self.optimizer.step()
        return loss


def install_compute_dtype_lora(network: LoRANetwork) -> None:
    """Prototype of a proposed `LoRAModule.forward`: the LoRA path in the activation's dtype.

    network.py casts the activation to float32 (a full read and write of x per module,
    and a float32 copy of x kept for backward) and runs the LoRA matmuls in float32.
    Here the rank-r weights are cast instead (tiny), scale is folded into lora_up, and
    for Linear targets the up-projection and the residual add are one `addmm`. The
    weights stay float32 leaves, so gradients and optimiser state are float32 as before.
    The modules keep their class's layout and `apply_to`, so torch.compile sees one
    forward for all of them (a per-module closure would recompile every block).
    """
    for module in network.modules_by_name.values():
        cfg = (module.dropout, module.rank_dropout, module.module_dropout)
        if any(cfg):
            raise ValueError(f"{module.name}: the compute-dtype prototype has no dropout; got {cfg}")
        module.__class__ = ComputeDtypeLoRAModule
    network.apply_to()


class ComputeDtypeLoRAModule(LoRAModule):
    """LoRAModule whose forward runs the LoRA path in the activation's dtype (see above)."""

    def forward(self, x: Tensor) -> Tensor:
        org = self.org_module
        y = type(org).forward(org, x)
        down = self.lora_down.weight.to(x.dtype)
        up = (self.lora_up.weight * (self.multiplier * self.scale)).to(x.dtype)
        if isinstance(self.lora_down, nn.Conv2d):
            conv = self.lora_down
            h = F.conv2d(x, down, None, conv.stride, conv.padding, conv.dilation)
            return y + F.conv2d(h, up)
        h = F.linear(x, down)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), up.t())
        return out.view(y.shape)
