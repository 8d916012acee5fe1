"""The install path ComfyUI users follow, on a fresh ComfyUI:

    cd ComfyUI/custom_nodes && git clone <this repository> && pip install -r <it>/requirements.txt

then `python main.py` lists the pack's nodes. The fresh ComfyUI is a copy of COMFYUI_DIR
without its models, outputs, user data or other custom nodes. Its Python is a new venv
that sees the packages of the environment running pytest (ComfyUI's, with its CUDA/CPU
torch) through a .pth file: what `--system-site-packages` gives for a system Python, for
an environment that is itself a venv. So `pip install -r requirements.txt` runs for real
and anything it installs lands in the new venv, never in the shared environment; that
torch is unchanged afterwards is the check that the requirements leave the user's torch alone
(in ComfyUI's own environment, which has every requirement, pip installs nothing).
The clone is of this repository's committed HEAD (uncommitted changes are not installed).
"""

from __future__ import annotations

import json
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
from comfy_process import ComfyServer

PACK_DIR = Path(__file__).resolve().parents[2]
PACK_NAME = "comfyui-lora-trainer"
NOT_COPIED = {"__pycache__", ".git", "user", "temp"}  # per-installation state, never part of a checkout
ONLY_PLACEHOLDERS = {"models", "output", "input"}  # keep the folder layout, not the user's files
PLACEHOLDER_MAX_BYTES = 1_000_000
TORCH_PACKAGES = {"torch", "torchvision", "torchaudio", "xformers", "triton"}
# Registry rules (docs.comfy.org/registry/specifications): node id, semantic version, icon formats.
NODE_ID = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*")
SEMVER = re.compile(r"\d+\.\d+\.\d+")
ICON = re.compile(r"https://\S+\.(?:svg|png|jpe?g|gif|webp)", re.IGNORECASE)


def _run(command: list[str], cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"$ {' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _copy_fresh_comfyui(source: Path, target: Path) -> None:
    def ignore(folder: str, names: list[str]) -> set[str]:
        path = Path(folder)
        skipped = {n for n in names if n in NOT_COPIED}
        if path == source / "custom_nodes":  # other packs are the user's, not ComfyUI's
            skipped |= {n for n in names if (path / n).is_dir()}
        if path.relative_to(source).parts[:1] and path.relative_to(source).parts[0] in ONLY_PLACEHOLDERS:
            skipped |= {
                n for n in names if (path / n).is_file() and (path / n).stat().st_size > PLACEHOLDER_MAX_BYTES
            }
        return skipped

    shutil.copytree(source, target, ignore=ignore, symlinks=False)


def _venv_over_this_environment(venv: Path) -> Path:
    """A new venv whose Python also sees this environment's site-packages (see module docstring)."""
    # No pip/setuptools of its own: like --system-site-packages, every package (pip included) is
    # the environment's, so pip only installs what the requirements add.
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=300)
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout
    (Path(purelib.strip()) / "comfyui_environment.pth").write_text(
        "\n".join(site.getsitepackages()) + "\n", encoding="utf-8"
    )
    return python


def _torch_version(python: Path) -> str:
    return _run([str(python), "-c", "import torch; print(torch.__version__)"]).stdout.strip()


def _requirement_names(requirements: Path) -> set[str]:
    names = set()
    for line in requirements.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[\s<>=!~;\[@]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


@pytest.fixture(scope="module")
def fresh_install(comfyui_dir, tmp_path_factory, artifacts):
    """(ComfyUI folder, venv python, pip output) after the user's install steps."""
    root = tmp_path_factory.mktemp("fresh_install")
    comfy = root / "ComfyUI"
    _copy_fresh_comfyui(comfyui_dir, comfy)
    pack = comfy / "custom_nodes" / PACK_NAME
    _run(["git", "clone", "--quiet", str(PACK_DIR), str(pack)], timeout=300)
    python = _venv_over_this_environment(root / "venv")
    torch_before = _torch_version(python)
    pip = _run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-r", "requirements.txt"],
        cwd=pack,
        timeout=900,
    )
    (artifacts / "install_pip.log").write_text(pip.stdout + pip.stderr, encoding="utf-8")
    return comfy, python, pip.stdout, torch_before


def test_requirements_never_name_or_replace_torch(fresh_install):
    comfy, python, pip_output, torch_before = fresh_install
    requirements = comfy / "custom_nodes" / PACK_NAME / "requirements.txt"
    assert requirements.is_file(), "requirements.txt must be at the repository root"
    assert _requirement_names(requirements) & TORCH_PACKAGES == set()
    installed = re.findall(r"^Successfully installed (.+)$", pip_output, re.MULTILINE)
    names = [p.rsplit("-", 1)[0].lower() for line in installed for p in line.split()]
    assert [n for n in names if n in TORCH_PACKAGES] == []
    assert _torch_version(python) == torch_before


def test_registry_metadata_is_valid_for_the_comfy_registry(fresh_install):
    comfy, python, _, _ = fresh_install
    pack = comfy / "custom_nodes" / PACK_NAME
    # ComfyUI's own reader of a pack's pyproject.toml (comfy_config), from the fresh copy.
    script = (
        "import json, sys; from comfy_config.config_parser import extract_node_configuration;"
        "c = extract_node_configuration(sys.argv[1]);"
        "print(json.dumps({'project': c.project.model_dump(), 'comfy': c.tool_comfy.model_dump()}))"
    )
    output = _run([str(python), "-c", script, str(pack)], cwd=comfy).stdout
    parsed = json.loads(output.strip().splitlines()[-1])
    project, comfy_meta = parsed["project"], parsed["comfy"]
    problems = []
    if not (NODE_ID.fullmatch(project["name"]) and len(project["name"]) < 100):
        problems.append(f"project.name {project['name']!r} is not a valid registry node id")
    if not SEMVER.fullmatch(project["version"]):
        problems.append(f"project.version {project['version']!r} is not X.Y.Z")
    if not project["urls"]["repository"].startswith("https://"):
        problems.append("project.urls.Repository is missing")
    if not comfy_meta["publisher_id"].strip() or " " in comfy_meta["publisher_id"]:
        problems.append(f"tool.comfy.PublisherId {comfy_meta['publisher_id']!r} is empty or has spaces")
    if not comfy_meta["display_name"].strip():
        problems.append("tool.comfy.DisplayName is empty")
    if comfy_meta["icon"] and not ICON.fullmatch(comfy_meta["icon"]):
        problems.append(f"tool.comfy.Icon {comfy_meta['icon']!r} is not an https URL of an SVG/PNG/JPG image")
    problems += [
        f"tool.comfy.includes: {p!r} is not in the repository"
        for p in comfy_meta["includes"]
        if not (pack / p).exists()
    ]
    assert problems == []


def test_fresh_comfyui_with_the_cloned_pack_starts_with_its_nodes_listed(
    fresh_install, pack_nodes, artifacts
):
    comfy, python, _, _ = fresh_install
    server = ComfyServer.start(comfy, python, [], artifacts / "server_fresh_install.log")
    try:
        listed = set(server.get_json("/object_info", timeout=120))
        page = server.get_text("/")
    finally:
        server.stop()
    log = server.log_text()
    assert [line for line in log.splitlines() if "IMPORT FAILED" in line and PACK_NAME in line] == []
    assert pack_nodes - listed == set(), server.log_tail()
    assert "<title>ComfyUI</title>" in page  # the frontend package answers
