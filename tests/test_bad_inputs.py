"""The bad-input suite: every kind of broken dataset, config, model, state and UI input gets a clear answer.

Each case builds its input in a temporary folder and runs it through the front door a
user would: the CLI (`main([...])`: exit status 2, one `error:` message, no
traceback), the dataset pipeline the CLI runs (images PIL can read in an unusual
form are accepted and converted, as documented in images.py), or the path checks a
ComfyUI node calls. The expected outcome is "error", "skipped" (a logged warning,
training goes on) or "accepted". The last test prints every case with its message.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import struct
import sys
import types
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lora_train_core.cli import main
from lora_train_core.data.buckets import BucketConfig, load_bucketed_pixels, plan_buckets
from lora_train_core.data.dataset import DatasetConfig, load_dataset
from lora_train_core.demo import make_synthetic_dataset
from lora_train_core.errors import LoraTrainError
from lora_train_core.model.tiny_models import save_tiny_model, tiny_backend
from lora_train_core.run.state_files import latest_state

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = BucketConfig(resolution=(128, 128), min_bucket_reso=64, max_bucket_reso=256)
RESULTS: dict[str, tuple[str, str]] = {}  # case → (outcome, message), printed by the last test


@dataclass
class World:
    """One case's inputs: a valid dataset and config to break, plus shared model and state."""

    tmp: Path
    model: Path
    state: Path  # a complete training state of the base config (network_dim 4)
    config: dict

    @property
    def data(self) -> Path:
        return Path(self.config["dataset"]["path"])

    @property
    def subset(self) -> Path:
        return self.data / "2_shape"

    def write_config(self) -> Path:
        path = self.tmp / "run.toml"
        path.write_text(_toml(self.config), encoding="utf-8")
        return path

    def train_argv(self, *extra: str) -> list[str]:
        return ["train", str(self.write_config()), *extra]


def _toml(sections: dict) -> str:
    # bare keys first: after a [table] header they would belong to that table
    lines = [f"{k} = {_toml_value(v)}" for k, v in sections.items() if not isinstance(v, dict)]
    for section, values in sections.items():
        if isinstance(values, dict):
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # strings, numbers and lists read the same in TOML


