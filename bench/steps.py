"""The two training steps the benchmark compares, built on the same UNet weights and inputs.

Baseline: the textbook step of diffusers' example LoRA scripts
(`examples/text_to_image/train_text_to_image_lora.py`): the UNet frozen in the mixed-precision
dtype (`baseline_bf16`, what the example does: `weight_dtype` bf16, LoRA parameters cast back to
float32) or in float32 (`baseline`, an earlier column kept for comparison), peft LoRA added with
`unet.add_adapter`, `torch.autocast(bfloat16)`, MSE against ε, `clip_grad_norm_`,
`torch.optim.AdamW(fused=True)`, and the loss read back with `.item()` every step for the log.
Flux's steps are in flux_steps.py.

Ours: the core's own step, `lora_train_core.run.step`'s functions as train.py's loop calls
them (`loss_and_backward`, `checked_loss`, `apply_update`, with a `StepContext` over a
`DiffusersBackend` around the bench's UNet), on a network, optimiser and schedule built as
train() builds them (bf16 frozen UNet under autocast, kohya LoRA with float32 weights). The
options of `FastPath` go on top: the core's [speed] options (`speed.py`, `cuda_graphs.py`: the
same functions train() uses) and a few bench-only prototypes. Both draw ε and t from a
generator seeded alike, so they see the same noise and timesteps.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_train_core.model.backend import TextConditioning
from lora_train_core.model.diffusers_backend import DiffusersBackend
from lora_train_core.model.network import LoRAModule, LoRANetwork, NetworkConfig
from lora_train_core.model.tiny_models import tiny_components
from lora_train_core.objective.flow_loss import guidance_scale_for
from lora_train_core.objective.noise import sample_noise
from lora_train_core.optim.optimizers import OptimizerConfig, build_optimizer
from lora_train_core.optim.param_groups import build_param_groups
from lora_train_core.optim.schedule import build_lr_scheduler
from lora_train_core.run.cuda_graphs import GraphedBackward
from lora_train_core.run.distributed import SINGLE_PROCESS, DataParallel
from lora_train_core.run.speed import SpeedConfig
from lora_train_core.run.step import (
    RandomSources,
    StepContext,
    _ddpm_draws,
    _flow_draws,
    apply_update,
    checked_loss,
    loss_and_backward,
)
from lora_train_core.run.train import TrainConfig, TrainingRecipe, build_network

from .flux_steps import build_flux_baseline
from .models import Case, StepInputs, build_flux_transformer, build_unet, is_flux

RANK = 32
LEARNING_RATE = 1e-4
MAX_GRAD_NORM = 1.0
# kohya's default UNet targets: every Linear / 1×1 conv inside a Transformer2DModel
PEFT_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
LORA_PATHS = ("core", "compute_dtype")


@dataclass(frozen=True)
class FastPath:
    """Options of our step; the defaults are the core's step as train() runs it with
    mixed_precision "bf16" and no [speed] option.

    autocast: mixed_precision "bf16": the UNet under `torch.autocast(bfloat16)`; False is
        mixed_precision "no" (the core's float32 step with float32 weights; with the bench's
        bf16 weights, a plain bf16 step whose norms stay bf16).
    channels_last: bench prototype: UNet, LoRA convs and the noisy latents in NHWC, so cuDNN
        skips transposes.
    host_sync: `checked_loss` reads the loss and the gradient norm back every step for the NaN
        guard; False (bench prototype) clips without the read-back, so that the step has no
        host sync and the CPU queues the next step early.
    lora_path: "core" is network.py's LoRAModule.forward (input cast to float32, LoRA in
        float32 unless autocast recasts it); "compute_dtype" is a bench prototype of a
        proposed change: LoRA weights cast to the activation dtype, up-projection and the add
        fused into one addmm (Linear targets).
    cudnn_benchmark: speed.cudnn_benchmark: cuDNN times its convolution algorithms.
    cuda_graph: speed.cuda_graph: `loss_and_backward` (forward, loss, backward) replayed from
        a CUDA graph (cuda_graphs.GraphedBackward) as train() wraps it; `checked_loss` and
        `apply_update` stay eager; the noise is drawn outside the graph and copied into its
        input buffers.
    compile: speed.compile_blocks: torch.compile each block named in COMPILE_BLOCKS[compile].
    optimizer_type: an OptimizerConfig optimizer_type (AdamW is fused on CUDA).
    fp8_base: speed.fp8_base: the frozen Linear/Conv2d weights stored as float8 e4m3fn (in the
        ComfyUI door: as its loaders store them with weight_dtype fp8_e4m3fn, manual cast).
    door: "cli", the core's diffusers backend, or "comfy", the pack's ComfyBackend over ComfyUI's
        own model of the family (comfy_door.py; needs COMFYUI_DIR).
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
    door: str = "cli"


