"""Data-parallel training over several processes, on Hugging Face accelerate (torch.distributed).

Launched by `accelerate launch -m lora_train_core train CONFIG.toml` or `torchrun`, each
process holds the whole model and the LoRA. Every rank walks the same global batches
(train_batch_size x world size) and draws the noise, timesteps and caption choices of
the whole global batch from the same seeded streams, then computes its own contiguous
share; gradients are averaged across ranks before clipping and the optimiser step,
so every rank applies the same update and a run on N processes follows the
one-process run with the same global batch. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DataParallel:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_environment() -> DataParallel:
        """The process group set up by accelerate launch / torchrun (WORLD_SIZE > 1), else one process."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return DataParallel()
        from accelerate import PartialState

        # Without CUDA accelerate sets up the gloo group only when asked for the CPU.
        state = PartialState(cpu=not torch.cuda.is_available())
        return DataParallel(state.process_index, state.num_processes)

    def share(self, n: int) -> slice:
        """This rank's contiguous part of a global batch of n (the first n mod world ranks get one more)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def loss_weight(self, n: int) -> float:
        """Factor on this rank's mean loss so that averaging gradients gives the global batch mean."""
        share = self.share(n)
        return (share.stop - share.start) * self.world_size / n

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return value
        from accelerate.utils import reduce

        return reduce(value, reduction="mean")

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """All-reduce (mean) the gradients of the trainable parameters, as DDP would."""
        if self.world_size == 1:
            return
        trainable = [p for p in params if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainable]
        flat = self.mean(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for p in trainable:
            mean = flat[offset : offset + p.numel()].view_as(p)
            if p.grad is None:
                p.grad = mean.clone()
            else:  # in place: a recorded CUDA graph keeps writing into these same tensors
                p.grad.copy_(mean)
            offset += p.numel()

    def main_first(self):
        """Rank 0 runs the block first (e.g. fills the disk latent cache), then the others."""
        if self.world_size == 1:
            return contextlib.nullcontext()
        from accelerate import PartialState

        return PartialState(cpu=not torch.cuda.is_available()).main_process_first()


SINGLE_PROCESS = DataParallel()