def _base_config(tmp: Path, model: Path, data: Path) -> dict:
    return {
        "model": {"path": str(model)},
        "dataset": {"path": str(data)},
        "buckets": {"resolution": [128, 128], "min_bucket_reso": 64, "max_bucket_reso": 256},
        "network": {"network_dim": 4, "network_alpha": 4.0},
        "train": {"max_train_steps": 1, "train_batch_size": 1},
        "output": {"output_dir": str(tmp / "out"), "output_name": "bad"},
    }


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A tiny sd15 model folder and a training state made by the CLI from the base config."""
    tmp = tmp_path_factory.mktemp("shared")
    model = save_tiny_model(tmp / "model", "sd15")
    config = _base_config(tmp, model, make_synthetic_dataset(tmp / "data", count=2))
    config["train"]["save_state_every_n_steps"] = 1
    (tmp / "run.toml").write_text(_toml(config), encoding="utf-8")
    torch.set_num_threads(1)
    assert main(["train", str(tmp / "run.toml")]) == 0
    return model, latest_state(tmp / "out" / "state")


@pytest.fixture
def world(tmp_path, shared):
    model, state = shared
    data = make_synthetic_dataset(tmp_path / "data", count=2)
    return World(tmp_path, model, state, _base_config(tmp_path, model, data))


# ---- inputs ------------------------------------------------------------------------------------


def _png_bytes(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=save.pop("format", "PNG"), **save)
    return buffer.getvalue()


def _noise_png() -> bytes:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (96, 96, 3), generator=generator, dtype=torch.uint8).numpy()
    return _png_bytes(Image.fromarray(pixels))


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width×height (RGB) with no real pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    return _png_bytes(Image.new("RGB", (96, 64), (10, 200, 10)), format="JPEG", exif=exif)


def _kohya_lora(prefix: str, fan_in: int = 32, rank: int = 2) -> dict[str, torch.Tensor]:
    name = f"{prefix}_text_model_encoder_layers_0_mlp_fc1"
    return {
        f"{name}.lora_down.weight": torch.ones(rank, fan_in),
        f"{name}.lora_up.weight": torch.ones(64, rank),
        f"{name}.alpha": torch.tensor(float(rank)),
    }


def _paths_module():
    """nodes/paths.py as ComfyUI imports it (the core imported relatively), in bare packages, so that
    nodes/__init__.py, which needs ComfyUI, does not run."""
    for name, folder in (("lora_pack", ROOT), ("lora_pack.nodes", ROOT / "nodes")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules.setdefault(name, package)
    return importlib.import_module("lora_pack.nodes.paths")


# ---- how a case runs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[World], tuple[str, str]]  # → (outcome, message)
    expect: str  # a fragment of the message
    outcome: str = "error"


def _cli(argv: list[str]) -> tuple[str, str]:
    """Run the CLI; "error" with its message on status 2, "accepted" with the warnings logged on 0."""
    handler = _Records()
    logging.getLogger().addHandler(handler)
    err = io.StringIO()
    try:
        stderr, sys.stderr = sys.stderr, err
        code = main(argv)
    finally:
        sys.stderr = stderr
        logging.getLogger().removeHandler(handler)
    text = err.getvalue()
    assert "Traceback" not in text
    if code == 2:  # the message is the rest of stderr from "error: " on (progress bars come before it)
        return "error", text[text.rindex("error: ") + len("error: ") :].strip()
    assert code == 0, text
    return "accepted", " | ".join(handler.warnings)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.warnings: list[str] = []

    def emit(self, record):
        self.warnings.append(record.getMessage())


def _error_of(call: Callable[[], object]) -> tuple[str, str]:
    """ "error" with the message of the LoraTrainError that `call` raises (any other error fails the test)."""
    try:
        call()
    except LoraTrainError as exc:
        return "error", str(exc)
    except Exception as exc:  # the pack's own copy of ConfigError, imported relatively
        if type(exc).__name__ != "ConfigError":
            raise
        return "error", str(exc)
    return "accepted", "no error"


def train_with(setup: Callable[[World], None], *extra: str) -> Callable[[World], tuple[str, str]]:
    """A CLI `train` case: `setup` breaks the world, then the CLI runs on it."""

    def run(world: World) -> tuple[str, str]:
        setup(world)
        return _cli(world.train_argv(*extra))

    return run


def config_value(section: str, key: str, value) -> Callable[[World], tuple[str, str]]:
    def setup(world: World) -> None:
        world.config.setdefault(section, {})[key] = value

    return train_with(setup)


def dataset_file(name: str, data: bytes | Callable[[], bytes]) -> Callable[[World], tuple[str, str]]:
    def setup(world: World) -> None:
        (world.subset / name).write_bytes(data() if callable(data) else data)

    return train_with(setup)


def accepted_image(
    name: str, image: Callable[[], bytes], check: Callable
) -> Callable[[World], tuple[str, str]]:
    """The dataset loader and the bucket pipeline take the image; `check(record, pixels)` says how."""

    def run(world: World) -> tuple[str, str]:
        for path in world.subset.iterdir():
            path.unlink()
        (world.subset / name).write_bytes(image())
        dataset = load_dataset(DatasetConfig(path=world.data))
        plan = plan_buckets(dataset.images, BUCKETS)
        pixels, _ = load_bucketed_pixels(dataset.images[0].path, plan.assignments[0])
        return "accepted", check(dataset.images[0], plan.assignments[0], pixels)

    return run


def _rgb_at(pixels: torch.Tensor, x: int = 0, y: int = 0) -> tuple[int, ...]:
    """The 0..255 RGB of a [-1, 1] pixel tensor (C, H, W)."""
    return tuple(round(((v + 1) * 127.5).item()) for v in pixels[:, y, x])


def loaded_dataset(setup: Callable[[World], None]) -> Callable[[World], tuple[str, str]]:
    """load_dataset (the CLI's first step) on the broken folder; "skipped" if it warned and went on."""

    def run(world: World) -> tuple[str, str]:
        setup(world)
        handler = _Records()
        logging.getLogger("lora_train_core").addHandler(handler)
        try:
            outcome, message = _error_of(lambda: load_dataset(DatasetConfig(path=world.data)))
        finally:
            logging.getLogger("lora_train_core").removeHandler(handler)
        if outcome == "accepted" and handler.warnings:
            return "skipped", " | ".join(handler.warnings)
        return outcome, message

    return run


def resume_from(make_state: Callable[[World], Path], **config_changes) -> Callable[[World], tuple[str, str]]:
    def run(world: World) -> tuple[str, str]:
        state = make_state(world)
        for dotted, value in config_changes.items():
            section, key = dotted.split("__")
            world.config.setdefault(section, {})[key] = value
        return _cli(world.train_argv("--resume", str(state)))

    return run


def _copy_state(world: World, folder: Path | None = None) -> Path:
    """A copy of the shared state, by default at <tmp>/state/<its name>."""
    folder = folder or world.tmp / "state" / world.state.name
    folder.mkdir(parents=True)
    for path in world.state.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def _state_edited(edit: Callable[[Path], None]) -> Callable[[World], Path]:
    def make(world: World) -> Path:
        folder = _copy_state(world)
        edit(folder)
        return folder

    return make


def _state_json(change: dict) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        record = json.loads((folder / "state.json").read_text())
        (folder / "state.json").write_text(json.dumps({**record, **change}))

    return edit


def merge_of(
    *loras: tuple[str, dict[str, torch.Tensor] | bytes],
    into_model: bool = False,
    out: str | None = None,
    extra: tuple[str, ...] = (),
):
    """The merge command on these files (written to the world's folder), `--out` there, then `extra`."""

    def run(world: World) -> tuple[str, str]:
        specs = []
        for name, content in loras:
            path = world.tmp / name
            if isinstance(content, bytes):
                path.write_bytes(content)
            elif content:
                save_file(content, path)
            specs.append(f"{path}:0.5")
        into = ["--into-model", str(world.model)] if into_model else []
        target = world.tmp / (out or ("merged" if into_model else "merged.safetensors"))
        return _cli(["merge", *specs, "--out", str(target), *into, *extra])

    return run


def ui(call: Callable[[object, World], object]) -> Callable[[World], tuple[str, str]]:
    def run(world: World) -> tuple[str, str]:
        paths = _paths_module()
        return _error_of(lambda: call(paths, world))

    return run


def _write(relative: str, data: bytes = b"") -> Callable[[World], None]:
    def setup(world: World) -> None:
        path = world.data / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return setup


def _set_dataset_path(value: Callable[[World], str]) -> Callable[[World], None]:
    def setup(world: World) -> None:
        world.config["dataset"]["path"] = value(world)

    return setup


def _only_folder(name: str) -> Callable[[World], None]:
    def setup(world: World) -> None:
        world.subset.rename(world.data / name)

    return setup


def _nested_folder(world: World) -> None:
    (world.subset / "extra").mkdir()
    (world.subset / "extra" / "x.png").write_bytes(_png_bytes(Image.new("RGB", (64, 64))))


def _extra_folder(name: str) -> Callable[[World], None]:
    def setup(world: World) -> None:
        (world.data / name).mkdir()
        (world.data / name / "x.png").write_bytes(_png_bytes(Image.new("RGB", (64, 64))))

    return setup


def _model_path(make: Callable[[World], Path]) -> Callable[[World], None]:
    def setup(world: World) -> None:
        world.config["model"]["path"] = str(make(world))

    return setup


def _new_folder(world: World, name: str) -> Path:
    (world.tmp / name).mkdir()
    return world.tmp / name


def _empty_dir(world: World) -> Path:
    return _new_folder(world, "empty_model")


def _junk_checkpoint(world: World) -> Path:
    path = world.tmp / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    return path


def _raw_config(text: bytes) -> Callable[[World], tuple[str, str]]:
    def run(world: World) -> tuple[str, str]:
        path = world.tmp / "raw.toml"
        path.write_bytes(text)
        return _cli(["train", str(path)])

    return run


def _caption_for(text: bytes) -> Callable[[World], None]:
    return _write("2_shape/00.txt", text)


def _drop_captions(world: World) -> None:
    for path in world.subset.glob("*.txt"):
        path.unlink()


def _missing_caption(world: World) -> tuple[str, str]:
    _drop_captions(world)
    caption = load_dataset(DatasetConfig(path=world.data)).images[0].caption
    return "accepted", f"accepted: an image without a caption file gets the class token {caption!r}"


def _huge_caption(world: World) -> tuple[str, str]:
    (world.subset / "00.txt").write_text("red, " * 20_000, encoding="utf-8")  # 100,000 characters
    dataset = load_dataset(DatasetConfig(path=world.data))
    caption = dataset.images[0].caption
    hidden = tiny_backend("sd15", seed=0).encode_text([caption]).hidden
    assert len(caption) == 99_999 and hidden.shape[1] == 32
    return "accepted", (
        f"accepted: a {len(caption):,}-character caption loads; the tokenizer keeps the first "
        f"{hidden.shape[1]} tokens (77 for real CLIP), as kohya truncates"
    )


def _palette_image() -> Image.Image:
    image = Image.new("P", (64, 64), 0)
    image.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    return image


def _lora_file(world: World) -> Path:
    path = world.tmp / "some_lora.safetensors"
    save_file(_kohya_lora("lora_te"), path)
    return path


def _two_runs(world: World) -> Path:
    for run in ("a", "b"):
        _copy_state(world, world.tmp / "states" / f"{run}-step00000001")
    return world.tmp / "states"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def _linked_dataset(paths, world: World):
    (world.tmp / "input").mkdir()
    (world.tmp / "input" / "cats").symlink_to(world.data)
    return paths.resolve_dataset_folder(world.tmp / "input", "cats")


# ---- the table ---------------------------------------------------------------------------------

CASES = [
    # dataset: files with image extensions that are not usable images
    Case("zero_byte_png", dataset_file("zero.png", b""), "zero.png: empty file (0 bytes)"),
    Case(
        "truncated_png",
        dataset_file("cut.png", lambda: _noise_png()[:400]),
        "cut.png: not a readable image, corrupt or truncated",
    ),
    Case(
        "corrupt_jpeg",
        dataset_file("bad.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4),
        "bad.jpg: not a readable image",
    ),
    Case(
        "text_file_named_png",
        dataset_file("notes.png", b"just some notes\n"),
        "notes.png: not a readable image",
    ),
    Case(
        "html_named_webp",
        dataset_file("page.webp", b"<html><body>404</body></html>"),
        "page.webp: not a readable image",
    ),
    Case(
        "png_declaring_20000x20000",
        dataset_file("bomb.png", _png_declaring(20_000, 20_000)),
        "downscale the image first",
    ),
    # dataset: unusual but valid images, converted as images.py documents
    Case(
        "cmyk_jpeg",
        accepted_image(
            "c.jpg",
            lambda: _png_bytes(Image.new("CMYK", (64, 64), (0, 0, 0, 0)), format="JPEG"),
            lambda r, a, px: f"accepted: CMYK → RGB {_rgb_at(px)}",
        ),
        "RGB (255, 255, 255)",
        "accepted",
    ),
    Case(
        "png_16_bit",
        accepted_image(
            "g16.png",
            lambda: _png_bytes(Image.new("I;16", (64, 64), 65535)),
            lambda r, a, px: f"accepted: 16-bit gray 65535 → RGB {_rgb_at(px)}",
        ),
        "RGB (255, 255, 255)",
        "accepted",
    ),
    Case(
        "palette_png",
        accepted_image(
            "p.png",
            lambda: _png_bytes(_palette_image()),
            lambda r, a, px: f"accepted: palette index 0 → RGB {_rgb_at(px)}",
        ),
        "RGB (10, 20, 30)",
        "accepted",
    ),
    Case(
        "rgba_transparent_png",
        accepted_image(
            "a.png",
            lambda: _png_bytes(Image.new("RGBA", (64, 64), (255, 0, 0, 0))),
            lambda r, a, px: f"accepted: transparent red laid on white → RGB {_rgb_at(px)}",
        ),
        "RGB (255, 255, 255)",
        "accepted",
    ),
    Case(
        "gray_alpha_png",
        accepted_image(
            "la.png",
            lambda: _png_bytes(Image.new("LA", (64, 64), (0, 255))),
            lambda r, a, px: f"accepted: opaque black gray+alpha → RGB {_rgb_at(px)}",
        ),
        "RGB (0, 0, 0)",
        "accepted",
    ),
    Case(
        "exif_rotated_jpeg",
        accepted_image(
            "r.jpg",
            _exif_rotated_jpeg,
            lambda r, a, px: f"accepted: 96x64 stored, EXIF orientation 6 → {r.size[0]}x{r.size[1]} upright",
        ),
        "→ 64x96 upright",
        "accepted",
    ),
    Case(
        "one_by_one_png",
        accepted_image(
            "dot.png",
            lambda: _png_bytes(Image.new("RGB", (1, 1), (9, 9, 9))),
            lambda r, a, px: f"accepted: 1x1 upscaled into bucket {a.bucket}, pixels {tuple(px.shape)}",
        ),
        "bucket (128, 128), pixels (3, 128, 128)",
        "accepted",
    ),
    # captions
    Case("caption_missing", _missing_caption, "gets the class token 'shape'", "accepted"),
    Case("caption_empty", train_with(_caption_for(b"")), "00.txt: caption file is empty"),
    Case("caption_whitespace_only", train_with(_caption_for(b" \n\t ")), "00.txt: caption file is empty"),
    Case(
        "caption_latin1", train_with(_caption_for("café".encode("latin-1"))), "00.txt: caption is not UTF-8"
    ),
    Case("caption_utf16", train_with(_caption_for("tag".encode("utf-16"))), "caption is UTF-16"),
    Case("caption_huge", _huge_caption, "tokenizer keeps the first 32 tokens", "accepted"),
    # folders
    Case(
        "folder_not_n_name_beside_a_good_one",
        loaded_dataset(_extra_folder("mychar")),
        "mychar: skipped, the name is not N_name",
        "skipped",
    ),
    Case(
        "folder_zero_repeats",
        loaded_dataset(_extra_folder("0_none")),
        "0_none: skipped, the name is not N_name",
        "skipped",
    ),
    Case(
        "folder_nested_in_a_subset",
        loaded_dataset(_nested_folder),
        "folders inside a subset folder are not read",
        "skipped",
    ),
    Case("only_folder_not_n_name", train_with(_only_folder("mychar")), "no images found"),
    Case(
        "subset_folder_without_images",
        train_with(lambda w: (w.data / "3_empty").mkdir()),
        "3_empty: no images",
    ),
    Case(
        "empty_dataset",
        train_with(_set_dataset_path(lambda w: str(_new_folder(w, "nothing")))),
        "no images found",
    ),
    Case(
        "dataset_missing",
        train_with(_set_dataset_path(lambda w: str(w.tmp / "no_such"))),
        "the dataset folder does not exist",
    ),
    Case(
        "dataset_is_a_file",
        train_with(_set_dataset_path(lambda w: str(w.subset / "00.png"))),
        "the dataset folder is not a folder",
    ),
    Case(
        "dataset_path_traversal",
        train_with(_set_dataset_path(lambda w: str(w.tmp / "../../../no/such/data"))),
        "does not exist",
    ),
    Case(
        "caption_extension_is_an_image_one",
        config_value("dataset", "caption_extension", ".png"),
        "dataset.caption_extension: '.png' is an image extension",
    ),
    # config: ranges and types
    Case("rank_zero", config_value("network", "network_dim", 0), "network.network_dim: 0 is out of range"),
    Case(
        "rank_larger_than_the_layer",
        config_value("network", "network_dim", 4096),
        "rank 4096 is larger than min(",
    ),
    Case(
        "batch_larger_than_every_bucket",
        config_value("train", "train_batch_size", 64),
        "train_batch_size 64 is larger than every bucket",
        "accepted",
    ),
    Case(
        "noise_offset_out_of_range",
        config_value("noise", "noise_offset", 1.7),
        "noise.noise_offset: 1.7 is out of range",
    ),
    Case(
        "negative_learning_rate",
        config_value("optimizer", "learning_rate", -0.001),
        "optimizer.learning_rate: -0.001 is out of range",
    ),
    Case(
        "steps_as_a_string",
        config_value("train", "max_train_steps", "100"),
        "train.max_train_steps: '100' is not a whole number",
    ),
    Case(
        "batch_as_a_fraction",
        config_value("train", "train_batch_size", 2.5),
        "train.train_batch_size: 2.5 is not a whole number",
    ),
    Case(
        "flag_as_a_string",
        config_value("train", "gradient_checkpointing", "yes"),
        "train.gradient_checkpointing: 'yes' is not true/false",
    ),
    Case(
        "negative_state_interval",
        config_value("train", "save_state_every_n_steps", -1),
        "train.save_state_every_n_steps: -1 is out of range",
    ),
    Case(
        "no_steps_and_no_epochs",
        train_with(lambda w: w.config["train"].update(max_train_steps=0)),
        "set max_train_steps or max_train_epochs",
    ),
    Case(
        "warmup_longer_than_the_run",
        train_with(
            lambda w: w.config.update(
                optimizer={"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 50}
            )
        ),
        "50 warmup steps exceed the 1 training steps",
    ),
    Case(
        "resolution_not_a_multiple",
        config_value("buckets", "resolution", [100, 100]),
        "buckets.resolution: 100 is not a multiple of bucket_reso_steps = 64",
    ),
    Case(
        "unknown_optimizer",
        config_value("optimizer", "optimizer_type", "SGD"),
        "optimizer.optimizer_type: 'SGD' is not supported",
    ),
    Case(
        "unknown_mixed_precision",
        config_value("train", "mixed_precision", "fp8"),
        "train.mixed_precision: 'fp8' is not one of",
    ),
    Case(
        "unknown_save_precision",
        config_value("output", "save_precision", "fp8"),
        "output.save_precision: 'fp8' is not one of",
    ),
    Case(
        "unknown_key",
        config_value("network", "network_dimm", 8),
        "network.network_dimm: unknown key; did you mean 'network_dim'?",
    ),
    Case(
        "unknown_section",
        train_with(lambda w: w.config.update(noisy={"x": 1})),
        "unknown section [noisy]; did you mean 'noise'?",
    ),
    Case(
        "section_not_a_table", train_with(lambda w: w.config.update(network=5)), "[network] must be a table"
    ),
    Case("config_not_toml", _raw_config(b"[model\npath = "), "not valid TOML"),
    Case("config_not_utf8", _raw_config(b'[model]\npath = "caf\xe9"\n'), "not valid TOML"),
    Case("config_missing", lambda w: _cli(["train", str(w.tmp / "nope.toml")]), "nope.toml' does not exist"),
    Case(
        "device_unknown",
        train_with(lambda w: None, "--device", "bogus"),
        "--device: 'bogus' is not a torch device",
    ),
    Case(
        "output_name_traversal",
        config_value("output", "output_name", "../evil"),
        "output.output_name: '../evil' must be a plain file name",
    ),
    Case(
        "output_name_absolute",
        config_value("output", "output_name", "/tmp/evil"),
        "must be a plain file name",
    ),
    # models
    Case(
        "model_of_the_wrong_family",
        config_value("model", "family", "sdxl"),
        "holds a 'sd15' model (SD1.x/2.x), but model.family is 'sdxl'",
    ),
    Case("model_family_unknown", config_value("model", "family", "sd3"), "model.family: 'sd3' is not one of"),
    Case(
        "model_missing",
        train_with(_model_path(lambda w: w.tmp / "no_model")),
        "does not exist; give a diffusers model folder",
    ),
    Case(
        "model_folder_incomplete",
        train_with(_model_path(_empty_dir)),
        "is not a diffusers model folder (missing unet, vae",
    ),
    Case(
        "model_file_corrupt",
        train_with(_model_path(_junk_checkpoint)),
        "not a readable .safetensors checkpoint",
    ),
    # resume
    Case(
        "resume_missing",
        lambda w: _cli(w.train_argv("--resume", str(w.tmp / "no_state"))),
        "no_state does not exist",
    ),
    Case("resume_a_lora_file", resume_from(lambda w: _lora_file(w)), "is a file, not a training state"),
    Case(
        "resume_an_empty_folder",
        resume_from(lambda w: _new_folder(w, "states")),
        "holds no complete training state",
    ),
    Case(
        "resume_interrupted_save",
        resume_from(_state_edited(lambda f: (f / "state.json").unlink())),
        "incomplete training state",
    ),
    Case(
        "resume_corrupt_json",
        resume_from(_state_edited(lambda f: (f / "state.json").write_text('{"format'))),
        "state.json is not valid JSON",
    ),
    Case(
        "resume_torn_tensors",
        resume_from(_state_edited(lambda f: _truncate(f / "state.safetensors"))),
        "cannot be read",
    ),
    Case(
        "resume_a_folder_of_two_runs",
        resume_from(_two_runs),
        "holds the states of several runs (a, b); give one state folder",
    ),
    Case(
        "resume_with_another_rank",
        resume_from(_copy_state, network__network_dim=8),
        "network.network_dim: 4 in the state, 8 now",
    ),
    Case(
        "resume_state_of_another_architecture",
        resume_from(_state_edited(_state_json({"family": "sdxl"}))),
        "trained on a sdxl model, this model is sd15",
    ),
    # merge
    Case(
        "merge_loras_of_two_architectures",
        merge_of(("sd15.safetensors", _kohya_lora("lora_te")), ("sdxl.safetensors", _kohya_lora("lora_te1"))),
        "different architectures",
    ),
    Case(
        "merge_into_a_model_of_another_architecture",
        merge_of(("sdxl.safetensors", _kohya_lora("lora_te1")), into_model=True),
        "match no module of this sd15 model",
    ),
    Case(
        "merge_weight_not_a_number",
        lambda w: _cli(["merge", f"{w.tmp / 'a.safetensors'}:abc", "--out", str(w.tmp / "m.safetensors")]),
        "weight 'abc' is not a number",
    ),
    Case("merge_missing_file", merge_of(("absent.safetensors", {})), "absent.safetensors' does not exist"),
    Case(
        "merge_out_exists",
        merge_of(("a.safetensors", _kohya_lora("lora_te")), out="a.safetensors"),  # an existing file
        "already exists; choose another --out or pass --overwrite",
    ),
    Case(
        "merge_svd_without_rank",
        merge_of(("a.safetensors", _kohya_lora("lora_te")), extra=("--mode", "svd")),
        "merge --mode svd needs --rank N",
    ),
    Case(
        "merge_rank_without_svd",
        merge_of(("a.safetensors", _kohya_lora("lora_te")), extra=("--rank", "4")),
        "merge --rank: 4 applies only to --mode svd",
    ),
    Case(
        "merge_unknown_save_precision",
        merge_of(("a.safetensors", _kohya_lora("lora_te")), extra=("--save-precision", "fp8")),
        "merge --save-precision: 'fp8' is not one of",
    ),
    Case(
        "merge_corrupt_file",
        merge_of(("junk.safetensors", b"\x00" * 64)),
        "is not a readable .safetensors LoRA",
    ),
    # ComfyUI widgets: every path-like input stays inside ComfyUI's folders
    Case(
        "ui_dataset_folder_traversal",
        ui(lambda p, w: p.resolve_dataset_folder(w.tmp, "../secrets")),
        "Load Dataset: folder: '../secrets' is not a plain name",
    ),
    Case(
        "ui_dataset_folder_absolute",
        ui(lambda p, w: p.resolve_dataset_folder(w.tmp, "/etc")),
        "is not a plain name",
    ),
    Case("ui_dataset_folder_link_outside", ui(_linked_dataset), "leads outside"),
    Case(
        "ui_custom_dataset_path_off",
        ui(lambda p, w: p.resolve_dataset_folder(w.tmp, "x", custom_path="/etc")),
        "custom_path is off on this server",
    ),
    Case(
        "ui_lora_name_traversal",
        ui(lambda p, w: p.lora_save_path(w.tmp, "../../models/evil")),
        "lora_name: '../../models/evil' is not a plain name",
    ),
    Case(
        "ui_lora_name_backslashes",
        ui(lambda p, w: p.lora_save_path(w.tmp, "..\\..\\evil")),
        "is not a plain name",
    ),
    Case(
        "ui_lora_name_absolute",
        ui(lambda p, w: p.lora_save_path(w.tmp, "/etc/passwd")),
        "is not a plain name",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_a_clear_answer(case, world, monkeypatch):
    monkeypatch.delenv("LORA_TRAINER_ALLOW_ANY_DATASET_PATH", raising=False)
    outcome, message = case.run(world)
    RESULTS[case.name] = (outcome, message.replace(str(world.tmp), "<tmp>"))
    assert outcome == case.outcome, message
    assert case.expect in message
    assert "Traceback" not in message


def test_the_suite_covers_at_least_30_kinds_and_lists_each_message(capsys):
    """Prints the table of cases with the message each one got (run the whole file to fill it)."""
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)
    with capsys.disabled():
        print(f"\n{'case':45} {'outcome':9} message")
        for case in CASES:
            outcome, message = RESULTS.get(case.name, ("not run", ""))
            first = message.splitlines()[0] if message else ""
            detail = message.splitlines()[1].strip() if first.endswith("run again") else ""
            print(f"{case.name:45} {outcome:9} {first[:160]}{' ' + detail[:120] if detail else ''}")
