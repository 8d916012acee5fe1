"""Faults injected where they happen in real runs, shared by the NaN-guard tests."""

from __future__ import annotations

import dataclasses

import torch


class PoisonedLatents:
    """Cached latents whose `bad_read`-th read is all NaN (a broken image or a VAE overflow)."""

    def __init__(self, inner, bad_read: int):
        self.inner, self.bad_read, self.reads = inner, bad_read, 0

    def get(self, index, generator=None):
        self.reads += 1
        sample = self.inner.get(index, generator)
        if self.reads != self.bad_read:
            return sample
        return dataclasses.replace(sample, latents=torch.full_like(sample.latents, float("nan")))
