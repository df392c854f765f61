"""Flash attention as torch custom ops: ``clipfast.flash_attention`` (the signature and semantics of
``F.scaled_dot_product_attention`` without dropout) with Triton forward and backward.

Masks: ``is_causal`` (top-left aligned, as SDPA) and ``attn_mask`` run in the kernel. A boolean mask
(True = takes part) or an additive float mask is turned into a small fp32 additive bias of the mask's own
(unexpanded) shape; masks that vary only along the keys ([B, 1, 1, Lk], [1, Lk], or [B, Lk], see
``flash_attention``) are read as one vector per key block, other masks as tiles. Unlike SDPA, ``attn_mask``
and ``is_causal`` may be combined (causal text with padding).

Rows whose keys are all masked return 0 (SDPA returns NaN) and give zero gradients.

Cases the kernels do not take run the eager reference (``reference_attention``:
``F.scaled_dot_product_attention`` with the mask in a form SDPA takes) with a one-time warning: head dims
above 256, a value head dim different from the query's, and masks that require grad. The reference is also
the dispatcher's ``torch`` candidate. The custom ops' CPU path without the interpreter is not SDPA but the
kernels' own math in eager PyTorch (``_eager_fwd`` / ``_eager_bwd``): it must give what the kernels give
where SDPA differs (0 on rows whose keys are all masked) and the statistics the backward op reads.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from clipfast.kernels import attention as kernel
from clipfast.kernels import runtime

from .._validate import PLAIN_TENSOR_TYPES, check_same_device, check_tensor, plain_float_tensors_on, warn_once
from ._custom_op import custom_op

OP = "flash_attention"


# ----------------------------------------------------------------------------------------------
# Eager reference: SDPA, with clipfast's mask conventions turned into a form SDPA accepts
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


def reference_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                        scale: Optional[float]) -> Tensor:
    attn_mask, is_causal = sdpa_form(q, k, attn_mask, is_causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)


# ----------------------------------------------------------------------------------------------
# The custom ops' CPU path without the interpreter: the kernels' math and saved lse, in eager PyTorch.
# ----------------------------------------------------------------------------------------------

def _eager_scores(q, k, bias, is_causal, scale):
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    if is_causal:
        lq, lk = s.shape[-2:]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return s


def _eager_fwd(q, k, v, bias, is_causal, scale):
    b, h, lq, d = q.shape
    s = _eager_scores(q, k, bias, is_causal, scale) * kernel.LOG2E
    row_max = s.amax(-1, keepdim=True)
    live = torch.isfinite(row_max)
    row_max = torch.where(live, row_max, torch.full_like(row_max, float("inf")))  # p = 0 on fully masked rows
    p = torch.exp2(s - row_max)
    row_sum = p.sum(-1, keepdim=True)
    o = torch.matmul(p / torch.where(live, row_sum, 1.0), v.float())
    stats = torch.cat([row_max, torch.log2(torch.where(live, row_sum, 1.0))], -1)  # [B, H, Lq, 2]
    return _as_blhd(o, q.dtype), stats.reshape(b * h, lq, 2).transpose(1, 2).contiguous()


def _eager_bwd(do, q, k, v, bias, o, lse, is_causal, scale):
    b, h, lq, d = q.shape
    s = _eager_scores(q, k, bias, is_causal, scale) * kernel.LOG2E
    row_max, log2_sum = (t.reshape(b, h, lq, 1) for t in lse.unbind(1))
    p = torch.exp2((s - row_max) - log2_sum)
    dof = do.float()
    delta = (dof * o.float()).sum(-1, keepdim=True)
    dv = torch.matmul(p.transpose(-1, -2), dof)
    ds = p * (torch.matmul(dof, v.float().transpose(-1, -2)) - delta)
    dq = torch.matmul(ds, k.float()) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.float()) * scale
    return _as_blhd(dq, q.dtype), _as_blhd(dk, k.dtype), _as_blhd(dv, v.dtype)


def _as_blhd(t, dtype):
    """``t`` [B, H, L, D] in [B, L, H, D] memory, the layout the kernels write and the fake ops declare
    (compiled graphs rely on the strides matching)."""
    return t.transpose(1, 2).to(dtype).contiguous().transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------

@custom_op("clipfast::flash_attention_fwd")
def flash_attention_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], is_causal: bool,
                        scale: float) -> tuple[Tensor, Tensor]:
    """Returns (out [B, H, Lq, D] in [B, Lq, H, D] memory, base-2 log-sum-exp as fp32 [B*H, 2, Lq]: row
    max and log2 of the row sum)."""
    impl = kernel.attention_fwd if runtime.uses_triton(q) else _eager_fwd
    return impl(q, k, v, bias, is_causal, scale)


def _blhd_like(b, h, length, d, like):
    return like.new_empty((b, length, h, d)).permute(0, 2, 1, 3)


@flash_attention_fwd.register_fake
def _(q, k, v, bias, is_causal, scale):
    b, h, lq, d = q.shape
    return _blhd_like(b, h, lq, d, q), q.new_empty((b * h, 2, lq), dtype=torch.float32)


@custom_op("clipfast::flash_attention_bwd")
def flash_attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], out: Tensor,
                        lse: Tensor, is_causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv)."""
    impl = kernel.attention_bwd if runtime.uses_triton(q) else _eager_bwd
    return impl(do, q, k, v, bias, out, lse, is_causal, scale)


@flash_attention_bwd.register_fake
def _(do, q, k, v, bias, out, lse, is_causal, scale):
    b, h, lq, d = q.shape
    lk = k.shape[2]
    return _blhd_like(b, h, lq, d, q), _blhd_like(b, h, lk, d, k), _blhd_like(b, h, lk, d, v)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, is_causal, scale = inputs
    out, lse = output
    ctx.is_causal, ctx.scale = is_causal, scale
    ctx.save_for_backward(q, k, v, bias, out, lse)


