"""Shared fixtures: tiny real models (seeded random weights) and a synthetic dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_train_core.demo import make_synthetic_dataset
from lora_train_core.tiny_models import tiny_backend


@pytest.fixture(autouse=True)
def _single_thread_determinism():
    torch.use_deterministic_algorithms(False)
    yield


@pytest.fixture
def sd15_backend():
    return tiny_backend("sd15", seed=0)


@pytest.fixture
def sdxl_backend():
    return tiny_backend("sdxl", seed=0)


@pytest.fixture
def shapes_dataset(tmp_path: Path) -> Path:
    return make_synthetic_dataset(tmp_path / "dataset", count=6)
