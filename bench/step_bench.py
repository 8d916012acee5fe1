"""Training-step benchmark: our LoRA step against diffusers' textbook one, same inputs, one run.

    python -m bench.step_bench --out results.json            # on the GPU machine: every case
    python -m bench.step_bench --tiny                        # a CPU check in seconds
    python -m bench.report results.json                      # Markdown tables, ratios to the baseline

For each (case, variant) a fresh UNet is built from the same seed; one eager
step is counted by `torch.utils.flop_counter`; blocks are compiled and the step
captured as a CUDA graph if the variant asks (the extra time of the first steps
is reported as one-off seconds); then warm-up steps, then timed steps, each
between two CUDA events, with no host sync in between. Reported: images/s from
the median step, FLOPs per step and achieved TFLOP/s, and peak
`torch.cuda.max_memory_allocated` over every step after the counted one
(compile, capture, warm-up and timed steps; the counted step's own peak is kept
apart as `peak_counted_step_gib`), and the steady memory (`steady_gib`: the most the
timed steps held reserved from the driver, the cache emptied before them: what
training holds once shapes are recorded and autotuned, fragmentation included, and
the only measure that sees a CUDA graph's private pool after recording).
Results are written after every variant, so a run cut short keeps what it did.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from lora_train_core.run.cuda_graphs import CAPTURE_WARMUP
from lora_train_core.run.distributed import SINGLE_PROCESS, DataParallel
from lora_train_core.run.speed import compile_blocks, without_cudnn_attention

from .models import CASES, build_unet, make_inputs
from .profile import memory_phases, profile_steps
from .steps import FastPath, OurStep, StepSetup, build_baseline, build_ours

__all__ = ["VARIANTS", "FastPath", "OurStep", "build_ours", "main", "run_variant"]

BASELINE = "baseline"
# the textbook step with its frozen weights in each dtype (diffusers' examples use bf16); the
# report takes ratios against the faster of the two
BASELINES = {BASELINE: torch.float32, "baseline_bf16": torch.bfloat16}
# Each rung adds one [speed] option of the core to the one before it, so that each is measured.
_LADDER = [
    ("ours_core", {}),
    ("+cudnn_benchmark", {"cudnn_benchmark": True}),
    ("+cuda_graph", {"cuda_graph": True}),
    ("+compile_transformer", {"compile": "transformer"}),
    ("+compile_resnet", {"compile": "transformer+resnet"}),
]
# One change on top of a rung: memory options, and prototypes that are not in the core
# (run 1 measured the prototypes eagerly; these are their graphed A/B tests).
_BRANCHES = [
    ("+adamw8bit", "+compile_transformer", {"optimizer_type": "AdamW8bit"}),
    ("+fp8_base", "+compile_transformer", {"fp8_base": True}),
    ("+fp8_adamw8bit", "+fp8_base", {"optimizer_type": "AdamW8bit"}),
    ("+no_sync", "+compile_transformer", {"host_sync": False}),
    ("+channels_last", "+compile_transformer", {"channels_last": True}),
    ("+lora_addmm", "+compile_transformer", {"lora_path": "compute_dtype"}),
    # without a CUDA graph (its private pool holds more than the eager step's peak): memory first
    ("eager+adamw8bit", "ours_core", {"optimizer_type": "AdamW8bit"}),
    ("eager+fp8_base", "ours_core", {"fp8_base": True}),
    ("eager+fp8_adamw8bit", "eager+fp8_base", {"optimizer_type": "AdamW8bit"}),
    ("eager+compile_transformer", "ours_core", {"compile": "transformer"}),
    (
        "eager+compile_fp8_adamw8bit",
        "eager+compile_transformer",
        {"fp8_base": True, "optimizer_type": "AdamW8bit"},
    ),
    # the ComfyUI door (comfy_door.py): the same step over ComfyUI's own model of the family
    ("comfy_core", "ours_core", {"door": "comfy"}),
    ("comfy+speed", "+compile_transformer", {"door": "comfy"}),
    ("comfy+speed_resnet", "+compile_resnet", {"door": "comfy"}),
    ("comfy_eager+fp8", "ours_core", {"door": "comfy", "fp8_base": True}),
    ("comfy+speed_fp8", "+compile_transformer", {"door": "comfy", "fp8_base": True}),
]


def _variants() -> dict[str, FastPath | None]:
    variants: dict[str, FastPath | None] = dict.fromkeys(BASELINES)
    options: dict = {}
    for name, change in _LADDER:
        options = {**options, **change}
        variants[name] = FastPath(**options)
    for name, base, change in _BRANCHES:
        variants[name] = FastPath(**{**variants[base].__dict__, **change})
    return variants


VARIANTS = _variants()
GIB = 2**30


def run_variant(
    case_name: str,
    variant: str,
    device: torch.device,
    tiny: bool,
    warmup: int,
    steps: int,
    dist: DataParallel = SINGLE_PROCESS,
):
    """Build, count, compile, warm up and time one (case, variant); a dict of the measurements.

    With several processes (`dist`, ours only) each rank draws its own inputs and noise and
    the gradients are averaged every step, by step.py's `checked_loss` (scaling_bench.py).
    """
    case, fast = CASES[case_name], VARIANTS[variant]
    cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = bool(fast and fast.cudnn_benchmark)
    t0 = time.perf_counter()
    unet_config = build_unet(case.family, tiny, torch.device("meta")).config
    inputs = make_inputs(unet_config, case, tiny, device, seed=dist.rank)
    setup = (
        build_baseline(case, inputs, device, tiny, BASELINES[variant])
        if fast is None
        else build_ours(case, inputs, device, tiny, fast, dist=dist)
    )
    _sync(device)
    out = {"case": case_name, "variant": variant, "fast_path": fast.__dict__ if fast else None}
    out["setup_s"] = time.perf_counter() - t0
    out["lora_params"] = sum(p.numel() for p in setup.params)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        out["mem_model_gib"] = torch.cuda.memory_allocated(device) / GIB  # weights and LoRA
    generator = torch.Generator(device).manual_seed(dist.rank)
    with FlopCounterMode(display=False) as counter:
        losses = [setup.step(generator)]
    out["flops_per_step"] = counter.get_total_flops()
    if cuda:  # + gradients and optimiser state; the counted step's peak apart (the counter is not training)
        out["mem_after_step_gib"] = torch.cuda.memory_allocated(device) / GIB
        out["peak_counted_step_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        torch.cuda.reset_peak_memory_stats(device)
    first = time.perf_counter()
    if fast is not None and fast.compile != "none":
        out["compiled_blocks"] = len(compile_blocks([setup.unet], fast.compile))
    if fast is not None and fast.cuda_graph:
        setup.step.use_graphs()  # the next step records the graph (after CAPTURE_WARMUP eager runs)
    losses += [setup.step(generator) for _ in range(warmup)]
    _sync(device)
    out["warmup_s"] = time.perf_counter() - first
    if cuda:  # one-off peaks (compiling, recording, cuDNN's trial workspaces) apart from the steady one
        out["peak_warmup_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        torch.cuda.empty_cache()  # the timed steps then reserve only what they need
        torch.cuda.reset_peak_memory_stats(device)
    times, more, wall = _timed_steps(setup, generator, device, steps)
    losses += more
    median = statistics.median(times)
    out.update(
        step_ms=[t * 1e3 for t in times],
        step_ms_median=median * 1e3,
        wall_ms_per_step=wall * 1e3 / steps,
        images_per_s=case.batch_size / median,
        tflops=out["flops_per_step"] / median / 1e12,
        losses=[float(v) for v in losses],
    )
    if fast is not None and (fast.compile != "none" or fast.cuda_graph):
        plain_steps = warmup + (CAPTURE_WARMUP + 1) * fast.cuda_graph
        out["compile_s"] = out["warmup_s"] - plain_steps * median  # compile and capture, one-off
    if cuda:
        out["peak_gib"] = max(out["peak_warmup_gib"], torch.cuda.max_memory_allocated(device) / GIB)
        out["peak_timed_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        # What the timed steps held from the driver, fragmentation included: the same measure
        # for an eager step (its activations come and go in the cache) and a graphed one (its
        # activations live in the graph's private pool, reserved and never "allocated" again).
        out["steady_gib"] = torch.cuda.max_memory_reserved(device) / GIB
        out["mem_steady_gib"] = torch.cuda.memory_allocated(device) / GIB
    return out, setup


def _timed_steps(setup: StepSetup, generator: torch.Generator, device: torch.device, n: int):
    """Per-step seconds (CUDA events, or host clock on CPU), the losses, and the whole wall time."""
    losses, marks = [], []
    start = time.perf_counter()
    for _ in range(n):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            losses.append(setup.step(generator))
            end.record()
            marks.append((begin, end))
        else:
            t = time.perf_counter()
            losses.append(setup.step(generator))
            marks.append(time.perf_counter() - t)
    _sync(device)
    wall = time.perf_counter() - start
    times = [b.elapsed_time(e) / 1e3 for b, e in marks] if device.type == "cuda" else marks
    return times, losses, wall


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_info(device: torch.device) -> dict:
    import diffusers
    import peft

    cuda = device.type == "cuda"
    info = {
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.machine()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "command": "python -m bench.step_bench " + " ".join(sys.argv[1:]),
    }
    if device.type == "cuda":
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def _free(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch._dynamo.config.recompile_limit = 64  # one compiled graph per block shape, not per instance
    report = {
        "machine": machine_info(device),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": [],
        "profiles": {},
    }
    begin = time.perf_counter()
    with without_cudnn_attention():  # as train() runs; the textbook step gets the same kernels
        for case_name in args.cases:
            for variant in args.variants:
                if args.budget_s and time.perf_counter() - begin > args.budget_s:
                    report["results"].append({"case": case_name, "variant": variant, "error": "time budget"})
                    continue
                report["results"].append(_one(case_name, variant, device, args, report))
                _write(report, args.out)
                _free(device)
                print(_line(report["results"][-1]), flush=True)
    return report


def _one(case_name: str, variant: str, device: torch.device, args, report: dict) -> dict:
    setup = None
    try:
        result, setup = run_variant(case_name, variant, device, args.tiny, args.warmup, args.steps)
        key = f"{case_name}:{variant}"
        if key in args.profile:
            report["profiles"][key] = profile_steps(setup.step, device, 2)
        if key in args.memory and isinstance(setup.step, OurStep) and device.type == "cuda":
            report.setdefault("memory", {})[key] = memory_phases(setup.step, torch.Generator(device))
        return result
    except Exception as err:  # an OOM or a compile failure ends this variant, not the run
        return {"case": case_name, "variant": variant, "error": f"{type(err).__name__}: {str(err)[:300]}"}
    finally:
        del setup


def _line(r: dict) -> str:
    if "error" in r:
        return f"{r['case']:16} {r['variant']:22} ERROR {r['error'][:100]}"
    peak = f"{r['peak_gib']:6.2f} GiB (steady {r['steady_gib']:5.2f})" if "steady_gib" in r else ""
    return (
        f"{r['case']:16} {r['variant']:22} {r['images_per_s']:8.2f} img/s {r['step_ms_median']:9.1f} ms "
        f"{r['tflops']:7.1f} TFLOP/s {peak} loss {r['losses'][-1]:.4f}"
    )


def _write(report: dict, out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.step_bench", description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny UNets on the CPU: a check that runs in seconds")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the counted one")
    p.add_argument("--steps", type=int, default=10, help="timed steps; the median is reported")
    p.add_argument("--profile", nargs="*", default=[], help="CASE:VARIANT pairs to profile (top kernels)")
    p.add_argument("--memory", nargs="*", default=[], help="CASE:VARIANT pairs: memory by step phase")
    p.add_argument("--budget-s", type=float, default=0, help="skip variants once this many seconds passed")
    p.add_argument("--out", type=Path, default=None, help="where to write the JSON results")
    return p


if __name__ == "__main__":
    main()
