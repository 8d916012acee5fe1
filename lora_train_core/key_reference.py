"""`train --list-keys`: every key of a run's TOML file, with its meaning, allowed values and default.

The reference is TOML a user can paste as a starting config, and nothing in it is written
twice. A key's meaning is the comment at its field in the config dataclass (the comment lines
right above the field and the one after it); a section's is the comment at its entry in
config.SECTIONS. The allowed values are what the dataclass's own validation answers when it
refuses a value: each field is given values far out of any range, and a string no choice
matches, and the ConfigError that names the field carries its choices or bounds. The default
is the dataclass default.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
import typing
from functools import cache
from pathlib import Path

from . import config
from .data.captions import CaptionConfig, merged
from .errors import ConfigError

# A valid value for each field without a default, shown in place of a default: placeholders for
# the paths a run must set, and an example stage (the [[stages]] table has no default).
EXAMPLES = {
    "model": {"path": "path/to/model"},
    "dataset": {"path": "path/to/images"},
    "stages": {"resolution": 1024, "max_train_steps": 500},
}
SUBSET_EXAMPLE = "10_cat"  # the N_name folder the [subset_captions."..."] table is shown for
_PROBES = {int: (-(10**30), 10**30), float: (-1e30, 1e30), str: ("\0",)}


@dataclasses.dataclass(frozen=True)
class Key:
    section: str
    name: str
    meaning: str
    allowed: str
    default: object  # the dataclass default, an EXAMPLES value, or None when unset
    required: bool


def describe_keys() -> str:
    """The whole reference, as `train --list-keys` prints it."""
    required = [
        f"{key.section}.{key.name}"
        for section in config.SECTIONS
        if section not in config.NESTED
        for key in section_keys(section)
        if key.required
    ]
    intro = (
        "Every key of a run's TOML file (python -m lora_train_core train run.toml): what it means, the "
        f"values it accepts and its default. Paste this as a starting config and set {', '.join(required)}; "
        "a key left at its default may as well be deleted. Relative paths are relative to the file. "
        "A commented-out key is unset by default; a commented-out table is an example."
    )
    lines = [f"# {line}" for line in _wrap(intro)]
    for section in config.SECTIONS:
        lines += ["", *_section_lines(section)]
    return "\n".join(lines) + "\n"


def section_keys(section: str) -> list[Key]:
    cls = config.SECTIONS[section]
    hints = typing.get_type_hints(cls)
    meanings = field_comments(cls)
    example = EXAMPLES.get(section, {})
    keys = []
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name in example:
            default = example[f.name]
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None if required else f.default
        allowed = allowed_values(cls, f.name, hints[f.name], example) + ("; required" if required else "")
        keys.append(Key(section, f.name, meanings.get(f.name, ""), allowed, default, required))
    return keys


def section_meaning(section: str) -> str:
    return _comments_at_dict_keys(config, "SECTIONS").get(section, "")


def _section_lines(section: str) -> list[str]:
    meaning = [f"# {line}" for line in _wrap(section_meaning(section))]
    if section == "subset_captions":
        # only the keys a folder may override: what captions.merged accepts
        keys = [k for k in section_keys(section) if _subset_may_set(k)]
        header = f'# [subset_captions."{SUBSET_EXAMPLE}"]'
        return [header, *meaning, *(f"# {k.name} = {_toml(k.default)}" for k in keys)]
    header = f"[[{section}]]" if section in config.TABLE_ARRAYS else f"[{section}]"
    commented = section in config.NESTED  # optional tables: none by default
    out = [f"# {header}" if commented else header, *meaning]
    for key in section_keys(section):
        out += ["", *_key_lines(key, commented)]
    return out


def _key_lines(key: Key, commented: bool) -> list[str]:
    notes = [*_wrap(key.meaning), *_wrap(f"allowed: {key.allowed}")]
    unset = key.default is None
    assignment = f"{key.name} =" if unset else f"{key.name} = {_toml(key.default)}"
    return [*(f"# {n}" for n in notes), f"# {assignment}" if commented or unset else assignment]


def _subset_may_set(key: Key) -> bool:
    try:
        merged(CaptionConfig(), {key.name: key.default})
    except ConfigError:
        return False
    return True


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(text, width=100, break_on_hyphens=False) if text else []


# --- meanings: the comments at the fields ---------------------------------------------------------


@cache
def field_comments(cls: type) -> dict[str, str]:
    """Field name → its comment in the class's source."""
    source = textwrap.dedent(inspect.getsource(cls))
    (classdef,) = ast.parse(source).body
    comments = _Comments(source)
    return {
        statement.target.id: comments.at(statement)
        for statement in classdef.body
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
    }


