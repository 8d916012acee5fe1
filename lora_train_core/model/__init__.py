"""The model side: the backend protocol and its diffusers implementation, the LoRA network, kohya keys."""
