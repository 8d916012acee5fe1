"""Door parity (issue 16, "What it must show"): one recipe through the CLI and through ComfyUI.

The same run is written once as a TOML for `python -m lora_train_core train` (on the diffusers
twin of the random SD1.5 checkpoint) and once as the node values of a Load Dataset → Bucketize
→ Cache Latents → Configure Optimizer (→ Training Stages) → Train LoRA graph (on the same
checkpoint as ComfyUI loads it). Each test drives one scenario through both doors and asserts
that they behave alike: which files appear and what they hold, how the run ends, what the
saved metadata says. A failure names the scenario and the door.

Stops are triggered the way a user triggers them: Ctrl-C in the CLI (SIGINT raised from its
progress bar) and ComfyUI's Cancel (`interrupt_current_processing` from a progress hook). A
NaN loss is injected where the loss is computed (`training_loss` as run/step.py imported it);
inside ComfyUI the pack's core is a different module object from the CLI's, so both are patched.
Steps are kept to 1-4 per run: a step of the full-size UNet at 64 px takes seconds on a CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import io
import json
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import lora_train_core
import lora_train_core.run.progress as cli_progress
import lora_train_core.run.step as cli_step
from lora_train_core import cli

pytestmark = pytest.mark.slow

PACK_DIR = Path(__file__).resolve().parents[2]
SIZE = 64  # pixels: 8x8 latents keep the full-size UNet fast on a CPU
SEED = 7
LEARNING_RATE = 2e-4
EMA_DECAY = 0.99
SAVE_PRECISION = "fp32"  # saved tensors equal the trained ones exactly
CANCEL_AT = 2
LONG_RUN = 4  # steps of the runs that are cancelled and resumed
NO_STATE = "(none)"  # Train LoRA's resume_from when not resuming

# Metadata that may differ between the doors for a run that is otherwise the same.
EXCLUDED_METADATA = {
    "ss_session_id": "a random id per run",
    "ss_training_started_at": "a time",
    "ss_training_finished_at": "a time",
    "modelspec.date": "a time",
    "ss_sd_model_name": "the CLI names the model folder; a ComfyUI MODEL carries no file name",
    "ss_new_sd_model_hash": "sampled over the UNet's state dict, whose names are diffusers' in the "
    "CLI and ComfyUI's own in the graph",
    "sshs_model_hash": "a hash of the saved weights, which differ in the last digits between two "
    "backends' float arithmetic",
    "sshs_legacy_hash": "as sshs_model_hash",
}


@dataclass(frozen=True)
class Recipe:
    """One run, written once as TOML (`toml`) and once as node values (`run_in_comfy`)."""

    name: str
    steps: int = 2
    overwrite: bool = False
    stages: tuple[tuple[int, int], ...] = ()  # (resolution, steps) per stage
    ema: bool = False
    cache_mode: str = "ram"

    def toml(self, model: Path, dataset: Path, out_dir: Path, cache_dir: Path) -> str:
        lines = [
            "[model]",
            f"path = {json.dumps(str(model))}",
            "[dataset]",
            f"path = {json.dumps(str(dataset))}",
            'caption_extension = ".txt"',
            "default_repeats = 1",
            "[buckets]",
            f"resolution = [{SIZE}, {SIZE}]",
            f"min_bucket_reso = {SIZE}",
            f"max_bucket_reso = {2 * SIZE}",
            "bucket_reso_steps = 64",
            "[cache]",
            f'mode = "{self.cache_mode}"',
            f"cache_dir = {json.dumps(str(cache_dir))}",
            "[output]",
            f"output_dir = {json.dumps(str(out_dir))}",
            f'output_name = "{self.name}"',
            f'save_precision = "{SAVE_PRECISION}"',
            f"overwrite = {str(self.overwrite).lower()}",
            "[train]",
            f"max_train_steps = {self.steps}",
            "train_batch_size = 1",
            f"seed = {SEED}",
            "[optimizer]",
            f"learning_rate = {LEARNING_RATE}",
        ]
        if self.ema:
            lines += ["[ema]", "enabled = true", f"decay = {EMA_DECAY}"]
        for resolution, steps in self.stages:
            lines += ["[[stages]]", f"resolution = {resolution}", f"max_train_steps = {steps}"]
        return "\n".join(lines) + "\n"


# --- the CLI door ----------------------------------------------------------------------------------


class CliRun(NamedTuple):
    code: int
    stderr: str
    out_dir: Path


def run_cli(recipe: Recipe, checkpoint, dataset: Path, out_dir: Path, *extra: str) -> CliRun:
    """`python -m lora_train_core train run.toml [extra]`, in process; (exit code, stderr)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    toml = out_dir / f"{recipe.name}.toml"
    toml.write_text(recipe.toml(checkpoint.diffusers, dataset, out_dir, out_dir / "latent_cache"))
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = cli.main(["train", str(toml), "--device", "cpu", *extra])
    release_memory()
    return CliRun(code, stderr.getvalue(), out_dir)


