"""The refusals a recipe meets before training: asked by preflight (before the model loads) and
again by train() itself, for callers that drive it directly."""

from __future__ import annotations

import torch

from ..objective.loss import check_loss_for_prediction_type
from ..optim.param_groups import check_something_trains
from .speed import check_speed


def check_recipe(
    recipe, family: str, prediction_type: str, device: torch.device, fp8_base: bool, world_size: int = 1
) -> None:
    """ConfigError naming the setting when `recipe` cannot train this model here."""
    check_loss_for_prediction_type(recipe.loss, prediction_type)
    check_speed(recipe, device, fp8_base, world_size)
    check_something_trains(recipe.optimizer, recipe.network, recipe.blocks, family)
