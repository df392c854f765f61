"""The dispatched ops: the public functions of ``clipfast`` (and what ``clipfast.nn``, the patch rules and
text unpadding call). Each validates through the op's ``<op>_args`` (``clipfast.ops``), asks ``route`` what
to run on those canonical arguments and runs it: clipfast's path (``kernel_<op>``) or the chosen PyTorch
candidate. Signatures and semantics are the pure ops' in ``clipfast.ops`` (docstrings shared)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor

from clipfast.ops import attention as pure_attention
from clipfast.ops import attention_varlen as pure_varlen
from clipfast.ops import contrastive_loss as pure_loss
from clipfast.ops.layer_norm import (add_layer_norm_args, kernel_add_layer_norm, kernel_layer_norm,
                                     layer_norm_args)
from clipfast.ops.layer_norm import add_layer_norm as pure_add_layer_norm
from clipfast.ops.layer_norm import layer_norm as pure_layer_norm
from clipfast.ops.mlp import kernel_mlp, kernel_quick_gelu, mlp_args, quick_gelu_args
from clipfast.ops.mlp import mlp as pure_mlp
from clipfast.ops.mlp import quick_gelu as pure_quick_gelu
from clipfast.ops.patch_embed import kernel_patch_embed, patch_embed_args
from clipfast.ops.patch_embed import patch_embed as pure_patch_embed

from . import candidates  # noqa: F401  (registers every op's candidates)
from .tuner import route


def _same_doc(pure):
    def decorate(fn):
        fn.__doc__ = pure.__doc__
        return fn
    return decorate


@_same_doc(pure_layer_norm)
def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    args = layer_norm_args(x, weight, bias, eps)
    return (route("layer_norm", args) or kernel_layer_norm)(*args)


@_same_doc(pure_add_layer_norm)
def add_layer_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    args = add_layer_norm_args(x, residual, weight, bias, eps)
    return (route("add_layer_norm", args) or kernel_add_layer_norm)(*args)


@_same_doc(pure_attention.flash_attention)
def flash_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                    scale: Optional[float] = None) -> Tensor:
    args = pure_attention.attention_args(q, k, v, attn_mask, is_causal, scale)
    return (route("flash_attention", args) or pure_attention.kernel_attention)(*args)


@_same_doc(pure_varlen.flash_attention_varlen)
def flash_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, is_causal: bool = False,
                           scale: Optional[float] = None) -> Tensor:
    args = pure_varlen.attention_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal,
                                         scale)
    return (route("flash_attention_varlen", args) or pure_varlen.kernel_attention_varlen)(*args)


@_same_doc(pure_quick_gelu)
def quick_gelu(x: Tensor) -> Tensor:
    args = quick_gelu_args(x)
    return (route("quick_gelu", args) or kernel_quick_gelu)(*args)


@_same_doc(pure_mlp)
def mlp(x: Tensor, fc_weight: Tensor, fc_bias: Optional[Tensor], proj_weight: Tensor, proj_bias: Optional[Tensor],
        activation: str = "quick_gelu", *, residual: Optional[Tensor] = None) -> Tensor:
    args = mlp_args(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual=residual)
    return (route("mlp", args) or kernel_mlp)(*args)


@_same_doc(pure_patch_embed)
def patch_embed(pixels: Tensor, conv_weight: Tensor, class_embedding: Optional[Tensor] = None,
                positional_embedding: Optional[Tensor] = None, *, conv_bias: Optional[Tensor] = None,
                mean: Union[Sequence[float], Tensor, None] = None, std: Union[Sequence[float], Tensor, None] = None,
                ln_weight: Optional[Tensor] = None, ln_bias: Optional[Tensor] = None, ln_eps: float = 1e-5) -> Tensor:
    args = patch_embed_args(pixels, conv_weight, class_embedding, positional_embedding,
                                         conv_bias=conv_bias, mean=mean, std=std, ln_weight=ln_weight,
                                         ln_bias=ln_bias, ln_eps=ln_eps)
    return (route("patch_embed", args) or kernel_patch_embed)(*args)


def _contrastive(args: tuple) -> Tensor:
    op = "siglip_loss" if args[4] == pure_loss.SIGLIP else "clip_loss"
    return (route(op, args) or pure_loss.kernel_loss)(*args)


@_same_doc(pure_loss.clip_loss)
def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Union[Tensor, float],
              normalize: bool = True) -> Tensor:
    return _contrastive(pure_loss.clip_loss_args(image_features, text_features, logit_scale, normalize))


@_same_doc(pure_loss.siglip_loss)
def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Union[Tensor, float],
                logit_bias: Union[Tensor, float], normalize: bool = True, label_offset: int = 0) -> Tensor:
    return _contrastive(pure_loss.siglip_loss_args(image_features, text_features, logit_scale, logit_bias, normalize,
                                               label_offset))


@_same_doc(pure_loss.contrastive_cross_entropy)
def contrastive_cross_entropy(queries: Tensor, keys: Tensor, scale: Union[Tensor, float], label_offset: int = 0,
                              normalize: bool = False) -> Tensor:
    return _contrastive(pure_loss.contrastive_cross_entropy_args(queries, keys, scale, label_offset, normalize))


@_same_doc(pure_loss.clip_loss_scaled)
def clip_loss_scaled(image_features: Tensor, text_features: Tensor, scale: Union[Tensor, float],
                     normalize: bool = False) -> Tensor:
    return _contrastive(pure_loss.clip_loss_scaled_args(image_features, text_features, scale, normalize))


@_same_doc(pure_loss.siglip_loss_scaled)
def siglip_loss_scaled(image_features: Tensor, text_features: Tensor, scale: Union[Tensor, float],
                       bias: Union[Tensor, float], label_offset: int = 0, normalize: bool = False) -> Tensor:
    return _contrastive(pure_loss.siglip_loss_scaled_args(image_features, text_features, scale, bias, label_offset,
                                                      normalize))
