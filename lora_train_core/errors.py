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
    """A configuration value is out of range, of the wrong type, or unknown.

    The checks below also say, as data, which field they check and what it accepts (`choices`,
    or `bounds` (lo, hi) with None for no bound and `open_ends` (lo, hi) True where the bound
    itself is excluded, and a `hint`): `train --list-keys` shows each key's allowed values from
    the very check that refuses the others.
    """

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        choices: Sequence[object] | None = None,
        bounds: tuple[float | None, float | None] | None = None,
        open_ends: tuple[bool, bool] = (False, False),
        hint: str = "",
    ):
        super().__init__(message)
        self.field, self.choices, self.hint = field, choices, hint
        self.bounds, self.open_ends = bounds, open_ends


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
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    """Raise ConfigError unless lo <= value <= hi (either bound may be None; `lo_open` / `hi_open`
    exclude the bound itself); NaN is never in range."""
    rule = {"field": field, "bounds": (lo, hi), "open_ends": (lo_open, hi_open), "hint": hint}
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{field}: {value!r} is not a number{_hint(hint)}", **rule)
    # NaN fails every comparison, so it must be caught by name or it passes any range
    below = math.isnan(value) or (lo is not None and (value < lo or (lo_open and value == lo)))
    above = hi is not None and (value > hi or (hi_open and value == hi))
    if below or above:
        use = format_bounds(lo, hi, lo_open, hi_open)
        raise ConfigError(f"{field}: {value!r} is out of range; use {use}{_hint(hint)}", **rule)


def check_int(field: str, value: int, lo: int | None = None, hi: int | None = None, hint: str = "") -> None:
    """Raise ConfigError unless value is an int (not bool) within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"{field}: {value!r} is not a whole number{_hint(hint)}", field=field, bounds=(lo, hi), hint=hint
        )
    check_range(field, value, lo, hi, hint)


def check_choice(field: str, value: object, choices: Iterable[object]) -> None:
    """Raise ConfigError unless value is one of choices, listing them."""
    options = list(choices)
    if value not in options:
        listed = ", ".join(repr(c) for c in options)
        raise ConfigError(f"{field}: {value!r} is not one of {listed}", field=field, choices=tuple(options))


def format_bounds(lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> str:
    """`lo..hi` as the range messages write it (no bound as -inf / inf), then the excluded ends."""
    text = f"{'-inf' if lo is None else f'{lo:g}'}..{'inf' if hi is None else f'{hi:g}'}"
    excluded = [f"{b:g}" for b, is_open in ((lo, lo_open), (hi, hi_open)) if is_open and b is not None]
    return f"{text} exclusive of {' and '.join(excluded)}" if excluded else text


def _hint(hint: str) -> str:
    return f" ({hint})" if hint else ""
