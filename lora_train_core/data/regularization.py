"""kohya's DreamBooth balancing of regularisation images against training images.

Mirrors train_util.py `DreamBoothDataset.__init__` (the loop over `reg_infos` with
`n` and `first_loop`), read from sd-scripts 48d368f (2026-02):

1. First pass, in registration order: each reg image is registered with its whole
   folder's repeats, and the pass stops right after the image that brings the count
   to >= the number of training images (with repeats). That image keeps all its
   repeats, so the total can overshoot by up to its repeats - 1; the images after
   it are not used at all.
2. If every reg image was registered and the count is still short, each gets one more
   repeat in turn (from the first again after the last) until the count reaches it.

With no training images nothing is registered. kohya's `ss_num_reg_images` metadata
is the count before balancing (sum of folder repeats), not this list's length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from ..errors import check_int

T = TypeVar("T")


def balance_regularization(train_count: int, reg_items: Sequence[tuple[T, int]]) -> list[T]:
    """The reg items used per epoch, each repeated by its balanced count.

    `reg_items` are (item, folder repeats) in registration order; `train_count` is
    the number of training images with repeats. The result lists each used item's
    copies together, in registration order. [] when there are no reg items or no
    training images.
    """
    check_int("balance_regularization(train_count)", train_count, 0, hint="training images with repeats")
    for index, (_, repeats) in enumerate(reg_items):
        check_int(
            f"balance_regularization(reg_items[{index}].repeats)",
            repeats,
            1,
            hint="folder repeats, the N of N_name",
        )
    counts: list[int] = []
    total = 0
    for _, repeats in reg_items:
        if total >= train_count:
            break
        counts.append(repeats)
        total += repeats
    index = 0
    while counts and total < train_count:
        counts[index % len(counts)] += 1
        total += 1
        index += 1
    # Items after the first pass stopped have no count: zip leaves them out.
    return [item for (item, _), count in zip(reg_items, counts, strict=False) for _ in range(count)]
