"""The embedded demo shows a LoRA learning: its loss falls for both model families."""

from __future__ import annotations

import pytest

from lora_train_core.demo import run_demo


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_demo_loss_falls_from_the_first_to_the_last_six_steps(tmp_path, family):
    losses = run_demo(family, tmp_path).trained.losses
    assert len(losses) == 30
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    # a visible fall, not noise: the 1e-3 attention-only demo moved SDXL's by +0.6%
    assert last < 0.8 * first, (family, first, last)
