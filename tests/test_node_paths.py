"""Widget inputs never reach outside ComfyUI's input/ and models/loras/ folders."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_paths_module():
    """nodes/paths.py imports the core relatively, as inside ComfyUI; load it as part of a bare package
    (without running nodes/__init__.py, which needs ComfyUI)."""
    for name, folder in (("lora_pack", ROOT), ("lora_pack.nodes", ROOT / "nodes")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules.setdefault(name, package)
    return importlib.import_module("lora_pack.nodes.paths")


paths = _load_paths_module()
ConfigError = paths.ConfigError  # the pack's own copy of the core (imported relatively, as in ComfyUI)

TRAVERSALS = [
    "../escape",
    "..",
    "a/../../b",
    "/etc/passwd",
    "C:\\Windows\\x",
    "sub/dir",
    "sub\\dir",
    "~root",
    ".hidden",
    "",
    " leading-space",
    "name\x00null",
    "a" * 200,
    "..\\..\\x",
    "%2e%2e%2fetc",
]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_save_name_traversals_are_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="lora_name"):
        paths.lora_save_path(tmp_path, name)


@pytest.mark.parametrize("name", TRAVERSALS)
def test_dataset_folder_traversals_are_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="Load Dataset"):
        paths.resolve_dataset_folder(tmp_path, name)


def test_plain_names_resolve_inside_the_root(tmp_path):
    assert paths.lora_save_path(tmp_path, "my lora_v2.1") == tmp_path.resolve() / "my lora_v2.1.safetensors"
    assert paths.lora_save_path(tmp_path, "x.safetensors") == tmp_path.resolve() / "x.safetensors"
    (tmp_path / "cats").mkdir()
    assert paths.resolve_dataset_folder(tmp_path, "cats") == tmp_path.resolve() / "cats"


def test_links_out_of_the_root_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside)
    (root / "evil.safetensors").symlink_to(outside / "x.safetensors")
    with pytest.raises(ConfigError, match="links"):
        paths.resolve_dataset_folder(root, "link")
    with pytest.raises(ConfigError, match="links"):
        paths.lora_save_path(root, "evil")
    assert paths.dataset_folders(root) == []


def test_custom_dataset_path_needs_the_server_setting(tmp_path, monkeypatch):
    monkeypatch.delenv(paths.ALLOW_ANY_DATASET_PATH_ENV, raising=False)
    with pytest.raises(ConfigError, match=paths.ALLOW_ANY_DATASET_PATH_ENV):
        paths.resolve_dataset_folder(tmp_path, "x", custom_path=str(tmp_path))
    monkeypatch.setenv(paths.ALLOW_ANY_DATASET_PATH_ENV, "1")
    assert paths.resolve_dataset_folder(tmp_path, "x", custom_path=str(tmp_path)) == tmp_path


def test_dropdown_lists_only_folders_with_images(tmp_path):
    (tmp_path / "3d").mkdir()  # ComfyUI makes this one itself
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    (tmp_path / "kohya" / "10_cat").mkdir(parents=True)
    (tmp_path / "kohya" / "10_cat" / "b.JPG").write_bytes(b"")
    assert paths.dataset_folders(tmp_path) == ["flat", "kohya"]


def test_a_missing_dataset_folder_names_the_widget_and_the_choices(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "a.png").write_bytes(b"")
    with pytest.raises(
        ConfigError, match=r"Load Dataset: folder 'dogs' is not in .*folders with images there: cats"
    ):
        paths.resolve_dataset_folder(tmp_path, "dogs")
