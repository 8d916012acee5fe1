"""Where a step's GPU time and memory go: top kernels by kind (`torch.profiler`), memory by phase."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# Kernel kinds by name fragment, first match wins (cuBLAS/cuDNN/CUTLASS, flash attention, Triton).
# Copies come before elementwise: PyTorch's copy kernels run inside its elementwise templates.
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "sdpa")),
    ("conv", ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm", "xmma_")),
    ("matmul", ("gemm", "nvjet", "cutlass", "cublas")),
    ("norm", ("norm", "welford")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "l2norm")),
    ("compiled (triton)", ("triton_",)),
    ("copy", ("direct_copy", "copy_kernel", "memcpy", "catarray", "nchwtonhwc", "nhwctonchw")),
    ("strided elementwise", ("gpu_kernel_impl_nocast",)),  # an operand is not contiguous
    ("elementwise", ("elementwise", "reduce")),
)
TOP = 25


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, fragments in KERNEL_KINDS:
        if any(f in low for f in fragments):
            return kind
    return "other"


def profile_steps(step: Callable[[torch.Generator], object], device: torch.device, n: int) -> dict:
    """Profile n steps: wall and kernel time per step, time by kernel kind, and the top kernels.

    Kernel time below wall time means the GPU waited on the host (launches, syncs).
    """
    generator = torch.Generator(device).manual_seed(1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(n):
            step(generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    rows = [
        (e.key, e.self_device_time_total, e.count)
        for e in prof.key_averages()
        if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0
    ]
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows) or 1.0
    by_kind: dict[str, float] = defaultdict(float)
    for name, us, _ in rows:
        by_kind[kernel_kind(name)] += us
    return {
        "steps": n,
        "wall_ms_per_step": wall * 1e3 / n,
        "kernel_ms_per_step": total / 1e3 / n,
        "by_kind": {k: {"ms_per_step": v / 1e3 / n, "pct": 100 * v / total} for k, v in _desc(by_kind)},
        "top_kernels": [
            {
                "name": name[:160],
                "kind": kernel_kind(name),
                "ms_per_step": us / 1e3 / n,
                "pct": 100 * us / total,
                "calls_per_step": count / n,
            }
            for name, us, count in rows[:TOP]
        ],
    }


def _desc(d: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(d.items(), key=lambda kv: -kv[1])


def memory_phases(step, generator: torch.Generator) -> dict:
    """GiB allocated at the start and peak within each phase of one eager step of an `OurStep`.

    Phases: forward (until the UNet returns, seen by a forward hook), loss + backward,
    `update` (clipping and the optimiser step). Peaks include what was allocated before the
    phase (weights, LoRA, optimiser state).
    """
    gib = 2**30
    out = {}
    batch = step.draw(generator)
    torch.cuda.synchronize()

    def mark(name: str) -> None:
        torch.cuda.synchronize()
        out[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / gib
        out[f"after_{name}_gib"] = torch.cuda.memory_allocated() / gib
        torch.cuda.reset_peak_memory_stats()

    out["start_gib"] = torch.cuda.memory_allocated() / gib
    torch.cuda.reset_peak_memory_stats()
    unet = step.ctx.backend.unet
    hook = unet.register_forward_hook(lambda *_: mark("forward"))
    try:
        loss = step.backward(*batch)
    finally:
        hook.remove()
    mark("backward")
    step.update(loss)
    mark("optimizer")
    return out