@cache
def _comments_at_dict_keys(module, name: str) -> dict[str, str]:
    """Key → its comment, for a module-level dict literal `name: ... = {...}` written a key a line."""
    source = inspect.getsource(module)
    for statement in ast.parse(source).body:
        if (
            isinstance(statement, ast.AnnAssign)
            and getattr(statement.target, "id", None) == name
            and isinstance(statement.value, ast.Dict)
        ):
            comments = _Comments(source)
            return {key.value: comments.at(key) for key in statement.value.keys}
    raise LookupError(f"{module.__name__}.{name} is not an annotated dict literal")


class _Comments:
    """The comments of a source text, by line: those on a line of their own, and those after code."""

    def __init__(self, source: str):
        self.own_line: dict[int, str] = {}
        self.trailing: dict[int, str] = {}
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                alone = not token.line[: token.start[1]].strip()
                (self.own_line if alone else self.trailing)[token.start[0]] = token.string.lstrip("#").strip()

    def at(self, node: ast.AST) -> str:
        """The comment of a statement or expression: the comment lines right above it (no blank line
        between), then the comments after code on its lines."""
        above, line = [], node.lineno - 1
        while line in self.own_line:
            above.insert(0, self.own_line[line])
            line -= 1
        after = [self.trailing[n] for n in range(node.lineno, node.end_lineno + 1) if n in self.trailing]
        return " ".join([*above, *after])


# --- allowed values: what the dataclass's validation says -----------------------------------------


def allowed_values(cls: type, name: str, hint, example: dict) -> str:
    """What `name` accepts, read from the ConfigErrors the dataclass raises for out-of-range values."""
    options = [o for o in config._union_members(hint) if o is not type(None)]
    parts, hints = [], []
    for option in options:
        rule = _probe(cls, name, option, example)
        text, note = _describe(option, rule)
        parts.append(text)
        if note and note not in hints:
            hints.append(note)
    text = "; or ".join(parts)
    return f"{text} ({'; '.join(hints)})" if hints else text


def _probe(cls: type, name: str, option, example: dict) -> ConfigError | None:
    """The first ConfigError naming `name` with a rule that an out-of-range value of type `option` gets."""
    for value in _probe_values(option):
        try:
            cls(**{**example, name: value})
        except ConfigError as exc:
            if exc.field and exc.field.rpartition(".")[2] == name and (exc.choices or exc.bounds):
                return exc
        except Exception:  # a value the dataclass rejects some other way tells nothing
            continue
    return None


def _probe_values(option) -> list:
    if option in _PROBES:
        return list(_PROBES[option])
    if typing.get_origin(option) is tuple:
        args = typing.get_args(option)
        count = 1 if not args or args[-1] is Ellipsis else len(args)
        return [(value,) * count for value in _probe_values(args[0] if args else float)]
    return []


def _describe(option, rule: ConfigError | None) -> tuple[str, str]:
    """("a number, 0..1", hint) for one member of a field's type and the rule its check gave."""
    if typing.get_origin(option) is tuple:
        args = typing.get_args(option)
        item, _ = _describe(args[0] if args else float, None)
        count = "" if not args or args[-1] is Ellipsis else f"{len(args)} "
        plural = item.removeprefix("a ").removeprefix("an ") + "s"
        text = f"a list of {count}{plural}"
        if rule is not None and rule.bounds:
            text += f", each {_bounds(rule)}"
        return text, rule.hint if rule else ""
    if rule is not None and rule.choices:
        return f"one of {', '.join(_toml(c) for c in rule.choices)}", rule.hint
    text = {
        bool: "true or false",
        int: "a whole number",
        float: "a number",
        str: "a string",
        Path: "a path",
    }.get(option, "a table" if typing.get_origin(option) is dict else str(option))
    if rule is not None and rule.bounds and any(b is not None for b in rule.bounds):
        text += f", {_bounds(rule)}"
    return text, rule.hint if rule else ""


def _bounds(rule: ConfigError) -> str:
    (lo, hi), (lo_open, hi_open) = rule.bounds, rule.open_ends
    if lo is not None and hi is not None:
        excluded = [_number(b) for b, is_open in ((lo, lo_open), (hi, hi_open)) if is_open]
        return f"{_number(lo)}..{_number(hi)}" + (
            f" exclusive of {' and '.join(excluded)}" if excluded else ""
        )
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_number(lo)}"
    return f"{'<' if hi_open else '<='} {_number(hi)}"


def _number(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _toml(value) -> str:
    """A TOML literal for a default value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML literal for {value!r}")
