"""Differentiable ops (torch custom ops) over the Triton kernels."""
from .layer_norm import add_layer_norm, layer_norm
from .attention import flash_attention
from .patch_embed import patch_embed
from .contrastive_loss import clip_loss, contrastive_cross_entropy, siglip_loss

__all__ = ["layer_norm", "add_layer_norm", "patch_embed", "flash_attention", "clip_loss", "siglip_loss", "contrastive_cross_entropy"]
