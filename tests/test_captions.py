"""Caption processing against kohya's `process_caption` semantics, worked by hand."""

from __future__ import annotations

import math
import random
import re

import pytest

from lora_train_core.data.captions import (
    CaptionConfig,
    merged,
    parse_weighted_caption,
    process_caption,
    tag_frequency,
)
from lora_train_core.errors import ConfigError, DatasetError


def within_binomial_bounds(count: int, trials: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(count - trials * p) <= sigmas * math.sqrt(trials * p * (1 - p))


def test_keep_tokens_one_keeps_first_tag_in_place_while_rest_shuffle():
    cfg = CaptionConfig(shuffle_caption=True, keep_tokens=1)
    rng = random.Random(0)
    orders = set()
    for _ in range(200):
        tags = process_caption("sks dog, grass, sky, red collar", cfg, 1, rng).split(", ")
        assert tags[0] == "sks dog"
        assert sorted(tags[1:]) == ["grass", "red collar", "sky"]
        orders.add(tuple(tags[1:]))
    assert len(orders) > 1


def test_tag_dropout_drops_each_flexible_tag_at_rate_within_binomial_bounds():
    p, trials = 0.3, 2000
    cfg = CaptionConfig(caption_tag_dropout_rate=p, keep_tokens=1)
    rng = random.Random(1)
    kept = {"b": 0, "c": 0, "d": 0}
    for _ in range(trials):
        tags = process_caption("a, b, c, d", cfg, 1, rng).split(", ")
        assert tags[0] == "a"  # the kept tag is never dropped
        assert tags[1:] == [t for t in ("b", "c", "d") if t in tags]  # order unchanged without shuffle
        for tag in kept:
            kept[tag] += tag in tags
    for tag, count in kept.items():
        assert within_binomial_bounds(trials - count, trials, p), (tag, trials - count)


def test_caption_dropout_every_n_epochs_drops_only_on_even_epochs():
    cfg = CaptionConfig(caption_dropout_every_n_epochs=2)
    rng = random.Random(2)
    got = [process_caption("a, b", cfg, epoch, rng) for epoch in range(1, 7)]
    assert got == ["a, b", "", "a, b", "", "a, b", ""]


def test_caption_dropout_rate_empties_whole_caption_at_rate():
    p, trials = 0.25, 2000
    cfg = CaptionConfig(caption_dropout_rate=p, caption_prefix="photo of")
    rng = random.Random(3)
    results = [process_caption("a, b", cfg, 1, rng) for _ in range(trials)]
    assert set(results) == {"", "photo of a, b"}  # the prefix goes with the caption
    assert within_binomial_bounds(results.count(""), trials, p)
    always = CaptionConfig(caption_dropout_rate=1.0)
    assert process_caption("a, b", always, 1, rng) == ""


def test_wildcards_pick_each_alternative():
    cfg = CaptionConfig(enable_wildcard=True)
    rng = random.Random(4)
    seen = {process_caption("a {red|green|blue} car", cfg, 1, rng) for _ in range(300)}
    assert seen == {"a red car", "a green car", "a blue car"}


def test_double_braces_escape_literal_braces():
    cfg = CaptionConfig(enable_wildcard=True)
    rng = random.Random(5)
    seen = {process_caption("{{logo}} {x|y} {{a|b}}", cfg, 1, rng) for _ in range(100)}
    assert seen == {"{logo} x {a|b}", "{logo} y {a|b}"}


def test_multiline_caption_picks_random_line_with_wildcards_and_first_line_otherwise():
    caption = "first line\n\nsecond line\nthird line"
    rng = random.Random(6)
    with_wildcards = CaptionConfig(enable_wildcard=True, caption_prefix="p")
    seen = {process_caption(caption, with_wildcards, 1, rng) for _ in range(200)}
    assert seen == {"p first line", "p second line", "p third line"}  # blank line never picked
    plain = CaptionConfig(caption_suffix="s")
    assert {process_caption(caption, plain, 1, rng) for _ in range(20)} == {"first line s"}


def test_keep_tokens_separator_fixes_text_before_it_and_shuffles_the_rest():
    cfg = CaptionConfig(shuffle_caption=True, keep_tokens=3, keep_tokens_separator="|||")
    rng = random.Random(7)
    orders = set()
    for _ in range(100):
        tags = process_caption("sks, dog ||| c, d, e", cfg, 1, rng).split(", ")
        assert tags[:2] == ["sks", "dog"]  # the separator wins over keep_tokens=3
        assert sorted(tags[2:]) == ["c", "d", "e"]
        orders.add(tuple(tags[2:]))
    assert len(orders) > 1


def test_second_keep_tokens_separator_starts_a_fixed_suffix():
    cfg = CaptionConfig(shuffle_caption=True, keep_tokens_separator="|||")
    rng = random.Random(8)
    orders = set()
    for _ in range(100):
        tags = process_caption("sks ||| b, c, d ||| best quality, 4k", cfg, 1, rng).split(", ")
        assert tags[0] == "sks" and tags[-2:] == ["best quality", "4k"]
        assert sorted(tags[1:-2]) == ["b", "c", "d"]
        orders.add(tuple(tags[1:-2]))
    assert len(orders) > 1


def test_keep_tokens_separator_is_removed_even_without_shuffle():
    cfg = CaptionConfig(keep_tokens_separator="|||")
    assert process_caption("sks, dog|||grass ||| 4k", cfg, 1, random.Random(9)) == "sks, dog, grass, 4k"


def test_keep_tokens_counts_only_non_empty_tags():
    cfg = CaptionConfig(shuffle_caption=True, keep_tokens=2)
    rng = random.Random(10)
    for _ in range(50):
        tags = process_caption("a,, b, c, d,", cfg, 1, rng).split(", ")
        assert tags[:2] == ["a", "b"] and sorted(tags[2:]) == ["c", "d"]


def test_secondary_separator_is_replaced_after_shuffle_so_its_parts_stay_together():
    plain = CaptionConfig(secondary_separator=";;;")
    assert (
        process_caption("blue shirt;;;red tie, smile", plain, 1, random.Random(11))
        == "blue shirt,red tie, smile"
    )
    shuffled = CaptionConfig(shuffle_caption=True, secondary_separator=";;;")
    rng = random.Random(12)
    seen = {process_caption("blue shirt;;;red tie, smile", shuffled, 1, rng) for _ in range(100)}
    assert seen == {"blue shirt,red tie, smile", "smile, blue shirt,red tie"}


def test_prefix_and_suffix_are_joined_with_a_space_before_tags_are_split():
    cfg = CaptionConfig(caption_prefix="photo of", caption_suffix="4k")
    assert process_caption("sks dog", cfg, 1, random.Random(13)) == "photo of sks dog 4k"
    shuffled = CaptionConfig(caption_prefix="photo of", shuffle_caption=True, keep_tokens=1)
    rng = random.Random(14)
    for _ in range(20):
        assert process_caption("sks, dog, grass", shuffled, 1, rng).startswith("photo of sks, ")


def test_same_seed_gives_same_captions_each_epoch_and_another_seed_differs():
    cfg = CaptionConfig(
        shuffle_caption=True,
        keep_tokens=1,
        caption_tag_dropout_rate=0.2,
        caption_dropout_rate=0.1,
        enable_wildcard=True,
    )
    caption = "sks, {red|blue} shirt, grass, sky, tree, cloud, sun"

    def run(seed: int) -> list[list[str]]:
        rng = random.Random(seed)
        return [[process_caption(caption, cfg, epoch, rng) for _ in range(10)] for epoch in (1, 2, 3)]

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_epoch_zero_is_refused_because_epochs_count_from_one():
    with pytest.raises(ValueError, match="from 1"):
        process_caption("a", CaptionConfig(), 0, random.Random(0))


def test_tag_frequency_counts_lowercased_stripped_tags_per_folder():
    captions = {
        "10_sks dog": ["sks dog, Grass,  sky", "SKS dog, grass", "sks dog,, "],
        "1_dog": ["dog", "dog, Sky"],
    }
    assert tag_frequency(captions) == {
        "10_sks dog": {"sks dog": 3, "grass": 2, "sky": 1},
        "1_dog": {"dog": 2, "sky": 1},
    }


def test_varies_per_step_is_true_for_each_per_use_change_only():
    assert not CaptionConfig().varies_per_step
    assert not CaptionConfig(keep_tokens=2, caption_prefix="p", secondary_separator=";").varies_per_step
    for change in (
        {"shuffle_caption": True},
        {"enable_wildcard": True},
        {"caption_dropout_rate": 0.1},
        {"caption_dropout_every_n_epochs": 3},
        {"caption_tag_dropout_rate": 0.1},
    ):
        assert CaptionConfig(**change).varies_per_step, change


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("caption_dropout_rate", 1.5),
        ("caption_tag_dropout_rate", -0.1),
        ("keep_tokens", -1),
        ("caption_dropout_every_n_epochs", -2),
        ("caption_separator", ""),
        ("keep_tokens_separator", ","),
        ("shuffle_caption", "yes"),
    ],
)
def test_invalid_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=re.escape(f"captions.{field}:")):
        CaptionConfig(**{field: value})


