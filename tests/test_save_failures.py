"""Nothing trained is lost at save time: an unusable output folder stops the CLI before training,
and a final write that fails (disk full) lands the LoRA at a fallback path the message names."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lora_train_core.cli import main
from lora_train_core.demo import make_synthetic_dataset
from lora_train_core.model.tiny_models import save_tiny_model
from lora_train_core.outputs import export

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny_sd15", "sd15")


def _config(folder: Path, model: Path, output_dir: Path) -> Path:
    dataset = make_synthetic_dataset(folder / "data", count=4)
    config = folder / "run.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [model]
            path = "{model.as_posix()}"
            [dataset]
            path = "{dataset.as_posix()}"
            [buckets]
            resolution = [64, 64]
            min_bucket_reso = 64
            max_bucket_reso = 128
            [train]
            max_train_steps = 2
            [output]
            output_dir = "{output_dir.as_posix()}"
            output_name = "my_lora"
            state_dir = "{(folder / "states").as_posix()}"
            """
        ),
        encoding="utf-8",
    )
    return config


def _refused_before_training(code: int, out: str, err: str) -> None:
    assert code == 2, (out, err)
    assert err.startswith("error: output.output_dir: "), err
    assert "Traceback" not in err
    assert "effective batch" not in out  # the run never started


def test_output_folder_that_is_a_file_stops_before_training(tmp_path, tiny_model_dir, capsys):
    blocker = tmp_path / "out"
    blocker.write_text("not a folder")
    code = main(["train", str(_config(tmp_path, tiny_model_dir, blocker))])
    out, err = capsys.readouterr()
    _refused_before_training(code, out, err)
    assert "is a file, not a folder" in err


def test_output_folder_under_a_file_stops_before_training(tmp_path, tiny_model_dir, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = main(["train", str(_config(tmp_path, tiny_model_dir, blocker / "out"))])
    out, err = capsys.readouterr()
    _refused_before_training(code, out, err)
    assert "a part of that path is a file" in err


# As root, the child imports what the CLI needs (the interpreter and packages may live where
# only root can read), then becomes `nobody` and runs the CLI: root ignores permission bits.
_AS_USER = """
import os, sys
import lora_train_core.cli, lora_train_core.data.dataset, lora_train_core.run.orchestrator
import lora_train_core.model.diffusers_backend, lora_train_core.run.preflight
if os.geteuid() == 0:
    os.setgid(65534)
    os.setuid(65534)
sys.exit(lora_train_core.cli.main(["train", sys.argv[1]]))
"""


def test_output_folder_without_write_permission_stops_before_training():
    folder = Path(tempfile.mkdtemp(prefix="lora-perm-"))
    try:
        folder.chmod(0o755)  # `nobody` must reach the config, the data and the model
        out = folder / "out"
        out.mkdir()
        (folder / "states").mkdir()
        (folder / "states").chmod(0o777)
        config = _config(folder, folder / "model", out)
        (folder / "model").mkdir()  # never read: the run stops before the model loads
        out.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        env = {**os.environ, "HOME": str(folder / "states"), "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            [sys.executable, "-c", _AS_USER, str(config)],
            capture_output=True,
            text=True,
            env=env,
            cwd=folder / "states",
            timeout=300,
        )
        _refused_before_training(proc.returncode, proc.stdout, proc.stderr.strip().splitlines()[-1])
        assert f"cannot write to {out} (Permission denied)" in proc.stderr
    finally:
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(folder, ignore_errors=True)


def test_a_full_disk_at_the_final_save_keeps_the_lora_in_the_states_folder(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    out_dir = tmp_path / "out"
    write = export.atomic_write_bytes

    def disk_full_in_out_dir(path, data):
        if Path(path).parent == out_dir:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write(path, data)

    monkeypatch.setattr(export, "atomic_write_bytes", disk_full_in_out_dir)
    code = main(["train", str(_config(tmp_path, tiny_model_dir, out_dir))])
    out, err = capsys.readouterr()
    fallback = tmp_path / "states" / "my_lora.safetensors"
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert f"could not write {out_dir / 'my_lora.safetensors'} (No space left on device)" in err
    assert f"the LoRA was saved to {fallback} instead" in err
    assert any(k.endswith("lora_down.weight") for k in load_file(fallback))
    assert not (out_dir / "my_lora.safetensors").exists()
