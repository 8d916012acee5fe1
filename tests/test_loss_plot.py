"""The loss plot never crashes on real-world curves and draws what it is given."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lora_train_core.outputs.loss_plot import HEIGHT, WIDTH, render_loss_plot, smoothed


def test_smoothing_is_a_bias_corrected_moving_average():
    values = [1.0, 3.0]
    expected_second = (0.9 * 0.1 * 1.0 + 0.1 * 3.0) / (1 - 0.9**2)
    assert smoothed(values) == pytest.approx([1.0, expected_second])


@pytest.mark.parametrize(
    "losses", [[], [0.5], [0.3] * 10, [1.0, math.nan, 0.8, math.inf, 0.7], [math.nan] * 3, list(range(500))]
)
def test_plot_renders_for_empty_constant_nan_and_long_curves(losses):
    image = render_loss_plot(losses)
    assert image.size == (WIDTH, HEIGHT)


def test_a_falling_curve_is_drawn_high_on_the_left_and_low_on_the_right():
    pixels = np.asarray(render_loss_plot([1.0 - i / 100 for i in range(100)]))
    coloured = np.argwhere((pixels[:, :, 0] > 180) & (pixels[:, :, 1] < 100))  # the red smoothed line
    left = coloured[coloured[:, 1] < WIDTH // 3]
    right = coloured[coloured[:, 1] > 2 * WIDTH // 3]
    assert left[:, 0].mean() < right[:, 0].mean()  # image rows grow downwards
