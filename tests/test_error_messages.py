"""Every `section.key` that an error message of the core names is a key a TOML file can set.

The messages are read from the source: the text of each user error (ConfigError and its
siblings) and the field name given to each check (`check_range("noise.noise_offset", ...)`),
which becomes the message's first word. The keys are read from config.SECTIONS.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import lora_train_core
from lora_train_core.config import SECTIONS

CORE = Path(lora_train_core.__file__).parent
USER_ERRORS = {"LoraTrainError", "ConfigError", "DatasetError", "ModelError"}
# a lower-case `word.word` that is not part of a longer dotted name, a path or a number
DOTTED = re.compile(r"(?<![\w./\\-])([a-z][a-z0-9_]*)\.([a-z_][a-z0-9_]*)\b(?!\.\w)")
FILE_SUFFIXES = {"toml", "safetensors", "txt", "caption", "json", "png", "jpg", "jpeg", "webp", "bmp", "py"}
ABBREVIATIONS = {"e.g", "i.e"}


def _called(call: ast.Call) -> str:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def _texts(node: ast.AST) -> list[str]:
    """The literal text of a string expression (the fixed parts of an f-string)."""
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def message_texts() -> list[tuple[str, str]]:
    """(where, text) of every user error message and check field name in the core."""
    found = []
    for path in sorted(CORE.rglob("*.py")):
        for call in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(call, ast.Call):
                continue
            name = _called(call)
            if name in USER_ERRORS:
                parts = [*call.args, *(k.value for k in call.keywords)]
            elif name.lstrip("_").startswith("check_") and call.args:
                parts = call.args[:1]
            else:
                continue
            where = f"{path.relative_to(CORE.parent)}:{call.lineno}"
            found += [(where, text) for part in parts for text in _texts(part)]
    return found


def named_keys() -> list[tuple[str, str]]:
    keys = []
    for where, text in message_texts():
        for match in DOTTED.finditer(text):
            if match.group(0) not in ABBREVIATIONS and match.group(2) not in FILE_SUFFIXES:
                keys.append((where, match.group(0)))
    return keys


def test_the_scan_reads_the_messages_it_checks():
    keys = {key for _, key in named_keys()}
    # known messages, one per way a key gets into one: a check's field, an error's text, an f-string
    assert {"noise.noise_offset", "train.max_train_steps", "output.output_name"} <= keys
    assert "speed.fp8_base" in keys and "cache.text_encoder_outputs" in keys


# Sections of components not yet reachable from a TOML file (none today).
NOT_YET_SECTIONS: dict[str, type] = {}


def test_every_section_key_in_an_error_message_exists():
    sections = {**SECTIONS, **NOT_YET_SECTIONS}
    valid = {f"{s}.{f.name}" for s, cls in sections.items() for f in dataclasses.fields(cls)}
    unknown = sorted(f"{where}: {key}" for where, key in named_keys() if key not in valid)
    assert unknown == []
