"""The run orchestrator both doors call: stages carry the EMA, multi-stage runs resume exactly,
intermediate files are pruned across a resume, the existing-file policy, and refusals that come
before any model exists."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from lora_train_core.config import OutputConfig
from lora_train_core.demo import demo_config
from lora_train_core.errors import ConfigError
from lora_train_core.model.backend import ModelFacts
from lora_train_core.model.tiny_models import tiny_backend
from lora_train_core.optim.ema import EMAConfig
from lora_train_core.optim.optimizers import OptimizerConfig
from lora_train_core.outputs.export import read_metadata
from lora_train_core.run.orchestrator import run_training
from lora_train_core.run.preflight import prepare_run
from lora_train_core.run.stages import StageConfig
from lora_train_core.run.state_files import load_training_state
from lora_train_core.run.train import TrainingStopped

STAGES = (
    StageConfig(resolution=64, max_train_steps=2, learning_rate=1e-3),
    StageConfig(resolution=64, max_train_steps=2, learning_rate=5e-4),
)


def _cfg(tmp_path, dataset, **changes):
    cfg = demo_config("sd15", tmp_path, steps=2)
    cfg = dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, path=dataset))
    return dataclasses.replace(cfg, **changes)


def _with(cfg, **sections):
    """cfg with recipe sections replaced, e.g. ema=EMAConfig(enabled=True)."""
    return dataclasses.replace(cfg, recipe=dataclasses.replace(cfg.recipe, **sections))


class Stop(BaseException):
    """An interrupt that, like ComfyUI's since 2026, does not derive from Exception."""


def _stop_at(step: int):
    def on_step(report):
        if report.step == step:
            raise Stop(f"stopped at {step}")

    return on_step


def _quiet(_line: str) -> None:
    pass


def test_the_ema_keeps_averaging_across_stages(tmp_path, shapes_dataset):
    """At stage 2's first step (step 3 of the run) the EMA blends step 2's average with the new
    weights at diffusers' decay for step 3, d = 1 - (1 + k)^(-power) with k = 2; an EMA restarted
    per stage would instead copy the weights (k = 0, d = 0)."""
    ema_cfg = EMAConfig(enabled=True, decay=0.999)
    cfg = _with(_cfg(tmp_path, shapes_dataset, stages=STAGES), ema=ema_cfg)
    seen = {}

    def record(report):
        ema = report.trained.ema.shadow_state_dict()
        params = dict(report.trained.network.named_lora_parameters())
        seen[report.step] = (
            {k: v.clone() for k, v in ema.items()},
            {k: p.detach().clone() for k, p in params.items()},
        )

    result = run_training(cfg, tiny_backend("sd15"), on_step=record, say=_quiet)
    shadow2, _ = seen[2]
    shadow3, params3 = seen[3]
    d = 1 - (1 + 2) ** (-ema_cfg.power)
    for name, param in params3.items():
        expected = shadow2[name] + (1 - d) * (param - shadow2[name])
        torch.testing.assert_close(shadow3[name], expected, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(shadow3[n], params3[n]) for n in params3)
    saved = load_file(result.ema_path)
    final_shadow, _ = seen[4]
    name = next(iter(final_shadow))
    assert name.endswith("lora_up.weight") or name.endswith("lora_down.weight")
    torch.testing.assert_close(saved[name].float(), final_shadow[name], rtol=1e-3, atol=1e-4)  # fp16 file
    assert read_metadata(result.ema_path)["ss_ema_weights"] == "True"


