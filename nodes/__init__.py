"""ComfyUI nodes: thin front doors to lora_train_core (V3 schema, comfy_api.v0_0_2).

The only package that imports comfy.*; the core never does.
"""

from __future__ import annotations

from comfy_api.v0_0_2 import ComfyExtension, io

from .config_nodes import (
    ConfigureFlow,
    ConfigureNetwork,
    ConfigureNoise,
    ConfigureOptimizer,
    ConfigureSpeed,
)
from .dataset_nodes import Bucketize, CacheLatents, LoadDataset
from .merge_nodes import MergeLoRAs
from .train_nodes import EMAExport, LossPlot, TrainingStages, TrainLoRA

NODES: list[type[io.ComfyNode]] = [
    LoadDataset,
    Bucketize,
    CacheLatents,
    ConfigureNoise,
    ConfigureOptimizer,
    ConfigureNetwork,
    ConfigureFlow,
    ConfigureSpeed,
    TrainLoRA,
    EMAExport,
    LossPlot,
    MergeLoRAs,
    TrainingStages,
]


class LoraTrainerExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> LoraTrainerExtension:
    return LoraTrainerExtension()
