"""Optimiser choice, optimizer_args parsing and each optimiser training a tiny model."""

from __future__ import annotations

import importlib.util
import itertools
import logging
import math
import sys

import pytest
import torch
from torch import nn

from lora_train_core.errors import ConfigError
from lora_train_core.optim.optimizers import (
    OptimizerConfig,
    build_optimizer,
    optimizer_class,
    parse_optimizer_args,
)

CPU = torch.device("cpu")
HAS_CUDA = torch.cuda.is_available()


def tiny_regression(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    x = torch.randn(32, 4, generator=gen)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    return model, x, y


def train_losses(cfg: OptimizerConfig, steps: int, device: torch.device = CPU) -> list[float]:
    model, x, y = tiny_regression()
    model, x, y = model.to(device), x.to(device), y.to(device)
    groups = [{"params": list(model.parameters()), "lr": cfg.learning_rate}]
    opt = build_optimizer(groups, cfg, device)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return losses


def test_optimizer_name_is_matched_case_insensitively_and_stored_canonically():
    assert OptimizerConfig(optimizer_type="adamw").optimizer_type == "AdamW"
    assert OptimizerConfig(optimizer_type="PRODIGY", learning_rate=1.0).optimizer_type == "Prodigy"
    assert OptimizerConfig(optimizer_type="adamw8BIT").optimizer_type == "AdamW8bit"


def test_unknown_optimizer_name_lists_the_supported_ones():
    with pytest.raises(
        ConfigError, match=r"optimizer_type.*'SGD'.*AdamW, AdamW8bit, Lion, Lion8bit, Prodigy"
    ):
        OptimizerConfig(optimizer_type="SGD")


def test_dadaptation_is_reported_as_not_implemented():
    with pytest.raises(ConfigError, match=r"DAdaptAdam.*not implemented"):
        OptimizerConfig(optimizer_type="DAdaptAdam")


def test_optimizer_args_are_python_literals_as_in_kohya():
    parsed = parse_optimizer_args(
        ["betas=0.9,0.999", "weight_decay=0.01", "decouple=True", "beta3=None", "eps = 1e-6", "mode='x'"]
    )
    assert parsed == {
        "betas": (0.9, 0.999),
        "weight_decay": 0.01,
        "decouple": True,
        "beta3": None,
        "eps": 1e-6,
        "mode": "x",
    }


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("weight_decay", "'weight_decay' is not 'key=value'"),
        ("=3", "'=3' is not 'key=value'"),
        ("d_coef=two", "'d_coef=two'.*not a Python literal"),
    ],
)
def test_malformed_optimizer_args_name_the_bad_entry(entry, message):
    with pytest.raises(ConfigError, match=message):
        parse_optimizer_args([entry])


def test_repeated_optimizer_arg_is_an_error():
    with pytest.raises(ConfigError, match="'eps' is given more than once"):
        parse_optimizer_args(["eps=1e-8", "eps=1e-6"])


def test_unknown_optimizer_arg_names_the_key_and_the_accepted_ones():
    with pytest.raises(ConfigError, match=r"AdamW takes no 'momentum'; accepted: .*weight_decay"):
        OptimizerConfig(optimizer_type="AdamW", optimizer_args=("momentum=0.9",))
    with pytest.raises(ConfigError, match=r"Prodigy takes no 'amsgrad'; accepted: .*d_coef"):
        OptimizerConfig(optimizer_type="Prodigy", learning_rate=1.0, optimizer_args=("amsgrad=True",))


def test_lr_inside_optimizer_args_points_to_learning_rate():
    with pytest.raises(ConfigError, match="learning_rate"):
        OptimizerConfig(optimizer_args=("lr=1e-3",))


def test_stop_text_encoder_training_trains_te_while_step_is_below_n():
    cfg = OptimizerConfig(stop_text_encoder_training=3)
    assert [cfg.text_encoder_trains_at(s) for s in range(5)] == [True, True, True, False, False]
    assert all(OptimizerConfig().text_encoder_trains_at(s) for s in (0, 10, 10**6))


def test_text_encoder_lr_takes_one_or_two_values():
    assert OptimizerConfig(text_encoder_lr=(1e-5,)).text_encoder_lr == (1e-5,)
    assert OptimizerConfig(text_encoder_lr=[1e-5, 2e-5]).text_encoder_lr == (1e-5, 2e-5)
    with pytest.raises(ConfigError, match=r"text_encoder_lr.*3 values"):
        OptimizerConfig(text_encoder_lr=(1e-5, 1e-5, 1e-5))


def test_adafactor_relative_step_needs_its_own_schedule():
    with pytest.raises(ConfigError, match=r"lr_scheduler.*relative_step"):
        OptimizerConfig(optimizer_type="Adafactor", lr_scheduler="constant")
    with pytest.raises(ConfigError, match="'adafactor' only follows Adafactor"):
        OptimizerConfig(
            optimizer_type="Adafactor", optimizer_args=("relative_step=False",), lr_scheduler="adafactor"
        )
    with pytest.raises(ConfigError, match="'adafactor' only follows Adafactor"):
        OptimizerConfig(optimizer_type="AdamW", lr_scheduler="adafactor")


def test_adafactor_relative_step_refuses_per_group_lrs():
    with pytest.raises(ConfigError, match="unet_lr"):
        OptimizerConfig(optimizer_type="Adafactor", lr_scheduler="adafactor", unet_lr=1e-4)


def test_adafactor_warmup_init_needs_relative_step():
    args = ("relative_step=False", "warmup_init=True")
    with pytest.raises(ConfigError, match="warmup_init=True needs relative_step=True"):
        OptimizerConfig(optimizer_type="Adafactor", optimizer_args=args)


