"""The CLI: a config trains a LoRA from a diffusers folder; bad input is one clear message, no traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lora_train_core.cli import main
from lora_train_core.demo import make_synthetic_dataset
from lora_train_core.model.tiny_models import save_tiny_model
from lora_train_core.outputs.export import read_metadata


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny_sd15", "sd15")


def _write_config(tmp_path: Path, model: Path, dataset: Path, extra: str = "") -> Path:
    config = tmp_path / "run.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [model]
            path = "{model.as_posix()}"
            [dataset]
            path = "{dataset.as_posix()}"
            [buckets]
            resolution = [128, 128]
            min_bucket_reso = 64
            max_bucket_reso = 256
            [train]
            max_train_steps = 3
            train_batch_size = 2
            [output]
            output_dir = "{(tmp_path / "out").as_posix()}"
            output_name = "my_lora"
            """
        )
        + extra,
        encoding="utf-8",
    )
    return config


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_train_from_a_diffusers_folder_writes_a_kohya_lora(tmp_path, tiny_model_dir, capsys):
    dataset = make_synthetic_dataset(tmp_path / "data", count=4)
    code, out, err = _run(["train", str(_write_config(tmp_path, tiny_model_dir, dataset))], capsys)
    assert code == 0, err
    saved = tmp_path / "out" / "my_lora.safetensors"
    assert f"saved {saved}" in out
    keys = load_file(saved)
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert any(k.startswith("lora_te_") and k.endswith(".alpha") for k in keys)
    meta = read_metadata(saved)
    assert meta["ss_steps"] == "3" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_list_keys_documents_every_section(capsys):
    code, out, _ = _run(["train", "--list-keys"], capsys)
    assert code == 0
    for section in ("[model]", "[dataset]", "[buckets]", "[network]", "[optimizer]", "[train]", "[output]"):
        assert section in out


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("[network]\nnetwork_dimm = 8\n", "network.network_dimm: unknown key; did you mean 'network_dim'?"),
        ("[network]\nnetwork_dim = 0\n", "network.network_dim: 0 is out of range"),
        ("[optimizer]\nlearning_rate = 0.0\n", "optimizer: nothing would train"),
        ('[network]\nnetwork_dim = "eight"\n', "network.network_dim: 'eight' is not a whole number"),
        ("[noisy]\nx = 1\n", "unknown section [noisy]; did you mean 'noise'?"),
        ("[speed]\ncuda_graph = true\n", "speed.cuda_graph: needs a CUDA device; this run is on cpu"),
        (
            "[speed]\nfp8_base = true\n",
            "speed.fp8_base: float8 weights are cast where used by mixed precision",
        ),
        ('[speed]\ncompile_blocks = "unet"\n', "speed.compile_blocks"),
    ],
)
def test_bad_config_values_get_one_clear_message(tmp_path, tiny_model_dir, capsys, extra, expected):
    dataset = make_synthetic_dataset(tmp_path / "data", count=2)
    code, _, err = _run(["train", str(_write_config(tmp_path, tiny_model_dir, dataset, extra))], capsys)
    assert code == 2
    assert expected in err
    assert "Traceback" not in err


def test_missing_model_path_names_the_field(tmp_path, capsys):
    dataset = make_synthetic_dataset(tmp_path / "data", count=2)
    config = _write_config(tmp_path, tmp_path / "no_such_model", dataset)
    code, _, err = _run(["train", str(config)], capsys)
    assert code == 2
    assert "model.path" in err and "no_such_model" in err and "does not exist" in err


def test_corrupt_image_and_bad_caption_are_reported_together(tmp_path, tiny_model_dir, capsys):
    dataset = make_synthetic_dataset(tmp_path / "data", count=2)
    folder = dataset / "2_shape"
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "00.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    code, _, err = _run(["train", str(_write_config(tmp_path, tiny_model_dir, dataset))], capsys)
    assert code == 2
    assert "broken.png" in err and "00.txt" in err
    assert "Traceback" not in err


def test_empty_dataset_folder_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(["train", str(_write_config(tmp_path, tiny_model_dir, empty))], capsys)
    assert code == 2
    assert str(empty) in err


def test_missing_config_file_is_a_clear_error(tmp_path, capsys):
    code, _, err = _run(["train", str(tmp_path / "nope.toml")], capsys)
    assert code == 2 and "nope.toml" in err and "does not exist" in err


def test_the_cli_loads_the_unet_in_fp8_when_asked(tmp_path, tiny_model_dir, capsys):
    dataset = make_synthetic_dataset(tmp_path / "data", count=4)
    extra = "[speed]\nfp8_base = true\n[network]\ntrain_text_encoder = false\n"
    config = _write_config(tmp_path, tiny_model_dir, dataset, extra)
    config.write_text(
        config.read_text().replace("train_batch_size = 2", 'train_batch_size = 2\nmixed_precision = "bf16"')
    )
    code, _, err = _run(["train", str(config)], capsys)
    # train() refuses speed.fp8_base unless the backend's UNet really is float8 (check_speed)
    assert code == 0, err
    saved = tmp_path / "out" / "my_lora.safetensors"
    assert load_file(saved)
    assert read_metadata(saved)["ss_fp8_base"] == "True"


def test_listing_keys_and_refusing_a_config_import_no_diffusers(tmp_path):
    """diffusers takes seconds to import; `--list-keys` and config errors must not wait for it."""
    config = tmp_path / "bad.toml"
    config.write_text('[model]\npath = "m"\nfamily = "sd3"\n[dataset]\npath = "d"\n', encoding="utf-8")
    script = textwrap.dedent(
        f"""
        import sys
        from lora_train_core.cli import main
        assert main(["train", "--list-keys"]) == 0
        assert main(["train", {str(config)!r}]) != 0
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("diffusers", "transformers")))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "model.family: 'sd3'" in done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
