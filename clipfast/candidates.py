"""The implementations ``clipfast.dispatcher`` chooses between, per op, with each op's shape key.

Every op lists clipfast's own path first (``"clipfast"``, run inline by the op) and then the PyTorch
implementations a user would otherwise run; the one named ``"torch"`` is what ``dispatch("torch")`` runs.

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

The hook arguments of each op (what ``route`` and every candidate receive) are listed at its spec. To add
a candidate: see CONTRIBUTING.md ("Adding a dispatch candidate").
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import dispatcher
from .dispatcher import KERNEL, Candidate, OpSpec, bucket, register

EAGER_LOSS_MAX_LOGITS = int(os.environ.get("CLIPFAST_EAGER_LOSS_MAX_LOGITS", str(1 << 24)))


def _forced_kernel(fn):
    """clipfast's path of a public function, whatever the mode (for timing it)."""
    def run(*args):
        with dispatcher.dispatch("kernel"):
            return fn(*args)
    return run


def _same_dtype(t, like):
    return t.to(like.dtype) if t is not None and t.dtype != like.dtype else t


# ----------------------------------------------------------------------------------------------
# LayerNorm. Hook arguments: (x, weight, bias, eps) and (x, residual, weight, bias, eps).
# ----------------------------------------------------------------------------------------------

def torch_layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), _same_dtype(weight, x), _same_dtype(bias, x), eps)


def torch_add_layer_norm(x, residual, weight, bias, eps):
    h = x + residual
    return h, torch_layer_norm(h, weight, bias, eps)


def _ln_key(x, *rest):
    weight = rest[-3]
    return bucket(x.numel() // max(x.shape[-1], 1)), x.shape[-1], weight is not None and weight.dtype != x.dtype


def _layer_norm_specs():
    from .ops.layer_norm import add_layer_norm, layer_norm

    register(OpSpec("layer_norm", _ln_key, [Candidate(KERNEL, None), Candidate("torch", torch_layer_norm)],
                    "torch", _forced_kernel(layer_norm)))
    register(OpSpec("add_layer_norm", _ln_key, [Candidate(KERNEL, None), Candidate("torch", torch_add_layer_norm)],
                    "torch", _forced_kernel(add_layer_norm)))


# ----------------------------------------------------------------------------------------------
# Attention. Hook arguments: (q, k, v, attn_mask, is_causal, scale), as flash_attention takes them.
# ----------------------------------------------------------------------------------------------

def sdpa_form(q, k, attn_mask, is_causal):
    """clipfast's mask conventions in a form SDPA accepts: ``(attn_mask, is_causal)``."""
    if attn_mask is None:
        return None, is_causal
    lq, lk = q.shape[-2], k.shape[-2]
    if attn_mask.dim() == 2 and attn_mask.shape[0] not in (1, lq) and q.dim() == 4 \
            and tuple(attn_mask.shape) == (q.shape[0], lk):
        attn_mask = attn_mask[:, None, None, :]  # [B, Lk] key padding
    if is_causal:
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        attn_mask = attn_mask & keep if attn_mask.dtype == torch.bool \
            else attn_mask.masked_fill(~keep, float("-inf"))
    if attn_mask.dtype not in (torch.bool, q.dtype):
        attn_mask = attn_mask.to(q.dtype)
    return attn_mask, False


def torch_attention(q, k, v, attn_mask, is_causal, scale):
    attn_mask, is_causal = sdpa_form(q, k, attn_mask, is_causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)


def _sdpa_backend(backend_name: str):
    def run(q, k, v, attn_mask, is_causal, scale):
        if torch.compiler.is_compiling():  # traced as PyTorch's own backend choice
            return torch_attention(q, k, v, attn_mask, is_causal, scale)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return torch_attention(q, k, v, attn_mask, is_causal, scale)
    return run


def _attention_key(q, k, v, attn_mask, is_causal, scale):
    mask = None
    if attn_mask is not None:  # which dims the mask varies along, and its kind
        mask = (attn_mask.dim(), tuple(s > 1 for s in attn_mask.shape), attn_mask.dtype == torch.bool)
    lead = q.shape[:-2]
    return (bucket(lead[0]) if len(lead) == 2 else 1, lead[-1], bucket(q.shape[-2]), bucket(k.shape[-2]),
            q.shape[-1], bool(is_causal), mask)


def _attention_spec():
    from .ops.attention import flash_attention

    register(OpSpec("flash_attention", _attention_key, [
        Candidate(KERNEL, None), Candidate("torch", torch_attention),
        Candidate("sdpa_flash", _sdpa_backend("FLASH_ATTENTION"), cuda_only=True),
        Candidate("sdpa_cudnn", _sdpa_backend("CUDNN_ATTENTION"), cuda_only=True),
        Candidate("sdpa_efficient", _sdpa_backend("EFFICIENT_ATTENTION"), cuda_only=True),
    ], "torch", _forced_kernel(flash_attention)))


# ----------------------------------------------------------------------------------------------
# Packed (varlen) attention. Hook arguments: (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
# max_seqlen_k, is_causal, scale), as flash_attention_varlen takes them.
# ----------------------------------------------------------------------------------------------

def _token_positions(cu_seqlens: torch.Tensor, total: int):
    """(sequence index, position in its sequence) of every packed token, computed on the device."""
    token = torch.arange(total, device=cu_seqlens.device)
    offsets = cu_seqlens.long()
    seq = torch.searchsorted(offsets[1:], token, right=True)
    return seq, token - offsets[seq]


def torch_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale):
    """What PyTorch users write for packed sequences: scatter them into a padded batch, run SDPA with a
    key-padding (+ causal, top-left) mask, gather the real rows back. No host synchronization. Padded query
    rows see every key (their results are dropped) so that no row is fully masked."""
    batch = cu_seqlens_q.shape[0] - 1
    h = q.shape[1]
    if batch == 0 or q.shape[0] == 0:
        return q.new_empty((q.shape[0], h, v.shape[2]))
    sq, pq = _token_positions(cu_seqlens_q, q.shape[0])
    sk, pk = _token_positions(cu_seqlens_k, k.shape[0])

    def padded(t, seq, pos, length):
        return t.new_zeros((batch, length, h, t.shape[2])).index_put((seq, pos), t).transpose(1, 2)

    qp, kp, vp = padded(q, sq, pq, max_seqlen_q), padded(k, sk, pk, max_seqlen_k), padded(v, sk, pk, max_seqlen_k)
    keys = torch.arange(max_seqlen_k, device=q.device)
    rows = torch.arange(max_seqlen_q, device=q.device)
    keep = (keys < (cu_seqlens_k[1:] - cu_seqlens_k[:-1])[:, None])[:, None, :]           # [B, 1, Lk]
    if is_causal:
        keep = keep & (keys[None, :] <= rows[:, None])                                      # [B, Lq, Lk]
    padded_row = (rows >= (cu_seqlens_q[1:] - cu_seqlens_q[:-1])[:, None])[:, :, None]      # [B, Lq, 1]
    mask = (keep | padded_row)[:, None]                                                     # [B, 1, Lq, Lk]
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)[sq, pq]


