"""Resumable training state: what a run needs to go on exactly where it stopped.

A state is taken at an optimiser-step boundary (no gradient pending) and holds
the LoRA weights, the optimiser, scheduler and grad-scaler state, the EMA
shadow, the position in the data (epoch and batches of it consumed; an epoch's
order is a pure function of (seed, epoch)) and every random source: torch's CPU
and device generators (dropout), the trainer's torch.Generator (noise,
timesteps, crops) and the caption random.Random. kohya's `--save_state` /
`--resume` keep accelerate's state, which has no data position; with ours a
resumed CPU run ends with the very weights of an uninterrupted one.

state_files.py writes and reads states; this module says what one holds and
whether it fits the run that wants to resume from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from dataclasses import dataclass

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)

# Settings that must match to resume: the saved tensors or optimiser would not fit,
# or the run would quietly become another one (seed, batching, precision).
MUST_MATCH = (
    "network",
    "optimizer",
    "blocks",
    "ema",
    "train.seed",
    "train.train_batch_size",
    "train.gradient_accumulation_steps",
    "train.mixed_precision",
)
# Settings that may change freely: they decide where and how often states are saved.
_FREE = (
    "train.save_state_every_n_steps",
    "train.save_last_n_states",
    "speed.cuda_graph",  # these three change how fast a step runs, not what it computes
    "speed.compile_blocks",
    "speed.cudnn_benchmark",
)


@dataclass(frozen=True)
class RngState:
    """Every random source of a run at one instant."""

    torch_cpu: torch.Tensor  # torch.get_rng_state(): module dropout, CPU dropout
    torch_device: torch.Tensor | None  # the CUDA device's default generator (GPU dropout)
    generator: torch.Tensor  # the trainer's torch.Generator
    captions: tuple  # random.Random.getstate() of the caption shuffler

    @classmethod
    def capture(
        cls, generator: torch.Generator, caption_rng: random.Random, device: torch.device
    ) -> RngState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, generator.get_state(), caption_rng.getstate())

    def restore(self, generator: torch.Generator, caption_rng: random.Random, device: torch.device) -> None:
        torch.set_rng_state(self.torch_cpu)
        if device.type == "cuda" and self.torch_device is not None:
            torch.cuda.set_rng_state(self.torch_device, device)
        generator.set_state(self.generator)
        caption_rng.setstate(self.captions)


@dataclass
class TrainingState:
    """A run at the end of optimiser step `step`; the next batch is `batch_in_epoch` of `epoch`."""

    step: int
    epoch: int
    batch_in_epoch: int
    losses: list[float]
    started_at: float
    skipped_steps: int  # fp16 steps the grad scaler skipped
    family: str
    recipe: dict  # recipe_record() of the run's recipe
    data: str  # data_fingerprint() of its dataset and buckets
    network: dict[str, torch.Tensor]  # kohya keys, fp32
    optimizer: dict
    scheduler: dict
    scaler: dict
    ema: dict | None
    rng: RngState
    stage: int = 0  # the run's [[stages]] entry the state was taken in (0 without stages)
    earlier_losses: list[float] = dataclasses.field(default_factory=list)  # of the stages before it


def recipe_record(recipe) -> dict:
    """The recipe as plain JSON values, for comparing a state's settings with a run's."""
    return json.loads(json.dumps(dataclasses.asdict(recipe), default=str))


def data_fingerprint(dataset, plan) -> str:
    """SHA-256 over what decides the batches: each image (folder/name), caption, repeats and bucket."""
    rows = [
        (f"{r.path.parent.name}/{r.path.name}", r.caption, r.repeats, list(a.bucket))
        for r, a in zip(dataset.images, plan.assignments, strict=True)
    ]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def check_resumable(state: TrainingState, recipe, family: str, data: str, warn: bool = True) -> None:
    """ConfigError unless `state` can go on as a run of `recipe` on a `family` model; with `warn`,
    log the settings that changed (preflight checks quietly; train() warns once, when it resumes)."""
    if state.family != family:
        raise ConfigError(
            f"resume: the state was trained on a {state.family} model, this model is {family}; "
            "resume on the model the state was trained on"
        )
    changed = [d for d in _differences(state.recipe, recipe_record(recipe)) if not _under(d[0], _FREE)]
    fatal = [
        f"{path}: {old!r} in the state, {new!r} now" for path, old, new in changed if _under(path, MUST_MATCH)
    ]
    if fatal:
        raise ConfigError(
            f"resume: the state was saved with other settings ({'; '.join(fatal[:4])}); "
            "resume with the settings it was trained with"
        )
    if not warn:
        return
    for path, old, new in changed:
        log.warning(
            "resume: %s was %r and is now %r; the run will differ from an uninterrupted one", path, old, new
        )
    if state.data != data:
        log.warning(
            "resume: the dataset, its captions or its buckets changed since the state was saved; "
            "the data order will differ from an uninterrupted run"
        )


def _differences(old: object, new: object, path: str = "") -> list[tuple[str, object, object]]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(old.keys() | new.keys())
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{path}.{k}".lstrip("."))]
    return [] if old == new else [(path, old, new)]


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)