@dataclass
class StepSetup:
    """A ready training step: `step(generator)` runs one and returns the loss."""

    unet: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    step: Callable[[torch.Generator], Tensor | float]
    network: LoRANetwork | None = None


def build_baseline(
    case: Case,
    inputs: StepInputs,
    device: torch.device,
    tiny: bool,
    weight_dtype: torch.dtype = torch.float32,
) -> StepSetup:
    """diffusers' example: `weight_dtype` UNet + peft LoRA (r = α = 32, kohya's modules, float32
    parameters) + fused AdamW."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    if is_flux(case.family):
        return build_flux_baseline(case, inputs, device, tiny, RANK, LEARNING_RATE, weight_dtype)
    unet = build_unet(case.family, tiny, device).to(weight_dtype)
    unet.add_adapter(
        LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=PEFT_TARGET_MODULES)
    )
    cast_training_params(unet, dtype=torch.float32)
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
    dist: DataParallel = SINGLE_PROCESS,
) -> StepSetup:
    """lora_train_core's step on a frozen `weight_dtype` UNet, built as train() builds it, with the
    options of `fast`; with several processes (`dist`) the gradients are averaged every step."""
    backend = _backend(case, device, tiny, fast, weight_dtype)
    recipe = TrainingRecipe(
        TrainConfig(
            mixed_precision="bf16" if fast.autocast else "no",
            gradient_checkpointing=case.gradient_checkpointing,
        ),
        network=NetworkConfig(network_dim=RANK, network_alpha=RANK, train_text_encoder=False),
        optimizer=OptimizerConfig(
            optimizer_type=fast.optimizer_type, learning_rate=LEARNING_RATE, max_grad_norm=MAX_GRAD_NORM
        ),
        # run_variant applies compile_blocks and cudnn_benchmark, and OurStep.use_graphs the graphs,
        # after the eager step whose FLOPs are counted (train() enters them before its first step)
        speed=SpeedConfig(
            cuda_graph=fast.cuda_graph,
            compile_blocks=fast.compile,
            cudnn_benchmark=fast.cudnn_benchmark,
            fp8_base=fast.fp8_base and fast.door == "cli",  # ComfyUI: the loader's weight dtype
        ),
    )
    network = build_network(backend, recipe)
    _train_mode(backend, network, recipe)
    if fast.channels_last:
        backend.unet.to(memory_format=torch.channels_last)
        network.to(memory_format=torch.channels_last)
    if fast.lora_path == "compute_dtype":
        install_compute_dtype_lora(network)
    else:
        network.apply_to()
    groups = build_param_groups(network.named_lora_parameters(), case.family, recipe.optimizer)
    optimizer = build_optimizer(groups, recipe.optimizer, device)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ctx = StepContext(
        backend,
        dataset=None,  # no dataset and no latent cache: OurStep.draw stands in for draw_batch
        latents=None,
        recipe=recipe,
        alphas_cumprod=backend.alphas_cumprod,
        dist=dist,
        graphed=False,  # until use_graphs
    )
    # as the text encoders (in weight_dtype) would give them
    text = TextConditioning(
        inputs.text_hidden.to(weight_dtype),
        None if inputs.pooled is None else inputs.pooled.to(weight_dtype),
    )
    step = OurStep(
        ctx,
        inputs.latents,
        text,
        inputs.time_ids,
        params,
        optimizer,
        # kohya's default constant schedule: the total only matters to the others
        build_lr_scheduler(optimizer, recipe.optimizer, total_steps=1_000_000),
        torch.amp.GradScaler(device.type, enabled=False),  # only fp16 scales; the bench runs bf16
        host_sync=fast.host_sync,
        channels_last=fast.channels_last,
    )
    return StepSetup(_denoiser(backend), params, optimizer, step, network)


def _backend(case: Case, device: torch.device, tiny: bool, fast: FastPath, weight_dtype: torch.dtype):
    """The backend of `fast.door` around a real-size (or tiny) denoiser of the case's family."""
    if fast.door == "comfy":
        from .comfy_door import build_comfy_backend

        return build_comfy_backend(case.family, tiny, device, weight_dtype, fast.fp8_base)
    # The step runs only the UNet: the bench stands in for cached latents and text-encoder
    # outputs, so the backend's VAE and text encoders are the tiny ones (built first: build_unet
    # reseeds, so the UNet and LoRA weights do not depend on them).
    if is_flux(case.family):
        from lora_train_core.model.flux_backend import FluxBackend
        from lora_train_core.model.tiny_flux import tiny_flux_components

        _, vae, text_encoders, tokenizers = tiny_flux_components(case.family)
        torch.manual_seed(0)  # as build_unet seeds; made in weight_dtype: 12 B float32 weights hold 48 GB
        unet, backend_class = build_flux_transformer(tiny, device, weight_dtype), FluxBackend
    else:
        _, vae, text_encoders, tokenizers = tiny_components(case.family)
        unet, backend_class = build_unet(case.family, tiny, device), DiffusersBackend
    return backend_class(
        unet,
        vae,
        text_encoders,
        tokenizers,
        family=case.family,
        device=device,
        weight_dtype=weight_dtype,
        fp8_base=fast.fp8_base,
    )


