"""Standalone LoRA training core for Stable Diffusion (SD1.5, SDXL), kohya-compatible.

Components laid out by concern (data/, model/, objective/, optim/, outputs/) and a
recipe, `run.train.train()`, that wires them; `run.preflight.prepare_run()` checks a
run before the model loads and `run.orchestrator.run_training()` executes it (stages,
saves, states, stops). The CLI (`python -m lora_train_core`) and the ComfyUI nodes
are two front doors to that one run. This package never imports ComfyUI.
"""

from .errors import ConfigError, DatasetError, LoraTrainError, ModelError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DatasetError", "LoraTrainError", "ModelError", "__version__"]