def release_memory() -> None:
    """Give a finished CLI run's 4 GB model back before the next one loads (the machine is shared):
    a stopped run's traceback cycles hold it until collected, and glibc keeps freed heap pages."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# --- the ComfyUI door ------------------------------------------------------------------------------


def widget_defaults(node_class) -> dict:
    """Every widget of a node at its default, as a fresh node in the graph has them."""
    return {i.id: i.default for i in node_class.define_schema().inputs if hasattr(i, "default")}


def run_in_comfy(comfy, loaded, dataset: Path, recipe: Recipe, resume_from: str = NO_STATE) -> Path:
    """The recipe as node values; returns Train LoRA's lora_path. Raises what Train LoRA raises."""
    nodes = comfy.pack_module("nodes")
    model, clip, vae = loaded
    with torch.inference_mode():  # as the executor runs nodes
        data = nodes.LoadDataset.execute(
            folder=dataset.name,
            custom_path="",
            caption_extension=".txt",
            default_repeats=1,
            shuffle_caption=False,
            keep_tokens=0,
            caption_dropout_rate=0.0,
            caption_tag_dropout_rate=0.0,
        ).result[0]
        buckets = nodes.Bucketize.execute(
            data,
            resolution=SIZE,
            min_bucket_reso=SIZE,
            max_bucket_reso=2 * SIZE,
            bucket_reso_steps=64,
            bucket_no_upscale=False,
            random_crop=False,
        ).result[0]
        latents = nodes.CacheLatents.execute(buckets, model, vae, recipe.cache_mode).result[0]
        if recipe.cache_mode == "disk":
            # Cache Latents filled the disk cache at its own resolution; start empty so that every
            # entry found after the run was written by the stages themselves.
            shutil.rmtree(comfy_cache_dir(comfy), ignore_errors=True)
        optimizer_widgets = {
            **widget_defaults(nodes.ConfigureOptimizer),
            "learning_rate": LEARNING_RATE,
            "ema_decay": EMA_DECAY if recipe.ema else 0.0,
        }
        optimizer = nodes.ConfigureOptimizer.execute(**optimizer_widgets).result[0]
        stages = None
        if recipe.stages:
            text = "\n".join(f"{resolution} {steps}" for resolution, steps in recipe.stages)
            stages = nodes.TrainingStages.execute(text).result[0]
        out = nodes.TrainLoRA.execute(
            model,
            clip,
            latents,
            max_train_steps=recipe.steps,
            train_batch_size=1,
            gradient_accumulation_steps=1,
            gradient_checkpointing=False,
            seed=SEED,
            lora_name=recipe.name,
            overwrite=recipe.overwrite,
            save_precision=SAVE_PRECISION,
            resume_from=resume_from,
            vae=vae,
            optimizer=optimizer,
            stages=stages,
        ).result
    return Path(out[3])


def comfy_cache_dir(comfy) -> Path:
    return comfy.output_dir() / "lora_latent_cache"  # where Cache Latents' disk mode writes


def comfy_states_dir(comfy) -> Path:
    return comfy.output_dir() / "lora_train_states"


