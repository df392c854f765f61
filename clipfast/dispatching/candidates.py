"""The implementations the dispatcher chooses between, per op, with each op's shape key.

Every op lists clipfast's own path first (``"clipfast"``: the op's ``kernel_<op>`` in ``clipfast.ops``) and
then the PyTorch implementations a user would otherwise run; the one named ``"torch"`` is what
``dispatch("torch")`` runs. Candidates take the op's canonical arguments (what ``<op>_args`` in
``clipfast.ops`` returns), listed at each spec; where PyTorch code runs a formula, the candidate is the op's
one eager reference (``reference_<op>``).

- ``layer_norm`` / ``add_layer_norm``: ``F.layer_norm`` (after ``x + residual``).
- ``flash_attention``: ``F.scaled_dot_product_attention`` with PyTorch's own backend choice (``"torch"``) and
  each CUDA backend forced through ``torch.nn.attention.sdpa_kernel`` (``"sdpa_flash"``, ``"sdpa_cudnn"``,
  ``"sdpa_efficient"``); masks clipfast accepts beyond SDPA's forms (a [B, Lk] key-padding mask, a mask
  combined with ``is_causal``) are handed over in a form SDPA takes. Rows whose keys are all masked give 0
  in clipfast and NaN in some SDPA backends; such a candidate is dropped when the tuning call shows it.
- ``flash_attention_varlen``: the packed sequences scattered into a padded batch for SDPA with a key-padding
  (and causal) mask, then gathered back (``"torch"``; no host synchronization).
- ``mlp``: the eager composition ``F.linear -> activation -> F.linear`` (``"torch"``) and a hybrid
  (``"hybrid"``: cuBLAS ``F.linear`` GEMMs around clipfast's fused activation kernel).
- ``quick_gelu``: ``x * torch.sigmoid(1.702 * x)``.
- ``patch_embed``: ``conv2d -> flatten -> cat(class) -> + positional`` (and ``F.layer_norm`` for ln_pre).
- ``clip_loss`` / ``siglip_loss``: the eager formula, which builds the N x M logits, offered only while they
  stay under ``EAGER_LOSS_MAX_LOGITS`` elements (``CLIPFAST_EAGER_LOSS_MAX_LOGITS``); above it the fused
  loss is the only choice in ``auto`` (``torch`` mode still runs the formula, as asked). Beside clipfast's
  default (its backward on the feature-chunk width with the fewest GEMM passes, 512 for 16-aligned widths
  above 256), ``"clipfast_chunk256"`` runs the backward on 256-wide chunks with a twice-wider column tile:
  more passes, but each re-reads the row operand half as often (CUDA only).

To add a candidate: see CONTRIBUTING.md ("Adding a dispatch candidate").
"""
from __future__ import annotations

import functools
import os

import torch

from clipfast.ops.attention import kernel_attention, reference_attention
from clipfast.ops.attention_varlen import kernel_attention_varlen, reference_attention_varlen
from clipfast.ops.contrastive_loss import kernel_loss, reference_loss
from clipfast.ops.layer_norm import (kernel_add_layer_norm, kernel_layer_norm, reference_add_layer_norm,
                                     reference_layer_norm)
from clipfast.ops.mlp import activation_fwd, kernel_mlp, kernel_quick_gelu, reference_mlp, reference_quick_gelu
from clipfast.ops.patch_embed import kernel_patch_embed, reference_patch_embed

from .modes import KERNEL
from .specs import Candidate, OpSpec, bucket, register

EAGER_LOSS_MAX_LOGITS = int(os.environ.get("CLIPFAST_EAGER_LOSS_MAX_LOGITS", str(1 << 24)))


def _spec(op, shape_key, kernel_fn, torch_fn, *others, eligible=None) -> OpSpec:
    return register(OpSpec(op, shape_key, [Candidate(KERNEL, None), Candidate("torch", torch_fn), *others], "torch",
                           kernel_fn, eligible))


# ----------------------------------------------------------------------------------------------
# LayerNorm: (x, weight, bias, eps) and (x, residual, weight, bias, eps).
# ----------------------------------------------------------------------------------------------