@pytest.mark.parametrize("stop_at", [1, 3], ids=["in stage 1", "in stage 2"])
def test_a_multi_stage_run_resumed_ends_with_the_weights_of_an_uninterrupted_one(
    tmp_path, shapes_dataset, stop_at
):
    def cfg(name):
        base = _cfg(tmp_path / name, shapes_dataset, stages=STAGES)
        return _with(base, ema=EMAConfig(enabled=True, decay=0.99))

    whole = run_training(cfg("whole"), tiny_backend("sd15"), say=_quiet)
    interrupted = cfg("resumed")
    with pytest.raises(TrainingStopped) as stopped:
        run_training(interrupted, tiny_backend("sd15"), on_step=_stop_at(stop_at), say=_quiet)
    assert isinstance(stopped.value.__cause__, Stop)
    out = interrupted.output.output_dir
    partial = read_metadata(out / "demo_sd15_lora-partial.safetensors")
    assert partial["ss_steps"] == str(stop_at)
    state = load_training_state(interrupted.output.states_dir)
    assert state.stage == (0 if stop_at <= 2 else 1)
    resumed = run_training(interrupted, tiny_backend("sd15"), resume=state, say=_quiet)
    for ours, theirs in ((resumed.path, whole.path), (resumed.ema_path, whole.ema_path)):
        a, b = load_file(ours), load_file(theirs)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), ours.name
    assert resumed.trained.losses == whole.trained.losses
    meta = read_metadata(resumed.path)
    assert meta["ss_steps"] == meta["ss_max_train_steps"] == "4"
    assert meta["ss_stages"] == read_metadata(whole.path)["ss_stages"]


def test_intermediate_files_are_pruned_across_a_resume(tmp_path, shapes_dataset):
    output = OutputConfig(
        output_dir=tmp_path / "out", output_name="run", save_every_n_steps=1, save_last_n_saves=2
    )
    cfg = _cfg(tmp_path, shapes_dataset, output=output)
    cfg = dataclasses.replace(
        cfg,
        recipe=dataclasses.replace(
            cfg.recipe, train=dataclasses.replace(cfg.recipe.train, max_train_steps=5)
        ),
    )
    with pytest.raises(TrainingStopped):
        # the stop comes from the first step callback, before step 3's file is written
        run_training(cfg, tiny_backend("sd15"), on_step=_stop_at(3), say=_quiet)
    state = load_training_state(output.states_dir)
    run_training(cfg, tiny_backend("sd15"), resume=state, say=_quiet)
    steps = sorted(p.name for p in output.output_dir.glob("run-step*.safetensors"))
    assert steps == ["run-step00000002.safetensors", "run-step00000004.safetensors"]


def test_an_existing_file_is_kept_unless_overwrite(tmp_path, shapes_dataset):
    cfg = _cfg(tmp_path, shapes_dataset)
    cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, overwrite=False))
    existing = cfg.output.path
    existing.parent.mkdir(parents=True, exist_ok=True)
    existing.write_bytes(b"an earlier LoRA")
    kept = run_training(cfg, tiny_backend("sd15"), say=_quiet)
    assert kept.path == existing.with_name("demo_sd15_lora_1.safetensors")
    assert existing.read_bytes() == b"an earlier LoRA"
    replaced = run_training(
        dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, overwrite=True)),
        tiny_backend("sd15"),
        say=_quiet,
    )
    assert replaced.path == existing
    assert load_file(existing)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"optimizer": OptimizerConfig(learning_rate=0.0)}, "optimizer: nothing would train"),
        (
            {"stages": (StageConfig(64, max_train_steps=1, learning_rate=0.0),)},
            "optimizer: nothing would train",
        ),
    ],
)
def test_refusals_come_before_any_model_exists(tmp_path, shapes_dataset, change, message):
    from lora_train_core.data.dataset import load_dataset

    cfg = _cfg(tmp_path, shapes_dataset)
    if "optimizer" in change:
        cfg = _with(cfg, optimizer=change["optimizer"])
    else:
        cfg = dataclasses.replace(cfg, **change)
    facts = ModelFacts("sd15", "epsilon", torch.device("cpu"))
    with pytest.raises(ConfigError, match=message):
        prepare_run(cfg, load_dataset(cfg.dataset), facts)


def test_the_result_carries_the_metadata_the_file_was_saved_with(tmp_path, shapes_dataset):
    """What EMA Export copies from the result is the saved file's record (one session id), and the
    EMA file shares it apart from ss_ema_weights."""
    cfg = _with(_cfg(tmp_path, shapes_dataset), ema=EMAConfig(enabled=True))
    result = run_training(cfg, tiny_backend("sd15"), say=_quiet)
    saved = {k: v for k, v in read_metadata(result.path).items() if not k.startswith("sshs_")}
    assert saved == result.metadata
    ema = {k: v for k, v in read_metadata(result.ema_path).items() if not k.startswith("sshs_")}
    assert ema == {**result.metadata, "ss_ema_weights": "True"}
