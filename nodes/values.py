"""The values that travel on this pack's links (custom ComfyUI types).

Each is an immutable bundle of core values, so a node downstream sees exactly
what the node upstream produced, and ComfyUI's cache can reuse it safely.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from comfy_api.v0_0_2 import io

from ..lora_train_core.data.buckets import BucketPlan
from ..lora_train_core.data.captions import CaptionConfig
from ..lora_train_core.data.dataset import Dataset, DatasetConfig
from ..lora_train_core.data.latent_cache import CacheConfig, CachedLatents, OnTheFlyLatents
from ..lora_train_core.objective.loss import LossConfig
from ..lora_train_core.objective.noise import NoiseConfig
from ..lora_train_core.optim.ema import EMAConfig
from ..lora_train_core.optim.optimizers import OptimizerConfig
from ..lora_train_core.optim.param_groups import BlockWeights
from ..lora_train_core.run.train import TrainedLora

LoraDataset = io.Custom("LORA_DATASET")
LoraBuckets = io.Custom("LORA_BUCKETS")
LoraLatents = io.Custom("LORA_LATENTS")
LoraNoise = io.Custom("LORA_NOISE")
LoraOptimizer = io.Custom("LORA_OPTIMIZER")
LoraNetwork = io.Custom("LORA_NETWORK")
LoraTrained = io.Custom("LORA_TRAINED")
LoraStages = io.Custom("LORA_STAGES")
LoraSpeed = io.Custom("LORA_SPEED")  # a run.speed.SpeedConfig
LoraFlow = io.Custom("LORA_FLOW")  # carries an objective.flow.FlowConfig

CATEGORY = "LoRA Training"


@dataclass(frozen=True)
class DatasetValue:
    dataset: Dataset
    captions: CaptionConfig
    config: DatasetConfig  # what `dataset` was loaded from


@dataclass(frozen=True)
class BucketsValue:
    data: DatasetValue
    plan: BucketPlan


@dataclass(frozen=True)
class LatentsValue:
    buckets: BucketsValue
    latents: CachedLatents | OnTheFlyLatents
    cache: CacheConfig  # how they were made; training stages make theirs the same way


@dataclass(frozen=True)
class NoiseValue:
    noise: NoiseConfig
    loss: LossConfig


@dataclass(frozen=True)
class OptimizerValue:
    optimizer: OptimizerConfig
    ema: EMAConfig
    blocks: BlockWeights | None


@dataclass(frozen=True)
class TrainedValue:
    trained: TrainedLora
    metadata: dict[str, str]
    path: Path  # the saved LoRA
