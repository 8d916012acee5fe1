"""Shared fixtures: tiny real models (seeded random weights) and a synthetic dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_train_core.demo import make_synthetic_dataset
from lora_train_core.model.tiny_models import tiny_backend


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test: on a shared 2-core machine tiny models train ~10x faster
    without thread contention, and a run's numbers do not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def sd15_backend():
    return tiny_backend("sd15", seed=0)


@pytest.fixture
def sdxl_backend():
    return tiny_backend("sdxl", seed=0)


@pytest.fixture
def shapes_dataset(tmp_path: Path) -> Path:
    return make_synthetic_dataset(tmp_path / "dataset", count=6)
