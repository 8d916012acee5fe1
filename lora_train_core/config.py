"""The run configuration: TOML sections mapped onto the components' frozen configs.

Each section is one component's config dataclass; a key it does not know is an
error that names the key and the closest valid one, and values are checked for
type here and for range by the dataclass itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.buckets import BucketConfig
from .data.captions import CaptionConfig, merged
from .data.dataset import DatasetConfig
from .data.latent_cache import CacheConfig
from .errors import ConfigError, check_choice, check_int
from .model.model_config import ModelConfig
from .model.network import NetworkConfig
from .objective.flow import FlowConfig
from .objective.loss import LossConfig
from .objective.noise import NoiseConfig
from .optim.ema import EMAConfig
from .optim.optimizers import OptimizerConfig
from .optim.param_groups import BlockWeights
from .outputs.export import SAVE_DTYPES
from .outputs.sample_prompts import SampleConfig
from .run.speed import SpeedConfig
from .run.stages import StageConfig
from .run.train import TrainConfig, TrainingRecipe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class OutputConfig:
    """[output] section: where the LoRA goes."""

    output_dir: Path = Path("output")  # the folder the LoRA is saved in
    output_name: str = "lora"  # the file's name, without .safetensors
    save_precision: str = "fp16"  # the dtype of the saved weights
    overwrite: bool = False  # replace an existing file of that name; else the run refuses to start
    save_every_n_steps: int = 0  # also save `<name>-step<N>.safetensors` every N steps (0 = off)
    save_last_n_saves: int = 0  # keep only the newest N of those (0 = keep all)
    state_dir: Path | None = None  # training states; default <output_dir>/state

    def __post_init__(self):
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        if self.state_dir is not None:
            object.__setattr__(self, "state_dir", Path(self.state_dir))
        check_choice("output.save_precision", self.save_precision, SAVE_DTYPES)
        check_int("output.save_every_n_steps", self.save_every_n_steps, 0)
        check_int("output.save_last_n_saves", self.save_last_n_saves, 0)
        name = self.output_name
        if not name or any(c in name for c in "/\\\0") or name.startswith("."):
            raise ConfigError(
                f"output.output_name: {name!r} must be a plain file name (no folders, no leading dot)"
            )

    @property
    def path(self) -> Path:
        return self.output_dir / f"{self.output_name}.safetensors"

    @property
    def states_dir(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.output_dir / "state"


@dataclass(frozen=True)
class RunConfig:
    """A whole training run, as read from a TOML file."""

    model: ModelConfig | None
    dataset: DatasetConfig
    buckets: BucketConfig = field(default_factory=BucketConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    recipe: TrainingRecipe = field(default_factory=lambda: TrainingRecipe(TrainConfig()))
    samples: SampleConfig = field(default_factory=SampleConfig)
    stages: tuple[StageConfig, ...] = ()


# section name -> its config class; each comment says what the section is for (`train --list-keys`)
SECTIONS: dict[str, type] = {
    "model": ModelConfig,  # the base model to train on
    "dataset": DatasetConfig,  # the image folder, its captions and repeats, regularisation images
    "buckets": BucketConfig,  # aspect-ratio buckets: the sizes images are trained at
    "cache": CacheConfig,  # what is encoded once (latents, text-encoder outputs) and where it is kept
    "output": OutputConfig,  # where the LoRA is saved, and intermediate saves
    "train": TrainConfig,  # how long and in what batches to train, precision, seed, training states
    "network": NetworkConfig,  # the LoRA: ranks, alphas, dropouts, what it is trained on
    "optimizer": OptimizerConfig,  # the optimiser, learning rates and their schedule
    "noise": NoiseConfig,  # the training noise and timesteps
    "loss": LossConfig,  # the loss and its weighting per timestep
    "flow": FlowConfig,  # flow-matching models (Flux.1): how σ is drawn, loss weighting, guidance
    "captions": CaptionConfig,  # how captions are processed: shuffling, kept tags, dropout, weights
    "ema": EMAConfig,  # an exponential moving average of the LoRA weights, saved as a second file
    "blocks": BlockWeights,  # block-wise learning-rate weights of the UNet
    "speed": SpeedConfig,  # options that make a step faster or leaner on a GPU
    "samples": SampleConfig,  # validation images rendered during training
    # progressive training, one [[stages]] table per stage of growing resolution; together they
    # replace train.max_train_steps
    "stages": StageConfig,
    # any [captions] key, for the images of one N_name folder: [subset_captions."<folder name>"]
    "subset_captions": CaptionConfig,
}
TABLE_ARRAYS = ("stages",)
NESTED = ("stages", "subset_captions")
REQUIRED = ("model", "dataset")


def load_run_config(path: Path) -> RunConfig:
    path = Path(path)
    return run_config_from_dict(_read_toml(path), base_dir=path.parent)


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc


def _checked(raw: dict[str, Any]) -> dict[str, Any]:
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(f"unknown section [{section}]{_closest(section, SECTIONS)}")
        if section in TABLE_ARRAYS:
            if not isinstance(raw[section], list) or not all(isinstance(t, dict) for t in raw[section]):
                raise ConfigError(f"{section}: write each one as a [[{section}]] table")
        elif section == "subset_captions":
            if not all(isinstance(t, dict) for t in raw[section].values()):
                raise ConfigError('subset_captions: write each folder as [subset_captions."10_name"]')
        elif not isinstance(raw[section], dict):
            raise ConfigError(f"[{section}] must be a table of keys, got {raw[section]!r}")
    return raw


def run_config_from_dict(raw: dict[str, Any], base_dir: Path = Path(".")) -> RunConfig:
    """Build a RunConfig; relative paths are resolved against `base_dir` (the config file's folder)."""
    _checked(raw)
    for section in REQUIRED:
        if section not in raw:
            raise ConfigError(f"[{section}] is missing; it needs at least `path = ...`")
    built = {
        name: build_section(name, raw[name], base_dir)
        for name in SECTIONS
        if name in raw and name not in NESTED
    }
    stages = tuple(build_section("stages", table, base_dir) for table in raw.get("stages", []))
    base_captions = built.get("captions", CaptionConfig())
    subset_captions = {
        folder: merged(base_captions, overrides)
        for folder, overrides in raw.get("subset_captions", {}).items()
    }
    recipe = TrainingRecipe(
        train=built.get("train", TrainConfig()),
        subset_captions=subset_captions,
        **{k: built[k] for k in RECIPE_SECTIONS if k in built and k != "train"},
    )
    return RunConfig(
        model=built["model"],
        dataset=built["dataset"],
        recipe=recipe,
        stages=stages,
        **{k: built[k] for k in ("buckets", "cache", "output", "samples") if k in built},
    )


RECIPE_DIR = Path(__file__).parent / "recipes"
RECIPE_SECTIONS = (
    "train",
    "network",
    "optimizer",
    "noise",
    "loss",
    "flow",
    "captions",
    "ema",
    "blocks",
    "speed",
)


def recipe_path(name_or_path: str | Path) -> Path:
    """A built-in recipe's file (`recipes/<name>.toml`), or the given TOML path."""
    builtin = RECIPE_DIR / f"{name_or_path}.toml"
    if builtin.is_file():
        return builtin
    path = Path(name_or_path)
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.toml")))
        raise ConfigError(
            f"recipe {str(name_or_path)!r} is neither a built-in recipe ({names}) nor a TOML file"
        )
    return path


def with_overrides(cfg: RunConfig, path: Path) -> RunConfig:
    """`cfg` with the sections of a TOML file replacing its own (not [model] or [dataset])."""
    raw = _read_toml(path)
    for section in raw:
        if section in REQUIRED:
            raise ConfigError(f"{path}: [{section}] cannot be overridden here")
    built: dict[str, Any] = {
        name: build_section(name, values, path.parent)
        for name, values in _checked(raw).items()
        if name not in NESTED
    }
    if "subset_captions" in raw:
        raise ConfigError(f"{path}: [subset_captions] belongs in the run's own config, not an override file")
    if "stages" in raw:
        built["stages"] = tuple(build_section("stages", table, path.parent) for table in raw["stages"])
    recipe = dataclasses.replace(cfg.recipe, **{k: v for k, v in built.items() if k in RECIPE_SECTIONS})
    return dataclasses.replace(
        cfg, recipe=recipe, **{k: v for k, v in built.items() if k not in RECIPE_SECTIONS}
    )


def build_section(section: str, values: dict[str, Any], base_dir: Path = Path(".")):
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"{section}.{key}: unknown key{_closest(key, names)}")
        kwargs[key] = _coerce(f"{section}.{key}", hints[key], value, base_dir)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"[{section}]: {exc}") from exc


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid: {', '.join(options)}"


