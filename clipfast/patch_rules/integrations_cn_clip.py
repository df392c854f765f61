"""Chinese-CLIP (``cn_clip``) rules.

Its vision tower is OpenAI's (the family rules cover its blocks); its ``VisualTransformer`` adds a
``mask_ratio`` argument (random token masking between the embedding and ln_pre), so it gets the OpenAI
patch-embedding forward of ``patch_embed.py`` whenever ``mask_ratio`` is 0. Its text tower is an old-style BERT whose
``BertSelfAttention`` computes ``softmax(q k^T / sqrt(d) + mask) v`` with explicit matmuls and a
``(1 - mask) * -10000`` additive key-padding mask of shape [B, 1, 1, L]. The replacement runs
``clipfast.flash_attention`` with that mask (a per-key vector, read once per key block by the kernel).
Attention probabilities requested (``output_attentions``), a head mask, or attention dropout in training
run the original forward. The post-LN output blocks are fused by ``integrations_hf.py``'s BERT rule.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from clipfast.patch_rules.registry import PatchRule, Unsupported, clone_as, fast_subclass, register_rule

from . import patch_embed


def _bert_self_attention_forward(self, hidden_states: torch.Tensor, attention_mask=None, head_mask=None):
    if self.output_attentions or head_mask is not None or (self.training and self.dropout.p > 0):
        return type(self).__bases__[0].forward(self, hidden_states, attention_mask, head_mask)
    from clipfast.ops.attention import flash_attention

    q = self.transpose_for_scores(self.query(hidden_states))  # [B, H, L, D]
    k = self.transpose_for_scores(self.key(hidden_states))
    v = self.transpose_for_scores(self.value(hidden_states))
    context = flash_attention(q, k, v, attn_mask=attention_mask)
    context = context.permute(0, 2, 1, 3).reshape(*hidden_states.shape[:-1], self.all_head_size)
    return (context,)


def _match(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__module__ == "cn_clip.clip.modeling_bert" and cls.__name__ == "BertSelfAttention"


def _convert(module: nn.Module) -> nn.Module:
    cls = type(module)
    return clone_as(module, fast_subclass(cls, _bert_self_attention_forward, f"Fast{cls.__name__}"))


register_rule(PatchRule(family="attention", name="Chinese-CLIP BertSelfAttention -> flash attention",
                        match=_match, convert=_convert))


# ----------------------------------------------------------------------------------------------
# VisualTransformer: OpenAI's VisionTransformer plus random token masking
# ----------------------------------------------------------------------------------------------

def _visual_forward(self, x: torch.Tensor, mask_ratio: float = 0.0) -> torch.Tensor:
    if mask_ratio != 0:
        return type(self).__bases__[0].forward(self, x, mask_ratio)
    return patch_embed._openai_forward(self, x)


def _match_visual(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__module__ == "cn_clip.clip.model" and cls.__name__ == "VisualTransformer"


def _convert_visual(module: nn.Module) -> nn.Module:
    patch_embed._patch_size(module.conv1)  # raises Unsupported for anything but a patchify conv
    if module.positional_embedding.dim() != 2:
        raise Unsupported("positional_embedding is not [tokens, width]")
    cls = type(module)
    return clone_as(module, fast_subclass(cls, _visual_forward, f"Fast{cls.__name__}"))


register_rule(PatchRule(family="patch_embed", name="Chinese-CLIP VisualTransformer embedding -> fused patch embedding + ln_pre",
                        match=_match_visual, convert=_convert_visual))
