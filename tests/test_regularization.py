"""kohya's DreamBooth reg-image balancing, with counts worked by hand."""

from __future__ import annotations

from collections import Counter

import pytest

from lora_train_core.data.regularization import balance_regularization
from lora_train_core.errors import ConfigError


def test_single_repeat_reg_images_get_extra_repeats_in_turn_until_train_count():
    # first pass r1,r2,r3 -> 3; +1 each -> 6; +1 each -> 9; r1 -> 10
    got = balance_regularization(10, [("r1", 1), ("r2", 1), ("r3", 1)])
    assert Counter(got) == {"r1": 4, "r2": 3, "r3": 3}
    assert len(got) == 10


def test_extra_repeats_go_on_top_of_folder_repeats():
    # first pass a*2 + b*1 = 3; then a 4, b 5, a 6, b 7
    assert Counter(balance_regularization(7, [("a", 2), ("b", 1)])) == {"a": 4, "b": 3}


def test_first_pass_stops_mid_list_and_keeps_the_crossing_images_repeats():
    # a*3 -> 3 < 5, b*3 -> 6 >= 5: stop; b keeps all 3 repeats (overshoot to 6), c unused
    got = balance_regularization(5, [("a", 3), ("b", 3), ("c", 3)])
    assert got == ["a", "a", "a", "b", "b", "b"]


def test_reg_count_equal_to_train_count_is_used_as_is():
    assert balance_regularization(4, [("a", 2), ("b", 2)]) == ["a", "a", "b", "b"]


def test_more_reg_images_than_train_images_leaves_the_later_ones_unused():
    items = [(f"r{i}", 1) for i in range(10)]
    assert balance_regularization(3, items) == ["r0", "r1", "r2"]


def test_no_reg_items_or_no_train_images_gives_no_reg_images():
    assert balance_regularization(8, []) == []
    assert balance_regularization(0, [("a", 2)]) == []


def test_reg_folder_with_zero_repeats_is_refused():
    with pytest.raises(ConfigError, match=r"reg_items\[1\]\.repeats"):
        balance_regularization(4, [("a", 1), ("b", 0)])
