"""Fused contrastive losses (CLIP and SigLIP) as torch custom ops with Triton forward and backward.

- ``clip_loss(image, text, logit_scale, normalize=True)``: mean of the image->text and text->image
  cross-entropies of ``s * I @ T.T`` with ``s = logit_scale.exp()``.
- ``siglip_loss(image, text, logit_scale, logit_bias, normalize=True)``:
  ``-sum(logsigmoid(labels * (s * I @ T.T + b))) / N``.
- ``contrastive_cross_entropy(queries, keys, scale, label_offset)``: one direction of the CLIP loss over
  N queries and M >= N keys, the positive of query i being key ``i + label_offset`` (the local loss of a
  data-parallel rank); ``scale`` is the multiplier itself, as open_clip passes it.

None of them materializes the N x M logits (see ``clipfast/kernels/contrastive_loss.py``): memory is
O((N + M) * d). Features are normalized as ``x / max(||x||, eps)`` with ``eps = 1e-12`` (``F.normalize``):
a zero feature vector gives zero logits, a finite loss, and the gradient ``F.normalize`` gives it
(scaled by 1/eps, so large; it overflows fp16). The loss is fp32; gradients come back in the features'
dtypes (fp32 for the scale and bias). Deterministic: no atomics anywhere.

Backward: the fused Triton backward (``clipfast::contrastive_loss_bwd``), never eager recomputation; on
CPU tensors without the interpreter both directions run the same math in PyTorch.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from clipfast.kernels import contrastive_loss as kernel

from .._validate import (FLOAT_DTYPES, PLAIN_TENSOR_TYPES, check_same_device, check_tensor, kernel_takes_width,
                         plain_float_tensors_on)
from ._custom_op import custom_op

EPS = 1e-12
CLIP, SIGLIP = kernel.CLIP, kernel.SIGLIP


def _use_kernel(x: Tensor) -> bool:
    return kernel_takes_width("contrastive loss", x, kernel.MAX_DIM)


def _factor(kind: int, n: int, both_directions: bool) -> float:
    """The loss's constant factor: mean over rows (and over the two directions)."""
    return 1.0 / (2 * n) if (kind == CLIP and both_directions) else 1.0 / n


# ----------------------------------------------------------------------------------------------
# Eager reference (also the CPU path without the interpreter): materializes the logits.
# ----------------------------------------------------------------------------------------------

def _eager_logits(a, b, scale, normalize):
    """open_clip's logits: ``scale * a @ b.T`` in the features' dtype, then fp32 (or wider) for the loss."""
    if normalize:
        a, b = F.normalize(a, dim=-1, eps=EPS), F.normalize(b, dim=-1, eps=EPS)
    return (scale * a @ b.T).to(torch.promote_types(a.dtype, torch.float32))


def eager_loss(a, b, scale, bias, kind: int, offset: int, both_directions: bool, normalize: bool) -> Tensor:
    """The same loss in plain (differentiable) PyTorch, as open_clip writes it: the products in the features'
    dtype, the loss in fp32 or wider."""
    logits = _eager_logits(a, b, scale, normalize)
    n = a.shape[0]
    labels = torch.arange(n, device=a.device) + offset
    if kind == SIGLIP:
        y = -torch.ones_like(logits)
        y[torch.arange(n, device=a.device), labels] = 1.0
        return -F.logsigmoid(y * (logits + bias.to(logits.dtype))).sum() / n
    loss = F.cross_entropy(logits, labels)
    if both_directions:
        loss = (loss + F.cross_entropy(logits.T, labels)) / 2
    return loss


def _normalize_bwd(x, dxhat):
    """Gradient through ``x / max(||x||, eps)``."""
    norm = x.norm(dim=-1, keepdim=True)
    xhat = x / norm.clamp_min(EPS)
    proj = torch.where(norm > EPS, (xhat * dxhat).sum(-1, keepdim=True), torch.zeros_like(norm))
    return (dxhat - xhat * proj) / norm.clamp_min(EPS)


