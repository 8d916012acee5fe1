"""Standalone LoRA training core for Stable Diffusion (SD1.5, SDXL), kohya-compatible.

Components (one module per concern) and a recipe, `train.train()`, that wires
them; `run.run_training()` adds dataset loading and saving; the CLI
(`python -m lora_train_core`) and the ComfyUI nodes are two front doors to it.
This package never imports ComfyUI.
"""

from .errors import ConfigError, DatasetError, LoraTrainError, ModelError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DatasetError", "LoraTrainError", "ModelError", "__version__"]
