"""Where node inputs may read and write: only inside ComfyUI's own folders.

A ComfyUI server can be reachable by others, so a name typed into a widget
must never reach outside `input/` (datasets) or `models/loras/` (saved LoRAs):
no `..`, no absolute paths, no links, no odd characters. Pure functions over
the root folders, so they are tested without ComfyUI.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..lora_train_core.data.images import IMAGE_EXTENSIONS
from ..lora_train_core.errors import ConfigError

ALLOW_ANY_DATASET_PATH_ENV = "LORA_TRAINER_ALLOW_ANY_DATASET_PATH"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,127}$")


def dataset_folders(input_dir: Path) -> list[str]:
    """Sub-folders of ComfyUI's input directory that hold images (directly or in kohya N_name
    sub-folders), for the Load Dataset dropdown; folders ComfyUI makes for itself are left out."""
    if not input_dir.is_dir():
        return []
    return sorted(
        p.name
        for p in input_dir.iterdir()
        if p.is_dir() and not p.is_symlink() and not p.name.startswith(".") and _holds_images(p)
    )


def _holds_images(folder: Path) -> bool:
    def has_image(d: Path) -> bool:
        return any(f.suffix.lower() in IMAGE_EXTENSIONS for f in d.iterdir() if f.is_file())

    subsets = [d for d in folder.iterdir() if d.is_dir() and d.name.split("_", 1)[0].isdigit()]
    return has_image(folder) or any(has_image(d) for d in subsets)


def resolve_dataset_folder(input_dir: Path, name: str, custom_path: str = "") -> Path:
    """The folder a Load Dataset node reads: a sub-folder of `input_dir`, or (if allowed) `custom_path`."""
    if custom_path.strip():
        if os.environ.get(ALLOW_ANY_DATASET_PATH_ENV) != "1":
            raise ConfigError(
                "Load Dataset: custom_path is off on this server (a ComfyUI server may be reachable by "
                "others). "
                f"Put the dataset under {input_dir} and pick it in `folder`, or start ComfyUI with "
                f"{ALLOW_ANY_DATASET_PATH_ENV}=1 to allow any folder"
            )
        path = Path(custom_path.strip()).expanduser()
        if not path.is_absolute() or not path.is_dir():
            raise ConfigError(f"Load Dataset: custom_path {custom_path!r} is not an existing absolute folder")
        return path
    _check_name("Load Dataset: folder", name)
    path = _inside(input_dir, name, "Load Dataset: folder")
    if not path.is_dir():
        found = ", ".join(dataset_folders(input_dir)) or "none yet"
        raise ConfigError(
            f"Load Dataset: folder {name!r} is not in {input_dir}; put your images in input/<name>/, "
            f"refresh the page (R) and pick it (folders with images there: {found})"
        )
    return path


def state_folder(states_dir: Path, name: str) -> Path:
    """A saved training state `<states_dir>/<name>` chosen in Train LoRA's resume_from."""
    _check_name("resume_from", name)
    path = _inside(states_dir, name, "resume_from")
    if not path.is_dir():
        raise ConfigError(f"resume_from: no training state {name!r} in {states_dir}; refresh the page (R)")
    return path


def lora_save_path(loras_dir: Path, name: str) -> Path:
    """`<loras_dir>/<name>.safetensors` for a plain name; anything that could escape is refused."""
    stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
    _check_name("lora_name", stem)
    return _inside(loras_dir, f"{stem}.safetensors", "lora_name")


def _check_name(field: str, name: str) -> None:
    if not _SAFE_NAME.fullmatch(name or "") or ".." in name:
        raise ConfigError(
            f"{field}: {name!r} is not a plain name; use letters, digits, spaces, '_', '-' and '.', "
            "starting with a letter or digit, without folders or '..'"
        )


def _inside(root: Path, name: str, field: str) -> Path:
    root = Path(root).resolve()
    path = root / name
    if path.is_symlink() or path.resolve().parent != root:
        raise ConfigError(f"{field}: {name!r} leads outside {root}; links are not followed")
    return path
