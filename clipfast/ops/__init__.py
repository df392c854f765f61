"""Differentiable ops (torch custom ops) over the Triton kernels."""
from .layer_norm import add_layer_norm, layer_norm
from .patch_embed import patch_embed
from .mlp import mlp, quick_gelu
from .attention import flash_attention
from .attention_varlen import flash_attention_varlen
from .contrastive_loss import clip_loss, contrastive_cross_entropy, siglip_loss

__all__ = ["layer_norm", "add_layer_norm", "patch_embed", "mlp", "quick_gelu", "clip_loss", "siglip_loss", "contrastive_cross_entropy", "flash_attention", "flash_attention_varlen"]
