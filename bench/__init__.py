"""GPU training-step benchmark of lora_train_core against a textbook diffusers + peft step (issue 9)."""
