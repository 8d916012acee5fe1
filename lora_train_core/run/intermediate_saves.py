"""Intermediate LoRA files during a run: `<name>-step<N>.safetensors` every N steps, the newest K kept."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .trained import StepReport, TrainedLora


class IntermediateSaver:
    """A step callback (kohya save_every_n_steps / save_last_n_steps semantics, counted in files)."""

    def __init__(
        self,
        out_dir: Path,
        name: str,
        every_n_steps: int,
        keep_last: int,
        save: Callable[[Path, TrainedLora], Path],
    ):
        self.out_dir, self.name, self.every, self.keep = Path(out_dir), name, every_n_steps, keep_last
        self.save = save
        self.written: list[Path] = []

    def __call__(self, report: StepReport) -> None:
        if not self.every or report.step % self.every or report.step == report.total:
            return  # the final file is saved by the run itself
        self.written.append(
            self.save(self.out_dir / f"{self.name}-step{report.step:06d}.safetensors", report.trained)
        )
        while self.keep and len(self.written) > self.keep:
            self.written.pop(0).unlink(missing_ok=True)
