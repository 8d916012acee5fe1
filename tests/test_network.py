"""kohya's LoRA layer: forward formula, injection/restore, dropouts, state dict, dtypes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_train_core.errors import ConfigError
from lora_train_core.families import get_family
from lora_train_core.model.kohya_keys import LoraTarget, unet_targets
from lora_train_core.model.network import LoRAModule, LoRANetwork, NetworkConfig


def seeded_linear(seed: int = 0, in_features: int = 8, out_features: int = 6) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


def randomise_up(lora: LoRAModule, seed: int = 1) -> None:
    """lora_up starts at zero; give it values so the LoRA path shows in the output."""
    with torch.no_grad():
        lora.lora_up.weight.copy_(
            torch.randn(lora.lora_up.weight.shape, generator=torch.Generator().manual_seed(seed))
        )


def test_output_unchanged_at_init_because_up_is_zero():
    linear = seeded_linear()
    x = torch.randn(3, 8)
    before = linear(x)
    lora = LoRAModule("lora_te_x", linear, dim=4, alpha=1.0)
    lora.apply_to()
    assert torch.equal(linear(x), before)
    assert torch.count_nonzero(lora.lora_up.weight) == 0
    assert torch.count_nonzero(lora.lora_down.weight) > 0


def test_kaiming_uniform_bound_of_lora_down_matches_a_sqrt5():
    # kaiming_uniform_(a=√5): bound = gain·√(3/fan_in), gain = √(2/(1+a²)) = √(1/3) → bound = 1/√fan_in
    lora = LoRAModule("lora_te_x", nn.Linear(400, 300), dim=64, alpha=1.0)
    weight = lora.lora_down.weight
    assert weight.abs().max() <= 1 / math.sqrt(400)
    assert weight.abs().max() > 0.95 / math.sqrt(400)


def test_linear_forward_is_f_plus_scaled_low_rank_product():
    linear = seeded_linear()
    lora = LoRAModule("lora_te_x", linear, dim=4, alpha=2.0, multiplier=0.7)
    randomise_up(lora)
    lora.apply_to()
    x = torch.randn(2, 5, 8)
    down, up = lora.lora_down.weight, lora.lora_up.weight
    expected = x @ linear.weight.T + linear.bias + 0.7 * (2.0 / 4) * (x @ down.T @ up.T)
    torch.testing.assert_close(linear(x), expected)


def test_conv3x3_forward_equals_conv_with_composed_kernel():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    lora = LoRAModule("lora_unet_x", conv, dim=2, alpha=1.0)
    randomise_up(lora)
    lora.apply_to()
    x = torch.randn(2, 3, 9, 7)
    down = lora.lora_down.weight  # (r, in, 3, 3)
    up = lora.lora_up.weight[:, :, 0, 0]  # (out, r)
    delta = torch.zeros(5, 3, 3, 3)
    for o in range(5):
        for r in range(2):
            delta[o] += up[o, r] * down[r]
    expected = F.conv2d(x, conv.weight + (1.0 / 2) * delta, conv.bias, stride=2, padding=1)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)


def test_restore_gives_back_the_original_forward_and_bit_identical_outputs():
    linear = seeded_linear()
    original_forward = linear.forward
    x = torch.randn(4, 8)
    before = linear(x)
    lora = LoRAModule("lora_te_x", linear, dim=4, alpha=1.0)
    randomise_up(lora)
    lora.apply_to()
    assert not torch.equal(linear(x), before)
    with pytest.raises(RuntimeError, match="already applied"):
        lora.apply_to()
    lora.restore()
    assert "forward" not in linear.__dict__
    assert linear.forward == original_forward
    assert torch.equal(linear(x), before)


def test_lora_module_does_not_adopt_the_wrapped_module_as_a_child():
    lora = LoRAModule("lora_te_x", seeded_linear(), dim=4, alpha=1.0)
    assert sorted(lora.state_dict()) == ["alpha", "lora_down.weight", "lora_up.weight"]


def test_alpha_zero_or_none_means_alpha_equals_rank():
    for alpha in (0, None):
        lora = LoRAModule("lora_te_x", seeded_linear(), dim=4, alpha=alpha)
        assert lora.scale == 1.0
        assert float(lora.alpha) == 4.0


def test_rank_dropout_keeps_the_expected_output_and_is_off_in_eval():
    linear = seeded_linear()
    lora = LoRAModule("lora_te_x", linear, dim=4, alpha=4.0, rank_dropout=0.25)
    randomise_up(lora)
    lora.apply_to()
    x = torch.randn(1, 8).expand(20000, 8)  # one input, 20000 independent masks
    down, up = lora.lora_down.weight, lora.lora_up.weight
    exact = linear.__class__.forward(linear, x[:1]) + x[:1] @ down.T @ up.T
    lora.eval()
    torch.testing.assert_close(linear(x[:3]), exact.expand(3, -1))  # eval: no masks
    assert torch.equal(linear(x[:3]), linear(x[:3]))
    lora.train()
    torch.manual_seed(0)
    samples = linear(x)
    standard_error = samples.std(dim=0) / math.sqrt(len(samples))
    assert ((samples.mean(dim=0) - exact[0]).abs() < 5 * standard_error + 1e-6).all()
    assert samples.std(dim=0).min() > 0  # masks did vary


@pytest.mark.parametrize("kind", ["tokens", "pixels"])
def test_rank_dropout_mask_is_shared_by_all_tokens_or_pixels_of_a_sample(kind):
    torch.manual_seed(0)
    if kind == "tokens":
        module, x = nn.Linear(4, 4), torch.randn(64, 6, 4)  # (B, T, C)
    else:
        module, x = nn.Conv2d(4, 4, 1), torch.randn(64, 4, 3, 3)  # (B, C, H, W)
    lora = LoRAModule("lora_unet_x", module, dim=1, alpha=1.0, rank_dropout=0.5)
    randomise_up(lora)
    lora.apply_to()
    with torch.no_grad():
        delta = module(x) - module.__class__.forward(module, x)
    per_sample = delta.flatten(1)
    zero = (per_sample == 0).all(dim=1)
    nonzero = (per_sample != 0).all(dim=1)
    assert (zero | nonzero).all()  # a rank is dropped for the whole sample or not at all
    assert zero.any() and nonzero.any()


def test_module_dropout_skips_the_lora_path_with_probability_p():
    linear = seeded_linear()
    lora = LoRAModule("lora_te_x", linear, dim=4, alpha=1.0, module_dropout=0.3)
    randomise_up(lora)
    lora.apply_to()
    x = torch.randn(1, 8)
    plain = linear.__class__.forward(linear, x)
    torch.manual_seed(0)
    n = 2000
    skipped = sum(torch.equal(linear(x), plain) for _ in range(n))
    mean, sd = n * 0.3, math.sqrt(n * 0.3 * 0.7)
    assert abs(skipped - mean) < 5 * sd
    lora.eval()
    assert not torch.equal(linear(x), plain)


def test_network_dropout_acts_only_in_training_and_keeps_the_expectation():
    linear = seeded_linear()
    lora = LoRAModule("lora_te_x", linear, dim=4, alpha=4.0, dropout=0.5)
    randomise_up(lora)
    lora.apply_to()
    x = torch.randn(1, 8).expand(20000, 8)
    lora.eval()
    exact = linear(x[:1])
    down, up = lora.lora_down.weight, lora.lora_up.weight
    torch.testing.assert_close(exact, linear.__class__.forward(linear, x[:1]) + x[:1] @ down.T @ up.T)
    lora.train()
    torch.manual_seed(0)
    samples = linear(x)
    assert not torch.equal(samples[:1], exact)
    standard_error = samples.std(dim=0) / math.sqrt(len(samples))
    assert ((samples.mean(dim=0) - exact[0]).abs() < 5 * standard_error + 1e-6).all()


def test_dropouts_reproduce_under_torch_manual_seed():
    linear = seeded_linear()
    lora = LoRAModule(
        "lora_te_x", linear, dim=4, alpha=1.0, dropout=0.3, rank_dropout=0.3, module_dropout=0.3
    )
    randomise_up(lora)
    lora.apply_to()
    x = torch.randn(5, 8)
    outputs = []
    for _ in range(2):
        torch.manual_seed(7)
        outputs.append(torch.stack([linear(x) for _ in range(10)]))
    assert torch.equal(outputs[0], outputs[1])


def test_bf16_module_with_fp32_lora_keeps_dtypes_and_trains_in_fp32():
    linear = seeded_linear().to(torch.bfloat16)
    lora = LoRAModule("lora_te_x", linear, dim=4, alpha=1.0)
    randomise_up(lora)
    lora.apply_to()
    assert lora.lora_down.weight.dtype == lora.lora_up.weight.dtype == torch.float32
    x = torch.randn(3, 8).to(torch.bfloat16)
    y = linear(x)
    assert y.dtype == torch.bfloat16
    x32 = x.float()
    down, up = lora.lora_down.weight, lora.lora_up.weight
    expected = (x32 @ linear.weight.float().T + linear.bias.float()) + 0.25 * (x32 @ down.T @ up.T)
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert lora.lora_up.weight.grad.dtype == torch.float32


def test_rank_larger_than_module_is_rejected_with_its_sizes():
    with pytest.raises(ConfigError, match=r"lora_te_small: rank 8 .*in=8, out=6"):
        LoRAModule("lora_te_small", seeded_linear(), dim=8, alpha=1.0)


def test_grouped_conv_is_rejected():
    with pytest.raises(ConfigError, match="groups=2"):
        LoRAModule("lora_unet_g", nn.Conv2d(4, 4, 3, groups=2), dim=2, alpha=1.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("network_dim", 0),
        ("network_dim", 2.5),
        ("network_alpha", -1.0),
        ("conv_dim", -1),
        ("conv_alpha", -0.5),
        ("network_dropout", 1.0),
        ("rank_dropout", -0.1),
        ("module_dropout", 1.5),
    ],
)
def test_network_config_rejects_out_of_range_values_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"network.{field}"):
        NetworkConfig(**{field: value})


def test_network_config_rejects_training_nothing():
    with pytest.raises(ConfigError, match="train_unet"):
        NetworkConfig(train_unet=False, train_text_encoder=False)


def small_targets() -> list[LoraTarget]:
    torch.manual_seed(0)
    return [
        LoraTarget("lora_te_a", nn.Linear(8, 8), "te"),
        LoraTarget("lora_unet_b", nn.Linear(8, 4), "unet"),
        LoraTarget("lora_unet_c", nn.Conv2d(8, 8, 1), "unet"),
        LoraTarget("lora_unet_d", nn.Conv2d(8, 8, 3, padding=1), "unet"),
    ]


def test_network_gives_kxk_convs_conv_dim_and_others_network_dim():
    cfg = NetworkConfig(network_dim=4, network_alpha=2.0, conv_dim=2, conv_alpha=0.0)
    net = LoRANetwork(small_targets(), cfg, dims={"lora_unet_b": 3}, alphas={"lora_te_a": 8.0})
    modules = net.modules_by_name
    assert {name: m.dim for name, m in modules.items()} == {
        "lora_te_a": 4,
        "lora_unet_b": 3,
        "lora_unet_c": 4,
        "lora_unet_d": 2,
    }
    assert {name: m.scale for name, m in modules.items()} == {
        "lora_te_a": 2.0,
        "lora_unet_b": 2.0 / 3,
        "lora_unet_c": 0.5,
        "lora_unet_d": 1.0,
    }


def test_network_leaves_out_dim_zero_and_untrained_components():
    cfg = NetworkConfig(network_dim=4, conv_dim=2, train_text_encoder=False)
    net = LoRANetwork(small_targets(), cfg, dims={"lora_unet_c": 0})
    assert sorted(net.modules_by_name) == ["lora_unet_b", "lora_unet_d"]


def test_network_rejects_kxk_conv_targets_without_conv_dim_and_unknown_overrides():
    with pytest.raises(ConfigError, match=r"network\.conv_dim.*lora_unet_d"):
        LoRANetwork(small_targets(), NetworkConfig(network_dim=4))
    with pytest.raises(ConfigError, match="lora_unet_typo"):
        LoRANetwork(small_targets(), NetworkConfig(network_dim=4, conv_dim=2), dims={"lora_unet_typo": 2})


def test_state_dict_has_kohya_keys_and_round_trips_exactly():
    targets = small_targets()
    net = LoRANetwork(targets, NetworkConfig(network_dim=4, network_alpha=3.0, conv_dim=2, conv_alpha=1.5))
    for i, module in enumerate(net.modules_by_name.values()):
        randomise_up(module, seed=i)
    sd = net.kohya_state_dict()
    expected_keys = {
        f"{t.name}.{s}" for t in targets for s in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    assert set(sd) == expected_keys
    assert sd["lora_unet_b.alpha"].shape == () and float(sd["lora_unet_b.alpha"]) == 3.0
    assert float(sd["lora_unet_d.alpha"]) == 1.5
    assert all(t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad for t in sd.values())
    assert sd["lora_unet_b.lora_down.weight"].data_ptr() != net.lora_unet_b.lora_down.weight.data_ptr()
    assert {name for name, _ in net.named_lora_parameters()} == {k for k in expected_keys if "weight" in k}

    other = LoRANetwork(targets, NetworkConfig(network_dim=4, network_alpha=1.0, conv_dim=2))
    other.load_kohya_state_dict(sd)
    assert all(torch.equal(v, other.kohya_state_dict()[k]) for k, v in sd.items())
    assert other.modules_by_name["lora_unet_b"].scale == 3.0 / 4
    assert net.kohya_state_dict(torch.bfloat16)["lora_unet_b.lora_up.weight"].dtype == torch.bfloat16


def test_loading_a_mismatched_state_dict_names_the_keys():
    net = LoRANetwork(small_targets(), NetworkConfig(network_dim=4, conv_dim=2))
    sd = net.kohya_state_dict()
    missing = {k: v for k, v in sd.items() if k != "lora_unet_b.alpha"}
    with pytest.raises(ConfigError, match=r"lora_unet_b\.alpha"):
        net.load_kohya_state_dict(missing)
    with pytest.raises(ConfigError, match=r"lora_unet_zz\.alpha"):
        net.load_kohya_state_dict({**sd, "lora_unet_zz.alpha": torch.tensor(1.0)})
    wrong_rank = {**sd, "lora_unet_b.lora_up.weight": torch.zeros(4, 3)}
    with pytest.raises(ConfigError, match=r"lora_unet_b.lora_up.weight: shape \(4, 3\)"):
        net.load_kohya_state_dict(wrong_rank)


def test_network_restore_succeeds_after_a_partial_application():
    targets = small_targets()
    originals = [t.module.forward for t in targets]
    net = LoRANetwork(targets, NetworkConfig(network_dim=4, conv_dim=2))
    net.modules_by_name[
        "lora_unet_c"
    ].apply_to()  # applied out of band: the network's apply_to will fail on it
    with pytest.raises(RuntimeError, match="already applied"):
        net.apply_to()
    assert not net.modules_by_name["lora_te_a"].is_applied  # rolled back
    net.restore()
    assert all("forward" not in t.module.__dict__ for t in targets)
    assert [t.module.forward for t in targets] == originals


def test_applied_context_restores_on_exit_even_after_an_error():
    targets = small_targets()
    net = LoRANetwork(targets, NetworkConfig(network_dim=4, conv_dim=2))
    with pytest.raises(ValueError, match="boom"), net.applied():
        assert all(m.is_applied for m in net.modules_by_name.values())
        raise ValueError("boom")
    assert all("forward" not in t.module.__dict__ for t in targets)


def test_network_on_a_tiny_unet_keeps_outputs_at_init_and_trains_only_lora():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4,
        cross_attention_dim=8,
        attention_head_dim=4,
        sample_size=8,
    ).requires_grad_(False)
    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 8)
    before = unet(sample, 10, context).sample
    targets = unet_targets(unet, get_family("sdxl"), include_conv=True)
    net = LoRANetwork(targets, NetworkConfig(network_dim=2, conv_dim=2))
    with net.applied():
        torch.testing.assert_close(unet(sample, 10, context).sample, before)
        for module in net.modules_by_name.values():
            randomise_up(module)
        out = unet(sample, 10, context).sample
        assert not torch.allclose(out, before)
        out.square().mean().backward()
    assert all(p.grad is not None for _, p in net.named_lora_parameters())
    assert all(p.grad is None for p in unet.parameters())
    assert torch.equal(unet(sample, 10, context).sample, before)


def test_split_lora_equals_the_fused_layers_lora_in_output_and_gradients():
    """A LoRA over diffusers' split q/k/v is kohya's LoRA on the fused qkv: same output, same grads."""
    torch.manual_seed(0)
    fused = nn.Linear(8, 12)
    parts = [nn.Linear(8, 4) for _ in range(3)]
    with torch.no_grad():
        for i, part in enumerate(parts):
            part.weight.copy_(fused.weight[4 * i : 4 * i + 4])
            part.bias.copy_(fused.bias[4 * i : 4 * i + 4])
    whole = LoRAModule("lora_unet_qkv", fused, dim=2, alpha=1.0)
    split = LoRAModule("lora_unet_qkv", parts, dim=2, alpha=1.0)
    with torch.no_grad():
        whole.lora_up.weight.normal_()
        split.lora_down.weight.copy_(whole.lora_down.weight)
        split.lora_up.weight.copy_(whole.lora_up.weight)
    whole.apply_to()
    split.apply_to()
    x = torch.randn(3, 5, 8)
    expected = fused(x)
    got = torch.cat([part(x) for part in parts], dim=-1)
    torch.testing.assert_close(got, expected)
    expected.square().sum().backward()
    got.square().sum().backward()
    torch.testing.assert_close(split.lora_up.weight.grad, whole.lora_up.weight.grad)
    torch.testing.assert_close(split.lora_down.weight.grad, whole.lora_down.weight.grad)
    split.restore()
    assert all("forward" not in part.__dict__ for part in parts)


def test_split_lora_parts_share_one_rank_dropout_draw():
    """The parts see one down(x) per input tensor, so rank dropout drops the same ranks in each."""
    torch.manual_seed(0)
    parts = [nn.Linear(6, 6, bias=False) for _ in range(2)]
    for part in parts:
        nn.init.zeros_(part.weight)
    split = LoRAModule("lora_unet_qkv", parts, dim=4, alpha=4.0, rank_dropout=0.5)
    with torch.no_grad():
        split.lora_up.weight.copy_(torch.cat([torch.eye(6)[:, :4], torch.eye(6)[:, :4]]))
    split.apply_to()
    x = torch.randn(2, 3, 6)
    first, second = parts[0](x), parts[1](x)
    torch.testing.assert_close(first, second)  # identical rows of up, identical draw
    assert split._shared is None  # nothing held once both parts read it
