"""Copy the e2e screenshots the README shows into workflows/images/, small enough to commit.

Run after `pytest tests/e2e` (which writes tests/e2e/artifacts/): each picture is scaled to
at most 1600 px wide and stored as a 256-colour PNG; a file over 300 KB is an error.

    python tests/e2e/refresh_readme_images.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
ARTIFACTS = HERE / "artifacts"
IMAGES = HERE.parents[1] / "workflows" / "images"
README_IMAGES = {  # artifact → name in workflows/images/
    "graph_loaded_sd15_train_then_sample.png": "sd15_workflow_loaded.png",
    "training_in_progress_sd15.png": "sd15_training_in_progress.png",
    "after_run_sd15.png": "sd15_after_training.png",
}
MAX_WIDTH = 1600
MAX_BYTES = 300_000


def shrink(source: Path, target: Path) -> int:
    image = Image.open(source).convert("RGB")
    if image.width > MAX_WIDTH:
        image = image.resize((MAX_WIDTH, round(image.height * MAX_WIDTH / image.width)), Image.LANCZOS)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
    return target.stat().st_size


def main() -> int:
    missing = [name for name in README_IMAGES if not (ARTIFACTS / name).is_file()]
    if missing:
        print(f"run the e2e tests first; missing in {ARTIFACTS}: {missing}", file=sys.stderr)
        return 1
    IMAGES.mkdir(parents=True, exist_ok=True)
    too_big = []
    for source, name in README_IMAGES.items():
        size = shrink(ARTIFACTS / source, IMAGES / name)
        print(f"{IMAGES / name}: {size / 1000:.0f} KB")
        if size > MAX_BYTES:
            too_big.append(name)
    if too_big:
        print(f"over {MAX_BYTES // 1000} KB: {too_big}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
