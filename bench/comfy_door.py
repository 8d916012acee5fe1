"""The ComfyUI door in the benchmark: ComfyUI's own denoiser of a case's family, real size, random
weights, stored as ComfyUI's loaders store it, behind the pack's `nodes/comfy_backend.ComfyBackend`.

ComfyUI runs in this process from `COMFYUI_DIR` (a checkout; on the GPU machine the trimmed copy
that `../shared/tools/gpu-comfyui.sh` makes), with its default arguments: the GPU, no `--cpu`.
The model is built as `comfy.sd.load_diffusion_model_state_dict` builds one (its config class,
`set_inference_dtype` with ComfyUI's choice of manual-cast dtype, `get_model`, a `ModelPatcher`),
then filled with seeded random weights instead of a file's. `ComfyBackend.prepare_for_training`
loads it as Train LoRA does. What differs from the Train LoRA node is only what the CLI bench also
stands in for: the latents and text-encoder outputs are random tensors of the real shapes.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
from pathlib import Path

import torch

import lora_train_core

PACK_DIR = Path(__file__).resolve().parents[1]
PACK = "lora_trainer_pack"  # the name the pack is imported under here (ComfyUI uses its path)

# ComfyUI's `unet_config` of each family, as comfy/model_detection.py detects the published
# checkpoints (SD1.5 and SDXL come from diffusers' configs through ComfyUI's own converter).
FLUX_DEV = {
    "image_model": "flux",
    "in_channels": 16,
    "patch_size": 2,
    "out_channels": 16,
    "vec_in_dim": 768,
    "context_in_dim": 4096,
    "hidden_size": 3072,
    "mlp_ratio": 4.0,
    "num_heads": 24,
    "depth": 19,
    "depth_single_blocks": 38,
    "axes_dim": [16, 56, 56],
    "theta": 10000,
    "qkv_bias": True,
    "guidance_embed": True,
}
TINY_FLUX_DEV = {
    **FLUX_DEV,
    "vec_in_dim": 32,
    "context_in_dim": 32,
    "hidden_size": 32,
    "num_heads": 2,
    "depth": 1,
    "depth_single_blocks": 1,
    "axes_dim": [4, 6, 6],
}


def comfy_backend_module():
    """The pack's `nodes.comfy_backend`, over this process's `lora_train_core` (one copy of the core,
    so that the bench's step and the backend share their classes), with ComfyUI importable."""
    comfyui = os.environ.get("COMFYUI_DIR")
    if not comfyui or not (Path(comfyui) / "comfy").is_dir():
        raise SystemExit("the ComfyUI door needs COMFYUI_DIR=<a ComfyUI checkout>")
    if comfyui not in sys.path:
        sys.path.insert(0, comfyui)
    if not torch.cuda.is_available():  # --tiny on a CPU: ComfyUI's --cpu, set before model_management loads
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
    for info in pkgutil.walk_packages(lora_train_core.__path__, "lora_train_core."):
        if info.name != "lora_train_core.__main__":
            importlib.import_module(info.name)
    for name, module in list(sys.modules.items()):
        if name == "lora_train_core" or name.startswith("lora_train_core."):
            sys.modules[f"{PACK}.{name}"] = module
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACK, PACK_DIR / "__init__.py", submodule_search_locations=[str(PACK_DIR)]
        )
        sys.modules[PACK] = package = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(package)
    return importlib.import_module(f"{PACK}.nodes.comfy_backend")


def build_comfy_backend(family: str, tiny: bool, device: torch.device, weight_dtype: torch.dtype, fp8: bool):
    """A ComfyBackend over ComfyUI's model of `family`, weights `weight_dtype` (float8 e4m3fn with
    `fp8`, computed in `weight_dtype` by ComfyUI's manual cast), loaded for training."""
    backend_module = comfy_backend_module()
    import comfy.model_management as mm
    import comfy.model_patcher

    config = _model_config(family, tiny)
    stored = torch.float8_e4m3fn if fp8 else weight_dtype
    config.set_inference_dtype(stored, weight_dtype if fp8 else None)
    with torch.inference_mode():  # as a loader node runs under ComfyUI's executor
        model = config.get_model({}, "", device=device)
        _fill_random(model.diffusion_model, seed=0)
    offload = mm.unet_offload_device()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=offload)
    backend = backend_module.ComfyBackend(patcher)
    backend.prepare_for_training()
    return backend


def _model_config(family: str, tiny: bool):
    import comfy.model_detection
    import comfy.supported_models

    if family.startswith("flux"):
        return comfy.supported_models.Flux(dict(TINY_FLUX_DEV if tiny else FLUX_DEV))
    if tiny:  # ComfyUI detects only the published UNets' configs, not the tiny ones
        raise SystemExit(f"the ComfyUI door has no tiny {family} model; run it at real size")
    from .models import build_unet

    unet = build_unet(family, tiny, torch.device("meta"))
    unet_config = comfy.model_detection.unet_config_from_diffusers_unet(unet.state_dict())
    return {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[family](unet_config)


@torch.no_grad()
def _fill_random(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's ops leave weights uninitialised: norms' weights 1, biases 0, the rest
    ~ N(0, 1/fan_in), drawn on the weights' device in float32 and stored in their dtype."""
    generator = torch.Generator(next(module.parameters()).device).manual_seed(seed)
    for name, weight in module.named_parameters():
        if weight.ndim == 1:
            weight.fill_(1.0 if name.endswith(("weight", "scale")) else 0.0)
        else:
            values = torch.randn(weight.shape, generator=generator, device=weight.device)
            weight.copy_(values / weight[0].numel() ** 0.5)
