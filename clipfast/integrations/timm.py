"""timm: rules for the ViT blocks of timm's ``VisionTransformer``, as open_clip's ``TimmModel`` wraps them
(``ViT-B-16-SigLIP``, ``ViT-SO400M-14-SigLIP``, ... and any ``timm_model_name`` tower).

- ``timm.layers.LayerNorm`` (``F.layer_norm``, input dtype out; left alone when timm's fast-norm mode is
  on, which computes in the autocast dtype) and ``LayerNormFp32`` (fp32 math, input dtype out) -> the
  fused LayerNorm kernel.
- ``Attention`` (fused ``qkv`` Linear, optional ``q_norm``/``k_norm`` on the head dim, optional ``norm``
  before ``proj``, optional sigmoid ``gate``): the forward step by step with ``F.scaled_dot_product_attention``
  replaced by ``clipfast.flash_attention`` (same mask and ``is_causal`` semantics). The norms, gate and
  projections are called as the modules they are, so q/k-norm variants keep their math; attention dropout
  in training runs the original forward.
- ``AttentionPoolLatent`` (the MAP head of SigLIP towers): learned latent queries over every token in the
  flash kernel, then ``proj`` and the residual MLP exactly as timm does.
- ``Mlp`` (``fc1 -> act -> drop1 -> norm -> fc2 -> drop2``) with GELU or tanh-GELU and no inner norm ->
  one fused ``clipfast.mlp`` call; dropout between the layers while training runs the original forward.
- ``PatchEmbed`` (conv with bias, flattened to tokens, optional norm) -> ``clipfast.patch_embed`` with
  ``conv_bias``; image sizes the original would reject or pad, and the non-flattened output formats, run
  the original forward (the positional embedding is added by ``VisionTransformer._pos_embed`` as before).

Classes are recognized by module and class name, so timm is never imported here.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from clipfast.dispatching import flash_attention, patch_embed
from clipfast.kernels import layer_norm as layer_norm_kernel
from clipfast.nn.mlp import fused_mlp
from clipfast.patch_rules import layer_norm as layer_norm_rules
from clipfast.patch_rules import mlp as mlp_rules
from clipfast.patch_rules import patch_embed as patch_rules
from clipfast.patch_rules.registry import PatchRule, Unsupported, clone_as, fast_subclass, is_fast, register_rule

LAYER_NORM = ("timm.layers.norm", "LayerNorm")
LAYER_NORM_FP32 = ("timm.layers.norm", "LayerNormFp32")
ATTENTION = {("timm.layers.attention", "Attention"), ("timm.models.vision_transformer", "Attention")}
ATTENTION_POOL = {("timm.layers.attention_pool", "AttentionPoolLatent")}
MLP = {("timm.layers.mlp", "Mlp")}
PATCH_EMBED = {("timm.layers.patch_embed", "PatchEmbed")}


def _key(module: nn.Module) -> tuple[str, str]:
    cls = type(module)
    return cls.__module__, cls.__name__


def _matcher(names):
    def match(module: nn.Module) -> bool:
        return not is_fast(module) and _key(module) in names
    return match


def _original_forward(module: nn.Module):
    return patch_rules._original_class(module).forward


def _dropout_active(module: nn.Module, drop: Optional[nn.Module]) -> bool:
    return module.training and isinstance(drop, nn.Dropout) and drop.p > 0


def _check_dropout(drop: Optional[nn.Module], role: str) -> None:
    if drop is not None and type(drop) not in (nn.Dropout, nn.Identity):
        raise Unsupported(f"`{role}` is {type(drop).__qualname__}, not nn.Dropout")


def _check_linear(module: nn.Module, role: str) -> None:
    if type(module) is not nn.Linear or module._forward_hooks or module._forward_pre_hooks:
        raise Unsupported(f"`{role}` is not a plain nn.Linear without hooks")


def _check_head_dim(head_dim: int) -> None:
    if head_dim > 256:
        raise Unsupported(f"head dim {head_dim} > 256")


# ----------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------

def _convert_layer_norm(module: nn.Module) -> nn.Module:
    if getattr(module, "_fast_norm", False):
        raise Unsupported("timm fast-norm mode (computes in the autocast dtype)")
    n = math.prod(module.normalized_shape)
    if n > layer_norm_kernel.MAX_COLS:
        raise Unsupported(f"{n} features > {layer_norm_kernel.MAX_COLS}, wider than the kernel keeps in registers")
    fp32 = _key(module) == LAYER_NORM_FP32
    forward = layer_norm_rules._forward_input_dtype if fp32 else layer_norm_rules._forward_torch
    cls = type(module)
    return clone_as(module, fast_subclass(cls, forward, f"Fast{cls.__name__}"))


register_rule(PatchRule(family="layer_norm", name="timm LayerNorm / LayerNormFp32 -> fused LayerNorm",
                        match=_matcher({LAYER_NORM, LAYER_NORM_FP32}), convert=_convert_layer_norm))


# ----------------------------------------------------------------------------------------------
# Attention: qkv -> (q_norm, k_norm) -> flash attention -> (norm, gate) -> proj
# ----------------------------------------------------------------------------------------------

def _attention_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                       is_causal: bool = False) -> torch.Tensor:
    if _dropout_active(self, self.attn_drop):
        extra = {"is_causal": True} if is_causal else {}
        return _original_forward(self)(self, x, attn_mask=attn_mask, **extra)
    batch, length, _ = x.shape
    gate = getattr(self, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)                                               # [B, H, L, D] views
    q, k = self.q_norm(q), self.k_norm(k)
    out = flash_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    out = self.norm(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))
    if gate is not None:
        out = out * gate
    return self.proj_drop(self.proj(out))


def _convert_attention(module: nn.Module) -> nn.Module:
    _check_linear(module.qkv, "qkv")
    _check_head_dim(module.head_dim)
    _check_dropout(module.attn_drop, "attn_drop")
    for name in ("num_heads", "head_dim", "q_norm", "k_norm", "norm", "proj", "proj_drop"):
        if not hasattr(module, name):
            raise Unsupported(f"this timm version's Attention has no `{name}`")
    cls = type(module)
    return clone_as(module, fast_subclass(cls, _attention_forward, f"Fast{cls.__name__}"))


register_rule(PatchRule(family="attention", name="timm Attention -> flash attention", match=_matcher(ATTENTION),
                        convert=_convert_attention))


# ----------------------------------------------------------------------------------------------
# AttentionPoolLatent (MAP head): latent queries -> flash attention -> proj (+ MLP(norm))
# ----------------------------------------------------------------------------------------------

def _attention_pool_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    batch, length, channels = x.shape
    if self.pos_embed is not None:
        x = x + self.pos_embed.unsqueeze(0).to(x.dtype)
    latent = self.q(self.latent.expand(batch, -1, -1))
    q = latent.reshape(batch, self.latent_len, self.num_heads, self.head_dim).transpose(1, 2)
    k, v = self.kv(x).reshape(batch, length, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    x = flash_attention(q, k, v, attn_mask=attn_mask)                     # [B, H, latent_len, D]
    x = self.proj_drop(self.proj(x.transpose(1, 2).reshape(batch, self.latent_len, channels)))
    if self.mlp is not None:
        x = x + self.mlp(self.norm(x))
    if self.pool == "token":
        return x[:, 0]
    if self.pool == "avg":
        return x.mean(1)
    return x


def _convert_attention_pool(module: nn.Module) -> nn.Module:
    for name in ("latent", "latent_len", "num_heads", "head_dim", "pos_embed", "q", "kv", "q_norm", "k_norm",
                 "proj", "proj_drop", "norm", "mlp", "pool"):
        if not hasattr(module, name):
            raise Unsupported(f"this timm version's AttentionPoolLatent has no `{name}`")
    _check_linear(module.kv, "kv")
    _check_head_dim(module.head_dim)
    if module.pool not in ("token", "avg", "", None):
        raise Unsupported(f"pool type {module.pool!r}")
    cls = type(module)
    return clone_as(module, fast_subclass(cls, _attention_pool_forward, f"Fast{cls.__name__}"))


register_rule(PatchRule(family="attention", name="timm AttentionPoolLatent (MAP head) -> flash attention",
                        match=_matcher(ATTENTION_POOL), convert=_convert_attention_pool))


# ----------------------------------------------------------------------------------------------
# Mlp: fc1 -> act -> drop1 -> norm (Identity) -> fc2 -> drop2
# ----------------------------------------------------------------------------------------------

def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    if _dropout_active(self, self.drop1):
        return _original_forward(self)(self, x)
    return self.drop2(fused_mlp(x, self.fc1, self.fc2, self._clipfast_activation))


def _convert_mlp(module: nn.Module) -> nn.Module:
    if type(getattr(module, "norm", nn.Identity())) is not nn.Identity:
        raise Unsupported("a norm between the activation and fc2 is not in the fused MLP")
    mlp_rules._plain_linear(module.fc1, "fc1")
    mlp_rules._plain_linear(module.fc2, "fc2")
    _check_dropout(module.drop1, "drop1")
    _check_dropout(module.drop2, "drop2")
    activation = mlp_rules._activation(module.act, "act")
    cls = type(module)
    new = clone_as(module, fast_subclass(cls, _mlp_forward, f"Fused{cls.__name__}"))
    new._clipfast_activation = activation
    return new


register_rule(PatchRule(family="mlp", name="timm Mlp (fc1, GELU / tanh-GELU, fc2) -> fused MLP", match=_matcher(MLP),
                        convert=_convert_mlp))


# ----------------------------------------------------------------------------------------------
# PatchEmbed: conv (+ bias) -> flatten -> (norm)
# ----------------------------------------------------------------------------------------------

def _patch_embed_forward(self, x: torch.Tensor) -> torch.Tensor:
    conv = self.proj
    size_ok = isinstance(x, torch.Tensor) and (self.img_size is None or not self.strict_img_size
                                               or tuple(x.shape[-2:]) == tuple(self.img_size))
    if not size_ok or not patch_rules._fusable(x, conv, None):
        return _original_forward(self)(self, x)  # raises for sizes timm rejects, as before
    norm = self.norm
    ln_kwargs = None if type(norm) is nn.Identity else patch_rules._fusable_ln(norm, x)
    tokens = patch_embed(x, conv.weight, conv_bias=conv.bias, **(ln_kwargs or {}))
    return tokens if ln_kwargs is not None or type(norm) is nn.Identity else norm(tokens)


def _convert_patch_embed(module: nn.Module) -> nn.Module:
    patch_rules._patch_size(module.proj)
    if not getattr(module, "flatten", False):
        raise Unsupported("output is not flattened to tokens (output_fmt / flatten=False)")
    if getattr(module, "dynamic_img_pad", False):
        raise Unsupported("dynamic_img_pad pads images to the patch size")
    cls = type(module)
    return clone_as(module, fast_subclass(cls, _patch_embed_forward, f"Fast{cls.__name__}"))


register_rule(PatchRule(family="patch_embed", name="timm PatchEmbed -> fused patch embedding (conv bias)",
                        match=_matcher(PATCH_EMBED), convert=_convert_patch_embed))
