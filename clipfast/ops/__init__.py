"""Differentiable ops (torch custom ops) over the Triton kernels."""
from .layer_norm import add_layer_norm, layer_norm
from .attention import flash_attention
from .patch_embed import patch_embed

__all__ = ["layer_norm", "add_layer_norm", "patch_embed", "flash_attention"]
