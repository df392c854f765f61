"""Attention rules: ``nn.MultiheadAttention`` and CLIP's ``AttentionPool2d`` -> the flash-attention kernel.

- ``torch.nn.MultiheadAttention`` (and subclasses that keep its forward): the text and vision blocks of
  the reference model, OpenAI CLIP, Chinese-CLIP's vision tower and open_clip up to 3.3 (sequence-first or
  ``batch_first``). The replacement runs ``clipfast.nn.MultiheadAttention``'s forward: OpenAI's float
  causal mask is recognised and run as ``is_causal`` (at patch time for the masks blocks hold, so compiled
  models run the causal kernel too); ``need_weights=True``, ``add_bias_kv``,
  ``add_zero_attn`` and dropout while training run torch's forward (modules built with ``add_bias_kv`` or
  ``add_zero_attn`` are left alone and reported).
- ``AttentionPool2d`` of ModifiedResNet (reference model, OpenAI, Chinese-CLIP, open_clip): one query (the
  mean token) attending all positions, Lq = 1, in the kernel. Recognised by class name, so no optional
  package is imported.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from clipfast.dispatching import flash_attention
from clipfast.nn.attention import is_causal_mask, mha_forward
from clipfast.patch_rules.registry import PatchRule, Unsupported, clone_as, fast_subclass, is_fast, register_rule

ATTENTION_POOLS = {
    "clipfast.models.model.AttentionPool2d",
    "clip.model.AttentionPool2d",
    "cn_clip.clip.model.AttentionPool2d",
    "open_clip.modified_resnet.AttentionPool2d",
}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# ----------------------------------------------------------------------------------------------
# nn.MultiheadAttention
# ----------------------------------------------------------------------------------------------

def recognise_causal_masks(module: nn.Module) -> None:
    """Check, once, the square masks ``module`` holds for its attention (tensor attributes and buffers whose
    name contains ``mask``: OpenAI's and the reference model's ``ResidualAttentionBlock.attn_mask``,
    open_clip's ``attn_mask`` buffer) and mark the causal ones, so a compiled model runs them as
    ``is_causal`` from its first call (see ``clipfast.nn.attention``)."""
    tensors = {**{k: v for k, v in vars(module).items() if isinstance(v, torch.Tensor)}, **module._buffers}
    for name, value in tensors.items():
        if value is not None and "mask" in name and value.dim() == 2 and value.shape[0] == value.shape[1]:
            is_causal_mask(value)


def _match_mha(module: nn.Module) -> bool:
    # patch asks every rule about every module, parents first: the attention rule uses that one visit to
    # recognise the fixed causal masks that blocks hold for the attention modules below them
    recognise_causal_masks(module)
    return isinstance(module, nn.MultiheadAttention) and not is_fast(module)


def _convert_mha(module: nn.Module) -> nn.Module:
    cls = type(module)
    if cls.forward is not nn.MultiheadAttention.forward:
        raise Unsupported(f"{_qualname(cls)} overrides forward with unknown semantics")
    if module.bias_k is not None or module.bias_v is not None:
        raise Unsupported("add_bias_kv (learned key/value rows) is not in the kernel")
    if module.add_zero_attn:
        raise Unsupported("add_zero_attn is not in the kernel")
    if module.head_dim > 256:
        raise Unsupported(f"head dim {module.head_dim} > 256")
    return clone_as(module, fast_subclass(cls, mha_forward, f"Fast{cls.__name__}"))


register_rule(PatchRule(family="attention", name="nn.MultiheadAttention -> flash attention",
                        match=_match_mha, convert=_convert_mha))


# ----------------------------------------------------------------------------------------------
# AttentionPool2d
# ----------------------------------------------------------------------------------------------

def attention_pool_forward(self, x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, output_dim]: the mean token (plus positional embedding) attends every position
    (itself included) through the kernel with Lq = 1, then ``c_proj``."""
    n, c = x.shape[:2]
    x = x.flatten(2).transpose(1, 2)                                    # [N, HW, C]
    x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)              # [N, HW + 1, C]
    x = x + self.positional_embedding.to(x.dtype)
    h = self.num_heads
    d = c // h
    q = self.q_proj(x[:, :1]).view(n, 1, h, d).transpose(1, 2)          # [N, h, 1, d]
    k = self.k_proj(x).view(n, -1, h, d).transpose(1, 2)                # [N, h, HW + 1, d]
    v = self.v_proj(x).view(n, -1, h, d).transpose(1, 2)
    out = flash_attention(q, k, v)                                      # [N, h, 1, d]
    return self.c_proj(out.transpose(1, 2).reshape(n, c))


def _match_pool(module: nn.Module) -> bool:
    return _qualname(type(module)) in ATTENTION_POOLS


def _convert_pool(module: nn.Module) -> nn.Module:
    for name in ("q_proj", "k_proj", "v_proj", "c_proj"):
        if type(getattr(module, name, None)) is not nn.Linear:
            raise Unsupported(f"`{name}` is not a plain nn.Linear")
    c = module.q_proj.in_features
    if c % module.num_heads or c // module.num_heads > 256:
        raise Unsupported(f"width {c} with {module.num_heads} heads is not a head dim the kernel takes")
    if tuple(module.positional_embedding.shape[-1:]) != (c,):
        raise Unsupported("unexpected positional embedding shape")
    cls = type(module)
    return clone_as(module, fast_subclass(cls, attention_pool_forward, f"Fast{cls.__name__}"))


register_rule(PatchRule(family="attention", name="AttentionPool2d -> flash attention (one query)",
                        match=_match_pool, convert=_convert_pool))
