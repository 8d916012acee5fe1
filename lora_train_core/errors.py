"""Errors a user can fix, and the checks that raise them.

Every error here carries a message meant for the person running the trainer:
what is wrong (the field or file), the value, and how to fix it. The CLI and
the ComfyUI nodes print these messages without a traceback.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


class LoraTrainError(Exception):
    """Base class for errors caused by the user's input, not by a bug."""


class ConfigError(LoraTrainError, ValueError):
    """A configuration value is out of range, of the wrong type, or unknown."""


class DatasetError(LoraTrainError):
    """One or more dataset files cannot be used; `problems` lists them all."""

    def __init__(self, summary: str, problems: Sequence[str] = ()):
        self.problems = tuple(problems)
        lines = [summary, *(f"  - {p}" for p in self.problems)]
        super().__init__("\n".join(lines))


class ModelError(LoraTrainError):
    """A model path or model file cannot be loaded or is of the wrong family."""


def check_range(
    field: str,
    value: float,
    lo: float | None = None,
    hi: float | None = None,
    hint: str = "",
) -> None:
    """Raise ConfigError unless lo <= value <= hi (either bound may be None); NaN is never in range."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{field}: {value!r} is not a number{_hint(hint)}")
    # NaN fails every comparison, so it must be caught by name or it passes any range
    if math.isnan(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise ConfigError(f"{field}: {value!r} is out of range; use {lo_s}..{hi_s}{_hint(hint)}")


def check_int(field: str, value: int, lo: int | None = None, hi: int | None = None, hint: str = "") -> None:
    """Raise ConfigError unless value is an int (not bool) within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{field}: {value!r} is not a whole number{_hint(hint)}")
    check_range(field, value, lo, hi, hint)


def check_choice(field: str, value: object, choices: Iterable[object]) -> None:
    """Raise ConfigError unless value is one of choices, listing them."""
    options = list(choices)
    if value not in options:
        listed = ", ".join(repr(c) for c in options)
        raise ConfigError(f"{field}: {value!r} is not one of {listed}")


def _hint(hint: str) -> str:
    return f" ({hint})" if hint else ""