def _attention_varlen_key(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale):
    return (bucket(q.shape[0]), bucket(k.shape[0]), bucket(cu_seqlens_q.shape[0] - 1), bucket(max_seqlen_q),
            bucket(max_seqlen_k), q.shape[1], q.shape[2], bool(is_causal))


def _attention_varlen_spec():
    from .ops.attention_varlen import flash_attention_varlen

    register(OpSpec("flash_attention_varlen", _attention_varlen_key,
                    [Candidate(KERNEL, None), Candidate("torch", torch_attention_varlen)],
                    "torch", _forced_kernel(flash_attention_varlen)))


# ----------------------------------------------------------------------------------------------
# MLP. Hook arguments: (x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual), the
# parameters already in x's dtype.
# ----------------------------------------------------------------------------------------------

def plain_activation(z, activation):
    """The activation as a user writes it (QuickGELU's formula, ``F.gelu``)."""
    if activation == "quick_gelu":
        return z * torch.sigmoid(1.702 * z)
    return F.gelu(z, approximate="tanh" if activation == "gelu_tanh" else "none")


def _mlp_with(act):
    def run(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual):
        y = F.linear(act(F.linear(x, fc_weight, fc_bias), activation), proj_weight, proj_bias)
        return y + residual if residual is not None else y
    return run


def _fused_activation(z, activation):
    from .ops.mlp import activation_fwd

    return activation_fwd(z, activation)


