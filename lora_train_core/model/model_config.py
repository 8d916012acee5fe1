"""The [model] section: which base model to train on.

Kept apart from the backends so that reading a TOML (and `train --list-keys`, and every
config error) does not import diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import check_choice
from ..families import FAMILIES, FAMILY_GROUPS


@dataclass(frozen=True)
class ModelConfig:
    """[model] section: which base model to train on."""

    path: Path  # a diffusers model folder, or a single .safetensors checkpoint
    # auto, a family's name (families/: sd15, sdxl, flux_dev, flux_schnell) or flux (either Flux.1)
    family: str = "auto"
    v_parameterization: bool = False  # kohya: the model predicts v (SD2.x 768-v); DDPM families only

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))
        check_choice("model.family", self.family, ("auto", *FAMILY_GROUPS, *FAMILIES))

    @property
    def prediction_type(self) -> str:
        """What a DDPM family's network predicts: "v_prediction" with v_parameterization, else
        "epsilon" (a flow family's is "flow", whatever this says: the loader decides)."""
        return "v_prediction" if self.v_parameterization else "epsilon"
