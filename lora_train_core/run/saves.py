"""The files a run writes as it goes, and the rule that none of them is lost to a failed write.

`save_with_fallback` writes a LoRA where it belongs or, when that folder refuses the write
(disk full, permissions changed during the run), in the first fallback folder that takes it.
`IntermediateSaver` writes `<name>-step<N>.safetensors` every N steps and keeps the newest K
(kohya's save_every_n_steps / save_last_n_steps, counted in files), also across resumes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import LoraTrainError
from ..outputs.export import next_free_path
from .trained import StepReport, TrainedLora

log = logging.getLogger(__name__)
STEP_DIGITS = 8  # <name>-step00000400: as the state folders are named


class SavedElsewhere(LoraTrainError):
    """The LoRA could not be written where it belongs and was written to a fallback path instead."""


class SaveFailed(LoraTrainError):
    """The LoRA could be written neither where it belongs nor in any fallback folder."""


def save_with_fallback(
    write: Callable[[Path], Path], path: Path, fallback_dirs: Sequence[Path]
) -> tuple[Path, OSError | None]:
    """`write(path)`; when it raises OSError, `write` into the first fallback folder that takes it.

    Returns (where it was written, the error that sent it elsewhere or None). SaveFailed, naming
    every place tried, when no folder takes it.
    """
    try:
        return write(path), None
    except OSError as first:
        tried = [f"{path} ({first.strerror or first})"]
        for folder in fallback_dirs:
            candidate = next_free_path(Path(folder) / path.name)
            try:
                Path(folder).mkdir(parents=True, exist_ok=True)
                return write(candidate), first
            except OSError as exc:
                tried.append(f"{candidate} ({exc.strerror or exc})")
        raise SaveFailed(f"could not save the LoRA anywhere: {'; '.join(tried)}") from first


def fallback_message(wanted: Path, saved: Path, error: OSError) -> str:
    return (
        f"could not write {wanted} ({error.strerror or error}); the LoRA was saved to {saved} "
        "instead: move it where you want it, and check that folder (free space, permissions)"
    )


_STEP_FILE = re.compile(r"(.+)-step([0-9]+)\.safetensors")


def step_file_name(name: str, step: int) -> str:
    return f"{name}-step{step:0{STEP_DIGITS}d}.safetensors"


def step_files(folder: Path, name: str) -> list[tuple[int, Path]]:
    """(step, path) of every `<name>-step<N>.safetensors` in `folder`, by step."""
    if not Path(folder).is_dir():
        return []
    found = []
    for path in Path(folder).iterdir():
        match = _STEP_FILE.fullmatch(path.name)
        if match and match[1] == name and path.is_file():
            found.append((int(match[2]), path))
    return sorted(found)


class IntermediateSaver:
    """A step callback: `save(path, trained)` every `every_n_steps`, keeping the newest `keep_last`.

    resumed_at: the step a resumed run continues from; the files its earlier part wrote up to
    that step count towards `keep_last`, so a resumed run prunes them as one run would. A
    failed write is logged and training goes on: the final save has its own fallback.
    """

    def __init__(
        self,
        out_dir: Path,
        name: str,
        every_n_steps: int,
        keep_last: int,
        save: Callable[[Path, TrainedLora], Path],
        resumed_at: int | None = None,
    ):
        self.out_dir, self.name, self.every, self.keep = Path(out_dir), name, every_n_steps, keep_last
        self.save = save
        earlier = step_files(self.out_dir, name) if resumed_at is not None else []
        self.written: list[Path] = [path for step, path in earlier if step <= resumed_at]

    def __call__(self, report: StepReport) -> None:
        if not self.every or report.step % self.every or report.step == report.total:
            return  # the final file is saved by the run itself
        path = self.out_dir / step_file_name(self.name, report.step)
        try:
            self.written.append(self.save(path, report.trained))
        except (OSError, LoraTrainError) as exc:
            log.warning("could not save the intermediate LoRA %s (%s); training goes on", path, exc)
            return
        while self.keep and len(self.written) > self.keep:
            self.written.pop(0).unlink(missing_ok=True)