def _coerce(field_name: str, hint, value: Any, base_dir: Path) -> Any:
    """Check a TOML value against the field's annotation; lists become tuples, paths resolve."""
    options = _union_members(hint)
    if value is None and type(None) in options:
        return None
    for option in options:
        converted = _try_convert(option, value, base_dir)
        if converted is not _NO:
            return converted
    expected = " or ".join(_type_name(o) for o in options if o is not type(None))
    raise ConfigError(f"{field_name}: {value!r} is not {expected}")


_NO = object()


def _union_members(hint) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _try_convert(option, value: Any, base_dir: Path) -> Any:
    origin = typing.get_origin(option) or option
    if option is bool:
        return value if isinstance(value, bool) else _NO
    if option is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if option is float:
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else _NO
    if option is str:
        return value if isinstance(value, str) else _NO
    if option is Path:
        return (base_dir / value) if isinstance(value, str) else _NO
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(option)
        item = args[0] if args else Any
        items = [_try_convert(item, v, base_dir) if item is not Any else v for v in value]
        return _NO if any(i is _NO for i in items) else tuple(items)
    if origin is dict and isinstance(value, dict):
        return value
    return _NO


def _type_name(option) -> str:
    origin = typing.get_origin(option)
    if origin is tuple:
        return "a list"
    return {
        bool: "true/false",
        int: "a whole number",
        float: "a number",
        str: "a string",
        Path: "a path",
    }.get(option, getattr(option, "__name__", str(option)))