@contextlib.contextmanager
def cancel_in_comfy_at(step: int):
    """Press ComfyUI's Cancel when the progress bar reaches `step`, as the queue's button would."""
    import comfy.model_management as mm
    import comfy.utils as comfy_utils

    def hook(value, total, preview, node_id=None):
        if value >= step:
            mm.interrupt_current_processing(True)

    comfy_utils.set_progress_bar_global_hook(hook)
    try:
        yield
    finally:
        comfy_utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)


# --- what both doors are held to -----------------------------------------------------------------


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def assert_loads_in_comfyui(comfy, loaded, path: Path) -> None:
    """ComfyUI's LoRA loader maps every key of the file (nothing reported as not loaded)."""
    import comfy.sd as comfy_sd

    with comfy.capture_logs() as messages:
        comfy_sd.load_lora_for_models(loaded[0], loaded[1], load_file(str(path)), 1.0, 1.0)
    assert not [m for m in messages if "lora key not loaded" in m or m.startswith("NOT LOADED")], messages


def state_folders(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.glob(f"{name}-step*") if (p / "state.json").is_file())


class StepRecorder:
    """Wraps a door's progress callback: keeps the LoRA weights as they were after `step`."""

    def __init__(self, step: int):
        self.step, self.weights = step, None

    def wrap(self, original):
        def call(callback_self, report):
            if report.step == self.step:
                self.weights = {k: v.detach().clone() for k, v in report.trained.kohya_state_dict().items()}
            return original(callback_self, report)

        return call


class NaNLossAt:
    """`training_loss` whose `call`-th result is NaN (still part of the graph, so backward runs)."""

    def __init__(self, original, call: int):
        self.original, self.call, self.calls = original, call, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        loss = self.original(*args, **kwargs)
        return loss * float("nan") if self.calls == self.call else loss


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _the_worktrees_code(comfy):
    """Both doors run this checkout's code, not an installed copy."""
    assert Path(lora_train_core.__file__).resolve().is_relative_to(PACK_DIR), lora_train_core.__file__
    pack_core = comfy.pack_module("lora_train_core")
    assert Path(pack_core.__file__).resolve().is_relative_to(PACK_DIR), pack_core.__file__
    assert pack_core is not lora_train_core  # the pack's core is its own module object


@pytest.fixture(scope="module")
def loaded(comfy, sd15_checkpoint):
    """(MODEL, CLIP, VAE) as CheckpointLoaderSimple loads the checkpoint."""
    import comfy.sd as comfy_sd

    with torch.inference_mode():
        model, clip, vae, *_ = comfy_sd.load_checkpoint_guess_config(str(sd15_checkpoint.path))
    yield model, clip, vae
    import comfy.model_management as mm

    del model, clip, vae
    mm.cleanup_models()


class DoorFiles(NamedTuple):
    cli: Path
    comfy: Path


@pytest.fixture(scope="module")
def existing_file_runs(comfy, loaded, sd15_checkpoint, tiny_dataset, tmp_path_factory):
    """Each door trains `parity_keep` while a file of that name exists, overwrite off.

    Returns (the CLI's run, the existing files, their old bytes, ComfyUI's lora_path)."""
    recipe = Recipe("parity_keep")
    out_dir = tmp_path_factory.mktemp("cli_keep")
    existing = DoorFiles(
        out_dir / "parity_keep.safetensors", comfy.models_dir("loras") / "parity_keep.safetensors"
    )
    old = b"an older LoRA the user wants to keep"
    for path in existing:
        path.write_bytes(old)
    cli_run = run_cli(recipe, sd15_checkpoint, tiny_dataset, out_dir)
    comfy_path = run_in_comfy(comfy, loaded, tiny_dataset, recipe)
    return cli_run, existing, old, comfy_path


