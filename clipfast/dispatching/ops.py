"""The dispatched ops: the public functions of ``clipfast`` (and what ``clipfast.nn``, the patch rules and
text unpadding call). Each takes the pure op's signature and docstring (``clipfast.ops``), validates through
the op's ``<op>_args`` (which returns the canonical arguments), asks ``route`` what to run on them and runs
it: clipfast's path (``kernel_<op>``) or the chosen PyTorch candidate."""
from __future__ import annotations

import functools
from typing import Callable, Union

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


def _dispatched(op: Union[str, Callable[[tuple], str]], pure: Callable, args_of: Callable, kernel: Callable):
    """``pure`` behind the dispatcher: ``op`` names the op (or picks it from the canonical arguments)."""
    op_of = (lambda canonical: op) if isinstance(op, str) else op

    def dispatched(*args, **kwargs) -> Tensor:
        canonical = args_of(*args, **kwargs)
        chosen = route(op_of(canonical), canonical)  # None: clipfast's path
        return (kernel if chosen is None else chosen)(*canonical)

    functools.update_wrapper(dispatched, pure)
    dispatched.__module__ = __name__
    return dispatched


layer_norm = _dispatched("layer_norm", pure_layer_norm, layer_norm_args, kernel_layer_norm)
add_layer_norm = _dispatched("add_layer_norm", pure_add_layer_norm, add_layer_norm_args, kernel_add_layer_norm)
flash_attention = _dispatched("flash_attention", pure_attention.flash_attention, pure_attention.attention_args,
                              pure_attention.kernel_attention)
flash_attention_varlen = _dispatched("flash_attention_varlen", pure_varlen.flash_attention_varlen,
                                     pure_varlen.attention_varlen_args, pure_varlen.kernel_attention_varlen)
quick_gelu = _dispatched("quick_gelu", pure_quick_gelu, quick_gelu_args, kernel_quick_gelu)
mlp = _dispatched("mlp", pure_mlp, mlp_args, kernel_mlp)
patch_embed = _dispatched("patch_embed", pure_patch_embed, patch_embed_args, kernel_patch_embed)


def _loss_op(canonical: tuple) -> str:
    """The contrastive losses share one kernel path; the dispatcher keeps the two kinds apart."""
    return "siglip_loss" if canonical[4] == pure_loss.SIGLIP else "clip_loss"


clip_loss = _dispatched(_loss_op, pure_loss.clip_loss, pure_loss.clip_loss_args, pure_loss.kernel_loss)
siglip_loss = _dispatched(_loss_op, pure_loss.siglip_loss, pure_loss.siglip_loss_args, pure_loss.kernel_loss)
contrastive_cross_entropy = _dispatched(_loss_op, pure_loss.contrastive_cross_entropy,
                                        pure_loss.contrastive_cross_entropy_args, pure_loss.kernel_loss)
clip_loss_scaled = _dispatched(_loss_op, pure_loss.clip_loss_scaled, pure_loss.clip_loss_scaled_args,
                               pure_loss.kernel_loss)
siglip_loss_scaled = _dispatched(_loss_op, pure_loss.siglip_loss_scaled, pure_loss.siglip_loss_scaled_args,
                                 pure_loss.kernel_loss)
