"""`train --list-keys`: every key with its meaning, allowed values and default, as TOML to paste."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest

from lora_train_core import key_reference
from lora_train_core.cli import main
from lora_train_core.config import NESTED, SECTIONS, run_config_from_dict
from lora_train_core.data.captions import CaptionConfig
from lora_train_core.errors import ConfigError
from lora_train_core.objective.loss import LOSS_TYPES
from lora_train_core.optim.optimizers import LR_SCHEDULERS, OPTIMIZERS
from lora_train_core.optim.param_groups import BlockWeights

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Fields of modules being rewritten in other branches (issue 16: run/train.py, run/stages.py,
# model/diffusers_backend.py) that have no comment yet. Give each a comment, then drop it here.
PLACEHOLDERS = {"model": {"path": "path/to/model"}, "dataset": {"path": "path/to/images"}}
ALL_KEYS = [(s, k) for s in SECTIONS if s != "subset_captions" for k in key_reference.section_keys(s)]


def _id(section_key) -> str:
    return f"{section_key[0]}.{section_key[1].name}"


@dataclasses.dataclass(frozen=True)
class _Documented:
    after: int = 0  # said after the field
    # said above the field,
    # over two lines
    above: int = 1
    # above
    both: int = 2  # and after
    bare: int = 3

    unrelated: int = 4  # a blank line parts it from the comment above


def test_a_fields_meaning_is_its_comment_above_and_after_it():
    assert key_reference.field_comments(_Documented) == {
        "after": "said after the field",
        "above": "said above the field, over two lines",
        "both": "above and after",
        "bare": "",
        "unrelated": "a blank line parts it from the comment above",
    }


def test_every_key_and_every_section_has_a_meaning():
    missing = {f"{s}.{k.name}" for s in SECTIONS for k in key_reference.section_keys(s) if not k.meaning}
    assert sorted(missing) == []
    assert [s for s in SECTIONS if not key_reference.section_meaning(s)] == []


def test_the_reference_is_toml_that_builds_the_default_run():
    raw = tomllib.loads(key_reference.describe_keys())
    assert set(raw) == set(SECTIONS) - set(NESTED)  # the optional tables are commented out
    built = run_config_from_dict(raw, base_dir=Path("."))
    assert built.recipe.blocks == BlockWeights()  # [blocks] at its defaults sets no block weight
    built = dataclasses.replace(built, recipe=dataclasses.replace(built.recipe, blocks=None))
    assert built == run_config_from_dict(PLACEHOLDERS, base_dir=Path("."))


def test_every_key_is_shown_with_its_default_or_commented_out_when_unset():
    text = key_reference.describe_keys()
    raw = tomllib.loads(text)
    for section, cls in SECTIONS.items():
        if section in NESTED:
            continue
        shown = raw[section]
        for f in dataclasses.fields(cls):
            if f.name in PLACEHOLDERS.get(section, {}):
                assert shown[f.name] == PLACEHOLDERS[section][f.name]
            elif f.default is None:
                assert f.name not in shown and f"\n# {f.name} =\n" in text, f"{section}.{f.name}"
            else:
                default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                value = shown[f.name]
                value = tuple(value) if isinstance(value, list) else value
                assert value == (str(default) if isinstance(default, Path) else default), (
                    f"{section}.{f.name}"
                )


def test_each_key_is_its_meaning_then_its_allowed_values_then_the_assignment():
    text = key_reference.describe_keys()
    assert (
        "[noise]\n# the training noise and timesteps\n\n"
        "# offset noise o: ε ← ε + o·z, z ~ N(0, 1) per sample and channel\n"
        "# allowed: a number, 0..1 (0.05-0.1 is typical; 0 turns it off)\n"
        "noise_offset = 0.0\n"
    ) in text
    assert "# allowed: a number, >= 0 (0 trains no UNet LoRA)\n# unet_lr =\n" in text
    assert '# allowed: a path; required\npath = "path/to/model"\n' in text


def _choices(allowed: str) -> list:
    match = re.search(r'one of ((?:"[^"]*"(?:, )?)+)', allowed)
    return json.loads(f"[{match[1]}]") if match else []


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("loss.loss_type", LOSS_TYPES),
        ("optimizer.optimizer_type", OPTIMIZERS),
        ("optimizer.lr_scheduler", LR_SCHEDULERS),
        ("train.mixed_precision", ("no", "bf16", "fp16")),
        ("cache.mode", ("ram", "disk", "none")),
    ],
)
def test_the_choices_shown_are_the_validations_choices(key, expected):
    (shown,) = [k for s, k in ALL_KEYS if f"{s}.{k.name}" == key]
    assert tuple(_choices(shown.allowed)) == tuple(expected)


NUMBER = r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?"


def _number(text: str) -> float:
    return float(text) if re.search(r"[.e]", text) else int(text)


def _range(allowed: str) -> tuple | None:
    """(lo, hi, lo excluded, hi excluded) as the reference writes them, or None for no range."""
    if match := re.search(
        rf"(?<![\w.])({NUMBER})\.\.({NUMBER})(?: exclusive of ({NUMBER})(?: and ({NUMBER}))?)?", allowed
    ):
        lo, hi = _number(match[1]), _number(match[2])
        excluded = {_number(e) for e in (match[3], match[4]) if e}
        return lo, hi, lo in excluded, hi in excluded
    if match := re.search(rf"(>=?) ({NUMBER})", allowed):
        return _number(match[2]), None, match[1] == ">", False
    return None


BOUNDED = [(s, k) for s, k in ALL_KEYS if _range(k.allowed)]


@pytest.mark.parametrize(("section", "key"), BOUNDED, ids=map(_id, BOUNDED))
def test_a_shown_range_is_exactly_what_the_dataclass_accepts(section, key):
    cls, base = SECTIONS[section], key_reference.EXAMPLES.get(section, {})
    field = f"{'captions' if cls is CaptionConfig else section}.{key.name}"
    step = 1 if "whole number" in key.allowed else 1e-6
    lo, hi, lo_open, hi_open = _range(key.allowed)

    def build(value):
        if key.allowed.startswith("a list"):
            count = re.match(r"a list of (\d+) ", key.allowed)
            value = (value,) * (int(count[1]) if count else 1)
        return cls(**{**base, key.name: value})

    def refused_by_the_range(value) -> bool:
        try:
            build(value)
        except ConfigError as exc:  # another rule may refuse the value, but not this range
            return str(exc).startswith(f"{field}:") and "out of range" in str(exc)
        return False

    for edge, is_open, outside in (
        (lo, lo_open, lo - step),
        (hi, hi_open, None if hi is None else hi + step),
    ):
        if edge is not None:
            assert refused_by_the_range(edge) == is_open, (edge, key.allowed)
            assert refused_by_the_range(outside), (outside, key.allowed)


def _commented_assignments(block: str, cls: type) -> list[str]:
    names = "|".join(f.name for f in dataclasses.fields(cls))
    return [line[2:] for line in block.splitlines() if re.match(rf"# ({names}) = \S", line)]


def test_the_stages_example_is_a_table_array_that_builds_a_stage():
    text = key_reference.describe_keys()
    block = text.split("\n# [[stages]]\n", 1)[1].split("\n\n# [subset_captions", 1)[0]
    assignments = _commented_assignments(block, SECTIONS["stages"])
    raw = tomllib.loads("\n".join(["[[stages]]", *assignments]))
    (stage,) = run_config_from_dict({**PLACEHOLDERS, **raw}).stages
    assert (stage.resolution, stage.max_train_steps) == (1024, 500)


def test_the_subset_captions_example_is_a_nested_table_of_caption_keys():
    block = key_reference.describe_keys().split('\n# [subset_captions."10_cat"]\n', 1)[1]
    assignments = _commented_assignments(block, CaptionConfig)
    raw = tomllib.loads("\n".join(['[subset_captions."10_cat"]', *assignments]))
    assert set(raw["subset_captions"]["10_cat"]) == {f.name for f in dataclasses.fields(CaptionConfig)} - {
        "weighted_captions"  # a whole run's setting: refused per subset
    }
    assert run_config_from_dict({**PLACEHOLDERS, **raw}).recipe.subset_captions == {"10_cat": CaptionConfig()}


def test_cli_list_keys_prints_the_reference(capsys):
    assert main(["train", "--list-keys"]) == 0
    assert capsys.readouterr().out == key_reference.describe_keys()
