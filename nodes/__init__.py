"""ComfyUI nodes (thin front doors to lora_train_core). Built in the nodes issue."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
