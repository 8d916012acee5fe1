"""Weighted captions (kohya --weighted_captions) on the tiny SD1.5 and SDXL models.

The tiny tokenizer is byte-level without merges: every character of a word is one
token, so the positions a weight covers can be counted by hand (BOS is position 0).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lora_train_core.data.buckets import BucketConfig, plan_buckets
from lora_train_core.data.captions import CaptionConfig
from lora_train_core.data.dataset import DatasetConfig, load_dataset
from lora_train_core.data.latent_cache import CacheConfig, build_latents
from lora_train_core.data.text_cache import check_text_cacheable
from lora_train_core.demo import make_synthetic_dataset
from lora_train_core.errors import ConfigError
from lora_train_core.model.network import NetworkConfig
from lora_train_core.model.tiny_models import TOKEN_LENGTH, tiny_backend
from lora_train_core.model.weighted_text import weighted_token_ids
from lora_train_core.optim.optimizers import OptimizerConfig
from lora_train_core.run.train import TrainConfig, TrainingRecipe, train

PLAIN = ["a red circle, blue background", "", "flat colors " * 5]  # the last is cut to 30 tokens


def expected_weighting(hidden: torch.Tensor, weights: list[list[float]]) -> torch.Tensor:
    """Token i of sample b times weights[b][i] (kohya's current rule: no mean rescale), in float64."""
    h = hidden.double()
    w = torch.tensor(weights, dtype=torch.float64)
    out = torch.empty_like(h)
    for b in range(h.shape[0]):
        for i in range(h.shape[1]):
            out[b, i] = h[b, i] * w[b, i]
    return out


@pytest.fixture
def sd15_backend():
    """The tiny SD1.5 model with a learned-looking bias in its final LayerNorm.

    At init that LayerNorm has no bias, so every output vector averages ~0; a bias like
    real CLIP's keeps the weighted and unweighted outputs clearly apart.
    """
    return with_final_norm_bias(tiny_backend("sd15", seed=0))


def with_final_norm_bias(backend):
    generator = torch.Generator().manual_seed(1)
    bias = backend.text_encoders[0].get_submodule("final_layer_norm").bias
    with torch.no_grad():
        bias.copy_(0.5 + 0.1 * torch.randn(bias.shape, generator=generator))
    return backend


def red_weights(first: int, count: int, weight: float) -> list[float]:
    return [1.0] * first + [weight] * count + [1.0] * (TOKEN_LENGTH - first - count)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_caption_without_weight_syntax_encodes_exactly_as_the_backend(family):
    backend = tiny_backend(family, seed=0)
    with torch.no_grad():
        weighted = backend.encode_text(PLAIN, weighted=True)
        plain = backend.encode_text(PLAIN)
    assert torch.equal(weighted.hidden, plain.hidden)
    if family == "sdxl":
        assert torch.equal(weighted.pooled, plain.pooled)
    else:
        assert weighted.pooled is None


def test_weighted_tokens_are_scaled_by_their_weight(sd15_backend):
    with torch.no_grad():
        weighted = sd15_backend.encode_text(["(red:1.5) cat", "a [dog]"], weighted=True).hidden
        plain = sd15_backend.encode_text(["red cat", "a dog"]).hidden
    # "red" is positions 1-3; in "a [dog]", "a " is position 1 and "dog" positions 2-4, at 1/1.1.
    weights = [red_weights(1, 3, 1.5), red_weights(2, 3, 1 / 1.1)]
    torch.testing.assert_close(weighted.double(), expected_weighting(plain, weights), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(weighted, plain)


def test_sdxl_weights_the_concatenated_states_and_leaves_pooled_unweighted(sdxl_backend):
    with torch.no_grad():
        weighted = sdxl_backend.encode_text(["a (red:1.5) cat", "(blue:0.5)"], weighted=True)
        plain = sdxl_backend.encode_text(["a red cat", "blue"])
    assert weighted.hidden.shape == (2, TOKEN_LENGTH, 64) and weighted.pooled.shape == (2, 32)
    weights = [red_weights(2, 3, 1.5), red_weights(1, 4, 0.5)]
    expected = expected_weighting(plain.hidden, weights)
    torch.testing.assert_close(weighted.hidden.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(weighted.pooled, plain.pooled)


def test_weighted_tokens_past_the_window_are_cut_and_eos_keeps_weight_one(sd15_backend):
    (tokenizer,) = sd15_backend.tokenizers
    ids, weights = weighted_token_ids(tokenizer, ["(" + "x" * 40 + ":2)"])
    x = tokenizer.convert_tokens_to_ids("x")  # "x" inside a word; "x</w>" ends one
    assert ids.tolist() == [[tokenizer.bos_token_id, *[x] * (TOKEN_LENGTH - 2), tokenizer.eos_token_id]]
    assert weights.tolist() == [[1.0, *[2.0] * (TOKEN_LENGTH - 2), 1.0]]


def test_weighted_captions_train_through_train_and_reach_the_text_encoder(tmp_path):
    """ "(red:1)" with weighted captions must train exactly as plain "red"; at 1.5 it differs."""
    one = _train_losses(tmp_path / "one", r"a (\1:1)", weighted=True)
    plain = _train_losses(tmp_path / "plain", r"a \1", weighted=False)
    strong = _train_losses(tmp_path / "strong", r"a (\1:1.5)", weighted=True)
    assert all(torch.isfinite(torch.tensor(strong)))
    assert one[0] == plain[0]
    # The rescale's gradient is zero at weight 1 only up to rounding, so later steps agree closely.
    assert one == pytest.approx(plain, rel=1e-6, abs=0)
    assert abs(strong[0] - plain[0]) > 1e-4


def _train_losses(folder: Path, colour_pattern: str, weighted: bool) -> list[float]:
    make_synthetic_dataset(folder, count=4)
    for path in folder.glob("*/*.txt"):
        path.write_text(re.sub(r"^a (\w+)", colour_pattern, path.read_text()), encoding="utf-8")
    backend = with_final_norm_bias(tiny_backend("sd15", seed=0))
    dataset = load_dataset(DatasetConfig(path=folder))
    plan = plan_buckets(dataset.images, BucketConfig(resolution=(64, 64), min_bucket_reso=64))
    latents = build_latents(dataset, plan, backend, CacheConfig(mode="ram"))
    recipe = TrainingRecipe(
        train=TrainConfig(max_train_steps=2, train_batch_size=2, seed=3),
        network=NetworkConfig(network_dim=4, network_alpha=4.0),
        optimizer=OptimizerConfig(learning_rate=1e-3),
        captions=CaptionConfig(weighted_captions=weighted),
    )
    return train(backend, dataset, plan, latents, recipe).losses


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_text_encoder_cache_with_weighted_captions_is_refused_naming_both_fields(mode):
    with pytest.raises(
        ConfigError, match=rf"cache\.text_encoder_outputs: '{mode}'.*captions\.weighted_captions = true"
    ):
        check_text_cacheable(mode, False, CaptionConfig(weighted_captions=True))
    check_text_cacheable("none", False, CaptionConfig(weighted_captions=True))