@pytest.fixture(scope="module")
def cancelled_runs(comfy, loaded, sd15_checkpoint, tiny_dataset, tmp_path_factory):
    """Each door runs `parity_cancel` for LONG_RUN steps and is cancelled at step CANCEL_AT."""
    recipe = Recipe("parity_cancel", steps=LONG_RUN)
    out_dir = tmp_path_factory.mktemp("cli_cancel")
    original = cli_progress.ProgressBar.__call__

    def ctrl_c_at(bar, report):
        original(bar, report)
        if report.step == CANCEL_AT:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C in the terminal delivers

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli_progress.ProgressBar, "__call__", ctrl_c_at)
        cli_run = run_cli(recipe, sd15_checkpoint, tiny_dataset, out_dir)

    import comfy.model_management as mm

    with cancel_in_comfy_at(CANCEL_AT), pytest.raises(mm.InterruptProcessingException):
        run_in_comfy(comfy, loaded, tiny_dataset, recipe)
    return recipe, cli_run


# --- the scenarios -------------------------------------------------------------------------------


def test_overwrite_off_keeps_the_existing_file_and_takes_the_next_free_name(existing_file_runs):
    cli_run, existing, old, comfy_path = existing_file_runs
    assert cli_run.code == 0, cli_run.stderr
    saved = DoorFiles(cli_run.out_dir / "parity_keep_1.safetensors", comfy_path)
    for door, path in zip(DoorFiles._fields, existing, strict=True):
        assert path.read_bytes() == old, f"{door}: the existing file was changed"
    for door, path in zip(DoorFiles._fields, saved, strict=True):
        assert path.name == "parity_keep_1.safetensors", f"{door}: saved as {path}"
        assert path.is_file(), door
        assert metadata(path)["ss_output_name"] == "parity_keep_1", door


def test_overwrite_on_replaces_the_existing_file(comfy, loaded, sd15_checkpoint, tiny_dataset, tmp_path):
    recipe = Recipe("parity_replace", overwrite=True)
    existing = DoorFiles(
        tmp_path / "parity_replace.safetensors", comfy.models_dir("loras") / "parity_replace.safetensors"
    )
    for path in existing:
        path.write_bytes(b"an older LoRA the user wants replaced")
    run = run_cli(recipe, sd15_checkpoint, tiny_dataset, tmp_path)
    assert run.code == 0, run.stderr
    comfy_path = run_in_comfy(comfy, loaded, tiny_dataset, recipe)
    assert comfy_path == existing.comfy
    for door, path in zip(DoorFiles._fields, existing, strict=True):
        assert metadata(path)["ss_steps"] == "2", f"{door}: the file was not replaced by the trained LoRA"
        assert not path.with_name("parity_replace_1.safetensors").exists(), door


def test_finished_runs_record_the_same_metadata(comfy, existing_file_runs):
    cli_run, _, _, comfy_path = existing_file_runs
    assert cli_run.code == 0, cli_run.stderr
    saved = DoorFiles(cli_run.out_dir / "parity_keep_1.safetensors", comfy_path)
    cli_meta, comfy_meta = metadata(saved.cli), metadata(saved.comfy)
    assert sorted(cli_meta) == sorted(comfy_meta), "the doors record different metadata keys"
    differing = {
        key: (cli_meta[key], comfy_meta[key])
        for key in cli_meta
        if key not in EXCLUDED_METADATA and cli_meta[key] != comfy_meta[key]
    }
    assert not differing, f"metadata differs between the CLI and ComfyUI (cli, comfy): {differing}"
    assert set(load_file(str(saved.cli))) == set(load_file(str(saved.comfy))), "different LoRA keys"
    # the recipe's settings reached both doors (not just equal defaults)
    assert (cli_meta["ss_seed"], cli_meta["ss_learning_rate"], cli_meta["ss_steps"]) == (
        str(SEED),
        "0.0002",
        "2",
    )


