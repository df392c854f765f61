"""``torch.nn.MultiheadAttention`` running the flash-attention kernel.

``forward`` accepts the parent's arguments. With ``need_weights=False`` (what CLIP code passes) the
projections run as ``F.linear`` and attention as ``clipfast.flash_attention`` on strided views of the
projection output (no copies). Masks:

- a float ``-inf`` upper-triangular ``attn_mask`` (OpenAI CLIP, open_clip) or its bool form is recognised
  and run as ``is_causal`` (the causal kernel, which skips the blocks above the diagonal) without reading
  the mask again: the check runs once per mask (cached by data pointer and version counter, holding a
  reference so the memory cannot be reused) and marks the tensor (``mark_causal``). Under
  ``torch.compile`` nothing data-dependent can run, so only the mark is read (dynamo guards on it): the
  fixed masks that blocks hold are marked by ``clipfast.patch`` and by the first eager call, and a mask
  first made inside a compiled graph (e.g. converted to another dtype there) runs as a general mask;
- other ``attn_mask`` ([L, S] or [B*num_heads, L, S], bool True = masked, or additive float) and
  ``key_padding_mask`` ([B, S], bool True = ignored, or additive float) run inside the kernel.

``need_weights=True``, ``add_bias_kv``, ``add_zero_attn`` and dropout while training run the parent's
forward, with a one-time warning each.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import host_sync_forbidden, warn_once
from ..dispatching import flash_attention

_CAUSAL_CACHE: "OrderedDict[tuple, tuple[Tensor, bool]]" = OrderedDict()
_CAUSAL_CACHE_SIZE = 16


# Python attribute set on a mask tensor found causal: the version counter at the check. Dynamo reads it
# (and guards on it) while tracing, where the mask's values cannot be looked at.
_CAUSAL_MARK = "_clipfast_causal"


def mark_causal(mask: Tensor, causal: bool) -> None:
    """Record on ``mask`` whether it is the causal mask, for ``is_causal_mask`` under ``torch.compile``."""
    if causal:
        setattr(mask, _CAUSAL_MARK, mask._version)
    elif hasattr(mask, _CAUSAL_MARK):
        delattr(mask, _CAUSAL_MARK)


def is_causal_mask(mask: Optional[Tensor]) -> bool:
    """Whether ``mask`` is the square causal mask in MultiheadAttention's convention: float with -inf
    above the diagonal and 0 elsewhere, or bool with True above the diagonal. Checked once per mask;
    while compiling, only a mark left by an earlier check is read (no check of the values can run there,
    and an in-place change after the check is not seen: masks are built once and not edited)."""
    if mask is None or mask.dim() != 2 or mask.shape[0] != mask.shape[1] or mask.numel() == 0:
        return False
    if mask.is_meta:  # no values yet (deferred initialization): checked when a real mask comes
        return False
    if host_sync_forbidden():
        return getattr(mask, _CAUSAL_MARK, None) is not None
    key = (mask.data_ptr(), mask._version, tuple(mask.shape), tuple(mask.stride()), mask.dtype, mask.device)
    hit = _CAUSAL_CACHE.get(key)
    if hit is not None:
        _CAUSAL_CACHE.move_to_end(key)
        return hit[1]
    n = mask.shape[0]
    above = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        result = bool(torch.equal(mask, above))
    else:
        result = bool(torch.equal(torch.isneginf(mask), above) and not mask.masked_fill(above, 0).any())
    _CAUSAL_CACHE[key] = (mask, result)  # the reference keeps the memory (and so the key) from being reused
    mark_causal(mask, result)
    if len(_CAUSAL_CACHE) > _CAUSAL_CACHE_SIZE:
        _CAUSAL_CACHE.popitem(last=False)
    return result


def _additive(mask: Tensor) -> Tensor:
    """MultiheadAttention's mask convention (bool True = masked) as an additive float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask


