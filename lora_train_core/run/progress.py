"""A terminal progress bar for training: step, loss and it/s."""

from __future__ import annotations

from tqdm import tqdm

from .train import StepReport


class ProgressBar:
    """Callable as a train() step callback; shows step/total, loss (smoothed), lr and it/s."""

    def __init__(self, smoothing: float = 0.9):
        self.bar: tqdm | None = None
        self.smoothing = smoothing
        self.average: float | None = None

    def __call__(self, report: StepReport) -> None:
        loss, lr = report.loss, report.lr
        if self.bar is None:
            self.bar = tqdm(total=report.total, unit="step", dynamic_ncols=True)
        a = self.smoothing
        self.average = loss if self.average is None else a * self.average + (1 - a) * loss
        self.bar.set_postfix(loss=f"{loss:.4f}", avg=f"{self.average:.4f}", lr=f"{lr:.2e}", refresh=False)
        self.bar.update(report.step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
