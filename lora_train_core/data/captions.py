"""Caption processing with kohya sd-scripts semantics, and A1111/kohya caption weights.

`process_caption` mirrors train_util.py `BaseDataset.process_caption` (prefix/suffix,
whole-caption dropout, wildcards and multi-line captions, keep_tokens /
keep_tokens_separator, shuffle, tag dropout, secondary separator), in kohya's order.
`tag_frequency` is kohya's `ss_tag_frequency`. `parse_weighted_caption` mirrors
custom_train_functions.py `parse_prompt_attention` (`--weighted_captions`);
weighted_text.py applies the weights to the text encoders' outputs.

Where we differ from kohya (each a fix of an edge case, not of an option's meaning):
- prefix/suffix go around the line that is used; kohya adds them to the whole
  multi-line text first, so the prefix is lost when a later line is picked;
- empty tags (from "a,,b" or a trailing comma) are dropped before keep_tokens counts;
  kohya keeps them when no keep_tokens_separator is present;
- a keep_tokens_separator in the caption is always removed (tags rejoined with ", ");
  kohya leaves it in the text when neither shuffle nor tag dropout is on.
kohya's token warmup (`token_warmup_min`/`token_warmup_step`) is not offered here.
"""

from __future__ import annotations

import dataclasses
import difflib
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import ConfigError, DatasetError, check_int, check_range

_SECTION = "captions"


@dataclass(frozen=True)
class CaptionConfig:
    """Caption options of one dataset subset, named and meant as kohya's subset options."""

    caption_separator: str = ","  # the separator between a caption's tags
    shuffle_caption: bool = False  # shuffle the tags each time a caption is used
    keep_tokens: int = 0  # the first N tags stay in place and are never dropped
    keep_tokens_separator: str = ""  # a marker in captions: the tags before it stay in place (e.g. "|||")
    # joins words into one tag for shuffle and dropout, then becomes caption_separator (e.g. ";;;")
    secondary_separator: str = ""
    enable_wildcard: bool = False  # `{a|b}` picks one at random, and a multi-line caption a random line
    caption_prefix: str = ""  # text put before every caption
    caption_suffix: str = ""  # text put after every caption
    caption_dropout_rate: float = 0.0  # the probability of training an image with an empty caption
    caption_dropout_every_n_epochs: int = 0  # every caption is empty on epochs divisible by N
    caption_tag_dropout_rate: float = 0.0  # the probability of dropping each tag that is not kept
    # `(tag:1.2)` weights scale the text-encoder outputs of their tokens (kohya --weighted_captions);
    # for the whole run only, not per subset
    weighted_captions: bool = False

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            expected = {"bool": bool, "str": str}.get(str(field.type))
            if expected is not None and not isinstance(value, expected):
                raise ConfigError(f"{_SECTION}.{field.name}: {value!r} is not a {field.type}")
        for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            check_range(f"{_SECTION}.{name}", getattr(self, name), 0, 1, "a probability; 0 turns it off")
        check_int(f"{_SECTION}.keep_tokens", self.keep_tokens, 0, hint="leading tags kept in place")
        check_int(
            f"{_SECTION}.caption_dropout_every_n_epochs",
            self.caption_dropout_every_n_epochs,
            0,
            hint="drop every caption on epochs divisible by n; 0 turns it off",
        )
        if not self.caption_separator:
            raise ConfigError(f"{_SECTION}.caption_separator: '' is empty; use a tag separator such as ','")
        if self.keep_tokens_separator == self.caption_separator:
            raise ConfigError(
                f"{_SECTION}.keep_tokens_separator: {self.keep_tokens_separator!r} equals caption_separator; "
                "use a distinct marker such as '|||'"
            )

    @property
    def varies_per_step(self) -> bool:
        """True when the processed text can differ between uses of one caption.

        Shuffle, either dropout and wildcards (which also pick among a caption's
        lines) make it vary, so text-encoder outputs must not be cached.
        """
        return (
            self.shuffle_caption
            or self.enable_wildcard
            or self.caption_dropout_rate > 0
            or self.caption_dropout_every_n_epochs > 0
            or self.caption_tag_dropout_rate > 0
        )


