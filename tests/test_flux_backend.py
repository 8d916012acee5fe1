"""Flux.1 dev/schnell and Chroma in the CLI door: the backend feeds diffusers' transformers exactly
as diffusers' own pipelines do, detection reads configs only, tiny models train through the CLI,
and the fused kohya file lands on diffusers' split layers as diffusers' own converter maps it."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from safetensors.torch import load_file, save_file

import lora_train_core.model.diffusers_backend as diffusers_backend
from lora_train_core.cli import main
from lora_train_core.demo import make_synthetic_dataset
from lora_train_core.errors import ModelError
from lora_train_core.model.diffusers_backend import detect_family, model_facts
from lora_train_core.model.flux_backend import image_ids, pack_latents, unpack_latents
from lora_train_core.model.model_config import ModelConfig
from lora_train_core.model.network import LoRANetwork, NetworkConfig
from lora_train_core.model.tiny_flux import tiny_flux_backend
from lora_train_core.model.tiny_models import save_tiny_model
from lora_train_core.outputs.export import read_metadata

FLOW_FAMILIES = ("flux_dev", "flux_schnell", "chroma")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    dirs = {family: save_tiny_model(root / family, family) for family in FLOW_FAMILIES}
    dirs["sd15"] = save_tiny_model(root / "sd15", "sd15")
    return dirs


# --- the model's inputs, against diffusers' pipelines -----------------------------------------


def test_packing_matches_diffusers_flux_pipeline_and_round_trips():
    latents = torch.randn(2, 16, 6, 10)
    tokens = pack_latents(latents)
    assert torch.equal(tokens, FluxPipeline._pack_latents(latents, 2, 16, 6, 10))
    # the pipeline's unpack takes the image size in pixels (8 per latent pixel)
    assert torch.equal(unpack_latents(tokens, 6, 10), FluxPipeline._unpack_latents(tokens, 48, 80, 8))
    assert torch.equal(unpack_latents(tokens, 6, 10), latents)
    expected_ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    assert torch.equal(image_ids(3, 5, torch.device("cpu"), torch.float32), expected_ids)


@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_predict_calls_the_transformer_as_diffusers_pipelines_do(family):
    """σ as the time (the transformer scales it by 1000), raw guidance for dev only, packed tokens,
    [0, row, col] image ids, zero text ids, Chroma's [text mask, image ones] attention mask."""
    backend = tiny_flux_backend(family)
    text = backend.encode_text(["a red circle", "a blue square, flat colors"])
    noisy, sigmas = torch.randn(2, 16, 4, 6), torch.tensor([0.25, 0.8])
    guidance = torch.tensor([1.0, 3.5]) if family == "flux_dev" else None
    with torch.no_grad():
        ours = backend.predict(noisy, sigmas, text, None, guidance)
        extra = {}
        if family == "flux_dev":
            extra["guidance"] = guidance
        if family != "chroma":
            extra["pooled_projections"] = text.pooled
        else:
            extra["attention_mask"] = torch.cat([text.attention_mask, torch.ones(2, 6, dtype=torch.bool)], 1)
        reference = backend.transformer(
            hidden_states=FluxPipeline._pack_latents(noisy, 2, 16, 4, 6),
            encoder_hidden_states=text.hidden,
            timestep=sigmas,
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 2, 3, "cpu", torch.float32),
            txt_ids=torch.zeros(text.hidden.shape[1], 3),
            return_dict=False,
            **extra,
        )[0]
    assert ours.shape == noisy.shape
    torch.testing.assert_close(ours, FluxPipeline._unpack_latents(reference, 32, 48, 8), rtol=0, atol=0)


def test_text_conditioning_is_t5_padded_with_clip_pooled_for_flux_and_masked_for_chroma():
    flux = tiny_flux_backend("flux_dev")
    text = flux.encode_text(["a red circle"])
    assert text.hidden.shape == (1, flux.t5_max_length, 32) and text.attention_mask is None
    with torch.no_grad():
        clip_ids = flux.tokenizers[0](["a red circle"], padding="max_length", return_tensors="pt").input_ids
        torch.testing.assert_close(text.pooled, flux.text_encoders[0](clip_ids).pooler_output)
    chroma = tiny_flux_backend("chroma")
    text = chroma.encode_text(["a red circle", "a blue square, flat colors"])
    assert text.pooled is None
    # diffusers' ChromaPipeline: the caption's tokens (+ </s>) and one padding token
    words = [["a", "red", "circle"], ["a", "blue", "square", ",", "flat", "colors"]]
    valid = torch.tensor([len(w) + 1 for w in words])
    assert text.attention_mask.sum(dim=1).tolist() == (valid + 1).tolist()
    assert text.attention_mask[:, 0].all() and not text.attention_mask[:, -1].any()


