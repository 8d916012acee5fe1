"""ComfyUI entry point of the LoRA-trainer node pack.

ComfyUI imports this file from `custom_nodes/<pack>/` and calls
`comfy_entrypoint()` (the V3 node API). It must also import cleanly without
ComfyUI (tests and tools import the package), so the nodes load only when
ComfyUI's modules are importable.
"""

import importlib.util

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
