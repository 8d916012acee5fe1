"""The Flux.1 training steps the benchmark compares (see steps.py for SD).

Baseline: the textbook step of diffusers' Flux LoRA example (`examples/dreambooth/
train_dreambooth_lora_flux.py`): the transformer frozen in bfloat16, peft LoRA added with
`transformer.add_adapter` (its parameters cast to float32, `cast_training_params`), the forward
under `torch.autocast(bfloat16)` (accelerate's bf16 mixed precision), σ from a uniform u through
the shifted FlowMatchEulerDiscreteScheduler table (weighting_scheme "none"), packed latents and
ids, guidance input, MSE against ε − x0, `clip_grad_norm_`, fused AdamW, the loss read back every
step. The LoRA sits on the same modules as ours (kohya's targets: every Linear of the double and
single blocks), with one rank-r pair per diffusers Linear, as peft does.

Ours: the core's step (step.py's `loss_and_backward`, `checked_loss`, `apply_update`) over the
core's Flux backend, through steps.py's `OurStep` with flow draws.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from .models import Case, StepInputs, build_flux_transformer

FLOW_SHIFT = 3.0  # the example's scheduler shift (FLUX.1-dev's scheduler config)
GUIDANCE = 1.0  # kohya's docs' value for training dev; the same in both steps
# kohya's default Flux targets, as diffusers names them (families/flux.py's tables)
PEFT_FLUX_TARGETS = (
    r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|norm1\.linear|norm1_context\.linear)"
    r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out|norm\.linear)"
)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2·W/2, 4C), channels (c, ph, pw): diffusers' FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device: torch.device) -> torch.Tensor:
    """[0, row, col] per packed token (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


def build_flux_baseline(
    case: Case,
    inputs: StepInputs,
    device: torch.device,
    tiny: bool,
    rank: int,
    lr: float,
    weight_dtype: torch.dtype = torch.bfloat16,
):
    """The example's step, its transformer frozen in `weight_dtype` (bf16 there)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from .steps import StepSetup

    transformer = build_flux_transformer(tiny, device, weight_dtype)
    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=PEFT_FLUX_TARGETS)
    )
    cast_training_params(transformer, dtype=torch.float32)
    if case.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, fused=device.type == "cuda")
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT)
    step = partial(_flux_baseline_step, transformer, inputs, params, optimizer, scheduler)
    return StepSetup(transformer, params, optimizer, step)


def _flux_baseline_step(transformer, inputs: StepInputs, params, optimizer, scheduler, generator) -> float:
    x0 = inputs.latents
    b, _, h, w = x0.shape
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
    u = torch.rand((b,), generator=generator, device=generator.device)
    indices = (u * scheduler.config.num_train_timesteps).long().cpu()
    timesteps = scheduler.timesteps[indices].to(x0.device)
    sigmas = scheduler.sigmas.to(x0.device)[indices.to(x0.device)].reshape(b, 1, 1, 1)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    with torch.autocast(x0.device.type, dtype=torch.bfloat16):
        pred = transformer(
            hidden_states=pack(noisy),
            timestep=timesteps / 1000,
            guidance=torch.full((b,), GUIDANCE, device=x0.device),
            pooled_projections=inputs.pooled,
            encoder_hidden_states=inputs.text_hidden,
            txt_ids=torch.zeros(inputs.text_hidden.shape[1], 3, device=x0.device),
            img_ids=image_ids(h, w, x0.device),
            return_dict=False,
        )[0]
    pred = unpack(pred, h, w)
    loss = F.mse_loss(pred.float(), (noise - x0).float(), reduction="none").reshape(b, -1).mean(1).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach().item()
