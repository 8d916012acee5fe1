"""Validation-sample prompts in kohya's format (train_util.line_to_prompt_dict), and the
[samples] section that names them (sampling.py draws the images).

A line is a prompt followed by options split on " --": `--n` negative prompt,
`--w`/`--h` size (floored to a multiple of 8, at least 64; default 512),
`--d` seed, `--s` steps (1..1000, default 30), `--l` CFG scale (default 7.5),
`--ss` sampler. Files: .txt (lines, `#` comments), .toml or .json (a list of
tables/objects with the long names, or {"prompt": [...]}).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, check_int

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SAMPLERS = ("euler", "euler_a", "ddim", "dpmsolver++", "pndm", "lms")


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    steps: int = 30
    scale: float = 7.5
    sampler: str = "euler_a"

    def __post_init__(self):
        for name in ("width", "height"):
            value = getattr(self, name)
            object.__setattr__(self, name, max(64, int(value) // 8 * 8))
        if not 1 <= self.steps <= 1000:
            raise ConfigError(
                f"sample prompt {self.prompt!r}: steps {self.steps} is out of range; use 1..1000"
            )
        if self.sampler not in SAMPLERS:
            raise ConfigError(
                f"sample prompt {self.prompt!r}: sampler {self.sampler!r} is not one of {', '.join(SAMPLERS)}"
            )


_OPTIONS = {
    "n": "negative_prompt",
    "w": "width",
    "h": "height",
    "d": "seed",
    "s": "steps",
    "l": "scale",
    "ss": "sampler",
}
_TYPES = {"width": int, "height": int, "seed": int, "steps": int, "scale": float}


def parse_prompt_line(line: str) -> SamplePrompt:
    """`a cat --n blurry --w 768 --d 1` → SamplePrompt (kohya's option letters)."""
    prompt, *options = line.split(" --")
    fields: dict[str, object] = {"prompt": prompt.strip()}
    for option in options:
        key, _, value = option.strip().partition(" ")
        if key not in _OPTIONS:
            raise ConfigError(
                f"sample prompt {line!r}: unknown option --{key}; use --n --w --h --d --s --l --ss"
            )
        name = _OPTIONS[key]
        try:
            fields[name] = _TYPES.get(name, str)(value.strip())
        except ValueError:
            raise ConfigError(
                f"sample prompt {line!r}: --{key} needs a number, got {value.strip()!r}"
            ) from None
    return SamplePrompt(**fields)


def load_prompts(path: Path) -> list[SamplePrompt]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sample prompts file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        lines = [ln.strip() for ln in text.splitlines()]
        return [parse_prompt_line(ln) for ln in lines if ln and not ln.startswith("#")]
    data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    items = data.get("prompt", data.get("prompts", [])) if isinstance(data, dict) else data
    try:
        return [SamplePrompt(**item) if isinstance(item, dict) else parse_prompt_line(item) for item in items]
    except TypeError as exc:
        raise ConfigError(f"{path}: bad sample prompt entry ({exc})") from exc


@dataclass(frozen=True)
class SampleConfig:
    """[samples] section: when to render validation images (kohya sample_every_n_*)."""

    prompts: tuple[str, ...] = ()  # validation prompts, kohya prompt lines ("a cat --n blurry --d 1 --s 20")
    prompts_file: Path | None = None  # a .txt/.toml/.json file of prompts in kohya's format
    sample_every_n_steps: int = 0  # render the samples every N steps; 0 = only at the end (if prompts)
    seed: int = 0  # the seed of prompts without --d

    def __post_init__(self):
        check_int("samples.sample_every_n_steps", self.sample_every_n_steps, 0)
        check_int("samples.seed", self.seed, 0)

    def load(self) -> list[SamplePrompt]:
        """The prompts, then those of prompts_file."""
        prompts = [parse_prompt_line(p) for p in self.prompts]
        return prompts + (load_prompts(self.prompts_file) if self.prompts_file else [])