def _ln_key(x, *rest):
    weight = rest[-3]
    return bucket(x.numel() // max(x.shape[-1], 1)), x.shape[-1], weight is not None and weight.dtype != x.dtype


_spec("layer_norm", _ln_key, kernel_layer_norm, reference_layer_norm)
_spec("add_layer_norm", _ln_key, kernel_add_layer_norm, reference_add_layer_norm)


# ----------------------------------------------------------------------------------------------
# Attention: (q, k, v, attn_mask, is_causal, scale), as flash_attention takes them.
# ----------------------------------------------------------------------------------------------

def _sdpa_backend(backend_name: str):
    def run(q, k, v, attn_mask, is_causal, scale):
        if torch.compiler.is_compiling():  # traced as PyTorch's own backend choice
            return reference_attention(q, k, v, attn_mask, is_causal, scale)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return reference_attention(q, k, v, attn_mask, is_causal, scale)
    run.__name__ = f"sdpa_{backend_name.lower()}"
    return run


def _attention_key(q, k, v, attn_mask, is_causal, scale):
    mask = None
    if attn_mask is not None:  # which dims the mask varies along, and its kind
        mask = (attn_mask.dim(), tuple(s > 1 for s in attn_mask.shape), attn_mask.dtype == torch.bool)
    lead = q.shape[:-2]
    return (bucket(lead[0]) if len(lead) == 2 else 1, lead[-1], bucket(q.shape[-2]), bucket(k.shape[-2]),
            q.shape[-1], bool(is_causal), mask)


_spec("flash_attention", _attention_key, kernel_attention, reference_attention,
      Candidate("sdpa_flash", _sdpa_backend("FLASH_ATTENTION"), cuda_only=True),
      Candidate("sdpa_cudnn", _sdpa_backend("CUDNN_ATTENTION"), cuda_only=True),
      Candidate("sdpa_efficient", _sdpa_backend("EFFICIENT_ATTENTION"), cuda_only=True))


# ----------------------------------------------------------------------------------------------
# Packed (varlen) attention: (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal,
# scale), the sizes as ints and the scale resolved.
# ----------------------------------------------------------------------------------------------

def _attention_varlen_key(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale):
    return (bucket(q.shape[0]), bucket(k.shape[0]), bucket(cu_seqlens_q.shape[0] - 1), bucket(max_seqlen_q),
            bucket(max_seqlen_k), q.shape[1], q.shape[2], bool(is_causal))


_spec("flash_attention_varlen", _attention_varlen_key, kernel_attention_varlen,
      reference_attention_varlen)


# ----------------------------------------------------------------------------------------------
# MLP: (x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual), the parameters in x's dtype.
# ----------------------------------------------------------------------------------------------

def _mlp_key(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual):
    return (bucket(x.numel() // max(x.shape[-1], 1)), x.shape[-1], fc_weight.shape[0], proj_weight.shape[0],
            activation, residual is not None)


_spec("mlp", _mlp_key, kernel_mlp, reference_mlp,
      Candidate("hybrid", functools.partial(reference_mlp, act=activation_fwd)))
_spec("quick_gelu", lambda x: (bucket(x.numel()),), kernel_quick_gelu, reference_quick_gelu)


# ----------------------------------------------------------------------------------------------
# Patch embedding: (pixels, conv_weight, conv_bias, class_embedding, positional_embedding [N, width], scale,
# shift, ln_weight, ln_bias, ln_eps), scale/shift the folded normalization (or None).
# ----------------------------------------------------------------------------------------------

def _patch_embed_key(pixels, weight, conv_bias, class_embedding, positional_embedding, scale, *rest):
    ln_weight, ln_bias = rest[1], rest[2]
    return (bucket(pixels.shape[0]), *pixels.shape[1:], weight.shape[0], weight.shape[-1], weight.dtype,
            conv_bias is not None, class_embedding is not None, positional_embedding is not None, scale is not None,
            ln_weight is not None or ln_bias is not None)


_spec("patch_embed", _patch_embed_key, kernel_patch_embed, reference_patch_embed)


# ----------------------------------------------------------------------------------------------
# Contrastive losses: (a, b, scale, bias, kind, offset, both_directions, normalize), the scale already
# exponentiated.
# ----------------------------------------------------------------------------------------------

def _loss_key(a, b, scale, bias, kind, offset, both_directions, normalize):
    return bucket(a.shape[0]), bucket(b.shape[0]), a.shape[1], both_directions, normalize


def _eager_loss_fits(name, a, b, *rest) -> bool:
    return name != "torch" or a.shape[0] * b.shape[0] <= EAGER_LOSS_MAX_LOGITS


for _op in ("clip_loss", "siglip_loss"):
    _spec(_op, _loss_key, kernel_loss, reference_loss,
          Candidate("clipfast_chunk256", functools.partial(kernel_loss, grad_block_d=256),
                    cuda_only=True),
          eligible=_eager_loss_fits)
