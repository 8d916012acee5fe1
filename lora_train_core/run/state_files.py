"""Training states on disk: written so that a kill never leaves a state that loads wrong.

A state is a folder `<name>-step<N>/` with `state.safetensors` (every tensor,
and in its header the structure of the optimiser, scheduler, scaler, EMA and
RNG states, each tensor a reference to its key) and `state.json` (the small,
readable rest: step, epoch, position, settings). Both are written atomically
(atomic_io), the JSON last: it is the commit marker, and its token must match
the one in the safetensors header, so a folder whose save was killed half-way
is incomplete and is never loaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import safe_open

from ..atomic_io import atomic_save_safetensors, atomic_write_text
from ..errors import ConfigError
from .state import RngState, TrainingState

log = logging.getLogger(__name__)

STATE_FORMAT = "lora_train_core.training_state.v1"
TENSORS_FILE, RECORD_FILE = "state.safetensors", "state.json"
EXAMPLE = "<output_dir>/state/<name>-step00000100"


def save_training_state(state: TrainingState, folder: Path) -> Path:
    """Write `state` into `folder` (tensors, then the JSON that commits them); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Uncommit an older state in this folder first: its JSON must never vouch for new tensors.
    (folder / RECORD_FILE).unlink(missing_ok=True)
    token = uuid.uuid4().hex
    tensors: dict[str, torch.Tensor] = {}
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    torch_part = {k: fields.pop(k) for k in ("network", "optimizer", "scheduler", "scaler", "ema", "rng")}
    torch_part["rng"] = dataclasses.asdict(torch_part["rng"])
    torch_part["losses"] = torch.tensor(fields.pop("losses"), dtype=torch.float64)
    structure = json.dumps(_encode(torch_part, "", tensors), separators=(",", ":"))
    header = {"format": STATE_FORMAT, "token": token, "structure": structure}
    atomic_save_safetensors(folder / TENSORS_FILE, tensors, header)
    record = {"format": STATE_FORMAT, "token": token, **fields}
    atomic_write_text(folder / RECORD_FILE, json.dumps(record, indent=1))
    return folder