def merged(base: CaptionConfig, overrides: Mapping[str, object]) -> CaptionConfig:
    """`base` with a subset's overrides applied and validated; unknown keys are refused."""
    valid = [field.name for field in dataclasses.fields(CaptionConfig)]
    for key in overrides:
        if key not in valid:
            closest = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.0)
            raise ConfigError(f"{_SECTION}.{key}: unknown caption option; did you mean {closest[0]!r}?")
    if "weighted_captions" in overrides:
        raise ConfigError(
            f"{_SECTION}.weighted_captions: set it for the whole run in [captions], not per subset"
        )
    return dataclasses.replace(base, **overrides)


def process_caption(caption: str, cfg: CaptionConfig, epoch: int, rng: random.Random) -> str:
    """The text the text encoder sees for `caption` in `epoch` (counted from 1).

    kohya order: whole-caption dropout (U < caption_dropout_rate, or epoch divisible
    by caption_dropout_every_n_epochs) gives ""; else pick a line (a random non-blank
    one with enable_wildcard, else the first), add prefix/suffix with a space, expand
    `{a|b}` wildcards, split tags into fixed / flexible / fixed suffix, shuffle the
    flexible ones, drop each with caption_tag_dropout_rate, join with ", ", and
    finally replace secondary_separator by caption_separator. All draws come from `rng`.
    """
    if epoch < 1:
        raise ValueError(f"epoch {epoch} must be counted from 1")
    if _drops_whole_caption(cfg, epoch, rng):
        return ""
    text = _pick_line(caption, cfg.enable_wildcard, rng)
    if cfg.caption_prefix:
        text = f"{cfg.caption_prefix} {text}"
    if cfg.caption_suffix:
        text = f"{text} {cfg.caption_suffix}"
    if cfg.enable_wildcard:
        text = _expand_wildcards(text, rng)
    has_marker = bool(cfg.keep_tokens_separator) and cfg.keep_tokens_separator in text
    if cfg.shuffle_caption or cfg.caption_tag_dropout_rate > 0 or has_marker:
        text = _arrange_tags(text, cfg, rng)
    if cfg.secondary_separator:
        text = text.replace(cfg.secondary_separator, cfg.caption_separator)
    return text


def _drops_whole_caption(cfg: CaptionConfig, epoch: int, rng: random.Random) -> bool:
    by_rate = cfg.caption_dropout_rate > 0 and rng.random() < cfg.caption_dropout_rate
    every_n = cfg.caption_dropout_every_n_epochs
    return by_rate or (every_n > 0 and epoch % every_n == 0)


def _pick_line(caption: str, any_line: bool, rng: random.Random) -> str:
    lines = [line.strip() for line in caption.splitlines()]
    if not any_line:
        return lines[0] if lines else ""
    # kohya's caption reader drops blank lines before the random pick.
    lines = [line for line in lines if line]
    if len(lines) > 1:
        return rng.choice(lines)
    return lines[0] if lines else ""


def _expand_wildcards(text: str, rng: random.Random) -> str:
    """Each `{a|b|c}` becomes one alternative; `{{` and `}}` stand for literal braces."""
    # Escaped braces become characters absent from the text, so the wildcard pattern
    # cannot see them; escapes are resolved before wildcards, as kohya does.
    free = (chr(c) for c in range(0xE000, 0xF900) if chr(c) not in text)
    open_mark, close_mark = next(free), next(free)
    text = text.replace("{{", open_mark).replace("}}", close_mark)
    text = re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), text)
    return text.replace(open_mark, "{").replace(close_mark, "}")