def test_cancel_keeps_a_loadable_partial_lora_and_a_state(comfy, loaded, cancelled_runs):
    recipe, cli_run = cancelled_runs
    assert cli_run.code == 130, cli_run.stderr
    folders = DoorFiles(cli_run.out_dir, comfy.models_dir("loras"))
    states = DoorFiles(cli_run.out_dir / "state", comfy_states_dir(comfy))
    for door in DoorFiles._fields:
        folder = getattr(folders, door)
        partial = folder / f"{recipe.name}-partial.safetensors"
        assert partial.is_file(), f"{door}: no partial LoRA"
        assert not (folder / f"{recipe.name}.safetensors").exists(), f"{door}: a final file after a cancel"
        assert metadata(partial)["ss_steps"] == str(CANCEL_AT), f"{door}: stopped at another step"
        assert_loads_in_comfyui(comfy, loaded, partial)
        assert state_folders(getattr(states, door), recipe.name) == [f"{recipe.name}-step{CANCEL_AT:08d}"], (
            door
        )


def test_resume_after_cancel_ends_with_the_uninterrupted_step_count(
    comfy, loaded, sd15_checkpoint, tiny_dataset, cancelled_runs
):
    recipe, cli_run = cancelled_runs
    state = f"{recipe.name}-step{CANCEL_AT:08d}"
    resumed = run_cli(
        recipe,
        sd15_checkpoint,
        tiny_dataset,
        cli_run.out_dir,
        "--resume",
        str(cli_run.out_dir / "state" / state),
    )
    assert resumed.code == 0, resumed.stderr
    comfy_path = run_in_comfy(comfy, loaded, tiny_dataset, recipe, resume_from=state)
    for door, path in zip(
        DoorFiles._fields, (cli_run.out_dir / f"{recipe.name}.safetensors", comfy_path), strict=True
    ):
        assert path.name == f"{recipe.name}.safetensors", f"{door}: saved as {path}"
        meta = metadata(path)
        assert (meta["ss_steps"], meta["ss_max_train_steps"]) == (str(LONG_RUN), str(LONG_RUN)), door


def test_nan_loss_stops_with_a_partial_lora_of_the_last_good_step(
    comfy, loaded, sd15_checkpoint, tiny_dataset, tmp_path, monkeypatch
):
    recipe = Recipe("parity_nan", steps=3)
    pack_step = comfy.pack_module("lora_train_core.run.step")
    pack_progress = comfy.pack_module("nodes.comfy_training")._Progress
    recorders = DoorFiles(StepRecorder(1), StepRecorder(1))
    monkeypatch.setattr(cli_step, "training_loss", NaNLossAt(cli_step.training_loss, call=2))
    monkeypatch.setattr(pack_step, "training_loss", NaNLossAt(pack_step.training_loss, call=2))
    monkeypatch.setattr(
        cli_progress.ProgressBar, "__call__", recorders.cli.wrap(cli_progress.ProgressBar.__call__)
    )
    monkeypatch.setattr(pack_progress, "__call__", recorders.comfy.wrap(pack_progress.__call__))

    run = run_cli(recipe, sd15_checkpoint, tiny_dataset, tmp_path)
    assert run.code == 2, run.stderr
    cli_report = run.stderr
    with pytest.raises(comfy.pack_module("lora_train_core.errors").LoraTrainError) as raised:
        run_in_comfy(comfy, loaded, tiny_dataset, recipe)
    comfy_report = str(raised.value)

    folders = DoorFiles(tmp_path, comfy.models_dir("loras"))
    states = DoorFiles(tmp_path / "state", comfy_states_dir(comfy))
    for door, report in zip(DoorFiles._fields, (cli_report, comfy_report), strict=True):
        assert "loss of step 2 is nan" in report, f"{door} did not report the NaN: {report}"
        folder = getattr(folders, door)
        partial = folder / f"{recipe.name}-partial.safetensors"
        assert not (folder / f"{recipe.name}.safetensors").exists(), door
        assert metadata(partial)["ss_steps"] == "1", door
        step_1 = getattr(recorders, door).weights
        saved = load_file(str(partial))
        assert saved.keys() == step_1.keys(), door
        assert all(torch.equal(saved[k], step_1[k].float()) for k in saved), f"{door}: not step 1's weights"
        # the state of the last good step, to resume from once the cause is fixed
        assert state_folders(getattr(states, door), recipe.name) == [f"{recipe.name}-step00000001"], door


