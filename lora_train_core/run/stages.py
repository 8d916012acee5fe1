"""Progressive multi-stage training: one LoRA trained through stages of growing resolution.

Each stage has its own max bucket resolution, length and (optionally) learning
rate; its buckets and latent cache entries are made at that resolution (the
cache key holds the bucket, so stages never share a stale latent), and it starts
from the LoRA weights the previous stage ended with. The saved file records
every stage in `ss_stages`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from ..data.buckets import BucketConfig
from ..errors import ConfigError, check_int, check_range
from .train import StepReport, TrainingRecipe


@dataclass(frozen=True)
class StageConfig:
    """One `[[stages]]` table."""

    resolution: int  # max training area is resolution x resolution
    max_train_steps: int = 0  # this stage's optimiser steps (give this or max_train_epochs)
    max_train_epochs: int = 0  # this stage's epochs (give this or max_train_steps)
    learning_rate: float | None = None  # this stage's learning rate; unset = optimizer.learning_rate

    def __post_init__(self):
        check_int("stages.resolution", self.resolution, 64, 8192, "e.g. 512, then 768, then 1024")
        check_int("stages.max_train_steps", self.max_train_steps, 0)
        check_int("stages.max_train_epochs", self.max_train_epochs, 0)
        if (self.max_train_steps == 0) == (self.max_train_epochs == 0):
            raise ConfigError("stages: give each stage exactly one of max_train_steps or max_train_epochs")
        if self.learning_rate is not None:
            check_range("stages.learning_rate", self.learning_rate, 0, 10)


def stage_buckets(base: BucketConfig, stage: StageConfig) -> BucketConfig:
    """The run's bucket settings at the stage's resolution (min/max side widened to fit it)."""
    return dataclasses.replace(
        base,
        resolution=(stage.resolution, stage.resolution),
        min_bucket_reso=min(base.min_bucket_reso, stage.resolution),
        max_bucket_reso=max(base.max_bucket_reso, stage.resolution),
    )


def stage_recipe(base: TrainingRecipe, stage: StageConfig) -> TrainingRecipe:
    train = dataclasses.replace(
        base.train, max_train_steps=stage.max_train_steps, max_train_epochs=stage.max_train_epochs
    )
    optimizer = base.optimizer
    if stage.learning_rate is not None:
        optimizer = dataclasses.replace(optimizer, learning_rate=stage.learning_rate)
    return dataclasses.replace(base, train=train, optimizer=optimizer)


def stage_record(stage: StageConfig, recipe: TrainingRecipe, steps: int) -> dict:
    return {"resolution": stage.resolution, "steps": steps, "learning_rate": recipe.optimizer.learning_rate}


def stages_metadata(records: list[dict]) -> dict[str, str]:
    """`ss_stages` (JSON list of {resolution, steps, learning_rate} in order) and the total `ss_steps`."""
    if not records:
        return {}
    return {"ss_stages": json.dumps(records), "ss_steps": str(sum(r["steps"] for r in records))}


class StepOffset:
    """Step callbacks as one, counting steps across stages (stage k's step 1 is overall step offset+1)."""

    def __init__(self, callbacks, offset: int, total: int):
        self.callbacks = [c for c in callbacks if c is not None]
        self.offset, self.total = offset, total

    def __call__(self, report: StepReport) -> None:
        shifted = dataclasses.replace(report, step=report.step + self.offset, total=self.total)
        for callback in self.callbacks:
            callback(shifted)
