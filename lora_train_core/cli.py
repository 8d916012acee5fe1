"""`python -m lora_train_core train|demo|merge ...`: the standalone front door.

Errors the user can fix (LoraTrainError) print as one message without a
traceback and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import LoraTrainError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except LoraTrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_train_core", description=__doc__)
    sub = parser.add_subparsers(required=True, dest="command")
    t = sub.add_parser("train", help="train a LoRA from a TOML config")
    t.add_argument("config", type=Path, nargs="?", help="the run's TOML file")
    t.add_argument(
        "--list-keys", action="store_true", help="print every config section and key with its default"
    )
    t.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    t.set_defaults(func=_train)
    d = sub.add_parser("demo", help="train a tiny built-in model on a synthetic dataset (no downloads)")
    d.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    d.add_argument("--out", type=Path, default=Path("demo_out"))
    d.add_argument("--steps", type=int, default=30)
    d.add_argument(
        "--recipe",
        default=None,
        help="a built-in recipe (balanced, recommended) or a TOML file whose sections "
        "override the demo's (e.g. [optimizer], [noise])",
    )
    d.set_defaults(func=_demo)
    m = sub.add_parser("merge", help="merge LoRAs into one LoRA file, or into a diffusers model folder")
    m.add_argument("loras", nargs="+", metavar="FILE:WEIGHT", help="e.g. a.safetensors:0.7 b.safetensors:0.3")
    m.add_argument("--out", type=Path, required=True, help="merged .safetensors (a folder with --into-model)")
    m.add_argument("--mode", choices=("concat", "svd"), default=None, help="concat (exact, default) or svd")
    m.add_argument("--rank", type=int, default=None, help="rank of an svd merge")
    m.add_argument("--save-precision", default=None, help="fp16 (default), fp32 or bf16")
    m.add_argument("--into-model", type=Path, default=None, help="a diffusers folder to merge the LoRAs into")
    m.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    m.set_defaults(func=_merge)
    return parser


def _device(name: str | None):
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _train(args) -> int:
    from .config import describe_keys, load_run_config

    if args.list_keys:
        print(describe_keys())
        return 0
    if args.config is None:
        raise LoraTrainError("train: give a config file, e.g. `python -m lora_train_core train run.toml`")
    import torch

    from .backends.diffusers_backend import load_diffusers_backend
    from .progress import ProgressBar
    from .run import run_training
    from .train import MIXED_PRECISION

    cfg = load_run_config(args.config)
    weight_dtype = MIXED_PRECISION[cfg.recipe.train.mixed_precision] or torch.float32
    backend = load_diffusers_backend(cfg.model, _device(args.device), weight_dtype)
    bar = ProgressBar()
    try:
        result = run_training(cfg, backend, on_step=bar)
    finally:
        bar.close()
    losses = result.trained.losses
    print(f"first loss {losses[0]:.4f}, last loss {losses[-1]:.4f}")
    print(f"saved {result.path}")
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(family=args.family, out_dir=args.out, steps=args.steps, recipe=args.recipe)
    return 0


def _merge(args) -> int:
    from .merge import merge_into_model_folder, merge_lora_files, parse_lora_spec

    specs = [parse_lora_spec(spec) for spec in args.loras]
    if args.into_model is None:
        mode, precision = args.mode or "concat", args.save_precision or "fp16"
        path, result = merge_lora_files(specs, args.out, mode, args.rank, precision, args.overwrite)
        print(result.energy_summary())
        print(f"saved {path}")
        return 0
    given = [
        f"--{n.replace('_', '-')}" for n in ("mode", "rank", "save_precision") if getattr(args, n) is not None
    ]
    if given:
        raise LoraTrainError(f"merge: {', '.join(given)} apply to merging into a file, not --into-model")
    names = merge_into_model_folder(specs, args.into_model, args.out, args.overwrite)
    print(f"merged {len(names)} LoRA module(s) into the model; saved {args.out}")
    return 0
