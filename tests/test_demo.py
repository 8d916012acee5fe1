"""The embedded demo shows a LoRA learning: its loss falls for every model family it builds."""

from __future__ import annotations

import pytest

from lora_train_core.demo import run_demo

# The flow loss compares v̂ with ε − x0, whose noise part no LoRA can predict: its floor is high,
# so 30 steps lower it by ~15% (measured: flux_dev 0.85, chroma 0.85) where SD's falls by more.
FALL = {"sd15": 0.8, "sdxl": 0.8, "flux_dev": 0.9, "chroma": 0.9}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FALL))
def test_demo_loss_falls_from_the_first_to_the_last_six_steps(tmp_path, family):
    losses = run_demo(family, tmp_path).trained.losses
    assert len(losses) == 30
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    # a visible fall, not noise: the 1e-3 attention-only demo moved SDXL's by +0.6%
    assert last < FALL[family] * first, (family, first, last)
