"""The built-in recipes run end to end in the demo (short CPU runs with finite loss)."""

from __future__ import annotations

import math

import pytest

from lora_train_core.cli import main
from lora_train_core.config import recipe_path, with_overrides
from lora_train_core.demo import demo_config
from lora_train_core.errors import ConfigError
from lora_train_core.outputs.export import read_metadata


def test_balanced_recipe_sets_min_snr_offset_and_multires(tmp_path):
    cfg = with_overrides(demo_config("sd15", tmp_path, 5), recipe_path("balanced"))
    assert cfg.recipe.loss.min_snr_gamma == 5.0
    assert cfg.recipe.noise.noise_offset == 0.1
    assert (cfg.recipe.noise.multires_noise_iterations, cfg.recipe.noise.multires_noise_discount) == (6, 0.3)


@pytest.mark.parametrize("recipe", ["balanced", "recommended"])
def test_recipe_runs_in_the_cli_demo_with_finite_loss(tmp_path, capsys, recipe):
    assert main(["demo", "--out", str(tmp_path), "--steps", "4", "--recipe", recipe]) == 0
    out = capsys.readouterr().out
    last = float(out.split("last loss")[1].split()[0])
    assert math.isfinite(last)
    meta = read_metadata(tmp_path / "demo_sd15_lora.safetensors")
    assert meta["ss_min_snr_gamma"] == "5.0" and meta["ss_noise_offset"] == "0.1"
    if recipe == "recommended":
        assert meta["ss_optimizer"].startswith("Prodigy")
        assert (tmp_path / "demo_sd15_lora_ema.safetensors").is_file()


def test_unknown_recipe_names_the_built_in_ones():
    with pytest.raises(ConfigError, match="balanced, recommended"):
        recipe_path("fastest")
