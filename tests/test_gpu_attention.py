"""Training runs with scaled-dot-product attention off cuDNN's kernel (run/speed.py).

torch 2.11 on an H200 crashed with an illegal memory access in cuDNN attention's backward of a
real-size Flux.1 step at 1024²; flash and memory-efficient attention ran. The first test holds on
any machine; the second runs a real-size Flux double block's forward and backward at 1024² on a
GPU, under the guard, and is skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from lora_train_core.run.speed import SpeedConfig, speedups, without_cudnn_attention


def test_a_run_turns_cudnn_attention_off_and_gives_the_setting_back():
    torch.backends.cuda.enable_cudnn_sdp(True)
    with speedups([], SpeedConfig()):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with pytest.raises(RuntimeError), without_cudnn_attention():
        raise RuntimeError("a failed step")
    assert torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: real-size Flux attention")
def test_a_real_size_flux_block_trains_at_1024_under_the_guard():
    from diffusers.models.embeddings import FluxPosEmbed
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    torch.manual_seed(0)
    device, dtype = torch.device("cuda"), torch.bfloat16
    block = FluxTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128).to(device, dtype)
    image, text = 64 * 64, 512  # 1024² latents packed 2×2, and T5's 512 tokens
    hidden = torch.randn(1, image, 3072, device=device, dtype=dtype, requires_grad=True)
    context = torch.randn(1, text, 3072, device=device, dtype=dtype, requires_grad=True)
    temb = torch.randn(1, 3072, device=device, dtype=dtype)
    ids = torch.zeros(text + image, 3, device=device)
    ids[text:, 1] = torch.arange(64, device=device).repeat_interleave(64).float()
    ids[text:, 2] = torch.arange(64, device=device).repeat(64).float()
    rotary = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)
    with without_cudnn_attention():
        context_out, hidden_out = block(hidden, context, temb, image_rotary_emb=rotary)
        (hidden_out.float().square().mean() + context_out.float().square().mean()).backward()
    torch.cuda.synchronize()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(context.grad).all()