def eager_loss_bwd(grad, a, b, scale, bias, kind: int, offset: int, both_directions: bool, normalize: bool):
    """The gradients of ``eager_loss`` written out (the eager path of the backward op, where autograd
    is not available): ``(da, db, dscale, dbias)``."""
    acc = torch.promote_types(a.dtype, torch.float32)
    a32, b32 = a.to(acc), b.to(acc)
    ahat = F.normalize(a32, dim=-1, eps=EPS) if normalize else a32
    bhat = F.normalize(b32, dim=-1, eps=EPS) if normalize else b32
    dots = ahat @ bhat.T
    s = scale.to(acc)
    z = s * dots
    n = a.shape[0]
    positive = torch.zeros_like(z)
    positive[torch.arange(n, device=a.device), torch.arange(n, device=a.device) + offset] = 1.0
    if kind == SIGLIP:
        y = 2 * positive - 1
        g = -y * torch.sigmoid(-y * (z + bias.to(acc)))
    else:
        g = torch.softmax(z, 1) - positive
        if both_directions:
            g = g + torch.softmax(z, 0) - positive
    g = g * (grad.to(acc) * _factor(kind, n, both_directions))
    dahat, dbhat = s * (g @ bhat), s * (g.T @ ahat)
    da = _normalize_bwd(a32, dahat) if normalize else dahat
    db = _normalize_bwd(b32, dbhat) if normalize else dbhat
    dbias = g.sum().to(bias.dtype) if bias is not None else a.new_empty(0)
    return da.to(a.dtype), db.to(b.dtype), (g * dots).sum().to(scale.dtype), dbias


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------

