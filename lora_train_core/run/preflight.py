"""Every check that can fail, run before the model loads: a refused run costs seconds, not a run.

`prepare_run` is called by both doors before the slow part: the CLI before it loads the
weights, ComfyUI before the first step. It refuses every config combination that training
would refuse later, checks a resume state against the run, proves each folder the run
writes to is writable (a real probe write, not a permission-bit guess, which root ignores)
and decides the file the LoRA goes to. What it returns, a `RunPlan`, is what the
orchestrator runs.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig
from ..data.buckets import BucketPlan, plan_buckets
from ..data.dataset import Dataset
from ..data.latent_cache import check_cacheable, check_cacheable_across_processes
from ..data.text_cache import check_text_cacheable, text_cache_dir
from ..errors import ConfigError
from ..model.backend import ModelFacts
from ..outputs.export import next_free_path
from .checks import check_recipe
from .stages import StageConfig, stage_buckets, stage_recipe
from .state import TrainingState, check_resumable, data_fingerprint
from .train import TrainingRecipe, total_optimizer_steps


@dataclass(frozen=True)
class Stage:
    """One stage of a run (the whole run without `[[stages]]`): its buckets, recipe and length."""

    index: int
    config: StageConfig | None
    recipe: TrainingRecipe
    plan: BucketPlan
    total_steps: int
    total_batch: int  # images per optimiser step over every process


@dataclass(frozen=True)
class RunPlan:
    """A checked run: what `run_training` executes."""

    cfg: RunConfig
    dataset: Dataset
    stages: tuple[Stage, ...]
    lora_path: Path  # where the LoRA goes: output.path, or the next free name unless overwrite
    states_dir: Path
    resume: TrainingState | None
    world_size: int

    @property
    def name(self) -> str:
        """The stem every file of this run shares: LoRA, -partial, -step<N>, states."""
        return self.lora_path.stem

    @property
    def total_steps(self) -> int:
        return sum(stage.total_steps for stage in self.stages)

    def steps_before(self, stage: Stage) -> int:
        return sum(s.total_steps for s in self.stages[: stage.index])

    @property
    def fallback_dirs(self) -> tuple[Path, ...]:
        """Where a LoRA goes when its own folder refuses the write: the states folder, then temp."""
        return (self.states_dir, Path(tempfile.gettempdir()))


def prepare_run(
    cfg: RunConfig,
    dataset: Dataset,
    facts: ModelFacts,
    resume: TrainingState | None = None,
    world_size: int = 1,
) -> RunPlan:
    """Check `cfg` against the model and the machine; ConfigError naming the field if it cannot run."""
    cfg = _with_lr_rule(cfg, world_size)
    stages = _stages(cfg, dataset, world_size)
    for stage in stages:
        check_recipe(
            stage.recipe, facts.family, facts.prediction_type, facts.device, facts.fp8_base, world_size
        )
    check_cacheable(cfg.cache.mode, cfg.buckets.random_crop)
    check_cacheable_across_processes(cfg.cache.mode == "none", world_size)
    for captions in cfg.recipe.all_captions():
        check_text_cacheable(cfg.cache.text_encoder_outputs, cfg.recipe.network.train_text_encoder, captions)
    if resume is not None:
        check_resume(resume, stages, dataset, facts)
    out = cfg.output
    writable_folder(out.output_dir, "output.output_dir")
    states_dir = out.states_dir
    writable_folder(states_dir, "output.state_dir")
    if cfg.cache.mode == "disk":
        writable_folder(cfg.cache.cache_dir or dataset.root / ".latent_cache", "cache.cache_dir")
    if cfg.cache.text_encoder_outputs == "disk":
        writable_folder(text_cache_dir(cfg.cache, dataset), "cache.cache_dir")
    lora_path = out.path if out.overwrite else next_free_path(out.path)
    if lora_path.is_dir():
        raise ConfigError(f"output.output_name: {lora_path} is a folder; choose another output.output_name")
    return RunPlan(cfg, dataset, tuple(stages), lora_path, states_dir, resume, world_size)


def check_resume(state: TrainingState, stages: list[Stage], dataset: Dataset, facts: ModelFacts) -> None:
    if state.stage >= len(stages):
        raise ConfigError(
            f"resume: the state was saved in stage {state.stage + 1}, and this run has "
            f"{len(stages)} stage(s); resume with the [[stages]] it was trained with"
        )
    stage = stages[state.stage]
    check_resumable(state, stage.recipe, facts.family, data_fingerprint(dataset, stage.plan), warn=False)


def writable_folder(folder: Path, field: str) -> Path:
    """Create `folder` and prove a file can be written and removed there; ConfigError naming `field`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{field}: {folder} is a file, not a folder; choose a folder") from None
    except NotADirectoryError:
        raise ConfigError(
            f"{field}: {folder} cannot be a folder, because a part of that path is a file; choose a folder"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{field}: cannot create {folder} ({_reason(exc)}); choose a writable folder"
        ) from None
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-", suffix=".tmp") as probe:
            probe.write(b"lora_train_core write probe")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise ConfigError(
            f"{field}: cannot write to {folder} ({_reason(exc)}); "
            "choose a writable folder or fix its permissions"
        ) from None
    return folder


def _reason(exc: OSError) -> str:
    return exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))


def _stages(cfg: RunConfig, dataset: Dataset, world_size: int) -> list[Stage]:
    configs = cfg.stages or (None,)
    stages = []
    for index, config in enumerate(configs):
        buckets = stage_buckets(cfg.buckets, config) if config else cfg.buckets
        recipe = stage_recipe(cfg.recipe, config) if config else cfg.recipe
        plan = plan_buckets(dataset.images, buckets)
        train = recipe.train
        total_batch = train.train_batch_size * world_size * train.gradient_accumulation_steps
        total = total_optimizer_steps(plan, train, world_size)[0]
        stages.append(Stage(index, config, recipe, plan, total, total_batch))
    return stages


def _with_lr_rule(cfg: RunConfig, world_size: int) -> RunConfig:
    """train.scale_lr_by_processes: every learning rate x the number of processes (linear scaling)."""
    if not cfg.recipe.train.scale_lr_by_processes or world_size == 1:
        return cfg
    opt = cfg.recipe.optimizer
    scaled = dataclasses.replace(
        opt,
        learning_rate=opt.learning_rate * world_size,
        unet_lr=None if opt.unet_lr is None else opt.unet_lr * world_size,
        text_encoder_lr=None
        if opt.text_encoder_lr is None
        else tuple(lr * world_size for lr in opt.text_encoder_lr),
    )
    return dataclasses.replace(cfg, recipe=dataclasses.replace(cfg.recipe, optimizer=scaled))
