"""Hugging Face SigLIP / SigLIP 2 rules.

What the other rules already cover in ``SiglipModel``, ``SiglipVisionModel``, ``SiglipTextModel`` and their
SigLIP 2 counterparts: LayerNorm (``layer_norm.py``), ``SiglipAttention`` through the registered
``"clipfast"`` attention function (``integrations_hf.py``; the text tower is bidirectional, so a padded
batch runs the key-padding mask and an unpadded one no mask at all), the ``gelu_pytorch_tanh`` MLP as the
fused MLP with ``activation="gelu_tanh"`` (``mlp.py``: ``fc1 -> activation_fn -> fc2``) and the
``nn.MultiheadAttention`` inside the vision tower's attention-pooling head (``attention.py``).

This file adds:
- the pooling heads (``SiglipMultiheadAttentionPoolingHead``, ``Siglip2MultiheadAttentionPoolingHead``):
  the original forward asks its ``nn.MultiheadAttention`` for the attention weights (``need_weights``
  defaults to True) and throws them away, which sends the fast module to PyTorch's implementation. The
  replacement is the same forward with ``need_weights=False``: one learned probe query over every token
  in the flash kernel. SigLIP 2's padded NaFlex batches pass their ``[B, N]`` patch mask as the kernel's
  key-padding mask (the original builds the same mask as an additive ``[B * heads, 1, N]`` tensor);
- the patch embedding of ``SiglipVisionEmbeddings``: a conv *with* bias, no class token, then
the position embedding (``position_ids`` 0..N-1), all in one ``clipfast.patch_embed`` call.
``interpolate_pos_encoding=True`` and image sizes other than the configured one run the original forward.
SigLIP 2's ``Siglip2VisionEmbeddings`` (NaFlex: a ``Linear`` over already patchified pixels plus
positional embeddings resized per image to ``spatial_shapes``) is left as it is.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from clipfast.ops.patch_embed import patch_embed
from clipfast.patch_rules.registry import PatchRule, Unsupported, clone_as, fast_subclass, is_fast, register_rule

from . import patch_embed as rules

SIGLIP_EMBEDDINGS = {("transformers.models.siglip.modeling_siglip", "SiglipVisionEmbeddings")}
POOLING_HEADS = {("transformers.models.siglip.modeling_siglip", "SiglipMultiheadAttentionPoolingHead"),
                 ("transformers.models.siglip2.modeling_siglip2", "Siglip2MultiheadAttentionPoolingHead")}


def _matcher(names):
    def match(module: nn.Module) -> bool:
        cls = type(module)
        return not is_fast(module) and (cls.__module__, cls.__name__) in names
    return match


# ----------------------------------------------------------------------------------------------
# Attention-pooling head: probe -> MultiheadAttention (need_weights=False) -> + MLP(LayerNorm)
# ----------------------------------------------------------------------------------------------

def _pooling_head_forward(self, hidden_state: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    padding = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:  # not a [B, N] patch mask: the original builds what it needs
            return rules._original_class(self).forward(self, hidden_state, attention_mask)
        padding = attention_mask == 0  # nn.MultiheadAttention's key_padding_mask: True = left out
    probe = self.probe.repeat(hidden_state.shape[0], 1, 1)
    hidden_state = self.attention(probe, hidden_state, hidden_state, key_padding_mask=padding, need_weights=False)[0]
    residual = hidden_state
    hidden_state = residual + self.mlp(self.layernorm(hidden_state))
    return hidden_state[:, 0]


def _convert_pooling_head(module: nn.Module) -> nn.Module:
    attention = getattr(module, "attention", None)
    if not isinstance(attention, nn.MultiheadAttention) or not attention.batch_first:
        raise Unsupported("`attention` is not a batch-first nn.MultiheadAttention")
    for name in ("probe", "layernorm", "mlp"):
        if not hasattr(module, name):
            raise Unsupported(f"pooling head without `{name}`")
    cls = type(module)
    return clone_as(module, fast_subclass(cls, _pooling_head_forward, f"Fast{cls.__name__}"))


register_rule(PatchRule(family="attention", name="HF SigLIP attention-pooling head -> flash attention (probe query)",
                        match=_matcher(POOLING_HEADS), convert=_convert_pooling_head))


# ----------------------------------------------------------------------------------------------
# SiglipVisionEmbeddings: conv (with bias) -> flatten -> + position embedding
# ----------------------------------------------------------------------------------------------


def _siglip_embeddings_forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
    conv = self.patch_embedding
    size_ok = isinstance(pixel_values, torch.Tensor) and tuple(pixel_values.shape[-2:]) == (self.image_size,) * 2
    if interpolate_pos_encoding or not size_ok or not rules.positions_checked(self) or not rules._fusable(
            pixel_values, conv, self.num_positions, class_token=False):
        return rules._original_class(self).forward(self, pixel_values, interpolate_pos_encoding)
    # [B, N, width]; the original adds position_embedding(position_ids) with a leading batch dim of 1
    return patch_embed(pixel_values, conv.weight, None, self.position_embedding.weight, conv_bias=conv.bias)


def _convert(module: nn.Module) -> nn.Module:
    rules.check_hf_embeddings(module)
    return rules.hf_embeddings_clone(module, _siglip_embeddings_forward)


register_rule(PatchRule(family="patch_embed", name="HF SiglipVisionEmbeddings -> fused patch embedding (conv bias)",
                        match=_matcher(SIGLIP_EMBEDDINGS), convert=_convert))
