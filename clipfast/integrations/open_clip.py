"""open_clip: the rule for its own ``Attention`` class (blocks of type ``custom``: QK-norm, head scaling, inner
norm; the default blocks use ``nn.MultiheadAttention``, covered by ``attention.py``).

The replacement keeps the module's forward step by step and swaps the SDPA call for
``clipfast.flash_attention``: fused ``in_proj`` linear, heads split, open_clip's mask conventions (a 3-D
mask is per head; bool True = masked), ``ln_q``/``ln_k``, then head scale, ``ln_inner``, ``out_proj``. The
text tower's float causal mask runs as ``is_causal``. Scaled-cosine attention (a learned per-head logit
scale on normalized q, k) and attention dropout in training run the original forward.

The rest of open_clip is covered by the family rules (its blocks, LayerNorms, MLPs, ``AttentionPool2d``,
vision embedding ``_embeds``; its text tower's unpadded ``encode_text`` is ``clipfast.unpad``'s) and, for its
timm image towers, by ``timm.py``. The class is recognised by module and class name, so open_clip is never
imported here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipfast.dispatching import flash_attention
from clipfast.nn.attention import is_causal_mask
from clipfast.patch_rules.registry import PatchRule, Unsupported, clone_as, fast_subclass, register_rule

ATTENTION = ("open_clip.transformer", "Attention")


def _attention_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    if self.logit_scale is not None or (self.training and self.attn_drop.p > 0):
        return type(self).__bases__[0].forward(self, x, attn_mask)
    n, length, channels = x.shape
    q, k, v = (t.reshape(n, length, self.num_heads, -1).transpose(1, 2)
               for t in F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1))
    causal = is_causal_mask(attn_mask)
    if causal:
        attn_mask = None
    elif attn_mask is not None:
        if attn_mask.dim() == 3:  # (N * heads, L, L)
            attn_mask = attn_mask.reshape(n, self.num_heads, length, length)
        if attn_mask.dtype == torch.bool:  # open_clip: True = masked
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill_(attn_mask, float("-inf"))
    out = flash_attention(self.ln_q(q), self.ln_k(k), v, attn_mask=attn_mask, is_causal=causal)
    if self.head_scale is not None:
        out = out * self.head_scale
    out = self.ln_inner(out.transpose(1, 2).reshape(n, length, channels))
    return self.out_drop(self.out_proj(out))


def _match(module: nn.Module) -> bool:
    cls = type(module)
    return (cls.__module__, cls.__name__) == ATTENTION


def _convert(module: nn.Module) -> nn.Module:
    if module.logit_scale is not None:
        raise Unsupported("scaled-cosine attention (learned logit scale on normalized q, k)")
    cls = type(module)
    return clone_as(module, fast_subclass(cls, _attention_forward, f"Fast{cls.__name__}"))


register_rule(PatchRule(family="attention", name="open_clip Attention -> flash attention", match=_match,
                        convert=_convert))
