"""A stand-in for newer ComfyUI's dynamic-VRAM ModelPatcher, for a ComfyUI that has none.

ComfyUI 0.3.64 has no dynamic VRAM, and a newer one makes a dynamic patcher only for a GPU
(`ModelPatcherDynamic.__new__` gives a plain ModelPatcher for a CPU load device), so the CPU
tests meet one through `DynamicModelPatcher`. It does what ModelPatcherDynamic in
comfy/model_patcher.py (Comfy-Org/ComfyUI at e59d85a0) does where the pack can see it:

- `is_dynamic()` is True;
- `clone(disable_dynamic=True)` is an ordinary ModelPatcher over the checkpoint loaded afresh
  by `cached_patcher_init = (factory, args[, index])`, called with `disable_dynamic=True`;
  without a factory it raises ComfyUI's RuntimeError;
- loading refuses `full_load` and `force_patch_weights` (and `patch_model(load_weights=True)`),
  leaves each weight where it is and makes every ComfyUI op cast it at each call, the weights
  being assigned lazily to the device;
- a cast lands in a buffer that the next op's cast reuses (comfy/ops.py cast_modules_with_vbar
  and get_cast_buffer at 5522e4fd; here one for weights and one for biases). The reuse bumps
  the buffer's version counter, so a backward that needs an overwritten weight fails loudly;
  ComfyUI's raw cast buffers would give wrong gradients silently.

ComfyUI is imported on first use, after `setup_comfy` (see comfy_harness).
"""

from __future__ import annotations

import functools

import torch
from training_inputs import tiny_sd15_model


def reload_tiny_model(seed: int, disable_dynamic: bool = False):
    """A `cached_patcher_init` factory for tiny_sd15_model, called as newer ComfyUI calls one
    (comfy.sd.load_diffusion_model's is `(load_diffusion_model, (path, model_options))`)."""
    return tiny_sd15_model(seed)


class CastBuffer:
    """One destination for every op's cast weight, overwritten by the next op's cast."""

    def __init__(self, numel: int):
        self.numel = numel
        self.storage: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.dtype, weight.device)
        if key not in self.storage:
            with torch.inference_mode(False):  # a normal tensor, writable in and out of inference mode
                self.storage[key] = torch.empty(self.numel, dtype=weight.dtype, device=weight.device)
        view = self.storage[key][: weight.numel()].view(weight.shape)
        view.copy_(weight)
        return view


def dynamic_model_patcher(patcher, cached_patcher_init=None):
    """`patcher`'s model behind a DynamicModelPatcher (the class is built on first use)."""
    standin = _dynamic_class()(patcher.model, patcher.load_device, patcher.offload_device)
    standin.cached_patcher_init = cached_patcher_init
    return standin


@functools.cache
def _dynamic_class():
    import comfy.model_patcher as model_patcher

    class DynamicModelPatcher(model_patcher.ModelPatcher):
        cached_patcher_init = None

        def is_dynamic(self):
            return True

        def clone(self, disable_dynamic=False):
            n = super().clone()
            n.cached_patcher_init = self.cached_patcher_init
            if not disable_dynamic:
                return n
            if self.cached_patcher_init is None:
                raise RuntimeError(
                    "Cannot create non-dynamic delegate: cached_patcher_init is not initialized."
                )
            factory, args, *index = self.cached_patcher_init
            fresh = factory(*args, disable_dynamic=True)
            if index:
                fresh = fresh[index[0]]
            n.__class__ = model_patcher.ModelPatcher
            n.model, n.backup = fresh.model, fresh.backup
            n.object_patches_backup = fresh.object_patches_backup
            return n

        def patch_model(
            self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False
        ):
            assert not load_weights  # "the correct pattern is to call load_models_gpu()"
            return super().patch_model(load_weights=False, force_patch_weights=force_patch_weights)

        def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
            assert not force_patch_weights
            self.unpatch_model(self.offload_device, unpatch_weights=False)
            self.patch_model(load_weights=False)
            self.load(device_to)

        def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
            assert not force_patch_weights and not full_load  # neither makes sense for dynamic loading
            ops = {name: m for name, m in self.model.named_modules() if hasattr(m, "comfy_cast_weights")}
            largest = max(p.numel() for m in ops.values() for p in m.parameters(recurse=False))
            buffers = {"weight": CastBuffer(largest), "bias": CastBuffer(largest)}
            for name, module in ops.items():
                module.comfy_cast_weights = True
                for kind, buffer in buffers.items():
                    key = f"{name}.{kind}"
                    patch = [model_patcher.LowVramPatch(key, self.patches)] if key in self.patches else []
                    setattr(module, f"{kind}_function", [*patch, buffer])
            self.model.device = device_to
            self.model.current_weight_patches_uuid = self.patches_uuid

        def unpatch_model(self, device_to=None, unpatch_weights=True):
            super().unpatch_model(device_to=None, unpatch_weights=False)
            if unpatch_weights:
                for module in self.model.modules():
                    for attribute in ("comfy_cast_weights", "weight_function", "bias_function"):
                        vars(module).pop(attribute, None)
                self.model.current_weight_patches_uuid = None

        def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
            return 0  # the weights never left their offload device

    return DynamicModelPatcher
