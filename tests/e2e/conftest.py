"""End-to-end tests: a real ComfyUI server with this pack installed, and its real frontend in Chromium.

Run with ComfyUI's environment (it has ComfyUI's requirements, the frontend package and
the `playwright` Python package; the browser is Debian's chromium, never downloaded):

    apt-get install chromium && pip install playwright      # once, in ComfyUI's environment
    COMFYUI_DIR=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/e2e -v

Without COMFYUI_DIR every test here is skipped with the reason shown; without Playwright
or Chromium the browser tests are. CHROMIUM overrides the browser path (/usr/bin/chromium).
Screenshots and server logs go to tests/e2e/artifacts/ (git-ignored);
`python tests/e2e/refresh_readme_images.py` then refreshes the README's pictures.

The browser test's ComfyUI is a throw-away `--base-directory`: custom_nodes/ links to this
working tree, models/ holds a random-weight SD1.5 checkpoint and input/ the tiny shapes
dataset, both made by tests/integration/comfy_harness.py (in a child process, so this
process never imports ComfyUI). The browser may reach the loopback server only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest

HERE = Path(__file__).resolve().parent
PACK_DIR = HERE.parents[1]
INTEGRATION_DIR = PACK_DIR / "tests" / "integration"
ARTIFACTS = HERE / "artifacts"
PACK_NAME = "comfyui-lora-trainer"  # the folder name `git clone` gives in custom_nodes/
PACK_NODES = frozenset(
    f"LoRATrainer_{name}"
    for name in (
        "LoadDataset",
        "Bucketize",
        "CacheLatents",
        "ConfigureNoise",
        "ConfigureOptimizer",
        "ConfigureNetwork",
        "ConfigureSpeed",
        "ConfigureFlow",
        "TrainLoRA",
        "EMAExport",
        "LossPlot",
        "MergeLoRAs",
    )
)
SKIP_REASON = (
    "COMFYUI_DIR not set: the e2e tests start a real ComfyUI from that checkout (see tests/e2e/conftest.py)"
)
PREPARE_TIMEOUT_S = 1200  # building the random SD1.5 checkpoint the first time takes minutes on 2 cores
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1920, "height": 1080}
# A first start shows the template gallery over the canvas; a user closes it once and it stays
# closed (Comfy.TutorialCompleted). For the screenshots: no minimap over the graph, and no
# level-of-detail switch, so zoomed-out nodes keep their text.
FRONTEND_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
}

if str(HERE) not in sys.path:  # comfy_process / comfy_page are imported by name
    sys.path.insert(0, str(HERE))

from comfy_page import ComfyPage  # noqa: E402
from comfy_process import ComfyServer  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if os.environ.get("COMFYUI_DIR"):
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    path = Path(os.environ["COMFYUI_DIR"]).resolve()
    if not (path / "main.py").is_file():
        pytest.fail(f"COMFYUI_DIR={path} is not a ComfyUI checkout (no main.py)")
    return path


@pytest.fixture(scope="session")
def pack_nodes() -> frozenset[str]:
    """The node ids this pack registers."""
    return PACK_NODES


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@dataclass(frozen=True)
class ComfyHome:
    """A ComfyUI --base-directory prepared for the browser tests."""

    base: Path
    checkpoint: str  # name in models/checkpoints
    dataset: str  # folder in input/

    @property
    def loras(self) -> Path:
        return self.base / "models" / "loras"


@pytest.fixture(scope="session")
def comfy_home(comfyui_dir, tmp_path_factory) -> ComfyHome:
    base = tmp_path_factory.mktemp("comfy_home")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_NAME).symlink_to(PACK_DIR, target_is_directory=True)
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps(FRONTEND_SETTINGS), encoding="utf-8")
    made = _prepare_checkpoint_and_dataset(comfyui_dir, base)
    return ComfyHome(base, made["checkpoint"], made["dataset"])


_PREPARE = """
import json, sys
comfyui_dir, base, integration_dir, result = sys.argv[1:5]
sys.path.insert(0, integration_dir)
import comfy_harness as harness
harness.setup_comfy(comfyui_dir, base)
checkpoint, _ = harness.make_sd15_checkpoint()
made = {"checkpoint": harness.install_checkpoint(checkpoint), "dataset": harness.make_tiny_dataset().name}
open(result, "w").write(json.dumps(made))
"""


def _prepare_checkpoint_and_dataset(comfyui_dir: Path, base: Path) -> dict:
    """models/checkpoints/<random SD1.5> and input/<tiny dataset>, made by the integration harness."""
    result = base / "prepared.json"
    done = subprocess.run(
        [sys.executable, "-c", _PREPARE, str(comfyui_dir), str(base), str(INTEGRATION_DIR), str(result)],
        cwd=PACK_DIR,
        capture_output=True,
        text=True,
        timeout=PREPARE_TIMEOUT_S,
    )
    if done.returncode != 0 or not result.is_file():
        pytest.fail(
            f"preparing the checkpoint and dataset failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        )
    return json.loads(result.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def comfy_server(comfyui_dir, comfy_home, artifacts):
    """ComfyUI serving comfy_home on a free loopback port, with the frontend package it requires."""
    server = ComfyServer.start(
        comfyui_dir,
        sys.executable,
        ["--base-directory", str(comfy_home.base)],
        artifacts / "server_browser.log",
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def object_info(comfy_server) -> dict:
    return comfy_server.get_json("/object_info", timeout=120)


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """Debian's headless Chromium through Playwright, fresh profile, loopback-only network."""
    sync_api = pytest.importorskip(
        "playwright.sync_api",
        reason="the Python package playwright is not installed (pip install playwright)",
    )
    chromium = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    if not chromium.is_file():
        pytest.skip(f"no Chromium at {chromium}: apt-get install chromium, or set CHROMIUM")
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path_factory.getbasetemp())
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=str(chromium),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport=VIEWPORT,
            timeout=60_000,
        )
        try:
            context.set_default_timeout(60_000)
            context.route("**/*", _loopback_only)
            yield context
        finally:
            context.close()


def _loopback_only(route) -> None:
    # The frontend asks api.comfy.org about nodes and releases; a test must not reach out.
    if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
        route.continue_()
    else:
        route.abort()


@pytest.fixture
def comfy_page(browser, comfy_server):
    """A fresh tab with the ComfyUI frontend loaded."""
    page = browser.new_page()
    try:
        view = ComfyPage(page, comfy_server.url)
        view.open()
        yield view
    finally:
        page.close()