def _unsupported(module, query, key_padding_mask, need_weights, attn_mask) -> Optional[str]:
    if need_weights:
        return "need_weights=True"
    if module.bias_k is not None or module.bias_v is not None:
        return "add_bias_kv"
    if module.add_zero_attn:
        return "add_zero_attn"
    if module.training and module.dropout > 0:
        return "attention dropout while training"
    if query.dim() not in (2, 3):
        return f"a {query.dim()}-D query"
    for name, m in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
        if m is not None and not (m.dtype == torch.bool or m.is_floating_point()):
            return f"a {m.dtype} {name}"
    return None


def _parent_forward(module):
    """The forward this class overrides (nn.MultiheadAttention's, or a patched class's original)."""
    for cls in type(module).__mro__:
        f = cls.__dict__.get("forward")
        if f is not None and f is not mha_forward:
            return f
    raise TypeError(f"{type(module).__name__} has no parent forward")


def _projections(module, query, key, value):
    """q, k, v as [*, L, H, D] views of the projection outputs (one GEMM for self-attention)."""
    h, d = module.num_heads, module.head_dim
    bias = module.in_proj_bias
    if module._qkv_same_embed_dim and query is key and key is value:
        qkv = F.linear(query, module.in_proj_weight, bias).unflatten(-1, (3, h, d))
        return qkv.unbind(-3)
    if module._qkv_same_embed_dim:
        weights = module.in_proj_weight.chunk(3)
    else:
        weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
    biases = bias.chunk(3) if bias is not None else (None, None, None)
    return tuple(F.linear(x, w, b).unflatten(-1, (h, d)) for x, w, b in zip((query, key, value), weights, biases))


def mha_forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False):
    """``nn.MultiheadAttention.forward`` with the attention in the flash kernel (see the module doc)."""
    reason = _unsupported(self, query, key_padding_mask, need_weights, attn_mask)
    if reason is not None:
        warn_once(f"mha_{reason}", f"MultiheadAttention with {reason} runs the PyTorch implementation")
        return _parent_forward(self)(self, query, key, value, key_padding_mask=key_padding_mask,
                                     need_weights=need_weights, attn_mask=attn_mask,
                                     average_attn_weights=average_attn_weights, is_causal=is_causal)
    batched = query.dim() == 3
    if not batched:  # [L, E] -> one sequence-first batch
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    batch_first = self.batch_first and batched
    q, k, v = _projections(self, query, key, value)
    # [B, L, H, D] or [L, B, H, D] views -> [B, H, L, D]
    order = (0, 2, 1, 3) if batch_first else (1, 2, 0, 3)
    q, k, v = (t.permute(order) for t in (q, k, v))
    b, h, lq, _ = q.shape
    lk = k.shape[2]

    causal = bool(is_causal) or is_causal_mask(attn_mask)
    bias = None
    if attn_mask is not None and not causal:
        bias = _additive(attn_mask)
        bias = bias.reshape(1, 1, lq, lk) if bias.dim() == 2 else bias.reshape(b, h, lq, lk)
    if key_padding_mask is not None:
        pad = _additive(key_padding_mask).reshape(b, 1, 1, lk)
        bias = pad if bias is None else bias + pad
    if bias is not None and bias.dtype != torch.bool and not bias.is_floating_point():
        bias = bias.float()

    out = flash_attention(q, k, v, attn_mask=bias, is_causal=causal)  # [B, H, Lq, D] in [B, Lq, H, D] memory
    out = self.out_proj(out.transpose(1, 2).reshape(b, lq, self.embed_dim))
    if not batch_first:
        out = out.transpose(0, 1)
    if not batched:
        out = out.squeeze(1)
    return out, None


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in ``torch.nn.MultiheadAttention`` (same constructor, parameters and state_dict, either
    ``batch_first``) whose ``need_weights=False`` forward runs the flash-attention kernel."""

    forward = mha_forward