def test_weighted_captions_are_accepted_and_type_checked():
    assert CaptionConfig(weighted_captions=True).weighted_captions is True
    with pytest.raises(ConfigError, match=r"captions\.weighted_captions: 'yes' is not a bool"):
        CaptionConfig(weighted_captions="yes")


def test_merged_applies_a_subsets_overrides_and_validates_them():
    base = CaptionConfig(shuffle_caption=True, keep_tokens=1)
    subset = merged(base, {"keep_tokens": 2, "caption_prefix": "photo"})
    assert (subset.shuffle_caption, subset.keep_tokens, subset.caption_prefix) == (True, 2, "photo")
    assert base.keep_tokens == 1
    with pytest.raises(ConfigError, match=r"captions\.keep_tokens"):
        merged(base, {"keep_tokens": -1})


def test_merged_refuses_an_unknown_key_and_names_the_closest_one():
    with pytest.raises(ConfigError, match=r"shuffle_captions.*'shuffle_caption'"):
        merged(CaptionConfig(), {"shuffle_captions": True})


def assert_runs(got, expected):
    assert [text for text, _ in got] == [text for text, _ in expected]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in expected])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        ("[quiet] (loud:1.5)", [("quiet", 1 / 1.1), (" ", 1.0), ("loud", 1.5)]),
        ("((a)) [[b]]", [("a", 1.1 * 1.1), (" ", 1.0), ("b", 1 / 1.1 / 1.1)]),
        ("a:b) c]", [("a:b) c]", 1.0)]),
        (r"back\\slash", [("back\\slash", 1.0)]),
        ("", [("", 1.0)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.3 * 1.1 * 1.1),
                (" ", 1.1),
                ("on", 1.1 / 1.1),
                (" a ", 1.1),
                ("hill", 0.5 * 1.1),
                (", sun, ", 1.1),
                ("sky", 1.1**4),
                (".", 1.1),
            ],
        ),
    ],
)
def test_weighted_caption_parse_matches_a1111_attention_rules(text, expected):
    assert_runs(parse_weighted_caption(text), expected)


def test_weighted_caption_with_malformed_weight_is_a_dataset_error():
    with pytest.raises(DatasetError, match=r"1\.2\.3"):
        parse_weighted_caption("(tag:1.2.3)")