def test_families_default_t5_lengths_are_kohyas():
    from lora_train_core.families import get_family

    lengths = {name: get_family(name).t5_max_length for name in FLOW_FAMILIES}
    assert lengths == {"flux_dev": 512, "flux_schnell": 256, "chroma": 512}


# --- detection, from configs only --------------------------------------------------------------


def test_detection_reads_the_transformer_config_and_never_the_weights(model_dirs, tmp_path):
    for family in FLOW_FAMILIES:
        # a copy of the folder's layout and configs without a single weight file
        bare = tmp_path / family
        shutil.copytree(model_dirs[family], bare, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
        assert detect_family(bare) == family
        group = "chroma" if family == "chroma" else "flux"
        assert model_facts(ModelConfig(bare, family=group), "cpu").family == family
        assert model_facts(ModelConfig(bare), "cpu").prediction_type == "flow"
    assert detect_family(model_dirs["sd15"]) == "sd15"


@pytest.mark.parametrize(
    ("folder", "family", "message"),
    [
        ("sd15", "flux", "holds a 'sd15' model (SD1.x/2.x), but model.family is 'flux'"),
        (
            "flux_dev",
            "flux_schnell",
            "holds a 'flux_dev' model (Flux.1-dev), but model.family is 'flux_schnell'",
        ),
        ("chroma", "flux", "holds a 'chroma' model (Chroma), but model.family is 'flux'"),
    ],
)
def test_a_family_that_does_not_match_the_folder_is_refused_naming_both(model_dirs, folder, family, message):
    with pytest.raises(ModelError, match=r"model\.family") as err:
        model_facts(ModelConfig(model_dirs[folder], family=family), "cpu")
    assert message in str(err.value)


def test_a_flux_folder_missing_t5_is_refused_naming_the_subfolder(model_dirs, tmp_path):
    broken = shutil.copytree(model_dirs["flux_dev"], tmp_path / "broken")
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ModelError, match=r"missing text_encoder_2/ \(T5-XXL\)"):
        model_facts(ModelConfig(broken), "cpu")


def test_an_unknown_transformer_class_is_refused_listing_the_supported_ones(model_dirs, tmp_path):
    other = shutil.copytree(model_dirs["flux_dev"], tmp_path / "other")
    config = json.loads((other / "transformer" / "config.json").read_text())
    (other / "transformer" / "config.json").write_text(
        json.dumps(config | {"_class_name": "SD3Transformer2DModel"})
    )
    with pytest.raises(
        ModelError, match=r"SD3Transformer2DModel.*FluxTransformer2DModel, ChromaTransformer2DModel"
    ):
        detect_family(other)


def test_a_single_file_flux_checkpoint_is_refused_asking_for_a_diffusers_folder(tmp_path):
    path = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1)}, str(path))
    with pytest.raises(ModelError, match=r"single-file Flux/Chroma checkpoint.*diffusers folder"):
        model_facts(ModelConfig(path), "cpu")


def test_v_parameterization_is_refused_for_a_flow_model(model_dirs):
    with pytest.raises(Exception, match=r"model\.v_parameterization: true, but Flux\.1-schnell is a flow"):
        model_facts(ModelConfig(model_dirs["flux_schnell"], v_parameterization=True), "cpu")


# --- the CLI door: bad input before the model loads, and training ------------------------------


