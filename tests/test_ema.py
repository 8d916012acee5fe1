"""EMA of LoRA weights: diffusers' decay rule, the update, update_every and resumable state."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lora_train_core.errors import ConfigError
from lora_train_core.optim.ema import EMAConfig, LoraEMA

NAME = "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"


def decay_formula(step, after=0, warmup=True, inv_gamma=1.0, power=2 / 3, max_decay=0.9999, min_decay=0.0):
    """KOHYA_FACTS "Not in sd-scripts": the diffusers EMAModel rule, written out."""
    k = max(0, step - after - 1)
    if k == 0:
        return 0.0
    d = 1 - (1 + k / inv_gamma) ** (-power) if warmup else (1 + k) / (10 + k)
    return min(max(d, min_decay), max_decay)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"use_ema_warmup": False},
        {"update_after_step": 5, "inv_gamma": 2.0, "power": 0.75},
        {"decay": 0.9, "min_decay": 0.5},
        {"use_ema_warmup": False, "decay": 0.95, "min_decay": 0.3, "update_after_step": 2},
    ],
)
def test_decay_matches_the_diffusers_formula(kwargs):
    ema = LoraEMA([], EMAConfig(enabled=True, **kwargs))
    names = {"decay": "max_decay", "use_ema_warmup": "warmup", "update_after_step": "after"}
    formula_kwargs = {names.get(k, k): v for k, v in kwargs.items()}
    for step in (1, 2, 3, 4, 6, 7, 10, 100, 10_000, 10**7):
        assert ema.decay_at(step) == pytest.approx(decay_formula(step, **formula_kwargs), rel=1e-12), step


def test_decay_matches_diffusers_ema_model_get_decay():
    from diffusers.training_utils import EMAModel

    reference = EMAModel(
        [nn.Parameter(torch.zeros(1))],
        decay=0.999,
        min_decay=0.1,
        update_after_step=3,
        use_ema_warmup=True,
        inv_gamma=1.5,
        power=0.7,
    )
    ours = LoraEMA([], EMAConfig(decay=0.999, min_decay=0.1, update_after_step=3, inv_gamma=1.5, power=0.7))
    for step in range(1, 40):
        assert ours.decay_at(step) == pytest.approx(reference.get_decay(step), rel=1e-12)


def test_ema_after_three_updates_equals_the_hand_computed_average():
    param = nn.Parameter(torch.zeros(2))
    ema = LoraEMA([(NAME, param)], EMAConfig(decay=0.5, min_decay=0.5, use_ema_warmup=False))
    seen = []
    for step, value in enumerate((2.0, 4.0, 0.0), start=1):
        with torch.no_grad():
            param.fill_(value)
        ema.step(step)
        seen.append(ema.shadow_state_dict()[NAME][0].item())
    # step 1: d = 0, e = p = 2; step 2: e = 0.5·2 + 0.5·4 = 3; step 3: e = 0.5·3 + 0.5·0 = 1.5
    assert seen == [2.0, 3.0, 1.5]


def test_ema_of_a_sequence_equals_the_weighted_sum_of_its_values():
    param = nn.Parameter(torch.zeros(3))
    cfg = EMAConfig(decay=0.99, power=0.5)
    ema = LoraEMA([(NAME, param)], cfg)
    values = [torch.tensor([1.0, -2.0, 3.0]) * (t + 1) for t in range(6)]
    for step, v in enumerate(values, start=1):
        with torch.no_grad():
            param.copy_(v)
        ema.step(step)
    # e_n = Σ_t (1 − d_t)·p_t·Π_{s>t} d_s, with e_0 = 0 and d_1 = 0
    ds = [decay_formula(step, power=0.5, max_decay=0.99) for step in range(1, 7)]
    expected = torch.zeros(3)
    for t, v in enumerate(values):
        later = torch.tensor(ds[t + 1 :]).prod().item()
        expected += (1 - ds[t]) * v * later
    torch.testing.assert_close(ema.shadow_state_dict()[NAME], expected)


def test_update_every_skips_the_steps_in_between():
    param = nn.Parameter(torch.zeros(1))
    ema = LoraEMA([(NAME, param)], EMAConfig(update_every=2, decay=0.5, min_decay=0.5, use_ema_warmup=False))
    for step, value in enumerate((10.0, 20.0, 30.0, 40.0), start=1):
        with torch.no_grad():
            param.fill_(value)
        ema.step(step)
    # e starts as the initial 0; updates at step 2 (k = 1, d = 0.5: e = 0.5·0 + 0.5·20 = 10)
    # and step 4 (e = 0.5·10 + 0.5·40 = 25); the values of steps 1 and 3 are never seen
    assert ema.shadow_state_dict()[NAME].item() == pytest.approx(25.0)
    assert ema.num_updates == 2


def test_shadow_is_fp32_on_cpu_when_asked_for_low_precision_params():
    param = nn.Parameter(torch.full((2, 2), 0.1, dtype=torch.bfloat16))
    ema = LoraEMA([(NAME, param)], EMAConfig(device="cpu"))
    ema.step(1)
    shadow = ema.shadow_state_dict()[NAME]
    assert shadow.dtype == torch.float32 and shadow.device.type == "cpu"
    assert shadow.data_ptr() != param.data_ptr()


def test_state_dict_round_trips_and_its_meta_is_json():
    params = [(NAME, nn.Parameter(torch.randn(2, 2, generator=torch.Generator().manual_seed(0))))]
    cfg = EMAConfig(decay=0.9)
    ema = LoraEMA(params, cfg)
    for step in range(1, 5):
        with torch.no_grad():
            params[0][1].add_(1.0)
        ema.step(step)
    state = ema.state_dict()
    json.dumps(state["meta"])
    restored = LoraEMA([(NAME, nn.Parameter(torch.zeros(2, 2)))], cfg)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.shadow_state_dict()[NAME], ema.shadow_state_dict()[NAME])
    assert (restored.num_updates, restored.last_step) == (4, 4)


def test_loading_state_of_another_network_is_an_error():
    state = LoraEMA([(NAME, nn.Parameter(torch.zeros(2, 2)))], EMAConfig()).state_dict()
    other = LoraEMA([("lora_te_x.lora_up.weight", nn.Parameter(torch.zeros(2, 2)))], EMAConfig())
    with pytest.raises(ConfigError, match="EMA state does not match"):
        other.load_state_dict(state)
    wider = LoraEMA([(NAME, nn.Parameter(torch.zeros(2, 4)))], EMAConfig())
    with pytest.raises(ConfigError, match=r"shape \(2, 2\)"):
        wider.load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decay": 1.5}, "ema.decay: 1.5 is out of range"),
        ({"decay": 0.9, "min_decay": 0.95}, "ema.min_decay: 0.95 is out of range"),
        ({"update_every": 0}, "ema.update_every: 0 is out of range"),
        ({"device": "cuda"}, "ema.device: 'cuda' is not one of 'same', 'cpu'"),
        ({"update_after_step": 1.5}, "ema.update_after_step: 1.5 is not a whole number"),
    ],
)
def test_bad_ema_settings_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EMAConfig(**kwargs)
