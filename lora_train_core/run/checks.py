"""The refusals a recipe meets before training: asked by preflight (before the model loads) and
again by train() itself, for callers that drive it directly."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..families import ModelFamily, get_family
from ..objective.flow_loss import check_flow_unused, check_options_for_flow, guidance_scale_for
from ..objective.loss import check_loss_for_prediction_type
from ..optim.param_groups import check_something_trains
from .speed import check_speed

_BLOCK_WISE = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")


def check_recipe(
    recipe, family: str, prediction_type: str, device: torch.device, fp8_base: bool, world_size: int = 1
) -> None:
    """ConfigError naming the setting when `recipe` cannot train this model here."""
    spec = get_family(family)
    if spec.is_flow:
        check_options_for_flow(recipe.noise, recipe.loss, spec.title)
        guidance_scale_for(recipe.flow, spec)
    else:
        check_flow_unused(recipe.flow, spec.title)
        check_loss_for_prediction_type(recipe.loss, prediction_type)
    check_network_for_family(recipe, spec)
    check_speed(recipe, device, fp8_base, world_size)
    check_something_trains(recipe.optimizer, recipe.network, recipe.blocks, family)


def check_network_for_family(recipe, spec: ModelFamily) -> None:
    """Refuse network options the family's LoRA cannot honour: block-wise lists where kohya's
    family has no block numbering, a text-encoder LoRA for a family without one, conv LoRA on a
    DiT (it has no k×k convs)."""
    net = recipe.network
    if spec.blocks is None:
        given = [name for name in _BLOCK_WISE if getattr(net, name) is not None]
        if recipe.blocks is not None and recipe.blocks.is_set:
            given.append("block_lr_weight")
        if given:
            raise ConfigError(
                f"network.{given[0]}: block-wise settings are not implemented yet for {spec.title} "
                "(kohya numbers blocks only for SD UNets); remove it"
            )
    if net.train_text_encoder and not spec.text_encoder_prefixes:
        raise ConfigError(
            f"network.train_text_encoder: {spec.title} has no text encoder this trainer can put a LoRA "
            "on (its text encoder is T5-XXL; T5 LoRA, kohya's train_t5xxl, is not implemented yet); "
            "set it to false"
        )
    if spec.unet_names == "native" and net.conv_dim:
        raise ConfigError(
            f"network.conv_dim: {net.conv_dim}, but {spec.title} is a transformer with no k×k conv "
            "layers to put a conv LoRA on; set it to 0"
        )
