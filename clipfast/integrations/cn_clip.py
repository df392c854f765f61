"""Chinese-CLIP (``cn_clip``): its patch rules and its unpadded text tower.

Its vision tower is OpenAI's (the family rules cover its blocks); its ``VisualTransformer`` adds a
``mask_ratio`` argument (random token masking between the embedding and ln_pre), so it gets the OpenAI
patch-embedding forward of ``patch_embed.py`` whenever ``mask_ratio`` is 0. Its text tower is an old-style
BERT whose ``BertSelfAttention`` computes ``softmax(q k^T / sqrt(d) + mask) v`` with explicit matmuls and a
``(1 - mask) * -10000`` additive key-padding mask of shape [B, 1, 1, L]. The replacement runs
``clipfast.flash_attention`` with that mask (a per-key vector, read once per key block by the kernel).
Attention probabilities requested (``output_attentions``), a head mask, or attention dropout in training
run the original forward. The post-LN output blocks are fused by ``layer_norm.py``'s BERT output rule.

Unpadded text (family ``unpad_text``): ``CLIP.encode_text`` packs the real tokens (``text != [PAD]``, the
mask its ``encode_text`` builds; position 0 real) and runs ``clipfast.unpad``'s packed BERT tower, which is
exact (see there). It runs the original ``encode_text`` where the packed path cannot take the call (hooks,
checkpointing, dropout in training, ``torch.compile`` tracing, a prompt whose first token is [PAD]).

Classes are recognised by module and class name, so cn_clip is never imported here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from clipfast import unpad
from clipfast._validate import host_sync_forbidden
from clipfast.dispatching import flash_attention
from clipfast.patch_rules import patch_embed
from clipfast.patch_rules.registry import PatchRule, Unsupported, clone_as, fast_subclass, register_rule

CLIP = "cn_clip.clip.model.CLIP"


def _bert_self_attention_forward(self, hidden_states: torch.Tensor, attention_mask=None, head_mask=None):
    if self.output_attentions or head_mask is not None or (self.training and self.dropout.p > 0):
        return type(self).__bases__[0].forward(self, hidden_states, attention_mask, head_mask)
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


# ----------------------------------------------------------------------------------------------
# Unpadded text tower: encode_text on the real (non-[PAD]) tokens
# ----------------------------------------------------------------------------------------------

def encode_text(self, text):
    """cn_clip ``encode_text`` on the real (non-[PAD]) tokens only; the original where the packed path
    cannot take the call."""
    if (not host_sync_forbidden() and isinstance(text, torch.Tensor) and text.dim() == 2 and text.shape[0] > 0
            and unpad.bert_packable(self.bert)):
        keep = text.ne(self.tokenizer.vocab["[PAD]"])
        if bool(keep[:, 0].all()):
            return unpad.bert_cls(self.bert, text, keep).type(self.dtype) @ self.text_projection
    return unpad.unpadded_base(self).encode_text(self, text)


def unsupported_reason(model: nn.Module) -> Optional[str]:
    """Why this model's ``encode_text`` cannot skip padding (None when it can), from its structure."""
    try:
        reason = unpad.bert_structure_reason(model.bert)
        if reason is None and "[PAD]" not in getattr(getattr(model, "tokenizer", None), "vocab", {}):
            reason = "no [PAD] token in the tokenizer"
        return reason or unpad.bert_head_dim_reason(model.bert)
    except (AttributeError, IndexError, TypeError) as e:
        return f"unexpected text tower structure ({e})"


def _match_text_tower(module: nn.Module) -> bool:
    return unpad.tower_name(module) == CLIP and not hasattr(type(module), "_clipfast_unpadded_base")


def _convert_text_tower(module: nn.Module) -> nn.Module:
    reason = unsupported_reason(module)
    if reason is not None:
        raise Unsupported(reason)
    return clone_as(module, unpad.unpadded_class(type(module), {"encode_text": encode_text}))


register_rule(PatchRule(family="unpad_text", name="Chinese-CLIP encode_text -> unpadded text tower",
                        match=_match_text_tower, convert=_convert_text_tower))
