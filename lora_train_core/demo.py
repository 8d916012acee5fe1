"""The embedded demo: a tiny SD-, Flux- or Chroma-shaped model, a synthetic dataset, ~30 steps.

Needs no downloads and no weights: the models are built from configs with
seeded random weights (tiny_models.py) and the images are drawn on the spot.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from .config import OutputConfig, RunConfig, recipe_path, with_overrides
from .data.buckets import BucketConfig
from .data.dataset import DatasetConfig
from .data.latent_cache import CacheConfig
from .families import get_family
from .model.network import NetworkConfig
from .model.tiny_models import tiny_backend
from .optim.optimizers import OptimizerConfig
from .run.orchestrator import RunResult, run_training
from .run.progress import ProgressBar
from .run.train import TrainConfig, TrainingRecipe

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SIZES = [(128, 128), (160, 128), (128, 160), (192, 96), (96, 192), (256, 64)]


def make_synthetic_dataset(folder: Path, count: int = 12, seed: int = 0) -> Path:
    """`count` images of coloured shapes in several aspect ratios, each with a caption file.

    They go into `folder/2_shape` (kohya's N_name: 2 repeats, class token "shape").
    """
    rng = random.Random(seed)
    subset = folder / "2_shape"
    subset.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        w, h = SIZES[i % len(SIZES)]
        fg_name, bg_name = rng.sample(sorted(COLORS), 2)
        shape = rng.choice(["circle", "square"])
        image = Image.new("RGB", (w, h), COLORS[bg_name])
        draw = ImageDraw.Draw(image)
        r = min(w, h) // 3
        cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
        box = (cx - r, cy - r, cx + r, cy + r)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[fg_name])
        image.save(subset / f"{i:02d}.png")
        caption = f"a {fg_name} {shape}, {bg_name} background, flat colors"
        (subset / f"{i:02d}.txt").write_text(caption, encoding="utf-8")
    return folder


def demo_config(family: str, out_dir: Path, steps: int) -> RunConfig:
    return RunConfig(
        model=None,
        dataset=DatasetConfig(path=out_dir / "dataset"),
        buckets=BucketConfig(
            resolution=(128, 128),
            min_bucket_reso=64,
            max_bucket_reso=256,
            bucket_reso_steps=get_family(family).bucket_reso_step,
        ),
        cache=CacheConfig(mode="ram"),
        output=OutputConfig(output_dir=out_dir, output_name=f"demo_{family}_lora", overwrite=True),
        recipe=TrainingRecipe(
            train=TrainConfig(max_train_steps=steps, train_batch_size=4, seed=42),
            # Conv LoRA too: the tiny SDXL's last up block has no attention (as SDXL's top level
            # has none), so attention-only LoRA barely reaches the output and its loss stays flat.
            network=_demo_network(family),
            # High for LoRA, so that 30 steps show the loss falling (1e-3 left SDXL's flat).
            optimizer=OptimizerConfig(optimizer_type="AdamW", learning_rate=3e-3),
        ),
    )


def _demo_network(family: str) -> NetworkConfig:
    spec = get_family(family)
    if spec.unet_names == "native":  # a DiT has no k×k convs for conv LoRA
        # Chroma's only text encoder is T5, which takes no LoRA here
        return NetworkConfig(
            network_dim=8, network_alpha=8.0, train_text_encoder=bool(spec.text_encoder_prefixes)
        )
    return NetworkConfig(network_dim=8, network_alpha=8.0, conv_dim=8, conv_alpha=8.0)


def run_demo(
    family: str = "sd15", out_dir: Path = Path("demo_out"), steps: int = 30, recipe: str | None = None
) -> RunResult:
    """Build the tiny model and dataset, train, save; print first/last loss and the file."""
    out_dir = Path(out_dir)
    make_synthetic_dataset(out_dir / "dataset")
    cfg = demo_config(family, out_dir, steps)
    if recipe is not None:
        cfg = with_overrides(cfg, recipe_path(recipe))
        print(f"recipe: {recipe_path(recipe)}")
    backend = tiny_backend(family, seed=0)
    bar = ProgressBar()
    try:
        result = run_training(cfg, backend, on_step=bar)
    finally:
        bar.close()
    losses = result.trained.losses
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"first loss {losses[0]:.4f} (mean of first {k}: {first:.4f})")
    print(f"last loss  {losses[-1]:.4f} (mean of last {k}: {last:.4f})")
    print(f"saved {result.path}")
    return result
