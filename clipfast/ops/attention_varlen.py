"""Variable-length (packed) flash attention as torch custom ops: ``clipfast.flash_attention_varlen``.

Sequences of different lengths are packed along the token axis (q [total_q, H, D], k/v [total_k, H, D]) and
described by int32 cumulative offsets ``cu_seqlens`` [batch + 1] (FlashAttention's varlen convention).
Each sequence attends only to its own keys; ``is_causal`` is causal within each sequence, top-left aligned
as SDPA's (query i sees keys j <= i of its sequence). No padding is stored or computed.

Saved for backward: q, k, v, the output and fp32 row statistics [H, 2, total_q] (8 bytes per query token
and head); the probabilities are recomputed. The backward is deterministic (no atomics).

Argument checks read ``cu_seqlens`` on the host (one device sync, skipped while ``torch.compile`` traces):
offsets must start at 0, end at the packed length and grow strictly (an empty sequence is an error), and
``max_seqlen`` must be at least the longest sequence. Head dims above 256, a value head dim different from
the query's and sequences too long for 32-bit offsets inside one sequence run the eager reference after a
one-time warning.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from clipfast.kernels import attention_varlen as kernel
from clipfast.kernels import runtime

from .._validate import check_same_device, check_tensor, host_sync_forbidden, warn_once
from ._custom_op import custom_op
from .attention import _eager_bwd as _dense_eager_bwd
from .attention import _eager_fwd as _dense_eager_fwd

OP = "flash_attention_varlen"


# ----------------------------------------------------------------------------------------------
# Eager reference: what PyTorch code writes for packed sequences (SDPA on a padded batch). Also the
# dispatcher's ``torch`` candidate and the fallback for shapes the kernels do not take.
# ----------------------------------------------------------------------------------------------

def _token_positions(cu_seqlens: Tensor, total: int):
    """(sequence index, position in its sequence) of every packed token, computed on the device."""
    token = torch.arange(total, device=cu_seqlens.device)
    offsets = cu_seqlens.long()
    seq = torch.searchsorted(offsets[1:], token, right=True)
    return seq, token - offsets[seq]


def reference_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal,
                               scale) -> Tensor:
    """Scatter the packed sequences into a padded batch, run SDPA with a key-padding (+ causal, top-left)
    mask, gather the real rows back. No host synchronization. Padded query rows see every key (their results
    are dropped) so that no row is fully masked."""
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
    out = torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)[sq, pq]


# ----------------------------------------------------------------------------------------------
# The custom ops' CPU path without the interpreter: the dense eager math per sequence, with the kernels'
# saved statistics layout.
# ----------------------------------------------------------------------------------------------

def _sequences(cu_seqlens_q, cu_seqlens_k):
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(cq[i], cq[i + 1], ck[i], ck[i + 1]) for i in range(len(cq) - 1)]


def _dense(t, start, end):
    """[L, H, D] slice of packed tokens as a [1, H, L, D] batch."""
    return t[start:end].transpose(0, 1).unsqueeze(0)


def _eager_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, is_causal, scale):
    total_q, h, d = q.shape
    o = q.new_empty((total_q, h, d))
    lse = torch.empty((h, 2, total_q), dtype=torch.float32, device=q.device)
    for qs, qe, ks, ke in _sequences(cu_seqlens_q, cu_seqlens_k):
        ob, stats = _dense_eager_fwd(_dense(q, qs, qe), _dense(k, ks, ke), _dense(v, ks, ke), None, is_causal, scale)
        o[qs:qe] = ob[0].transpose(0, 1)
        lse[:, :, qs:qe] = stats
    return o, lse


def _eager_bwd(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, is_causal, scale):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for qs, qe, ks, ke in _sequences(cu_seqlens_q, cu_seqlens_k):
        grads = _dense_eager_bwd(_dense(do, qs, qe), _dense(q, qs, qe), _dense(k, ks, ke), _dense(v, ks, ke), None,
                                 _dense(o, qs, qe), lse[:, :, qs:qe], is_causal, scale)
        for out, g, s, e in zip((dq, dk, dv), grads, (qs, ks, ks), (qe, ke, ke)):
            out[s:e] = g[0].transpose(0, 1)
    return dq, dk, dv


def _use_kernel(q, k, max_seqlen_q, max_seqlen_k) -> bool:
    if not runtime.uses_triton(q):
        return False
    if not (kernel.fits_32bit_sequence_offsets(q, max_seqlen_q) and kernel.fits_32bit_sequence_offsets(k, max_seqlen_k)):
        warn_once("attention_varlen_long", f"{OP}: a sequence too long for 32-bit offsets runs in eager PyTorch")
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------

@custom_op("clipfast::flash_attention_varlen_fwd")
def flash_attention_varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                               max_seqlen_q: int, max_seqlen_k: int, is_causal: bool,
                               scale: float) -> tuple[Tensor, Tensor]:
    """Returns (out [total_q, H, D] contiguous, base-2 row statistics fp32 [H, 2, total_q])."""
    if _use_kernel(q, k, max_seqlen_q, max_seqlen_k):
        return kernel.varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale)
    return _eager_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, is_causal, scale)


@flash_attention_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale):
    total_q, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((h, 2, total_q), dtype=torch.float32)


@custom_op("clipfast::flash_attention_varlen_bwd")
def flash_attention_varlen_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                               cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                               is_causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv), contiguous, in the inputs' shapes."""
    if _use_kernel(q, k, max_seqlen_q, max_seqlen_k):
        return kernel.varlen_bwd(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 is_causal, scale)
    return _eager_bwd(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, is_causal, scale)


