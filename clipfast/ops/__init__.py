"""Differentiable ops (torch custom ops) over the Triton kernels."""
from .layer_norm import add_layer_norm, layer_norm

__all__ = ["layer_norm", "add_layer_norm"]
