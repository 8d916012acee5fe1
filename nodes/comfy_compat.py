"""What differs between the ComfyUI releases the pack runs on, decided in one place.

The pack is tested on ComfyUI 0.3.64 and written against the newer releases users run
(read, not run: README "ComfyUI versions"). What changed under it:

- Dynamic VRAM (from about February 2026, on NVIDIA and recent ROCm): CheckpointLoader
  gives a `ModelPatcherDynamic` (`is_dynamic()` True). Its weights stay off the GPU and
  each op casts its weight into a cast buffer the next op reuses (comfy/model_patcher.py
  ModelPatcherDynamic.load, comfy/ops.py cast_modules_with_vbar); autograd would save
  those views for a backward that reads other layers' weights. Its `load` refuses a full
  load, and loading it again may swap its parameters for backups. So training runs on
  `clone(disable_dynamic=True)`: an ordinary ModelPatcher over the same checkpoint loaded
  afresh by the loader's `cached_patcher_init`, fully loaded for the run. The graph's MODEL
  is never touched; the trained MODEL is still its clone with the LoRA as patches.
- `comfy.model_management.in_training` (same era): ComfyUI's own trainer raises it so
  ops take their autograd-safe paths (comfy/ldm/flux/math.py, comfy/ops.py).
- Before `in_training`, the Flux/Chroma blocks add residuals in place (`txt += …`,
  `x.addcmul_(…)`, comfy/ldm/flux/layers.py, comfy/ldm/chroma/layers.py) into tensors their
  norms saved for backward, which autograd refuses: `inplace_safe_autograd` keeps copies.
- Cancel raises `InterruptProcessingException`, a BaseException since about April 2026:
  the core's training loop keeps the partial LoRA for any BaseException (run/train.py).

Every check here asks the object (`getattr`, signatures), never a version number.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import comfy.model_management as mm
import torch

from ..lora_train_core.errors import ConfigError, ModelError

DISABLE_DYNAMIC_VRAM = "--disable-dynamic-vram"  # comfy/cli_args.py: "Disable dynamic VRAM ..."


def is_dynamic(patcher) -> bool:
    """True for a dynamic-VRAM ModelPatcher; releases before dynamic VRAM have no `is_dynamic`."""
    return bool(getattr(patcher, "is_dynamic", lambda: False)())


def training_patcher(model, clip=None, text_encoder: bool = False):
    """The MODEL to train on: `model` itself, or for a dynamic-VRAM MODEL a non-dynamic clone
    with its own weights. Refuses, naming the setting to change, what cannot be trained.

    Call before loading anything for the run; `release_training_patcher` undoes it.
    """
    if text_encoder and clip is not None and is_dynamic(clip.patcher):
        # CLIP.clone(disable_dynamic=True) gives a new patcher but keeps the old
        # cond_stage_model (comfy/sd.py), so there is no safe delegate to train on.
        raise ConfigError(
            "Train LoRA: training the text encoder is not supported on a dynamic-VRAM CLIP; start "
            f"ComfyUI with {DISABLE_DYNAMIC_VRAM}, or set train_text_encoder off in Configure Network"
        )
    if not is_dynamic(model):
        return model
    try:
        return model.clone(disable_dynamic=True)
    except RuntimeError as err:  # "Cannot create non-dynamic delegate: cached_patcher_init ..."
        raise ModelError(
            "Train LoRA: this MODEL is loaded with dynamic VRAM and its loader cannot reload it "
            f"without (no cached_patcher_init): load it with a core loader (Load Checkpoint, Load "
            f"Diffusion Model) or start ComfyUI with {DISABLE_DYNAMIC_VRAM}"
        ) from err


def load_for_training(patcher) -> None:
    """Every weight on the load device for the run: a partly offloaded model casts its weights
    into reused buffers per op, which backward must not read (ComfyUI's own trainer also
    forces a full load unless it offloads in bypass mode)."""
    mm.load_models_gpu([patcher], force_full_load=True)


def release_training_patcher(patcher, model) -> None:
    """Unload the non-dynamic clone `training_patcher` made for `model` (nothing if none).

    `unload_model_and_clones` exists in the releases that have dynamic VRAM; it also drops
    the graph's dynamic MODEL from VRAM, which reloads it on demand.
    """
    if patcher is model:
        return
    unload = getattr(mm, "unload_model_and_clones", None)
    if unload is not None:
        unload(patcher)


@contextlib.contextmanager
def training_flag() -> Iterator[None]:
    """`comfy.model_management.in_training` raised for the run, where the release has it."""
    if not hasattr(mm, "in_training"):
        yield
        return
    before, mm.in_training = mm.in_training, True
    try:
        yield
    finally:
        mm.in_training = before


def inplace_safe_autograd():
    """A context under which a forward that modifies saved activations in place still trains.

    Where the release has no `in_training` flag (0.3.64), autograd keeps its own copy of each
    saved activation (3-D and up, or one that requires grad), so a later `+=` on the original
    changes nothing backward reads. Frozen 2-D weights are kept as they are (no copy of the
    model per step). Elsewhere, `training_flag` makes the model's ops autograd-safe and this is
    a no-op.
    """
    if hasattr(mm, "in_training"):
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_keep_a_copy, _as_saved)


def _keep_a_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone() if tensor.requires_grad or tensor.ndim >= 3 else tensor


def _as_saved(tensor: torch.Tensor) -> torch.Tensor:
    return tensor