def _denoiser(backend) -> nn.Module:
    """The module the speed options compile: the UNet / transformer of either door's backend."""
    return backend.diffusion_model if hasattr(backend, "diffusion_model") else backend.unet


def _train_mode(backend: DiffusersBackend, network: LoRANetwork, recipe: TrainingRecipe) -> None:
    """Train mode (and gradient checkpointing) as train.py's `_training_mode` enters it."""
    network.train()
    if recipe.train.gradient_checkpointing:
        # with speed.cuda_graph no RNG state may be read while a graph records (nor is one needed)
        backend.set_gradient_checkpointing(True, preserve_rng_state=not recipe.speed.cuda_graph)
        for module in backend.trainable_modules():
            module.train()


@dataclass
class OurStep:
    """One optimiser step through step.py's own functions, as train.py's loop calls them.

    `draw` stands in for `draw_batch` and the text encoding: fixed latents (a latent cache
    without random crops) and fixed text-encoder outputs, fresh noise and timesteps from the
    generator in draw_batch's order of draws. `backward` is step.py's `loss_and_backward`
    (predict, loss, backward), replayed from CUDA graphs once `use_graphs` ran, as train()
    wraps it with speed.cuda_graph; its loss is averaged over processes as `forward_backward`
    does. `update` is `checked_loss` (gradients averaged and clipped, the NaN guard's one
    read-back) then `apply_update` (optimiser and schedule step, gradients cleared).
    With `host_sync` False (a bench prototype) `checked_loss` gives way to
    `clip_without_sync` and the loss comes back as a 0-d tensor instead of a float.
    """

    ctx: StepContext
    latents: Tensor
    text: TextConditioning
    size_conditioning: Tensor | None  # SDXL's time ids; None for SD1.5, whose backend ignores them
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    host_sync: bool = True
    channels_last: bool = False  # bench prototype: the noisy latents in NHWC, as the UNet
    steps: int = 0
    backward: Callable[..., Tensor] = field(init=False)

    def __post_init__(self):
        self.backward = partial(loss_and_backward, self.ctx, self.scaler)

    def use_graphs(self) -> None:
        """From the next step on, record (once per shape) and replay `loss_and_backward`, as
        train() does from its first step with speed.cuda_graph."""
        self.ctx = replace(self.ctx, graphed=True)
        self.backward = GraphedBackward(partial(loss_and_backward, self.ctx, self.scaler), self.params)

    def __call__(self, generator: torch.Generator) -> Tensor | float:
        return self.update(self.ctx.dist.mean(self.backward(*self.draw(generator))))

    def draw(self, generator: torch.Generator) -> tuple[Tensor | None, ...]:
        """`loss_and_backward`'s inputs for one batch, drawn by draw_batch's own functions: DDPM
        t, x_t and ε or v, or flow σ, x_t and ε − x0 with the guidance input."""
        ctx, latents = self.ctx, self.latents
        noise = sample_noise(latents, ctx.recipe.noise, generator)
        rng = RandomSources(generator, random.Random(0))  # captions are not drawn here
        draws = _flow_draws if ctx.is_flow else _ddpm_draws
        noisy, timesteps, target = draws(ctx, latents, noise, rng)
        guidance = None
        if ctx.is_flow:
            value = guidance_scale_for(ctx.recipe.flow, ctx.backend.family_spec)
            if value is not None:
                guidance = torch.full((len(latents),), value, device=latents.device)
        if self.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        # every process computes an equal share of the global batch
        loss_weight = ctx.dist.loss_weight(ctx.dist.world_size * len(latents))
        return (
            noisy,
            timesteps,
            self.text.hidden,
            self.text.pooled,
            self.text.attention_mask,
            self.size_conditioning,
            guidance,
            target,
            None,  # every sample's loss weight is 1
            torch.full((), loss_weight, device=latents.device),
        )

    def update(self, loss: Tensor) -> Tensor | float:
        self.steps += 1
        if self.host_sync:
            loss = checked_loss(self.ctx, self.params, self.optimizer, self.scaler, [loss], self.steps)
        else:
            clip_without_sync(self.ctx, self.params)
        apply_update(self.ctx, self.optimizer, self.scaler, self.scheduler, None, self.steps, self.steps)
        return loss


def clip_without_sync(ctx: StepContext, params: list[nn.Parameter]) -> None:
    """`checked_loss` without its read-back (bench prototype): gradients averaged and clipped as
    there, but no NaN guard, so that nothing waits for the GPU and the host runs ahead."""
    ctx.dist.average_gradients(params)
    torch.nn.utils.clip_grad_norm_(params, ctx.recipe.optimizer.max_grad_norm)


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