def _config(
    tmp_path: Path, model: Path, family: str, extra: str = "", steps: int = 3, train_extra: str = ""
) -> Path:
    dataset = make_synthetic_dataset(tmp_path / "data", count=2)
    config = tmp_path / "run.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [model]
            path = "{model.as_posix()}"
            family = "{family}"
            [dataset]
            path = "{dataset.as_posix()}"
            [buckets]
            resolution = [64, 64]
            min_bucket_reso = 32
            max_bucket_reso = 128
            bucket_reso_steps = 16
            [train]
            max_train_steps = {steps}
            train_batch_size = 2
            {train_extra}
            [optimizer]
            learning_rate = 3e-3
            [output]
            output_dir = "{(tmp_path / "out").as_posix()}"
            output_name = "lora"
            """
        )
        + textwrap.dedent(extra),
        encoding="utf-8",
    )
    return config


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load weights fails the test: the refusals must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(diffusers_backend, "load_diffusers_backend", refuse)


@pytest.mark.parametrize(
    ("folder", "family", "extra", "message"),
    [
        ("sd15", "flux", "", "holds a 'sd15' model (SD1.x/2.x), but model.family is 'flux'"),
        (
            "flux_schnell",
            "flux",
            "[flow]\nguidance_scale = 3.5\n",
            "flow.guidance_scale: 3.5, but Flux.1-schnell",
        ),
        ("chroma", "chroma", "", "network.train_text_encoder: Chroma has no text encoder"),
        (
            "flux_dev",
            "auto",
            "[network]\nconv_dim = 4\n",
            "network.conv_dim: 4, but Flux.1-dev is a transformer",
        ),
    ],
)
def test_bad_flux_input_is_one_message_before_the_model_loads(
    tmp_path, model_dirs, no_model_load, capsys, folder, family, extra, message
):
    code = main(["train", str(_config(tmp_path, model_dirs[folder], family, extra))])
    err = capsys.readouterr().err
    assert code != 0 and message in err, err
    assert "Traceback" not in err


def _train_through_the_cli(tmp_path, model: Path, family: str, extra: str = "", steps: int = 3):
    code = main(["train", str(_config(tmp_path, model, family, extra, steps))])
    assert code == 0
    return load_file(tmp_path / "out" / "lora.safetensors"), read_metadata(
        tmp_path / "out" / "lora.safetensors"
    )


def _loss_fell(losses: list[float]) -> bool:
    k = len(losses) // 4
    return sum(losses[-k:]) / k < 0.95 * sum(losses[:k]) / k


@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_tiny_flow_models_train_from_a_folder_and_save_only_fused_kohya_keys(
    tmp_path, model_dirs, capsys, monkeypatch, family
):
    losses = []
    import lora_train_core.run.orchestrator as orchestrator

    original = orchestrator.run_training

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        losses.extend(result.trained.losses)
        return result

    monkeypatch.setattr(orchestrator, "run_training", recording)
    te = "false" if family == "chroma" else "true"
    extra = f"[network]\nnetwork_dim = 8\nnetwork_alpha = 8.0\ntrain_text_encoder = {te}\n"
    tensors, metadata = _train_through_the_cli(tmp_path, model_dirs[family], "auto", extra, steps=24)
    assert _loss_fell(losses), losses
    modules = {key.split(".")[0] for key in tensors}
    unet = {m for m in modules if m.startswith("lora_unet_")}
    fused = {"img_attn_qkv", "txt_attn_qkv", "img_attn_proj", "txt_attn_proj", "img_mlp_0", "img_mlp_2"}
    fused |= {"txt_mlp_0", "txt_mlp_2"} | ({"img_mod_lin", "txt_mod_lin"} if family != "chroma" else set())
    single = {"linear1", "linear2"} | ({"modulation_lin"} if family != "chroma" else set())
    assert unet == {f"lora_unet_double_blocks_0_{n}" for n in fused} | {
        f"lora_unet_single_blocks_0_{n}" for n in single
    }
    text = modules - unet
    assert (text != set()) == (family != "chroma") and all(m.startswith("lora_te1_text_model_") for m in text)
    version = "chroma" if family == "chroma" else "flux1"
    assert metadata["ss_base_model_version"] == version


def test_checkpointing_and_fp8_base_train_a_tiny_flux_dev_on_the_cpu(tmp_path, model_dirs, capsys):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8_e4m3fn")
    extra = "[network]\ntrain_text_encoder = false\n[speed]\nfp8_base = true\n"
    train = 'mixed_precision = "bf16"\n            gradient_checkpointing = true'
    config = _config(tmp_path, model_dirs["flux_dev"], "flux", extra, steps=2, train_extra=train)
    code = main(["train", str(config)])
    assert code == 0, capsys.readouterr().err
    tensors = load_file(tmp_path / "out" / "lora.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_fp8_base_stores_the_transformer_in_float8_and_predicts_under_bf16_autocast():
    backend = tiny_flux_backend("flux_dev", weight_dtype=torch.bfloat16, fp8_base=True)
    linear = backend.transformer.transformer_blocks[0].attn.to_q
    assert linear.weight.dtype == torch.float8_e4m3fn
    text = backend.encode_text(["a red circle"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = backend.predict(torch.randn(1, 16, 4, 4), torch.tensor([0.5]), text, None, torch.tensor([1.0]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# --- the export lands on diffusers' split layers ------------------------------------------------


def _randomized_network(backend) -> LoRANetwork:
    """A LoRA over every Flux target with random down AND up (a fresh one has up = 0)."""
    cfg = NetworkConfig(network_dim=4, network_alpha=2.0, train_text_encoder=False)
    network = LoRANetwork(backend.lora_targets(False, True, False), cfg)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in network.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return network


def _merge_diffusers_lora(transformer, diffusers_sd: dict[str, torch.Tensor]) -> None:
    """W += B·A for every `transformer.<module>.lora_A/B.weight` pair (scale already baked in)."""
    for key in [k for k in diffusers_sd if k.endswith(".lora_A.weight")]:
        module = transformer.get_submodule(key.removeprefix("transformer.").removesuffix(".lora_A.weight"))
        up = diffusers_sd[key.replace(".lora_A.", ".lora_B.")]
        module.weight.data += up @ diffusers_sd[key]


def _merge_fused_linear1(transformer, kohya_sd: dict[str, torch.Tensor], index: int) -> None:
    """kohya's fused single-block linear1 = rows [to_q; to_k; to_v; proj_mlp]; ΔW = α/r · up·down,
    split by rows. (diffusers' converter hard-codes Flux's real widths for linear1 [3072, 3072,
    3072, 12288], so a tiny model cannot go through it.)"""
    name = f"lora_unet_single_blocks_{index}_linear1"
    down, up, alpha = (kohya_sd.pop(f"{name}.{s}") for s in ("lora_down.weight", "lora_up.weight", "alpha"))
    delta = alpha / down.shape[0] * up @ down
    block = transformer.single_transformer_blocks[index]
    parts = [block.attn.to_q, block.attn.to_k, block.attn.to_v, block.proj_mlp]
    for part, rows in zip(parts, delta.split([p.out_features for p in parts]), strict=True):
        part.weight.data += rows


@pytest.mark.parametrize("family", ["flux_dev", "chroma"])
def test_the_fused_export_loaded_by_diffusers_converter_gives_our_lora_output(family):
    """Our split LoRA applied to the base weights vs the saved fused file converted by diffusers'
    `_convert_kohya_flux_lora_to_diffusers` and merged into a fresh copy of the same weights.
    Tolerance: float32 rounding of merged vs activation-path LoRA (atol 1e-5, rtol 1e-4)."""
    backend = tiny_flux_backend(family, seed=1)
    fresh = tiny_flux_backend(family, seed=1).transformer  # the same base weights, never wrapped
    network = _randomized_network(backend)
    text = backend.encode_text(["a red circle"])
    noisy, sigma = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0.4])
    guidance = torch.tensor([2.0]) if family == "flux_dev" else None
    with torch.no_grad(), network.applied():
        ours = backend.predict(noisy, sigma, text, None, guidance)
    kohya_sd = network.kohya_state_dict()
    assert all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in kohya_sd)
    _merge_fused_linear1(fresh, kohya_sd, 0)
    converted = _convert_kohya_flux_lora_to_diffusers(dict(kohya_sd))
    _merge_diffusers_lora(fresh, converted)
    backend.unet = fresh  # the LoRA-free backend over the merged weights
    with torch.no_grad():
        theirs = backend.predict(noisy, sigma, text, None, guidance)
    assert not torch.allclose(
        ours, tiny_flux_backend(family, seed=1).predict(noisy, sigma, text, None, guidance)
    )
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


def test_the_text_cache_keeps_chromas_attention_mask_on_disk(tmp_path):
    from lora_train_core.data.text_cache import CachedTextEncoder

    backend = tiny_flux_backend("chroma")
    captions = ["a red circle", "a blue square, flat colors"]
    CachedTextEncoder(backend, tmp_path).prefill(captions)
    reread = CachedTextEncoder(backend, tmp_path)
    reread.prefill(captions)
    assert reread.encoded_count == 0  # every row came from disk
    with torch.no_grad():
        direct = backend.encode_text(captions)
    cached = reread.encode_text(captions)
    assert torch.equal(cached.attention_mask, direct.attention_mask)
    torch.testing.assert_close(cached.hidden, direct.hidden)