@custom_op("clipfast::contrastive_loss_fwd")
def contrastive_loss_fwd(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], kind: int, offset: int,
                         both_directions: bool, normalize: bool, grad_block_d: int = 0
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss, a_hat, b_hat, lse_a, lse_b): the fp32 scalar loss, the tile operands ``s * a / |a|``
    and ``b / |b|`` (``b_hat`` empty without normalization: the tiles read ``b``) and the row / column
    softmax statistics [3, n] (max, log of the sum, softmax - 1 at the positive; empty where the loss has
    none). ``grad_block_d``: the backward's feature-chunk width (``kernels.contrastive_loss.grad_plan``;
    0: the fewest GEMM passes)."""
    if not _use_kernel(a):
        # the eager backward recomputes everything; the saved outputs only keep their declared shapes
        _, a_hat, b_hat, lse_a, lse_b = _saved_like(a, b, kind, both_directions, normalize, torch.zeros)
        loss = eager_loss(a, b, scale, bias, kind, offset, both_directions, normalize).float()
        return loss, a_hat, b_hat, lse_a, lse_b
    a_hat = kernel.prepare(a, scale, normalize, EPS)
    b_hat = kernel.prepare(b, None, True, EPS) if normalize else b
    (row_loss, lse_a), cols = kernel.contrastive_fwd(a_hat, b_hat, bias, kind, offset, both_directions)
    loss = row_loss.sum()
    lse_b = None
    if cols is not None:
        loss = loss + cols[0].sum()
        lse_b = cols[1]
    loss = loss * _factor(kind, a.shape[0], both_directions)
    if lse_a is None:
        lse_a = scale.new_empty(0, dtype=torch.float32)
    if lse_b is None:
        lse_b = scale.new_empty(0, dtype=torch.float32)
    if not normalize:  # the tiles read b itself
        b_hat = a.new_empty(0)
    return loss, a_hat, b_hat, lse_a, lse_b


def _saved_like(a, b, kind, both_directions, normalize, make=torch.empty):
    """The forward's outputs as ``make`` (torch.empty / torch.zeros) allocates them: one definition of
    their shapes for the fake, the kernel and the eager paths."""
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    loss = make((), dtype=torch.float32, device=a.device)
    a_hat = make((n, d), dtype=a.dtype, device=a.device)
    b_hat = make((m, d) if normalize else (0,), dtype=a.dtype, device=a.device)
    lse_a = make((3, n) if kind == CLIP else (0,), dtype=torch.float32, device=a.device)
    lse_b = make((3, m) if (kind == CLIP and both_directions) else (0,), dtype=torch.float32, device=a.device)
    return loss, a_hat, b_hat, lse_a, lse_b


@contrastive_loss_fwd.register_fake
def _(a, b, scale, bias, kind, offset, both_directions, normalize, grad_block_d=0):
    return _saved_like(a, b, kind, both_directions, normalize)


@custom_op("clipfast::contrastive_loss_bwd")
def contrastive_loss_bwd(grad: Tensor, a: Tensor, b: Tensor, a_hat: Tensor, b_hat: Tensor, scale: Tensor,
                         bias: Optional[Tensor], lse_a: Tensor, lse_b: Tensor, kind: int, offset: int,
                         both_directions: bool, normalize: bool, grad_block_d: int = 0
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (da, db, dscale, dbias); dbias is empty without a bias."""
    if not _use_kernel(a):
        return eager_loss_bwd(grad, a, b, scale, bias, kind, offset, both_directions, normalize)
    if not normalize:
        b_hat = b
    coef = (grad.float() * _factor(kind, a.shape[0], both_directions)).reshape(())
    has_lse_b = kind == CLIP and both_directions
    lse_a_ = lse_a if kind == CLIP else None
    lse_b_ = lse_b if has_lse_b else None
    # acc_a = sum_j G_ij b_hat_j and acc_b = sum_i G_ij a_hat_i (the transposed problem); a_hat carries s
    acc_a, sums = kernel.contrastive_grad(a_hat, b_hat, lse_a_, lse_b_, bias, kind, offset, True, grad_block_d)
    acc_b, _ = kernel.contrastive_grad(b_hat, a_hat, lse_b_, lse_a_, bias, kind, -offset, False, grad_block_d)
    s = scale.float().reshape(())
    exact_acc = a.dtype == torch.float32  # G entered the fp32 accumulator unrounded
    da, dots = kernel.feature_grad(a, acc_a, coef * s, normalize, EPS, want_dot=exact_acc)
    db, _ = kernel.feature_grad(b, acc_b, coef, normalize, EPS)
    sums = sums.sum((0, 2))  # over column splits and rows
    # dz_ij/ds = <xhat_i, bhat_j> = z_ij / s
    dscale = (coef * (dots.sum() if exact_acc else sums[1] / s)).to(scale.dtype)
    dbias = (coef * sums[0]).to(bias.dtype) if bias is not None else a.new_empty(0)
    return da, db, dscale, dbias


@contrastive_loss_bwd.register_fake
def _(grad, a, b, a_hat, b_hat, scale, bias, lse_a, lse_b, kind, offset, both_directions, normalize,
      grad_block_d=0):
    return (torch.empty_like(a, memory_format=torch.contiguous_format),
            torch.empty_like(b, memory_format=torch.contiguous_format), torch.empty_like(scale),
            torch.empty_like(bias) if bias is not None else a.new_empty(0))


def _setup_context(ctx, inputs, output):
    a, b, scale, bias, kind, offset, both_directions, normalize, *grad_block_d = inputs
    _, a_hat, b_hat, lse_a, lse_b = output
    ctx.args = (kind, offset, both_directions, normalize, *grad_block_d)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(a, b, a_hat, b_hat, scale, bias, lse_a, lse_b)


def _backward(ctx, grad, *unused):
    a, b, a_hat, b_hat, scale, bias, lse_a, lse_b = ctx.saved_tensors
    da, db, dscale, dbias = contrastive_loss_bwd(grad, a, b, a_hat, b_hat, scale, bias, lse_a, lse_b, *ctx.args)
    return da, db, dscale, (dbias if ctx.has_bias else None), None, None, None, None, None


