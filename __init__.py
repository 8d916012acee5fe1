"""ComfyUI entry point of the LoRA-trainer node pack.

ComfyUI imports this file from `custom_nodes/<pack>/`. It must also import
cleanly without ComfyUI (tests and tools import the package), so the node
classes are loaded only when ComfyUI's modules are importable.
"""

import importlib.util

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

if importlib.util.find_spec("comfy") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