def _mlp_key(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual):
    return (bucket(x.numel() // max(x.shape[-1], 1)), x.shape[-1], fc_weight.shape[0], proj_weight.shape[0],
            activation, residual is not None)


def _mlp_specs():
    from .ops.mlp import mlp, quick_gelu

    def kernel_mlp(x, w1, b1, w2, b2, activation, residual):
        return mlp(x, w1, b1, w2, b2, activation, residual=residual)

    register(OpSpec("mlp", _mlp_key, [Candidate(KERNEL, None), Candidate("torch", _mlp_with(plain_activation)),
                                      Candidate("hybrid", _mlp_with(_fused_activation))],
                    "torch", _forced_kernel(kernel_mlp)))
    register(OpSpec("quick_gelu", lambda x: (bucket(x.numel()),),
                    [Candidate(KERNEL, None), Candidate("torch", lambda x: plain_activation(x, "quick_gelu"))],
                    "torch", _forced_kernel(quick_gelu)))


# ----------------------------------------------------------------------------------------------
# Patch embedding. Hook arguments: (pixels, conv_weight, class_embedding, positional_embedding [N, width],
# scale, shift, ln_weight, ln_bias, ln_eps), scale/shift the folded normalization (or None).
# ----------------------------------------------------------------------------------------------

def torch_patch_embed(pixels, weight, conv_bias, class_embedding, positional_embedding, scale, shift, ln_weight,
                      ln_bias, ln_eps):
    if scale is not None:
        pixels = pixels.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    bias = conv_bias.to(weight.dtype) if conv_bias is not None else None
    x = F.conv2d(pixels.to(weight.dtype), weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    if class_embedding is not None:
        x = torch.cat([class_embedding.to(x.dtype).expand(x.shape[0], 1, x.shape[-1]), x], dim=1)
    if positional_embedding is not None:
        x = x + positional_embedding.to(x.dtype)
    if ln_weight is None and ln_bias is None:
        return x
    return torch_layer_norm(x, ln_weight, ln_bias, ln_eps)


def _patch_embed_key(pixels, weight, conv_bias, class_embedding, positional_embedding, scale, *rest):
    ln_weight, ln_bias = rest[1], rest[2]
    return (bucket(pixels.shape[0]), *pixels.shape[1:], weight.shape[0], weight.shape[-1], weight.dtype,
            conv_bias is not None, class_embedding is not None, positional_embedding is not None, scale is not None,
            ln_weight is not None or ln_bias is not None)


def _patch_embed_spec():
    from .ops.layer_norm import layer_norm
    from .ops.patch_embed import patch_embed_fwd

    def kernel_patch_embed(pixels, weight, conv_bias, cls, pos, scale, shift, ln_weight, ln_bias, ln_eps):
        tokens = patch_embed_fwd(pixels, weight, conv_bias, cls, pos, scale, shift)
        if ln_weight is None and ln_bias is None:
            return tokens
        return layer_norm(tokens, ln_weight, ln_bias, float(ln_eps))

    register(OpSpec("patch_embed", _patch_embed_key, [Candidate(KERNEL, None), Candidate("torch", torch_patch_embed)],
                    "torch", _forced_kernel(kernel_patch_embed)))


# ----------------------------------------------------------------------------------------------
# Contrastive losses. Hook arguments: (a, b, scale, bias, kind, offset, both_directions, normalize), the
# scale already exponentiated.
# ----------------------------------------------------------------------------------------------

def torch_loss(a, b, scale, bias, kind, offset, both_directions, normalize):
    from .ops.contrastive_loss import eager_loss

    return eager_loss(a, b, scale, bias, kind, offset, both_directions, normalize).float()


def _loss_key(a, b, scale, bias, kind, offset, both_directions, normalize):
    return bucket(a.shape[0]), bucket(b.shape[0]), a.shape[1], both_directions, normalize


def _eager_loss_fits(name, a, b, *rest) -> bool:
    return name != "torch" or a.shape[0] * b.shape[0] <= EAGER_LOSS_MAX_LOGITS


def _fused_loss_with_chunk(block_d: int):
    def run(*args):
        from .ops.contrastive_loss import fused_loss

        return fused_loss(*args, grad_block_d=block_d)
    return run


def _loss_specs():
    from .ops.contrastive_loss import _run

    for op in ("clip_loss", "siglip_loss"):
        register(OpSpec(op, _loss_key, [Candidate(KERNEL, None), Candidate("torch", torch_loss),
                                        Candidate("clipfast_chunk256", _fused_loss_with_chunk(256), cuda_only=True)],
                        "torch", _forced_kernel(_run), eligible=_eager_loss_fits))


_layer_norm_specs()
_attention_spec()
_attention_varlen_spec()
_mlp_specs()
_patch_embed_spec()
_loss_specs()
