"""The [model] section: which base model to train on.

Kept apart from the backends so that reading a TOML (and `train --list-keys`, and every
config error) does not import diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import check_choice
from ..families import FAMILIES


@dataclass(frozen=True)
class ModelConfig:
    """[model] section: which base model to train on."""

    path: Path  # a diffusers model folder, or a single .safetensors checkpoint
    family: str = "auto"  # auto, or a family's name (families/): sd15, sdxl
    v_parameterization: bool = False  # kohya: the model predicts v (SD2.x 768-v)

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        check_choice("model.family", self.family, ("auto", *FAMILIES))

    @property
    def prediction_type(self) -> str:
        """What the network predicts: "v_prediction" with v_parameterization, else "epsilon"."""
        return "v_prediction" if self.v_parameterization else "epsilon"