def load_training_state(path: Path) -> TrainingState:
    """Read a state: its folder, a file in it, or a folder of states (the newest complete one)."""
    folder = resolve_state_folder(Path(path))
    record = _read_record(folder)
    try:
        with safe_open(str(folder / TENSORS_FILE), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("token") != record.get("token"):
                raise ConfigError(
                    f"resume: {folder}: {TENSORS_FILE} does not belong to {RECORD_FILE} (a save was "
                    "interrupted); resume from an older state"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except ConfigError:
        raise
    except Exception as exc:  # safetensors raises its own error types for torn or foreign files
        raise ConfigError(
            f"resume: {folder / TENSORS_FILE} cannot be read ({exc}); resume from an older state"
        ) from exc
    try:
        torch_part = _decode(json.loads(header["structure"]), tensors)
        fields = {k: record[k] for k in (f.name for f in dataclasses.fields(TrainingState)) if k in record}
        torch_part["rng"] = RngState(**torch_part["rng"])
        torch_part["losses"] = torch_part["losses"].tolist()
        return TrainingState(**fields, **torch_part)
    except (KeyError, TypeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"resume: {folder} is not a training state this version reads ({exc!r})") from exc


def resolve_state_folder(path: Path) -> Path:
    """The state folder that `path` names; ConfigError saying why when it names none."""
    if not path.exists():
        raise ConfigError(f"resume: {path} does not exist; give a state folder such as {EXAMPLE}")
    if path.is_file():
        if path.name in (RECORD_FILE, TENSORS_FILE):
            return path.parent
        raise ConfigError(
            f"resume: {path} is a file, not a training state (a LoRA file holds no optimiser state "
            f"or data position); give a state folder such as {EXAMPLE}"
        )
    if (path / RECORD_FILE).exists() or (path / TENSORS_FILE).exists():
        return path
    runs = sorted({_STEP_FOLDER.fullmatch(folder.name)[1] for _, folder in state_folders(path)})
    if len(runs) > 1:
        raise ConfigError(
            f"resume: {path} holds the states of several runs ({', '.join(runs)}); give one state "
            f"folder, e.g. {latest_state(path, runs[0])}"
        )
    newest = latest_state(path)
    if newest is None:
        raise ConfigError(f"resume: {path} holds no complete training state (a folder with {RECORD_FILE})")
    log.info("resume: the newest complete state in %s is %s", path, newest.name)
    return newest


def _read_record(folder: Path) -> dict:
    record_path = folder / RECORD_FILE
    if not record_path.is_file():
        raise ConfigError(
            f"resume: {folder} is an incomplete training state (no {RECORD_FILE}: its save was interrupted); "
            "resume from an older state"
        )
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"resume: {record_path} is not valid JSON ({exc})") from exc
    if not isinstance(record, dict) or record.get("format") != STATE_FORMAT:
        found = record.get("format") if isinstance(record, dict) else None
        raise ConfigError(
            f"resume: {record_path} is not a training state of format {STATE_FORMAT} (found {found!r})"
        )
    return record


_STEP_FOLDER = re.compile(r"(.+)-step([0-9]+)")


def state_folders(root: Path, name: str | None = None) -> list[tuple[int, Path]]:
    """(step, folder) of every `<name>-step<N>` folder under `root`, complete or not, by step."""
    if not Path(root).is_dir():
        return []
    found = []
    for folder in Path(root).iterdir():
        match = _STEP_FOLDER.fullmatch(folder.name)
        if folder.is_dir() and match and (name is None or match[1] == name):
            found.append((int(match[2]), folder))
    return sorted(found)


def latest_state(root: Path, name: str | None = None) -> Path | None:
    """The complete state of the highest step under `root` (optionally of one run name), or None."""
    complete = [folder for _, folder in state_folders(root, name) if (folder / RECORD_FILE).is_file()]
    return complete[-1] if complete else None


class StateWriter:
    """Saves states as `<root>/<name>-step<N>/` and keeps the newest `keep_last` of them (0 keeps all).

    Call it with a TrainingState (train()'s `save_state`); saving the same step twice writes once.
    `step` names the folder when it differs from `state.step` (a later stage counts the steps of
    the stages before it).
    """

    def __init__(self, root: Path, name: str, keep_last: int = 2):
        self.root, self.name, self.keep_last = Path(root), name, keep_last
        self.last: tuple[int, Path] | None = None

    def __call__(self, state: TrainingState, step: int | None = None) -> Path:
        step = state.step if step is None else step
        if self.last is not None and self.last[0] == step:
            return self.last[1]
        folder = save_training_state(state, self.root / f"{self.name}-step{step:08d}")
        self.last = (step, folder)
        self._prune(step)
        return folder

    def _prune(self, newest: int) -> None:
        # Older states of this timeline beyond keep_last, and interrupted saves, go; later
        # steps (a longer run this one resumed before) are left alone.
        older = [(step, folder) for step, folder in state_folders(self.root, self.name) if step <= newest]
        complete = [folder for _, folder in older if (folder / RECORD_FILE).is_file()]
        keep = set(complete[-self.keep_last :] if self.keep_last else complete)
        for _, folder in older:
            if folder not in keep:
                (folder / RECORD_FILE).unlink(missing_ok=True)  # uncommit before deleting the tensors
                shutil.rmtree(folder, ignore_errors=True)


_TAGS = ("tensor", "dict", "tuple")


def _encode(value: object, key: str, tensors: dict[str, torch.Tensor]) -> object:
    """JSON form of a (nested) state dict; each tensor goes into `tensors` and leaves {"tensor": key}.

    Dicts become {"dict": [[k, v], ...]} (optimiser state is keyed by int) and tuples
    {"tuple": [...]} (Random.getstate, betas), so decoding gives back the same types.
    """
    if isinstance(value, torch.Tensor):
        if key in tensors:
            raise ValueError(f"training state: two values map to the key {key!r}")
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[k, _encode(v, f"{key}.{k}".lstrip("."), tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"training state: cannot store a {type(value).__name__} (at {key!r})")


def _decode(value: object, tensors: dict[str, torch.Tensor]) -> object:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1 or next(iter(value)) not in _TAGS:
        raise ValueError(f"unexpected object {str(value)[:80]}")
    ((tag, body),) = value.items()
    if tag == "tensor":
        return tensors[body]
    if tag == "tuple":
        return tuple(_decode(v, tensors) for v in body)
    return {k: _decode(v, tensors) for k, v in body}
