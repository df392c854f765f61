"""Hugging Face transformers rules (CLIP, ChineseCLIP, CLIPSeg, SigLIP / SigLIP 2).

What the family rules already cover in these models: LayerNorm (``layer_norm.py``, BERT's post-LN output
blocks of ChineseCLIP's text tower included), ``CLIPMLP`` and its copies as the fused MLP (``mlp.py``: ``fc1
-> activation_fn -> fc2``; SigLIP's ``gelu_pytorch_tanh`` with ``activation="gelu_tanh"``), CLIP's vision
embeddings (``patch_embed.py``) and the ``nn.MultiheadAttention`` inside SigLIP's attention-pooling head
(``attention.py``).

This file adds:
- attention: every attention module whose ``forward`` dispatches through transformers' attention interface
  (``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``: CLIP, ChineseCLIP vision and BERT text towers,
  CLIPSeg, SigLIP, ...) gets its own shallow copy of its config with ``_attn_implementation = "clipfast"``,
  so it runs ``clipfast.flash_attention`` (see ``clipfast.integrations.hf``) while the rest of the model,
  including mask building, keeps its configuration. The forward is the original one. SigLIP's text tower is
  bidirectional, so a padded batch runs the key-padding mask and an unpadded one no mask at all;
- patch_embed: ChineseCLIP's vision embeddings (the same forward as CLIP's) take ``patch_embed.py``'s rule
  for ``CLIPVisionEmbeddings``;
- SigLIP's pooling heads (``SiglipMultiheadAttentionPoolingHead``, ``Siglip2MultiheadAttentionPoolingHead``):
  the original forward asks its ``nn.MultiheadAttention`` for the attention weights (``need_weights``
  defaults to True) and throws them away, which sends the fast module to PyTorch's implementation. The
  replacement is the same forward with ``need_weights=False``: one learned probe query over every token
  in the flash kernel. SigLIP 2's padded NaFlex batches pass their ``[B, N]`` patch mask as the kernel's
  key-padding mask (the original builds the same mask as an additive ``[B * heads, 1, N]`` tensor);
- the patch embedding of ``SiglipVisionEmbeddings``: a conv *with* bias, no class token, then the position
  embedding (``position_ids`` 0..N-1), all in one ``clipfast.patch_embed`` call.
  ``interpolate_pos_encoding=True`` and image sizes other than the configured one run the original forward.
  SigLIP 2's ``Siglip2VisionEmbeddings`` (NaFlex: a ``Linear`` over already patchified pixels plus
  positional embeddings resized per image to ``spatial_shapes``) is left as it is;
- unpad_text: ``CLIPModel`` / ``CLIPTextModelWithProjection`` / ``ChineseCLIPModel`` get text encodings that
  compute only real tokens (``unpad.py``).

Classes are recognised by module and class name, so transformers is never imported here.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from clipfast import unpad
from clipfast.dispatching import patch_embed
from clipfast.integrations import hf
from clipfast.integrations.hf import unpad as hf_unpad
from clipfast.patch_rules import patch_embed as embedding_rules
from clipfast.patch_rules.registry import PatchRule, Unsupported, clone_as, fast_subclass, is_fast, register_rule

# mask formats the clipfast function takes: the ones the sdpa and eager mask builders produce
_MASK_COMPATIBLE = (None, "eager", "sdpa", hf.NAME)


def _matcher(names):
    def match(module: nn.Module) -> bool:
        cls = type(module)
        return not is_fast(module) and (cls.__module__, cls.__name__) in names
    return match


# ----------------------------------------------------------------------------------------------
# Attention modules dispatching through the attention interface
# ----------------------------------------------------------------------------------------------

def _dispatches_attention_interface(module: nn.Module) -> bool:
    cls = type(module)
    if not cls.__module__.startswith("transformers.") or not hasattr(getattr(module, "config", None), "_attn_implementation"):
        return False
    code = getattr(cls.forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def _convert_attention(module: nn.Module) -> nn.Module:
    current = module.config._attn_implementation
    if current == hf.NAME:
        raise Unsupported('already runs attn_implementation="clipfast"')
    if current not in _MASK_COMPATIBLE:
        raise Unsupported(f"the model builds its masks for attn_implementation={current!r}")
    if not hf.register():
        raise Unsupported("this transformers version has no attention interface")
    cls = type(module)
    new = clone_as(module, fast_subclass(cls, cls.forward, f"Fast{cls.__name__}"))
    config = copy.copy(module.config)  # the copy is this module's alone; the model's config is untouched
    config._attn_implementation = hf.NAME
    new.config = config
    return new


register_rule(PatchRule(family="attention", name="transformers attention -> clipfast attention function",
                        match=_dispatches_attention_interface, convert=_convert_attention))


# ----------------------------------------------------------------------------------------------
# Vision embeddings with CLIPVisionEmbeddings' forward
# ----------------------------------------------------------------------------------------------

CLIP_LIKE_EMBEDDINGS = {("transformers.models.chinese_clip.modeling_chinese_clip", "ChineseCLIPVisionEmbeddings")}


def _match_embeddings(module: nn.Module) -> bool:
    cls = type(module)
    return (cls.__module__, cls.__name__) in CLIP_LIKE_EMBEDDINGS


register_rule(PatchRule(family="patch_embed", name="ChineseCLIP vision embeddings -> fused patch embedding",
                        match=_match_embeddings, convert=embedding_rules._convert_hf))


# ----------------------------------------------------------------------------------------------
# SigLIP attention-pooling head: probe -> MultiheadAttention (need_weights=False) -> + MLP(LayerNorm)
# ----------------------------------------------------------------------------------------------

SIGLIP_EMBEDDINGS = {("transformers.models.siglip.modeling_siglip", "SiglipVisionEmbeddings")}
POOLING_HEADS = {("transformers.models.siglip.modeling_siglip", "SiglipMultiheadAttentionPoolingHead"),
                 ("transformers.models.siglip2.modeling_siglip2", "Siglip2MultiheadAttentionPoolingHead")}


def _pooling_head_forward(self, hidden_state: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    padding = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:  # not a [B, N] patch mask: the original builds what it needs
            return embedding_rules._original_class(self).forward(self, hidden_state, attention_mask)
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

def _siglip_embeddings_forward(self, pixel_values: torch.Tensor,
                               interpolate_pos_encoding: bool = False) -> torch.Tensor:
    conv = self.patch_embedding
    size_ok = isinstance(pixel_values, torch.Tensor) and tuple(pixel_values.shape[-2:]) == (self.image_size,) * 2
    if (interpolate_pos_encoding or not size_ok or not embedding_rules.positions_checked(self)
            or not embedding_rules._fusable(pixel_values, conv, self.num_positions, class_token=False)):
        return embedding_rules._original_class(self).forward(self, pixel_values, interpolate_pos_encoding)
    # [B, N, width]; the original adds position_embedding(position_ids) with a leading batch dim of 1
    return patch_embed(pixel_values, conv.weight, None, self.position_embedding.weight, conv_bias=conv.bias)


def _convert_siglip_embeddings(module: nn.Module) -> nn.Module:
    embedding_rules.check_hf_embeddings(module)
    return embedding_rules.hf_embeddings_clone(module, _siglip_embeddings_forward)


register_rule(PatchRule(family="patch_embed", name="HF SiglipVisionEmbeddings -> fused patch embedding (conv bias)",
                        match=_matcher(SIGLIP_EMBEDDINGS), convert=_convert_siglip_embeddings))


# ----------------------------------------------------------------------------------------------
# Unpadded text towers
# ----------------------------------------------------------------------------------------------

def _match_text_tower(module: nn.Module) -> bool:
    return unpad.tower_name(module) in hf_unpad.METHODS and not hasattr(type(module), "_clipfast_unpadded_base")


def _convert_text_tower(module: nn.Module) -> nn.Module:
    reason = hf_unpad.unsupported_reason(module)
    if reason is not None:
        raise Unsupported(reason)
    return clone_as(module, unpad.unpadded_class(type(module), hf_unpad.METHODS[unpad.tower_name(module)]))


register_rule(PatchRule(family="unpad_text",
                        name="HF CLIP / ChineseCLIP get_text_features -> unpadded text tower",
                        match=_match_text_tower, convert=_convert_text_tower))