def test_adafactor_relative_step_builds_with_no_lr_and_transformers_defaults():
    cfg = OptimizerConfig(optimizer_type="Adafactor", lr_scheduler="adafactor")
    opt = build_optimizer([{"params": [nn.Parameter(torch.ones(3))], "lr": 1e-4}], cfg, CPU)
    group = opt.param_groups[0]
    assert group["lr"] is None
    assert (group["relative_step"], group["scale_parameter"], group["warmup_init"]) == (True, True, False)


def test_adamw_uses_foreach_on_cpu():
    opt = build_optimizer([{"params": [nn.Parameter(torch.ones(3))], "lr": 1e-4}], OptimizerConfig(), CPU)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["foreach"] is True


def test_optimizer_default_lr_is_learning_rate_as_in_kohya():
    cfg = OptimizerConfig(learning_rate=3e-4, unet_lr=1e-4)
    opt = build_optimizer([{"params": [nn.Parameter(torch.ones(3))], "lr": 1e-4}], cfg, CPU)
    assert opt.defaults["lr"] == 3e-4
    assert opt.param_groups[0]["lr"] == 1e-4


@pytest.mark.parametrize(
    "cfg",
    [
        OptimizerConfig(optimizer_type="AdamW", learning_rate=3e-2),
        OptimizerConfig(optimizer_type="Lion", learning_rate=1e-2),
        OptimizerConfig(optimizer_type="Prodigy", learning_rate=1.0),
        OptimizerConfig(optimizer_type="Adafactor", lr_scheduler="adafactor"),
        OptimizerConfig(
            optimizer_type="Adafactor",
            learning_rate=3e-2,
            optimizer_args=("relative_step=False", "scale_parameter=False"),
        ),
    ],
    ids=["AdamW", "Lion", "Prodigy", "Adafactor-relative", "Adafactor-fixed"],
)
def test_each_optimizer_reduces_the_loss_of_a_tiny_regression(cfg):
    losses = train_losses(cfg, steps=30)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses


def test_prodigy_step_size_d_grows_from_d0():
    model, x, y = tiny_regression()
    cfg = OptimizerConfig(optimizer_type="Prodigy", learning_rate=1.0)
    opt = build_optimizer([{"params": list(model.parameters()), "lr": 1.0}], cfg, CPU)
    ds = [opt.param_groups[0]["d"]]
    for _ in range(8):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        ds.append(opt.param_groups[0]["d"])
    assert ds[0] == 1e-6  # prodigyopt's d0
    assert all(b >= a for a, b in itertools.pairwise(ds))
    assert ds[-1] > 10 * ds[0]


def test_prodigy_optimizer_args_reach_the_optimizer():
    args = (
        "d_coef=2.0",
        "decouple=False",
        "use_bias_correction=True",
        "safeguard_warmup=True",
        "weight_decay=0.01",
    )
    cfg = OptimizerConfig(optimizer_type="Prodigy", learning_rate=1.0, optimizer_args=args)
    opt = build_optimizer([{"params": [nn.Parameter(torch.ones(3))], "lr": 1.0}], cfg, CPU)
    group = opt.param_groups[0]
    assert (group["d_coef"], group["decouple"], group["use_bias_correction"]) == (2.0, False, True)
    assert (group["safeguard_warmup"], group["weight_decay"]) == (True, 0.01)


def test_prodigy_warns_when_lr_is_low(caplog):
    cfg = OptimizerConfig(optimizer_type="Prodigy", learning_rate=1e-4)
    with caplog.at_level(logging.WARNING):
        build_optimizer([{"params": [nn.Parameter(torch.ones(3))], "lr": 1e-4}], cfg, CPU)
    assert "use lr about 1.0" in caplog.text


def test_prodigy_refuses_groups_with_different_lrs():
    # prodigyopt >= 1.1 raises at the first step; kohya's "only the first lr counts" is gone.
    cfg = OptimizerConfig(optimizer_type="Prodigy", learning_rate=1.0, text_encoder_lr=(0.5,))
    groups = [
        {"params": [nn.Parameter(torch.ones(3))], "lr": 0.5},
        {"params": [nn.Parameter(torch.ones(3))], "lr": 1.0},
    ]
    with pytest.raises(ConfigError, match=r"Prodigy needs one learning rate.*\[0.5, 1.0\]"):
        build_optimizer(groups, cfg, CPU)


def test_8bit_optimizers_on_cpu_say_they_need_cuda():
    for name in ("AdamW8bit", "Lion8bit"):
        with pytest.raises(ConfigError, match=f"{name}.*needs a CUDA device.*use {name[:-4]}"):
            build_optimizer(
                [{"params": [nn.Parameter(torch.ones(3))], "lr": 1e-4}], OptimizerConfig(name), CPU
            )


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_missing_bitsandbytes_says_what_to_install():
    with pytest.raises(ConfigError, match=r"pip install bitsandbytes.*or use AdamW"):
        optimizer_class("AdamW8bit")


def test_missing_lion_pytorch_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lion_pytorch", None)  # makes `import lion_pytorch` fail
    with pytest.raises(ConfigError, match="pip install lion-pytorch"):
        optimizer_class("Lion")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (bitsandbytes 8-bit optimisers)")
@pytest.mark.parametrize(("name", "lr"), [("AdamW8bit", 3e-2), ("Lion8bit", 1e-2)])
def test_8bit_optimizers_reduce_the_loss_on_cuda(name, lr):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    losses = train_losses(OptimizerConfig(name, learning_rate=lr), steps=30, device=torch.device("cuda"))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_adamw_is_fused_on_cuda():
    param = nn.Parameter(torch.ones(3, device="cuda"))
    opt = build_optimizer([{"params": [param], "lr": 1e-4}], OptimizerConfig(), torch.device("cuda"))
    assert opt.defaults["fused"] is True
