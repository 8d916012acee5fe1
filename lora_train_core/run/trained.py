"""What a training run gives back, and what it reports while it goes.

`TrainedLora` is the result (the live network, its EMA and the loss record);
a step callback sees a `StepReport` after each optimiser step; a run that ends
early raises `TrainingStopped` with the partial result and the state to resume
from; `NonFiniteError` is the NaN guard's reason for stopping.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ConfigError, LoraTrainError
from ..model.network import LoRANetwork
from ..optim.ema import LoraEMA
from .state import TrainingState


@dataclass
class TrainedLora:
    """What a run produced; `network` still holds the trained modules."""

    network: LoRANetwork
    ema: LoraEMA | None
    losses: list[float]
    steps: int
    epochs: int
    total_steps: int
    started_at: float
    finished_at: float = 0.0
    skipped_steps: int = 0  # fp16 steps the grad scaler skipped (inf/NaN gradients)

    @property
    def completed(self) -> bool:
        return self.steps >= self.total_steps

    def kohya_state_dict(self, use_ema: bool = False) -> dict[str, torch.Tensor]:
        """The trained weights under kohya keys; with `use_ema`, the EMA-averaged ones."""
        state = self.network.kohya_state_dict()
        if not use_ema:
            return state
        if self.ema is None:
            raise ConfigError("ema: this run kept no EMA weights; set ema.enabled = true before training")
        state.update({k: v.detach().to("cpu").clone() for k, v in self.ema.shadow_state_dict().items()})
        return state


class TrainingStopped(Exception):
    """Training stopped early (cancel, error); `partial` holds what was trained so far.

    `state` continues the run from its last optimiser step (None before the first one).
    """

    def __init__(self, message: str, partial: TrainedLora, state: TrainingState | None = None):
        super().__init__(message)
        self.partial = partial
        self.state = state


class NonFiniteError(LoraTrainError):
    """The loss or the gradient norm of a step is NaN or infinite."""

    def __init__(self, what: str, value: float, step: int):
        super().__init__(
            f"the {what} of step {step} is {value} (not finite); training stopped before that step "
            f"changed the weights, so the weights of step {step - 1} are kept. Lower "
            "optimizer.learning_rate, keep optimizer.max_grad_norm > 0, or look for a broken image"
        )
        self.step = step


@dataclass(frozen=True)
class StepReport:
    """What a step callback sees after each optimiser step; `trained` is the live run."""

    step: int
    total: int
    loss: float
    lr: float
    epoch: int
    trained: TrainedLora


StepCallback = Callable[[StepReport], None]