@flash_attention_varlen_bwd.register_fake
def _(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, is_causal, scale = inputs
    out, lse = output
    ctx.args = (max_q, max_k, is_causal, scale)
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = flash_attention_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


flash_attention_varlen_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------

def _check_offsets(name: str, cu: Tensor, total: int, max_seqlen: int, max_name: str) -> None:
    """Offsets start at 0, end at ``total``, grow strictly; ``max_seqlen`` covers the longest sequence."""
    offsets = cu.tolist()
    if offsets[0] != 0 or offsets[-1] != total:
        raise ValueError(f"{OP}: `{name}` must start at 0 and end at the packed length {total}, "
                         f"got {offsets[0]} .. {offsets[-1]}")
    lengths = [b - a for a, b in zip(offsets, offsets[1:])]
    bad = [i for i, n in enumerate(lengths) if n <= 0]
    if bad:
        raise ValueError(f"{OP}: `{name}` describes empty (or negative-length) sequences at batch index "
                         f"{bad[:8]}; every sequence needs at least one token")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{OP}: `{max_name}` = {max_seqlen} is less than the longest sequence ({max(lengths)})")


def _check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(OP, name, t, ndim=3)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{OP}: `q`, `k` and `v` must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[:2] != v.shape[:2] or q.shape[1] != k.shape[1]:
        raise ValueError(f"{OP}: `q` [total_q, H, D], `k` and `v` [total_k, H, D] must share H, and `k`, `v` "
                         f"their length; got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{OP}: `q` and `k` must have the same head dim, got {q.shape[2]} and {k.shape[2]}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(OP, name, cu, dtypes=(torch.int32,), ndim=1)
        if cu.shape[0] < 1:
            raise ValueError(f"{OP}: `{name}` must have batch + 1 >= 1 entries, got none")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"{OP}: `cu_seqlens_q` and `cu_seqlens_k` must describe the same batch, got "
                         f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]} entries")
    check_same_device(OP, q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int):
            raise TypeError(f"{OP}: `{name}` must be an int, got {type(m).__name__}")
        if m < 0:
            raise ValueError(f"{OP}: `{name}` must be >= 0, got {m}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"{OP}: `scale` must be a float or None, got {type(scale).__name__}")
    if not host_sync_forbidden():
        _check_offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
        _check_offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")


def _eager_reason(q, v) -> Optional[str]:
    if q.shape[2] > kernel.MAX_HEAD_DIM:
        return f"head dim {q.shape[2]} > {kernel.MAX_HEAD_DIM}"
    if v.shape[2] != q.shape[2]:
        return "a value head dim different from the query's"
    return None


def flash_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, is_causal: bool = False,
                           scale: Optional[float] = None) -> Tensor:
    """``softmax(q k^T * scale) v`` within each packed sequence.

    q [total_q, H, D], k/v [total_k, H, D]; ``cu_seqlens_q`` / ``cu_seqlens_k`` int32 [batch + 1] cumulative
    offsets (sequence b is tokens ``cu[b] .. cu[b + 1] - 1``), every sequence at least one token long;
    ``max_seqlen_*`` at least the longest sequence (it sizes the grid). ``is_causal``: query i of a
    sequence sees keys j <= i of the same sequence. ``scale`` defaults to ``1 / sqrt(D)``. Returns
    [total_q, H, D].
    """
    return kernel_attention_varlen(*attention_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                          max_seqlen_k, is_causal, scale))


def attention_varlen_args(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                          max_seqlen_q: int, max_seqlen_k: int, is_causal: bool = False,
                          scale: Optional[float] = None) -> tuple:
    """The canonical arguments: the public ones with the sizes as ints and the scale resolved."""
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)
    d = q.shape[2]
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(d) if d > 0 else 1.0
    return q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), bool(is_causal), scale


def kernel_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal,
                            scale) -> Tensor:
    """clipfast's path: the varlen op, or the reference (once said) for what the kernels do not take."""
    reason = _eager_reason(q, v)
    if reason is not None:
        warn_once(f"attention_varlen_eager_{reason}", f"{OP} with {reason} runs PyTorch SDPA on a padded batch")
        return reference_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          is_causal, scale)
    return flash_attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal,
                                      scale)[0]
