"""LoRA merging: exact concat, Eckart–Young SVD, merging into the base equals applying, clear refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lora_train_core.cli import main
from lora_train_core.errors import ConfigError
from lora_train_core.model.diffusers_backend import load_diffusers_backend
from lora_train_core.model.model_config import ModelConfig
from lora_train_core.model.network import LoRANetwork, NetworkConfig
from lora_train_core.model.tiny_models import save_tiny_model, tiny_backend
from lora_train_core.outputs.export import read_metadata, save_lora
from lora_train_core.outputs.merge import delta_weights, merge_into_backend, merge_loras, parse_lora_spec

LINEAR, CONV, ONLY_B = "lora_unet_down_blocks_0_attn_to_q", "lora_unet_down_blocks_0_conv1", "lora_te_fc1"


def _module(sd, name, out, inp, rank, alpha, generator, kernel=None):
    if kernel is None:
        down, up = torch.randn(rank, inp, generator=generator), torch.randn(out, rank, generator=generator)
    else:
        down = torch.randn(rank, inp, kernel, kernel, generator=generator)
        up = torch.randn(out, rank, 1, 1, generator=generator)
    sd.update(
        {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}
    )


def _lora_a():
    g, sd = torch.Generator().manual_seed(1), {}
    _module(sd, LINEAR, out=6, inp=5, rank=2, alpha=1.0, generator=g)
    _module(sd, CONV, out=4, inp=3, rank=3, alpha=2.0, generator=g, kernel=3)
    return sd


def _lora_b():
    g, sd = torch.Generator().manual_seed(2), {}
    _module(sd, LINEAR, out=6, inp=5, rank=3, alpha=8.0, generator=g)
    _module(sd, CONV, out=4, inp=3, rank=1, alpha=0.5, generator=g, kernel=3)
    _module(sd, ONLY_B, out=7, inp=4, rank=2, alpha=2.0, generator=g)
    return sd


def _plain_delta(sd, name):
    """(alpha/r)·up·down written out: matmul for Linear, an einsum over the rank for conv."""
    down, up = sd[f"{name}.lora_down.weight"].double(), sd[f"{name}.lora_up.weight"].double()
    scale = float(sd[f"{name}.alpha"]) / down.shape[0]
    if down.ndim == 2:
        return scale * (up @ down)
    return scale * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)


def _expected_sum(a, b, wa, wb, name):
    parts = [wa * _plain_delta(a, name) if f"{name}.alpha" in a else 0, wb * _plain_delta(b, name)]
    return parts[0] + parts[1]


def test_concat_merge_reproduces_the_weighted_sum_of_deltas():
    a, b = _lora_a(), _lora_b()
    merged = merge_loras([(a, 0.7), (b, -0.4)]).state_dict
    for name in (LINEAR, CONV, ONLY_B):
        torch.testing.assert_close(
            _plain_delta(merged, name), _expected_sum(a, b, 0.7, -0.4, name), rtol=1e-5, atol=1e-5
        )
    assert float(merged[f"{LINEAR}.alpha"]) == 5 == merged[f"{LINEAR}.lora_down.weight"].shape[0]
    assert merged[f"{CONV}.lora_down.weight"].shape == (4, 3, 3, 3)


def test_delta_weights_match_the_kohya_formula():
    a = _lora_a()
    deltas = delta_weights(a)
    assert set(deltas) == {LINEAR, CONV}
    for name, delta in deltas.items():
        assert delta.dtype == torch.float32
        torch.testing.assert_close(delta.double(), _plain_delta(a, name), rtol=1e-5, atol=1e-5)
    a[f"{LINEAR}.alpha"] = torch.tensor(0.0)  # kohya: alpha 0 means alpha = rank, scale 1
    up, down = a[f"{LINEAR}.lora_up.weight"], a[f"{LINEAR}.lora_down.weight"]
    torch.testing.assert_close(delta_weights(a)[LINEAR], up @ down)


def test_svd_merge_at_full_rank_is_exact_and_keeps_all_energy():
    a, b = _lora_a(), _lora_b()
    result = merge_loras([(a, 0.7), (b, 0.3)], mode="svd", rank=64)
    for name in (LINEAR, CONV, ONLY_B):
        torch.testing.assert_close(
            _plain_delta(result.state_dict, name), _expected_sum(a, b, 0.7, 0.3, name), rtol=1e-5, atol=1e-5
        )
        assert result.retained_energy[name] == pytest.approx(1.0, abs=1e-9)


def test_svd_merge_at_low_rank_is_the_best_rank_k_approximation():
    a, b, k = _lora_a(), _lora_b(), 2
    result = merge_loras([(a, 0.7), (b, 0.3)], mode="svd", rank=k)
    for name in (LINEAR, CONV):
        target = _expected_sum(a, b, 0.7, 0.3, name)
        s = torch.linalg.svdvals(target.flatten(1))
        approx = _plain_delta(result.state_dict, name)
        assert result.state_dict[f"{name}.lora_down.weight"].shape[0] == k
        # Eckart–Young: the best rank-k error is the energy of the dropped singular values
        error = float(((target - approx) ** 2).sum())
        assert error == pytest.approx(float((s[k:] ** 2).sum()), rel=1e-4)
        energy = float((s[:k] ** 2).sum() / (s**2).sum())
        assert result.retained_energy[name] == pytest.approx(energy, rel=1e-6)
        assert result.retained_energy[name] < 1
    assert "min" in result.energy_summary()


def _predict(backend):
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    size = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]) if backend.family == "sdxl" else None
    with torch.no_grad():
        return backend.predict(latents, torch.tensor([500]), backend.encode_text(["a red cube"]), size)


def _random_lora_network(backend, seed=4):
    targets = backend.lora_targets(include_conv=True, unet=True, text_encoder=True)
    network = LoRANetwork(
        targets, NetworkConfig(network_dim=4, network_alpha=2.0, conv_dim=2, conv_alpha=3.0)
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.modules_by_name.values():
            module.lora_up.weight.copy_(0.2 * torch.randn(module.lora_up.weight.shape, generator=g))
    return network


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_merging_into_the_base_equals_applying_the_lora(family):
    lora_backend = tiny_backend(family, seed=0)
    network = _random_lora_network(lora_backend)
    base_out = _predict(lora_backend)
    with network.applied():
        applied_out = _predict(lora_backend)

    merged_backend = tiny_backend(family, seed=0)
    names = merge_into_backend(merged_backend, network.kohya_state_dict())
    assert sorted(names) == sorted(network.modules_by_name)
    merged_out = _predict(merged_backend)
    assert not torch.allclose(applied_out, base_out, atol=1e-3)  # the LoRA does change the output
    torch.testing.assert_close(merged_out, applied_out, rtol=1e-4, atol=1e-4)


def test_a_lora_of_another_architecture_is_refused_and_leaves_the_model_untouched():
    backend = tiny_backend("sd15", seed=0)
    before = {k: v.clone() for k, v in backend.unet.state_dict().items()}
    sdxl_sd = _random_lora_network(tiny_backend("sdxl", seed=0)).kohya_state_dict()
    with pytest.raises(ConfigError, match=r"LoRA module\(s\) match no module of this sd15 model.*lora_te1_"):
        merge_into_backend(backend, sdxl_sd)
    assert all(torch.equal(v, before[k]) for k, v in backend.unet.state_dict().items())


def test_different_base_model_versions_are_refused_naming_the_files():
    meta = [{"ss_base_model_version": "sd_v1"}, {"ss_base_model_version": "sdxl_base_v1-0"}]
    with pytest.raises(ConfigError, match=r"ss_base_model_version.*a\.safetensors.*b\.safetensors"):
        merge_loras(
            [(_lora_a(), 1.0), (_lora_b(), 1.0)], metadata=meta, names=["a.safetensors", "b.safetensors"]
        )


def test_sd15_and_sdxl_key_names_are_refused():
    sdxl_te = {
        k.replace("lora_te_", "lora_te1_"): v for k, v in _lora_b().items() if k.startswith("lora_te_")
    }
    with pytest.raises(ConfigError, match=r"SD1\.x/2\.x in a.*SDXL in b"):
        merge_loras([(_lora_b(), 1.0), (sdxl_te, 1.0)], names=["a", "b"])


def test_the_same_module_with_different_shapes_is_refused_naming_it():
    b = _lora_b()
    b[f"{LINEAR}.lora_up.weight"] = torch.randn(9, 3)
    with pytest.raises(ConfigError, match=rf"{LINEAR} has ΔW shape \(6, 5\) in a but \(9, 5\) in b"):
        merge_loras([(_lora_a(), 1.0), (b, 1.0)], names=["a", "b"])


def test_non_kohya_keys_and_misused_rank_are_refused():
    with pytest.raises(ConfigError, match="not kohya LoRA keys"):
        merge_loras([({"unet.x.lora_A.weight": torch.zeros(2, 3)}, 1.0)])
    with pytest.raises(ConfigError, match=r"--mode svd needs --rank"):
        merge_loras([(_lora_a(), 1.0)], mode="svd")
    with pytest.raises(ConfigError, match=r"--rank: 0 is out of range"):
        merge_loras([(_lora_a(), 1.0)], mode="svd", rank=0)
    with pytest.raises(ConfigError, match="--rank: 4 applies only to --mode svd"):
        merge_loras([(_lora_a(), 1.0)], rank=4)


def test_lora_spec_parsing():
    assert parse_lora_spec("dir/a.safetensors:0.25") == (parse_lora_spec("dir/a.safetensors")[0], 0.25)
    assert parse_lora_spec("a.safetensors")[1] == 1.0
    assert parse_lora_spec("C:\\loras\\a.safetensors")[1] == 1.0
    with pytest.raises(ConfigError, match="'abc' is not a number"):
        parse_lora_spec("a.safetensors:abc")


def _write_inputs(tmp_path):
    meta = {"ss_base_model_version": "sd_v1", "modelspec.architecture": "stable-diffusion-v1/lora"}
    a = save_lora(tmp_path / "a.safetensors", _lora_a(), meta, torch.float32)
    b = save_lora(tmp_path / "b.safetensors", _lora_b(), meta, torch.float32)
    return a, b


def test_cli_merge_writes_a_loadable_exact_merge_with_its_sources(tmp_path, capsys):
    a, b = _write_inputs(tmp_path)
    out = tmp_path / "c.safetensors"
    argv = ["merge", f"{a}:0.7", f"{b}:0.3", "--out", str(out), "--save-precision", "fp32"]
    assert main(argv) == 0, capsys.readouterr().err
    merged = load_file(out)
    for name in (LINEAR, CONV, ONLY_B):
        expected = _expected_sum(_lora_a(), _lora_b(), 0.7, 0.3, name)
        torch.testing.assert_close(_plain_delta(merged, name), expected, rtol=1e-5, atol=1e-5)
    meta = read_metadata(out)
    assert json.loads(meta["ss_merged_from"]) == [
        {"file": "a.safetensors", "weight": 0.7},
        {"file": "b.safetensors", "weight": 0.3},
    ]
    assert meta["ss_base_model_version"] == "sd_v1"
    assert main(argv) == 2  # no silent overwrite; the message names the flags, not TOML keys
    assert "already exists; choose another --out or pass --overwrite" in capsys.readouterr().err
    svd = ["merge", f"{a}:0.7", f"{b}:0.3", "--out", str(out), "--mode", "svd", "--rank", "2", "--overwrite"]
    assert main(svd) == 0
    assert "retained energy over 3 modules" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("spec", "message"),
    [("a.safetensors:abc", "is not a number"), ("missing.safetensors:1", "does not exist")],
)
def test_cli_merge_bad_specs_print_one_error_without_traceback(tmp_path, capsys, spec, message):
    _write_inputs(tmp_path)
    code = main(["merge", str(tmp_path / spec), "--out", str(tmp_path / "c.safetensors")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err


def test_cli_merge_into_a_model_folder_adds_the_delta_to_the_weights(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model", "sd15", seed=0)
    backend = tiny_backend("sd15", seed=0)  # the same weights as the saved folder
    lora_sd = _random_lora_network(backend).kohya_state_dict(torch.float32)
    lora = save_lora(tmp_path / "l.safetensors", lora_sd, {"ss_base_model_version": "sd_v1"}, torch.float32)
    out = tmp_path / "merged"
    assert main(["merge", f"{lora}:0.5", "--into-model", str(model), "--out", str(out)]) == 0, (
        capsys.readouterr()
    )
    merged = load_diffusers_backend(ModelConfig(out))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    expected = backend.unet.state_dict()[path].double() + 0.5 * _plain_delta(lora_sd, name)
    torch.testing.assert_close(merged.unet.state_dict()[path].double(), expected, rtol=1e-5, atol=1e-6)
    te_path = next(k for k in backend.text_encoders[0].state_dict() if k.endswith("layers.0.mlp.fc1.weight"))
    assert not torch.equal(
        merged.text_encoders[0].state_dict()[te_path], backend.text_encoders[0].state_dict()[te_path]
    )
    assert (out / "vae").is_dir() and (out / "model_index.json").is_file()
    assert main(["merge", f"{lora}:0.5", "--into-model", str(model), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


# --- Flux: fused kohya keys (qkv, linear1) merge as any Linear LoRA ----------------------------------
FLUX_QKV, FLUX_LINEAR1 = "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"
FLUX_DEV_META = {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora"}


def _flux_lora(seed, rank, alpha, hidden=8):
    g, sd = torch.Generator().manual_seed(seed), {}
    _module(sd, FLUX_QKV, out=3 * hidden, inp=hidden, rank=rank, alpha=alpha, generator=g)
    _module(sd, FLUX_LINEAR1, out=7 * hidden, inp=hidden, rank=rank, alpha=alpha, generator=g)
    return sd


def test_merge_lora_files_merges_fused_flux_modules_exactly_and_keeps_the_architecture(tmp_path):
    from lora_train_core.outputs.merge import merge_lora_files

    a, b = _flux_lora(1, rank=2, alpha=1.0), _flux_lora(2, rank=4, alpha=8.0)
    pa = save_lora(tmp_path / "a.safetensors", a, FLUX_DEV_META, torch.float32)
    pb = save_lora(tmp_path / "b.safetensors", b, FLUX_DEV_META, torch.float32)
    out, _ = merge_lora_files([(pa, 0.7), (pb, -0.4)], tmp_path / "c.safetensors", save_precision="fp32")
    merged = load_file(out)
    assert {k.split(".")[0] for k in merged} == {FLUX_QKV, FLUX_LINEAR1}
    for name in (FLUX_QKV, FLUX_LINEAR1):
        expected = _expected_sum(a, b, 0.7, -0.4, name)
        torch.testing.assert_close(_plain_delta(merged, name), expected, rtol=1e-5, atol=1e-5)
    meta = read_metadata(out)
    assert {k: meta[k] for k in FLUX_DEV_META} == FLUX_DEV_META


def test_merging_flux_dev_with_flux_schnell_loras_is_refused_naming_both(tmp_path):
    from lora_train_core.outputs.merge import merge_lora_files

    schnell = FLUX_DEV_META | {"modelspec.architecture": "flux-1-schnell/lora"}
    pa = save_lora(tmp_path / "a.safetensors", _flux_lora(1, 2, 1.0), FLUX_DEV_META, torch.float32)
    pb = save_lora(tmp_path / "b.safetensors", _flux_lora(2, 2, 1.0), schnell, torch.float32)
    with pytest.raises(ConfigError, match=r"different base models .*flux-1-dev/lora.*flux-1-schnell/lora"):
        merge_lora_files([(pa, 1.0), (pb, 1.0)], tmp_path / "c.safetensors")