def _backward(ctx, dout, dlse):
    q, k, v, bias, out, lse = ctx.saved_tensors
    dq, dk, dv = flash_attention_bwd(dout, q, k, v, bias, out, lse, ctx.is_causal, ctx.scale)
    return dq, dk, dv, None, None, None


flash_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------

def _mask_to_bias(mask: Tensor, b: int, h: int, lq: int, lk: int) -> Tensor:
    """fp32 additive bias, 4-D, broadcastable to [B, H, Lq, Lk] without being expanded."""
    if mask.dim() > 4:
        raise ValueError(f"{OP}: `attn_mask` must have at most 4 dimensions, got shape {tuple(mask.shape)}")
    if mask.dim() == 2 and mask.shape[0] not in (1, lq) and mask.shape[0] == b and mask.shape[1] == lk:
        mask = mask[:, None, None, :]  # [B, Lk] key-padding mask (SDPA would reject this shape)
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    try:
        torch.broadcast_shapes(mask.shape, (b, h, lq, lk))
        ok = all(m in (1, t) for m, t in zip(mask.shape, (b, h, lq, lk)))
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{OP}: `attn_mask` of shape {tuple(mask.shape)} does not broadcast to "
                         f"[B, H, Lq, Lk] = {[b, h, lq, lk]} (a [B, Lk] key-padding mask is also accepted)")
    mask = mask.detach()
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.to(torch.float32)


MASK_DTYPES = (torch.bool, torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _common_case(q, k, v, attn_mask, scale) -> bool:
    """The usual call (see ``plain_float_tensors_on``); anything else takes the full checks."""
    try:
        dims = q.dim()
        qs, ks = q.shape, k.shape
        return (dims in (3, 4) and k.dim() == dims and v.dim() == dims and q.dtype == k.dtype == v.dtype
                and qs[:-2] == ks[:-2] == v.shape[:-2] and ks[-2] == v.shape[-2] and qs[-1] == ks[-1]
                and (scale is None or type(scale) is float or type(scale) is int)
                and plain_float_tensors_on(q.device, q, k, v)
                and (attn_mask is None or (type(attn_mask) in PLAIN_TENSOR_TYPES and attn_mask.dtype in MASK_DTYPES
                                           and attn_mask.device == q.device)))
    except (AttributeError, TypeError):
        return False


def _check(q, k, v, attn_mask, scale):
    if _common_case(q, k, v, attn_mask, scale):
        return
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(OP, name, t)
        if t.dim() not in (3, 4):
            raise ValueError(f"{OP}: `{name}` must be [B, H, L, D] (or [H, L, D]), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{OP}: `q`, `k` and `v` must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.dim() == k.dim() == v.dim()):
        raise ValueError(f"{OP}: `q`, `k` and `v` must have the same number of dimensions, got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-2] != v.shape[:-2]:
        raise ValueError(f"{OP}: `q`, `k`, `v` must share batch and head dims, got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"{OP}: `k` and `v` must have the same length, got {k.shape[-2]} and {v.shape[-2]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{OP}: `q` and `k` must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    if attn_mask is not None:
        check_tensor(OP, "attn_mask", attn_mask, dtypes=MASK_DTYPES)
    check_same_device(OP, q=q, k=k, v=v, attn_mask=attn_mask)
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"{OP}: `scale` must be a float or None, got {type(scale).__name__}")


def _sdpa_reason(q, k, v, attn_mask) -> Optional[str]:
    if q.shape[-1] > kernel.MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {kernel.MAX_HEAD_DIM}"
    if v.shape[-1] != q.shape[-1]:
        return "a value head dim different from the query's"
    if attn_mask is not None and attn_mask.requires_grad:
        return "an attn_mask that requires grad"
    return None


def flash_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                    scale: Optional[float] = None) -> Tensor:
    """``softmax(q k^T * scale + mask) v`` over q [B, H, Lq, D], k/v [B, H, Lk, D] (or [H, L, D]).

    ``attn_mask`` is bool (True = takes part) or additive float, broadcastable to [B, H, Lq, Lk] as in
    SDPA; a 2-D [B, Lk] mask whose first dim is not Lq (or 1) is taken as a key-padding mask (SDPA reads 2-D
    masks as [Lq, Lk]; pass [B, 1, 1, Lk] when B == Lq). ``is_causal`` may be combined with a mask. Rows with
    every key masked give 0 and zero gradients. ``scale`` defaults to ``1 / sqrt(D)``.
    """
    return kernel_attention(*attention_args(q, k, v, attn_mask, is_causal, scale))


def attention_args(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                   scale: Optional[float] = None) -> tuple:
    _check(q, k, v, attn_mask, scale)
    return q, k, v, attn_mask, is_causal, scale


def kernel_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                     scale: Optional[float]) -> Tensor:
    """clipfast's path: the flash-attention op, or the reference (once said) for what the kernels do not take."""
    reason = _sdpa_reason(q, k, v, attn_mask)
    if reason is not None:
        warn_once(f"attention_sdpa_{reason}", f"{OP} with {reason} runs PyTorch scaled_dot_product_attention")
        return reference_attention(q, k, v, attn_mask, is_causal, scale)
    unbatched = q.dim() == 3
    if unbatched:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    b, h, lq, d = q.shape
    lk = k.shape[2]
    bias = _mask_to_bias(attn_mask, b, h, lq, lk) if attn_mask is not None else None
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(d) if d > 0 else 1.0
    out = flash_attention_fwd(q, k, v, bias, bool(is_causal), scale)[0]
    return out.squeeze(0) if unbatched else out