def test_stages_with_a_disk_cache_encode_every_stage_into_the_disk_cache(
    comfy, loaded, sd15_checkpoint, tiny_dataset, tmp_path
):
    recipe = Recipe("parity_stages_disk", stages=((SIZE, 1), (2 * SIZE, 1)), cache_mode="disk")
    run = run_cli(recipe, sd15_checkpoint, tiny_dataset, tmp_path)
    assert run.code == 0, run.stderr
    comfy_path = run_in_comfy(comfy, loaded, tiny_dataset, recipe)
    caches = DoorFiles(tmp_path / "latent_cache", comfy_cache_dir(comfy))
    images = len(list(tiny_dataset.rglob("*.png")))
    for door, cache in zip(DoorFiles._fields, caches, strict=True):
        areas = sorted(_bucket_area(entry) for entry in cache.glob("*.safetensors"))
        # one entry per image and stage: the first stage's buckets hold SIZE², the second's more
        assert len(areas) == 2 * images, f"{door}: {len(areas)} disk cache entries in {cache}"
        assert all(a <= SIZE * SIZE for a in areas[:images]), (door, areas)
        assert all(a > SIZE * SIZE for a in areas[images:]), (door, areas)
    for door, path in zip(
        DoorFiles._fields, (tmp_path / f"{recipe.name}.safetensors", comfy_path), strict=True
    ):
        meta = metadata(path)
        assert meta["ss_steps"] == "2", door
        assert [s["resolution"] for s in json.loads(meta["ss_stages"])] == [SIZE, 2 * SIZE], door


def _bucket_area(entry: Path) -> int:
    width, height = json.loads(metadata(entry)["bucket"])
    return width * height


def test_ema_across_stages_writes_the_ema_file(comfy, loaded, sd15_checkpoint, tiny_dataset, tmp_path):
    recipe = Recipe("parity_ema", stages=((SIZE, 1), (SIZE, 1)), ema=True)
    run = run_cli(recipe, sd15_checkpoint, tiny_dataset, tmp_path)
    assert run.code == 0, run.stderr
    comfy_path = run_in_comfy(comfy, loaded, tiny_dataset, recipe)
    for door, path in zip(
        DoorFiles._fields, (tmp_path / f"{recipe.name}.safetensors", comfy_path), strict=True
    ):
        ema_path = path.with_name(f"{recipe.name}_ema.safetensors")
        assert ema_path.is_file(), f"{door}: no EMA file"
        assert metadata(path)["ss_ema_weights"] == "False", door
        ema_meta = metadata(ema_path)
        assert ema_meta["ss_ema_weights"] == "True", door
        assert ema_meta["ss_steps"] == "2", door
        assert json.loads(ema_meta["ss_ema"])["decay"] == EMA_DECAY, door


def test_config_nodes_left_at_their_defaults_give_the_cores_defaults(comfy):
    """A Configure node added and left untouched trains what the CLI trains without its section."""
    nodes = comfy.pack_module("nodes")
    core = {
        name: comfy.pack_module(f"lora_train_core.{name}")
        for name in ("model.network", "optim.optimizers", "optim.ema", "objective.noise", "objective.loss")
    }
    network = nodes.ConfigureNetwork.execute(**widget_defaults(nodes.ConfigureNetwork)).result[0]
    assert network == core["model.network"].NetworkConfig()
    optimizer = nodes.ConfigureOptimizer.execute(**widget_defaults(nodes.ConfigureOptimizer)).result[0]
    assert optimizer.optimizer == core["optim.optimizers"].OptimizerConfig()
    assert optimizer.ema == core["optim.ema"].EMAConfig()
    assert optimizer.blocks is None
    noise = nodes.ConfigureNoise.execute(**widget_defaults(nodes.ConfigureNoise)).result[0]
    assert noise.noise == core["objective.noise"].NoiseConfig()
    assert noise.loss == core["objective.loss"].LossConfig()
