"""Integration tests against a real ComfyUI: they run only when COMFYUI_DIR names a checkout.

Run them with ComfyUI's environment (it has torchvision, which the core venv must not):
    COMFYUI_DIR=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/integration -q
Without COMFYUI_DIR every test here is skipped with the reason shown. This file imports
no ComfyUI module itself; the `comfy` fixture starts ComfyUI once per session.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

HERE = Path(__file__).resolve().parent
SKIP_REASON = "COMFYUI_DIR not set: integration tests need a ComfyUI checkout (see README)"
LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None

if str(HERE) not in sys.path:  # comfy_harness is imported by name (also under --import-mode=importlib)
    sys.path.insert(0, str(HERE))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("COMFYUI_DIR"):
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(skip)


class Sd15Checkpoint(NamedTuple):
    path: Path  # the single-file checkpoint (cached)
    name: str  # its name in models/checkpoints, for CheckpointLoaderSimple
    diffusers: Path  # the same weights as a diffusers folder


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """The harness module, after ComfyUI was started in this process."""
    import comfy_harness

    comfy_harness.setup_comfy(os.environ["COMFYUI_DIR"], tmp_path_factory.mktemp("comfyui"))
    return comfy_harness


@pytest.fixture(scope="session")
def sd15_checkpoint(comfy) -> Sd15Checkpoint:
    """Random-weight SD1.5 checkpoint + diffusers twin (built once, ~1 min, then cached)."""
    path, diffusers = comfy.make_sd15_checkpoint()
    return Sd15Checkpoint(path, comfy.install_checkpoint(path), diffusers)


@pytest.fixture(scope="session")
def tiny_dataset(comfy) -> Path:
    """The synthetic shapes dataset in ComfyUI's input folder, as `lora_test_dataset`."""
    return comfy.make_tiny_dataset()


@pytest.fixture(autouse=True)
def collect_garbage():
    """Free each test's models when it ends: an interrupted run's exception chain (the interrupt,
    TrainingStopped and their tracebacks) is a reference cycle that would keep a test's 4 GB
    checkpoint alive until Python's cycle collector happens to run, and glibc keeps freed weights
    below its mmap threshold in the heap unless asked to give them back."""
    yield
    gc.collect()
    if LIBC is not None and hasattr(LIBC, "malloc_trim"):
        LIBC.malloc_trim(0)
