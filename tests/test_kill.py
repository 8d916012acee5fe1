"""Kill safety: SIGKILL at random points never leaves a file that does not load, and the newest state resumes.

The trainer runs as the CLI does (`cli.main(["train", CONFIG, "--resume", ...])`) in a
child process that is SIGKILLed at random moments, 20 times in a row, each run
resuming from the newest state the previous ones left. The children are forked
from a forkserver that imported torch, diffusers and transformers once: a fresh
`python -m lora_train_core` spends most of its start-up importing them (over 10 s
on a loaded 2-core machine), which would leave no time for the kills themselves.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import re
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tqdm import tqdm

from lora_train_core.demo import make_synthetic_dataset
from lora_train_core.model.tiny_models import save_tiny_model
from lora_train_core.outputs.export import read_metadata
from lora_train_core.run.state_files import latest_state, load_training_state, state_folders

pytestmark = pytest.mark.slow  # ~40 s: a forkserver start-up and 20 short training runs

KILLS = 20
PRELOAD = ["torch", "diffusers", "transformers", "lora_train_core.cli", "lora_train_core.run.orchestrator"]


def _child(argv: list[str], log_path: str) -> None:
    """A child's body: the CLI, with its output in a log file and one intra-op thread."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)
    # tqdm's default lock is a multiprocessing semaphore, which a killed child can never release
    tqdm.set_lock(threading.RLock())
    from lora_train_core.cli import main

    sys.exit(main(argv))


def _write_chunks(path: str, ready: str) -> None:
    """Rewrite one 32 MB safetensors file forever; each version is a constant tensor of its number."""
    from lora_train_core.atomic_io import atomic_save_safetensors

    for version in range(10**9):
        atomic_save_safetensors(
            Path(path), {"x": torch.full((8 << 20,), float(version))}, {"v": str(version)}
        )
        Path(ready).touch()


@pytest.fixture(scope="module")
def forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


@contextlib.contextmanager
def _started(forkserver, target, *args):
    """A started child process that is SIGKILLed on the way out if it still runs (a failed test)."""
    proc = forkserver.Process(target=target, args=args)
    proc.start()
    try:
        yield proc
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()


def _config(tmp_path: Path, model: Path, dataset: Path, steps: int, every: int = 1) -> Path:
    path = tmp_path / f"run_{steps}.toml"
    out = tmp_path / "out"
    path.write_text(
        textwrap.dedent(
            f"""
            [model]
            path = "{model.as_posix()}"
            [dataset]
            path = "{dataset.as_posix()}"
            [buckets]
            resolution = [128, 128]
            min_bucket_reso = 64
            max_bucket_reso = 256
            [cache]
            mode = "disk"
            cache_dir = "{(out / "latent_cache").as_posix()}"
            [network]
            network_dim = 4
            network_alpha = 4.0
            [train]
            max_train_steps = {steps}
            train_batch_size = 2
            save_state_every_n_steps = {every}
            save_last_n_states = 2
            [ema]
            enabled = true
            [output]
            output_dir = "{out.as_posix()}"
            output_name = "killed"
            overwrite = true
            """
        ),
        encoding="utf-8",
    )
    return path


def _argv(config: Path, out: Path) -> list[str]:
    newest = latest_state(out / "state")
    return ["train", str(config), *(["--resume", str(newest)] if newest else [])]


def _newest_step(out: Path) -> int:
    """The step of the newest complete state, 0 when there is none."""
    complete = [step for step, folder in state_folders(out / "state") if (folder / "state.json").exists()]
    return max(complete, default=0)


def _cache_entries(out: Path) -> list[Path]:
    folder = out / "latent_cache"
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []


