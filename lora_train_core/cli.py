"""`python -m lora_train_core train|demo|merge ...`: the standalone front door.

Errors the user can fix (LoraTrainError) print as one message without a
traceback and exit with status 2. During `train`, Ctrl-C (or SIGTERM) stops
after the current optimiser step, saves the partial LoRA and the training
state, and exits with status 130; `train --resume STATE` continues from it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
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
        "--list-keys",
        action="store_true",
        help="print every config key with its meaning, allowed values and default, as TOML",
    )
    t.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    t.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="STATE",
        help="continue from a training state: a folder <output_dir>/state/<name>-step<N>, "
        "or <output_dir>/state for the newest complete one",
    )
    t.set_defaults(func=_train)
    d = sub.add_parser("demo", help="train a tiny built-in model on a synthetic dataset (no downloads)")
    d.add_argument("--family", choices=("sd15", "sdxl", "flux_dev", "flux_schnell", "chroma"), default="sd15")
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

    # Under accelerate launch / torchrun each process takes the GPU of its LOCAL_RANK.
    default = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name or default)
    except RuntimeError:
        raise LoraTrainError(f"--device: {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoraTrainError(f"--device: {name!r}, but this torch has no usable CUDA device; use cpu")
    return device


def _train(args) -> int:
    from .config import load_run_config

    if args.list_keys:
        from .key_reference import describe_keys

        print(describe_keys(), end="")
        return 0
    if args.config is None:
        raise LoraTrainError("train: give a config file, e.g. `python -m lora_train_core train run.toml`")
    cfg = load_run_config(args.config)  # before the imports below: a config error needs no diffusers
    import torch

    from .data.dataset import load_dataset
    from .model.diffusers_backend import load_diffusers_backend, model_facts
    from .run.distributed import DataParallel
    from .run.orchestrator import run_training
    from .run.preflight import prepare_run
    from .run.progress import ProgressBar
    from .run.state_files import load_training_state
    from .run.train import MIXED_PRECISION, TrainingStopped

    # Everything that can be wrong with the input is checked before the (slow) model load.
    state = load_training_state(args.resume) if args.resume is not None else None
    dataset = load_dataset(cfg.dataset)
    device = _device(args.device)
    fp8 = cfg.recipe.speed.fp8_base
    world_size = DataParallel.from_environment().world_size
    plan = prepare_run(cfg, dataset, model_facts(cfg.model, device, fp8), state, world_size)
    weight_dtype = MIXED_PRECISION[cfg.recipe.train.mixed_precision] or torch.float32
    backend = load_diffusers_backend(cfg.model, device, weight_dtype, fp8_base=fp8)
    bar = ProgressBar()
    try:
        with _StopOnSignal(bar) as on_step:
            result = run_training(cfg, backend, on_step, plan=plan)
    except TrainingStopped as stopped:
        bar.close()
        if isinstance(stopped.__cause__, Cancelled | KeyboardInterrupt):
            print(f"cancelled after step {stopped.partial.steps}", file=sys.stderr)
            return 130
        if isinstance(stopped.__cause__, LoraTrainError):
            raise LoraTrainError(str(stopped)) from stopped
        raise
    finally:
        bar.close()
    losses = result.trained.losses
    print(f"first loss {losses[0]:.4f}, last loss {losses[-1]:.4f}")
    print(f"saved {result.path}")
    return 0


class Cancelled(Exception):
    """The user asked training to stop (Ctrl-C or SIGTERM)."""


class _StopOnSignal:
    """A step callback (wrapping `on_step`) that stops training after the step in which Ctrl-C came.

    The first Ctrl-C / SIGTERM asks for the stop; a second aborts at once. Stopping at a step
    boundary lets run_training save the partial LoRA and a state that resumes exactly. Signal
    handlers can only be set from the main thread; elsewhere this is `on_step` alone.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_step):
        self.on_step = on_step
        self.requested, self.previous = False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nstopping after this step (press Ctrl-C again to stop at once; the partial LoRA is kept)",
            file=sys.stderr,
        )

    def __call__(self, report) -> None:
        self.on_step(report)
        if self.requested:
            raise Cancelled("cancelled by the user")


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(family=args.family, out_dir=args.out, steps=args.steps, recipe=args.recipe)
    return 0


def _merge(args) -> int:
    from .outputs.merge import merge_into_model_folder, merge_lora_files, parse_lora_spec

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
