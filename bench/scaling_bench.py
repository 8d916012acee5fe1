"""Data-parallel scaling: our step's images/s on 1 and N GPUs of one host (issue 12).

    torchrun --nproc-per-node 1 -m bench.scaling_bench --out one.json
    torchrun --nproc-per-node 2 -m bench.scaling_bench --out two.json
    python -m bench.scaling_bench --ratio one.json two.json      # N-GPU over 1-GPU images/s

Every process runs step_bench's `run_variant` on its own GPU with its own inputs and
noise (per-device batch = the case's batch), averaging the LoRA gradients every step
in step.py's `checked_loss`, as lora_train_core's multi-process training does
(`DataParallel.average_gradients`: one all-reduce after backward, before clipping).
The global rate is world size x per-device batch / the slowest rank's median step.
On a CPU,
`torchrun --nproc-per-node 2 -m bench.scaling_bench --tiny --variant ours_core` checks
that it runs (gloo), not how fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lora_train_core.run.distributed import DataParallel

from .models import CASES
from .step_bench import VARIANTS, machine_info, run_variant


def measure(case: str, variant: str, tiny: bool, warmup: int, steps: int) -> dict | None:
    """This rank's run; the global numbers on rank 0 (None on the others)."""
    dist = DataParallel.from_environment()
    cuda = torch.cuda.is_available() and not tiny
    if cuda:
        torch.cuda.set_device(dist.rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    result, _setup = run_variant(case, variant, device, tiny, warmup, steps, dist)
    slowest = torch.tensor([result["step_ms_median"]], device=device)
    if dist.world_size > 1:
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
    if not dist.is_main:
        return None
    step_s = float(slowest) / 1e3
    return {
        "machine": machine_info(device),
        "case": case,
        "variant": variant,
        "world_size": dist.world_size,
        "per_device_batch": CASES[case].batch_size,
        "slowest_step_ms_median": step_s * 1e3,
        "images_per_s": dist.world_size * CASES[case].batch_size / step_s,
        "rank0": result,
    }


def ratio(one: dict, many: dict) -> str:
    r = many["images_per_s"] / one["images_per_s"]
    return (
        f"{many['case']} {many['variant']}: {one['images_per_s']:.2f} img/s with 1 process, "
        f"{many['images_per_s']:.2f} img/s with {many['world_size']}: {r:.2f}x "
        f"({r / many['world_size']:.0%} scaling efficiency)"
    )


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.ratio:
        one, many = (json.loads(Path(p).read_text()) for p in args.ratio)
        print(ratio(one, many))
        return
    out = measure(args.case, args.variant, args.tiny, args.warmup, args.steps)
    if out is None:
        return
    out["machine"]["command"] = "torchrun ... -m bench.scaling_bench " + " ".join(sys.argv[1:])
    print(f"{out['world_size']} process(es): {out['images_per_s']:.2f} img/s", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.scaling_bench", description=__doc__.split("\n")[0])
    p.add_argument("--case", default="sdxl_1024_b4", choices=list(CASES))
    p.add_argument(
        "--variant", default="+compile_transformer", choices=[v for v in VARIANTS if v != "baseline"]
    )
    p.add_argument("--tiny", action="store_true", help="tiny UNets on the CPU (gloo): a check that it runs")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--ratio", nargs=2, type=Path, metavar=("ONE.json", "MANY.json"))
    return p


if __name__ == "__main__":
    main()