def _wait_until(condition, proc, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.is_alive():
        if condition():
            return
        time.sleep(0.005)
    raise AssertionError(f"no {what} within {timeout}s (see the child logs)")


def _assert_every_safetensors_loads(folder: Path) -> int:
    files = sorted(folder.rglob("*.safetensors"))
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                f.get_tensor(key)
    return len(files)


def test_sigkill_during_training_and_saving_leaves_loadable_files_and_a_resumable_state(
    forkserver, tmp_path, capsys
):
    model = save_tiny_model(tmp_path / "model", "sd15")
    dataset = make_synthetic_dataset(tmp_path / "data", count=8)
    out = tmp_path / "out"
    config = _config(tmp_path, model, dataset, steps=100_000)  # never finishes: every run is killed
    rng = random.Random(1234)
    rows = []
    for kill in range(KILLS):
        before = _newest_step(out)
        with _started(forkserver, _child, _argv(config, out), str(tmp_path / f"child{kill}.log")) as proc:
            if kill == 0:  # the first run fills the latent cache: kill it once an entry is written
                _wait_until(lambda: _cache_entries(out), proc, "latent cache entry")
                delay, where = 0.0, "encoding"
            elif kill % 5 == 0:  # at any moment: model load, dataset check, resume, training
                delay, where = rng.uniform(0.0, 1.5), "anywhere"
            else:  # once training runs: during steps and state saves
                _wait_until(lambda b=before: _newest_step(out) > b, proc, f"state after step {before}")
                delay, where = rng.uniform(0.0, 0.5), "training"
            time.sleep(delay)
            assert proc.is_alive(), f"child {kill} exited early with {proc.exitcode}; see child{kill}.log"
            proc.kill()  # SIGKILL
            proc.join()
        assert proc.exitcode == -9
        loaded = _assert_every_safetensors_loads(out) if out.exists() else 0
        rows.append((kill, where, delay, before, _newest_step(out), len(_cache_entries(out)), loaded))

    newest = latest_state(out / "state")
    assert newest is not None
    for _, folder in state_folders(out / "state"):
        if (folder / "state.json").exists():
            load_training_state(folder)
    # A torn cache entry (as a crash of a non-atomic writer leaves) is detected and encoded again.
    torn = _cache_entries(out)[0]
    torn.write_bytes(torn.read_bytes()[:100])
    # The newest state resumes; a config 2 steps past it lets the run finish here.
    finish = load_training_state(newest).step + 2
    argv = _argv(_config(tmp_path, model, dataset, steps=finish), out)
    with _started(forkserver, _child, argv, str(tmp_path / "final.log")) as proc:
        proc.join(120)
    final_log = (tmp_path / "final.log").read_text()
    assert proc.exitcode == 0, final_log
    assert f"latent cache entry {torn} unreadable" in final_log
    assert read_metadata(out / "killed.safetensors")["ss_steps"] == str(finish)
    _assert_every_safetensors_loads(out)
    with capsys.disabled():
        print("\nkill  where     delay  newest state before -> after  cache entries  .safetensors loaded")
        for kill, where, delay, before, after, entries, loaded in rows:
            print(f"{kill:4}  {where:8}  {delay:5.2f}s  step {before:3} -> {after:3}  {entries:13}  {loaded}")
        print(f"resumed step {finish - 2} -> {finish}: exit 0, killed.safetensors saved")


def test_sigkill_during_a_large_atomic_write_leaves_the_previous_version(forkserver, tmp_path):
    """10 kills of a process rewriting a 32 MB file: the file always loads, whole, as one version."""
    target, ready = tmp_path / "big.safetensors", tmp_path / "ready"
    rng = random.Random(99)
    for _ in range(10):
        ready.unlink(missing_ok=True)
        with _started(forkserver, _write_chunks, str(target), str(ready)) as proc:
            _wait_until(ready.exists, proc, "first write", timeout=30)
            time.sleep(rng.uniform(0.0, 0.3))
            proc.kill()
        with safe_open(str(target), framework="pt") as f:
            version = float(f.metadata()["v"])
            x = f.get_tensor("x")
        assert x.numel() == 8 << 20 and bool((x == version).all())
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert all(name.startswith(".big.safetensors.") for name in leftovers)  # never a .safetensors name


def test_ctrl_c_stops_after_the_step_and_saves_the_partial_lora_and_a_state_that_resumes(
    forkserver, tmp_path
):
    """SIGINT (Ctrl-C) with no periodic states: the stop itself writes the state; exit status 130."""
    model = save_tiny_model(tmp_path / "model", "sd15")
    dataset = make_synthetic_dataset(tmp_path / "data", count=4)
    out, log = tmp_path / "out", tmp_path / "cancel.log"
    config = _config(tmp_path, model, dataset, steps=100_000, every=0)
    with _started(forkserver, _child, ["train", str(config)], str(log)) as proc:
        # the progress bar shows "| <step>/100000" once a step is done
        done = re.compile(r"\| *[1-9][0-9]*/100000")
        _wait_until(lambda: log.exists() and done.search(log.read_text(errors="replace")), proc, "a step")
        os.kill(proc.pid, signal.SIGINT)
        proc.join(60)
    text = log.read_text(errors="replace")
    assert proc.exitcode == 130, text
    step = int(text.split("cancelled after step ")[1].split()[0])
    assert [s for s, _ in state_folders(out / "state")] == [step]
    assert read_metadata(out / "killed-partial.safetensors")["ss_steps"] == str(step)

    finish = _config(tmp_path, model, dataset, steps=step + 1, every=0)
    with _started(
        forkserver, _child, ["train", str(finish), "--resume", str(out / "state")], str(log)
    ) as proc:
        proc.join(120)
    assert proc.exitcode == 0, log.read_text(errors="replace")
    assert read_metadata(out / "killed.safetensors")["ss_steps"] == str(step + 1)
