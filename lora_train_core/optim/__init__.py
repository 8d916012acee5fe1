"""Optimisers, learning-rate schedules, parameter groups and EMA of the LoRA weights."""