def _arrange_tags(text: str, cfg: CaptionConfig, rng: random.Random) -> str:
    fixed, flexible, fixed_suffix = _split_tags(text, cfg)
    if cfg.shuffle_caption:
        rng.shuffle(flexible)
    if cfg.caption_tag_dropout_rate > 0:
        flexible = [tag for tag in flexible if rng.random() >= cfg.caption_tag_dropout_rate]
    return ", ".join(fixed + flexible + fixed_suffix)


def _split_tags(text: str, cfg: CaptionConfig) -> tuple[list[str], list[str], list[str]]:
    """(fixed, flexible, fixed suffix): text before the first keep_tokens_separator is
    fixed, a second one starts a fixed suffix; without one, the first keep_tokens tags."""
    marker = cfg.keep_tokens_separator
    if marker and marker in text:
        fixed_part, _, rest = text.partition(marker)
        flexible_part, _, suffix_part = rest.partition(marker)
        return _tags(fixed_part, cfg), _tags(flexible_part, cfg), _tags(suffix_part, cfg)
    tags = _tags(text, cfg)
    return tags[: cfg.keep_tokens], tags[cfg.keep_tokens :], []


def _tags(text: str, cfg: CaptionConfig) -> list[str]:
    return [tag.strip() for tag in text.split(cfg.caption_separator) if tag.strip()]


def tag_frequency(captions_by_subset: Mapping[str, Sequence[str]]) -> dict[str, dict[str, int]]:
    """kohya `ss_tag_frequency`: per folder, how many times each tag occurs in the raw
    captions (split on ",", stripped, lowercased; empty tags skipped)."""
    frequency: dict[str, dict[str, int]] = {}
    for subset, captions in captions_by_subset.items():
        counts = frequency.setdefault(subset, {})
        for caption in captions:
            for tag in caption.split(","):
                tag = tag.strip().lower()
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
    return frequency


# A1111 attention syntax, token by token: an escape (backslash and one of ()[]\, or a
# lone backslash, which vanishes), an opening bracket, ":weight)" closing a round
# bracket, a closing bracket, a run of plain text, or a stray colon.
_ATTENTION_TOKEN = re.compile(r"\\[()\[\]\\]?|[(\[]|:([+-]?[.\d]+)\)|[)\]]|[^\\()\[\]:]+|:")
_ROUND_MULTIPLIER = 1.1


def parse_weighted_caption(text: str) -> list[tuple[str, float]]:
    """Split `text` into (text, weight) runs, as kohya's `parse_prompt_attention`.

    `(x)` multiplies by 1.1, `[x]` divides by 1.1, `(x:w)` multiplies by w; nesting
    multiplies; brackets left open apply to the end; a closing bracket with no opener
    is plain text; `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are literal. Neighbouring runs of
    equal weight are merged; an empty text gives [("", 1.0)].
    """
    runs: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token in ("(", "["):
            (open_round if token == "(" else open_square).append(len(runs))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), _weight_value(weight, text))
        elif token == ")" and open_round:
            scale_from(open_round.pop(), _ROUND_MULTIPLIER)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), 1 / _ROUND_MULTIPLIER)
        else:
            runs.append([token, 1.0])
    for start in open_round:
        scale_from(start, _ROUND_MULTIPLIER)
    for start in open_square:
        scale_from(start, 1 / _ROUND_MULTIPLIER)
    return _merge_equal_weights(runs)


def _weight_value(weight: str, text: str) -> float:
    try:
        return float(weight)
    except ValueError:
        raise DatasetError(
            f"weighted caption {text!r}: {weight!r} is not a number; write e.g. (tag:1.2)"
        ) from None


def _merge_equal_weights(runs: list[list]) -> list[tuple[str, float]]:
    merged_runs: list[tuple[str, float]] = []
    for piece, weight in runs:
        if merged_runs and merged_runs[-1][1] == weight:
            merged_runs[-1] = (merged_runs[-1][0] + piece, weight)
        else:
            merged_runs.append((piece, weight))
    return merged_runs or [("", 1.0)]