contrastive_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

def _scalar(op: str, name: str, value, like: Tensor) -> Tensor:
    """A number or one-element float tensor -> 0-dim fp32 tensor on ``like``'s device (differentiable)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float32, device=like.device)
    if not (type(value) in PLAIN_TENSOR_TYPES and value.dtype in FLOAT_DTYPES):
        check_tensor(op, name, value)
    if value.numel() != 1:
        raise ValueError(f"{op}: `{name}` must be a number or a one-element tensor, got shape {tuple(value.shape)}")
    if value.device != like.device:
        raise ValueError(f"{op}: `{name}` is on {value.device} but the features are on {like.device}")
    return value.float().reshape(())


def _common_case(a, b, square: bool, offset) -> bool:
    """The usual call (see ``plain_float_tensors_on``); anything else takes the full checks."""
    try:
        if a.dim() != 2 or b.dim() != 2 or type(offset) is not int:
            return False
        (n, d), (m, d_b) = a.shape, b.shape
        return (a.dtype == b.dtype and d == d_b and n > 0 and d > 0 and (m == n or not square)
                and 0 <= offset and offset + n <= m and plain_float_tensors_on(a.device, a, b))
    except (AttributeError, TypeError):
        return False


def _check_features(op: str, a: Tensor, b: Tensor, a_name: str, b_name: str, square: bool, offset: int) -> None:
    if _common_case(a, b, square, offset):
        return
    check_tensor(op, a_name, a, ndim=2)
    check_tensor(op, b_name, b, ndim=2)
    check_same_device(op, **{a_name: a, b_name: b})
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: `{a_name}` dtype {a.dtype} differs from `{b_name}` dtype {b.dtype}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{op}: `{a_name}` {tuple(a.shape)} and `{b_name}` {tuple(b.shape)} must have the same "
                         f"feature dimension")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{op}: needs at least one pair and one feature, got `{a_name}` of shape {tuple(a.shape)}")
    if square and a.shape[0] != b.shape[0]:
        raise ValueError(f"{op}: `{a_name}` and `{b_name}` must have the same number of rows (pairs), got "
                         f"{a.shape[0]} and {b.shape[0]}")
    if not (0 <= offset and offset + a.shape[0] <= b.shape[0]):
        raise ValueError(f"{op}: `label_offset` {offset} puts the positives of {a.shape[0]} rows outside the "
                         f"{b.shape[0]} columns of `{b_name}`")


def kernel_loss(a, b, scale, bias, kind, offset, both_directions, normalize, grad_block_d: int = 0) -> Tensor:
    """clipfast's path: the fused op (no logits matrix), its backward on feature chunks of ``grad_block_d``
    (0: the width with the fewest GEMM passes)."""
    return contrastive_loss_fwd(a, b, scale, bias, kind, int(offset), bool(both_directions), bool(normalize),
                                int(grad_block_d))[0]


def reference_loss(a, b, scale, bias, kind, offset, both_directions, normalize) -> Tensor:
    """The eager formula (``eager_loss``: builds the N x M logits) as a fp32 scalar."""
    return eager_loss(a, b, scale, bias, kind, offset, both_directions, normalize).float()


# Every public loss below takes its own arguments to the canonical ones, ``(a, b, scale, bias, kind, offset,
# both_directions, normalize)`` with ``scale`` exponentiated (``<loss>_args``), then runs ``kernel_loss``.

def clip_loss_args(image_features, text_features, logit_scale, normalize=True) -> tuple:
    op = "clip_loss"
    _check_features(op, image_features, text_features, "image_features", "text_features", True, 0)
    s = _scalar(op, "logit_scale", logit_scale, image_features).exp()
    return image_features, text_features, s, None, CLIP, 0, True, normalize


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Union[Tensor, float],
              normalize: bool = True) -> Tensor:
    """CLIP loss: ``(CE(s I T^T, arange) + CE(s T I^T, arange)) / 2`` with ``s = logit_scale.exp()``.

    ``image_features``/``text_features``: [N, d], same dtype (fp32/fp16/bf16); L2-normalized here when
    ``normalize`` (``x / max(||x||, 1e-12)``). Returns a fp32 scalar; never builds the N x N logits."""
    return kernel_loss(*clip_loss_args(image_features, text_features, logit_scale, normalize))


def siglip_loss_args(image_features, text_features, logit_scale, logit_bias, normalize=True,
                     label_offset=0) -> tuple:
    op = "siglip_loss"
    _check_features(op, image_features, text_features, "image_features", "text_features", False, label_offset)
    s = _scalar(op, "logit_scale", logit_scale, image_features).exp()
    b = _scalar(op, "logit_bias", logit_bias, image_features)
    return image_features, text_features, s, b, SIGLIP, label_offset, False, normalize


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Union[Tensor, float],
                logit_bias: Union[Tensor, float], normalize: bool = True, label_offset: int = 0) -> Tensor:
    """SigLIP loss ``-sum(logsigmoid(y * (s I T^T + b))) / N``, ``s = logit_scale.exp()``, ``y = +1`` on the
    pairs (text ``i + label_offset`` for image ``i``) and -1 elsewhere. ``text_features`` may have more rows
    than ``image_features`` (all texts of a data-parallel group). Returns a fp32 scalar."""
    return kernel_loss(*siglip_loss_args(image_features, text_features, logit_scale, logit_bias, normalize,
                                         label_offset))


def contrastive_cross_entropy_args(queries, keys, scale, label_offset=0, normalize=False) -> tuple:
    op = "contrastive_cross_entropy"
    _check_features(op, queries, keys, "queries", "keys", False, label_offset)
    return queries, keys, _scalar(op, "scale", scale, queries), None, CLIP, label_offset, False, normalize


def contrastive_cross_entropy(queries: Tensor, keys: Tensor, scale: Union[Tensor, float], label_offset: int = 0,
                              normalize: bool = False) -> Tensor:
    """``CE(scale * Q K^T, arange(N) + label_offset)`` for Q [N, d] against K [M, d], M >= N + label_offset.

    ``scale`` multiplies the logits directly (open_clip's convention: an already exponentiated
    ``logit_scale``). This is one direction of the local loss of a data-parallel rank."""
    return kernel_loss(*contrastive_cross_entropy_args(queries, keys, scale, label_offset, normalize))


def clip_loss_scaled_args(image_features, text_features, scale, normalize=False) -> tuple:
    op = "clip_loss"
    _check_features(op, image_features, text_features, "image_features", "text_features", True, 0)
    return image_features, text_features, _scalar(op, "scale", scale, image_features), None, CLIP, 0, True, normalize


def clip_loss_scaled(image_features: Tensor, text_features: Tensor, scale: Union[Tensor, float],
                     normalize: bool = False) -> Tensor:
    """``clip_loss`` taking the multiplier ``scale`` itself (open_clip's ``logit_scale``) instead of its log."""
    return kernel_loss(*clip_loss_scaled_args(image_features, text_features, scale, normalize))


def siglip_loss_scaled_args(image_features, text_features, scale, bias, label_offset=0, normalize=False) -> tuple:
    op = "siglip_loss"
    _check_features(op, image_features, text_features, "image_features", "text_features", False, label_offset)
    return (image_features, text_features, _scalar(op, "scale", scale, image_features),
            _scalar(op, "logit_bias", bias, image_features), SIGLIP, label_offset, False, normalize)


def siglip_loss_scaled(image_features: Tensor, text_features: Tensor, scale: Union[Tensor, float],
                       bias: Union[Tensor, float], label_offset: int = 0, normalize: bool = False) -> Tensor:
    """``siglip_loss`` taking the multiplier ``scale`` itself (open_clip's convention) instead of its log."""
    return kernel_loss(*siglip_loss_scaled_args(image_features, text_features, scale, bias, label_offset, normalize))
