"""Weighted captions (kohya `--weighted_captions`): A1111 attention syntax in a caption
scales the text-encoder outputs of the tokens it covers. `DiffusersBackend.encode_text(...,
weighted=True)` runs this.

Each caption is split into (text, weight) runs by `captions.parse_weighted_caption`;
each run is tokenized without special tokens and every token gets its run's weight;
ids are cut to the tokenizer's length − 2, then BOS, EOS and padding are added with
weight 1.0 (custom_train_functions.py `get_prompts_with_weights` /
`pad_tokens_and_weights`; strategy_base.py `_get_weighted_input_ids`). The text
encoders then run exactly as for unweighted captions (`DiffusersBackend.encode_token_ids`),
so a caption without weight syntax gives the same conditioning, and each token's hidden
state is multiplied by its weight, as current sd-scripts does (strategy_sd.py /
strategy_sdxl.py `encode_tokens_with_weights`; not the mean rescale of its older SD1.x
`get_weighted_text_embeddings`). SDXL: both encoders' penultimate states are weighted; the
pooled output of the second encoder is left unweighted, as kohya leaves it. Only one
77-token window is used (no `max_token_length`), as everywhere in this trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..data.captions import parse_weighted_caption
from ..errors import ModelError
from .backend import TextConditioning

if TYPE_CHECKING:  # the backend calls in here from its encode_text(weighted=True)
    from .diffusers_backend import DiffusersBackend


def encode_weighted_captions(backend: DiffusersBackend, captions: Sequence[str]) -> TextConditioning:
    """`backend.encode_text(captions)` with each caption's attention weights applied.

    Differentiable when the text encoders are (text-encoder LoRA trains).
    """
    tokenized = [weighted_token_ids(tokenizer, captions) for tokenizer in backend.tokenizers]
    weights = tokenized[0][1]
    if any(not torch.equal(weights, other) for _, other in tokenized[1:]):
        # SDXL's two tokenizers share CLIP's vocabulary, so their tokens line up; one weight
        # per position across the concatenated states needs that.
        raise ModelError(
            f"{backend.family_spec.title}'s tokenizers split a weighted caption differently; cannot weight it"
        )
    text = backend.encode_token_ids([token_ids for token_ids, _ in tokenized])
    return TextConditioning(_weighted(text.hidden, weights), text.pooled)


def weighted_token_ids(tokenizer, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, weights), both (B, tokenizer.model_max_length): BOS, the caption's tokens
    cut to length − 2, EOS, then padding; BOS, EOS and padding weigh 1.0.

    For a caption without weight syntax the ids equal the tokenizer's own
    `padding="max_length", truncation=True` ids.
    """
    length = tokenizer.model_max_length
    id_rows, weight_rows = [], []
    for caption in captions:
        ids: list[int] = []
        weights: list[float] = []
        for text, weight in parse_weighted_caption(caption):
            run = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
            ids += run
            weights += [weight] * len(run)
        ids, weights = ids[: length - 2], weights[: length - 2]
        padding = length - 2 - len(ids)
        id_rows.append(
            [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding
        )
        weight_rows.append([1.0, *weights, 1.0] + [1.0] * padding)
    return torch.tensor(id_rows, dtype=torch.long), torch.tensor(weight_rows, dtype=torch.float32)


def _weighted(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's hidden state times its weight (kohya `encode_tokens_with_weights`)."""
    return hidden * weights.to(hidden.device, hidden.dtype)[..., None]
