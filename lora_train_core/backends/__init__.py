"""Model backends: the only code that knows how a model family encodes and predicts."""

from .base import Backend, TextConditioning

__all__ = ["Backend", "TextConditioning"]
