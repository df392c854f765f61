"""Fused MLP (``proj(act(fc(x)))`` with optional residual) and the standalone activation, as torch custom
ops with Triton forward and backward (see ``clipfast/kernels/mlp.py`` for the kernels).

Ops:
- ``clipfast::mlp_fwd`` -> ``(y, z)``: the output and the pre-activation Z [M, hidden] (empty when no
  gradient is needed);
- ``clipfast::mlp_bwd`` -> ``(dx, dfc_weight, dfc_bias, dproj_weight, dproj_bias)``, computing only the
  gradients autograd asks for (frozen weights skip their GEMMs);
- ``clipfast::activation_fwd`` / ``clipfast::activation_bwd``: elementwise activation (``quick_gelu``).

What is saved for backward: x and Z, plus the weights (the parameters themselves, or their cast to
x's dtype). The activation H = act(Z) is not kept: the proj weight gradient recomputes it from Z as it
loads each Z tile, and the fc gradients take act'(Z) from Z in the dgrad epilogue. That is one M x hidden
tensor per layer against eager's two (nn.GELU: Z and H) or three (QuickGELU written as
``z * sigmoid(1.702 * z)``: Z, the sigmoid and H); ``bench/results/mlp_saved_bytes_cpu`` has the table.

Parameters of another float dtype than ``x`` (fp32 weights with fp16/bf16 activations) are cast to
``x``'s dtype first, as autocast does for ``nn.Linear``; their gradients flow back in their own dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from clipfast.kernels import mlp as kernel
from clipfast.kernels import runtime

from .._validate import (FLOAT_DTYPES, PLAIN_TENSOR_TYPES, any_requires_grad, check_same_device, check_shape,
                         check_tensor, plain_float_tensors_on)
from ._custom_op import custom_op

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")


# ----------------------------------------------------------------------------------------------
# Eager reference (also the CPU path without the interpreter): what PyTorch code computes, in the input
# dtype (CLIP's QuickGELU as OpenAI writes it, ``F.gelu``). On the canonical arguments (``mlp_args``:
# parameters in x's dtype).
# ----------------------------------------------------------------------------------------------

def reference_activation(z: Tensor, activation: str) -> Tensor:
    if activation == "quick_gelu":
        return z * torch.sigmoid(1.702 * z)
    return F.gelu(z, approximate="tanh" if activation == "gelu_tanh" else "none")


def eager_activation_grad(z: Tensor, activation: str) -> Tensor:
    """act'(z) in fp32 (float64 for float64 input)."""
    z = z.float() if z.dtype != torch.float64 else z
    if activation == "quick_gelu":
        s = torch.sigmoid(1.702 * z)
        return s + 1.702 * z * s * (1 - s)
    if activation == "gelu":
        return 0.5 * (1 + torch.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * torch.exp(-0.5 * z * z)
    u = 0.7978845608028654 * (z + 0.044715 * z ** 3)
    t = torch.tanh(u)
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * 0.7978845608028654 * (1 + 3 * 0.044715 * z * z)


def _reference_parts(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual, act=reference_activation):
    """(y, the pre-activation z)."""
    z = F.linear(x, fc_weight, fc_bias)
    y = F.linear(act(z, activation), proj_weight, proj_bias)
    return (y + residual if residual is not None else y), z


def reference_mlp(x: Tensor, fc_weight: Tensor, fc_bias: Optional[Tensor], proj_weight: Tensor,
                  proj_bias: Optional[Tensor], activation: str, residual: Optional[Tensor], *,
                  act=reference_activation) -> Tensor:
    """``proj(act(fc(x))) (+ residual)`` with ``F.linear``; ``act(z, activation)`` may be replaced (the
    dispatcher's hybrid candidate runs clipfast's activation kernel between cuBLAS GEMMs)."""
    return _reference_parts(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual, act)[0]


def reference_quick_gelu(x: Tensor) -> Tensor:
    return reference_activation(x, "quick_gelu")


def _eager_mlp_fwd(x2, w1, b1, w2, b2, residual2, activation, save_for_backward):
    y, z = _reference_parts(x2, w1, b1, w2, b2, activation, residual2)
    return y, (z if save_for_backward else None)


def _eager_mlp_bwd(dy2, x2, w1, w2, z, activation, need_dx, need_fc_grads, need_proj_grads, has_b1, has_b2):
    dw2 = db2 = dx = dw1 = db1 = None
    if need_proj_grads:
        dw2 = dy2.t() @ reference_activation(z, activation)
        db2 = dy2.float().sum(0) if has_b2 else None
    if need_dx or need_fc_grads:
        dz = ((dy2 @ w2).float() * eager_activation_grad(z, activation)).to(dy2.dtype)
        if need_fc_grads:
            dw1 = dz.t() @ x2
            db1 = dz.float().sum(0) if has_b1 else None
        if need_dx:
            dx = dz @ w1
    return dx, dw1, db1, dw2, db2


def _as_rows(t: Tensor) -> Tensor:
    """[..., N] -> [M, N]; a view when one exists (the GEMM takes any strides)."""
    return t.reshape(-1, t.shape[-1])


def _empty_like_none(x: Tensor) -> Tensor:
    return x.new_empty(0)


# ----------------------------------------------------------------------------------------------
# Custom ops: MLP
# ----------------------------------------------------------------------------------------------

@custom_op("clipfast::mlp_fwd")
def mlp_fwd(x: Tensor, fc_weight: Tensor, fc_bias: Optional[Tensor], proj_weight: Tensor,
            proj_bias: Optional[Tensor], residual: Optional[Tensor], activation: str,
            save_for_backward: bool) -> tuple[Tensor, Tensor]:
    """Returns (y [..., D_out], z [M, hidden] or empty)."""
    x2 = _as_rows(x)
    res2 = _as_rows(residual) if residual is not None else None
    if runtime.uses_triton(x):
        if res2 is not None and res2.stride(-1) != 1:
            res2 = res2.contiguous()  # the epilogue reads residual rows with unit stride
        y, z = kernel.mlp_fwd(x2, fc_weight, fc_bias, proj_weight, proj_bias, res2, activation, save_for_backward)
    else:
        y, z = _eager_mlp_fwd(x2, fc_weight, fc_bias, proj_weight, proj_bias, res2, activation, save_for_backward)
    y = y.reshape(*x.shape[:-1], proj_weight.shape[0])
    return y, (z if z is not None else _empty_like_none(x))


@mlp_fwd.register_fake
def _(x, fc_weight, fc_bias, proj_weight, proj_bias, residual, activation, save_for_backward):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    hidden = fc_weight.shape[0]
    y = x.new_empty((*x.shape[:-1], proj_weight.shape[0]))
    return y, (x.new_empty((rows, hidden)) if save_for_backward else x.new_empty(0))


@custom_op("clipfast::mlp_bwd")
def mlp_bwd(dy: Tensor, x: Tensor, fc_weight: Tensor, proj_weight: Tensor, z: Tensor, activation: str,
            need_dx: bool, need_fc_grads: bool, need_proj_grads: bool, has_fc_bias: bool,
            has_proj_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dfc_weight, dfc_bias, dproj_weight, dproj_bias); bias gradients in fp32; empty tensors
    for what was not asked for."""
    x2, dy2 = _as_rows(x), _as_rows(dy)
    impl = kernel.mlp_bwd if runtime.uses_triton(x) else _eager_mlp_bwd
    dx, dw1, db1, dw2, db2 = impl(dy2, x2, fc_weight, proj_weight, z, activation, need_dx, need_fc_grads,
                                  need_proj_grads, has_fc_bias, has_proj_bias)
    # absent results are distinct empty tensors (custom-op outputs may not alias each other)
    return (dx.reshape(x.shape) if dx is not None else _empty_like_none(x),
            *(t if t is not None else _empty_like_none(x) for t in (dw1, db1, dw2, db2)))


@mlp_bwd.register_fake
def _(dy, x, fc_weight, proj_weight, z, activation, need_dx, need_fc_grads, need_proj_grads, has_fc_bias,
      has_proj_bias):
    fp32 = dict(dtype=torch.float32)
    # the kernels return contiguous gradients whatever the strides of x and the weights
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            x.new_empty(fc_weight.shape) if need_fc_grads else x.new_empty(0),
            x.new_empty((fc_weight.shape[0],), **fp32) if need_fc_grads and has_fc_bias else x.new_empty(0),
            x.new_empty(proj_weight.shape) if need_proj_grads else x.new_empty(0),
            x.new_empty((proj_weight.shape[0],), **fp32) if need_proj_grads and has_proj_bias else x.new_empty(0))


def _mlp_setup_context(ctx, inputs, output):
    x, fc_weight, fc_bias, proj_weight, proj_bias, residual, activation, save_for_backward = inputs
    _, z = output
    ctx.activation = activation
    ctx.fc_bias_dtype = fc_bias.dtype if fc_bias is not None else None
    ctx.proj_bias_dtype = proj_bias.dtype if proj_bias is not None else None
    ctx.has_residual = residual is not None
    ctx.save_for_backward(x, fc_weight, proj_weight, z)


def _mlp_backward(ctx, dy, dz):
    x, fc_weight, proj_weight, z = ctx.saved_tensors
    need = ctx.needs_input_grad
    if z.numel() == 0 and x.numel() and fc_weight.numel():
        raise RuntimeError("clipfast.mlp: backward called on a forward that ran without gradient tracking")
    need_dx = need[0]
    need_fc = need[1] or need[2]
    need_proj = need[3] or need[4]
    dx, dw1, db1, dw2, db2 = mlp_bwd(dy, x, fc_weight, proj_weight, z, ctx.activation, need_dx, need_fc,
                                     need_proj, ctx.fc_bias_dtype is not None, ctx.proj_bias_dtype is not None)
    return (dx if need_dx else None,
            dw1 if need[1] else None,
            db1.to(ctx.fc_bias_dtype) if need[2] else None,
            dw2 if need[3] else None,
            db2.to(ctx.proj_bias_dtype) if need[4] else None,
            dy if ctx.has_residual and need[5] else None,
            None, None)


mlp_fwd.register_autograd(_mlp_backward, setup_context=_mlp_setup_context)


# ----------------------------------------------------------------------------------------------
# Custom ops: elementwise activation
# ----------------------------------------------------------------------------------------------

@custom_op("clipfast::activation_fwd")
def activation_fwd(x: Tensor, activation: str) -> Tensor:
    if runtime.uses_triton(x):
        return kernel.activation_fwd(x.contiguous(), activation)
    return reference_activation(x, activation)


@activation_fwd.register_fake
def _(x, activation):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@custom_op("clipfast::activation_bwd")
def activation_bwd(dy: Tensor, x: Tensor, activation: str) -> Tensor:
    if runtime.uses_triton(x):
        return kernel.activation_bwd(dy.contiguous(), x.contiguous(), activation)
    return (dy.float() * eager_activation_grad(x, activation)).to(x.dtype)


@activation_bwd.register_fake
def _(dy, x, activation):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _activation_setup_context(ctx, inputs, output):
    x, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(x)


def _activation_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return activation_bwd(dy, x, ctx.activation), None


activation_fwd.register_autograd(_activation_backward, setup_context=_activation_setup_context)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

def _check_activation(op: str, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: `activation` must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")


def quick_gelu_args(x: Tensor) -> tuple:
    if not (type(x) in PLAIN_TENSOR_TYPES and x.dtype in FLOAT_DTYPES):
        check_tensor("quick_gelu", "x", x)
    return (x,)


def kernel_quick_gelu(x: Tensor) -> Tensor:
    return activation_fwd(x, "quick_gelu")


def quick_gelu(x: Tensor) -> Tensor:
    """``x * sigmoid(1.702 * x)`` elementwise (OpenAI CLIP's QuickGELU), computed in fp32, returned in
    ``x``'s dtype."""
    return kernel_quick_gelu(*quick_gelu_args(x))


def mlp(x: Tensor, fc_weight: Tensor, fc_bias: Optional[Tensor], proj_weight: Tensor, proj_bias: Optional[Tensor],
        activation: str = "quick_gelu", *, residual: Optional[Tensor] = None) -> Tensor:
    """``proj(act(fc(x))) (+ residual)`` with weights in ``nn.Linear`` layout.

    x: [..., D]; fc_weight: [hidden, D]; fc_bias: [hidden] or None; proj_weight: [D_out, hidden];
    proj_bias: [D_out] or None; residual: [..., D_out] or None (added in the projection's epilogue);
    activation: "quick_gelu" (x * sigmoid(1.702 x)), "gelu" (erf) or "gelu_tanh". Accumulates in fp32 and
    returns ``x``'s dtype; fp32 inputs use TF32 only when torch allows it for matmuls."""
    return kernel_mlp(*mlp_args(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual=residual))


def mlp_args(x: Tensor, fc_weight: Tensor, fc_bias: Optional[Tensor], proj_weight: Tensor,
             proj_bias: Optional[Tensor], activation: str = "quick_gelu", *, residual: Optional[Tensor] = None) -> tuple:
    """The canonical arguments ``(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, residual)``, the
    parameters of another float dtype cast to x's (autocast's rule; same-dtype ones are used as they are)."""
    if not _common_case(x, fc_weight, fc_bias, proj_weight, proj_bias, residual, activation):
        _check_fully(x, fc_weight, fc_bias, proj_weight, proj_bias, residual, activation)
    dtype = x.dtype
    params = [t if t is None or t.dtype == dtype else t.to(dtype) for t in (fc_weight, fc_bias, proj_weight, proj_bias)]
    return (x, *params, activation, residual)


def kernel_mlp(x: Tensor, fc_weight: Tensor, fc_bias: Optional[Tensor], proj_weight: Tensor,
               proj_bias: Optional[Tensor], activation: str, residual: Optional[Tensor]) -> Tensor:
    """clipfast's path: the fused MLP op (Z kept for backward only when a gradient is wanted)."""
    save = torch.is_grad_enabled() and any_requires_grad(x, fc_weight, fc_bias, proj_weight, proj_bias, residual)
    return mlp_fwd(x, fc_weight, fc_bias, proj_weight, proj_bias, residual, activation, save)[0]


def _common_case(x, fc_weight, fc_bias, proj_weight, proj_bias, residual, activation) -> bool:
    """The usual call (see ``plain_float_tensors_on``); anything else takes the full checks."""
    try:
        if x.dim() == 0 or fc_weight.dim() != 2 or proj_weight.dim() != 2 or activation not in ACTIVATIONS:
            return False
        hidden, width = fc_weight.shape
        out = proj_weight.shape[0]
        shape = x.shape
        return (shape[-1] == width and proj_weight.shape[1] == hidden
                and (fc_bias is None or fc_bias.shape == (hidden,))
                and (proj_bias is None or proj_bias.shape == (out,))
                and (residual is None or (residual.dtype == x.dtype and residual.shape == (*shape[:-1], out)))
                and plain_float_tensors_on(x.device, x, fc_weight, fc_bias, proj_weight, proj_bias, residual))
    except (AttributeError, TypeError):
        return False


def _check_fully(x, fc_weight, fc_bias, proj_weight, proj_bias, residual, activation) -> None:
    op = "mlp"
    check_tensor(op, "x", x, min_dim=1)
    check_tensor(op, "fc_weight", fc_weight, ndim=2)
    check_tensor(op, "proj_weight", proj_weight, ndim=2)
    check_tensor(op, "fc_bias", fc_bias, optional=True, ndim=1)
    check_tensor(op, "proj_bias", proj_bias, optional=True, ndim=1)
    check_tensor(op, "residual", residual, optional=True, min_dim=1)
    _check_activation(op, activation)
    width, hidden, out = x.shape[-1], fc_weight.shape[0], proj_weight.shape[0]
    check_shape(op, "fc_weight", fc_weight, (hidden, width))
    check_shape(op, "fc_bias", fc_bias, (hidden,))
    check_shape(op, "proj_weight", proj_weight, (out, hidden))
    check_shape(op, "proj_bias", proj_bias, (out,))
    check_shape(op, "residual", residual, (*x.shape[:-1], out))
    if residual is not None and residual.dtype != x.dtype:
        raise TypeError(f"{op}: `residual` dtype {residual.dtype} differs from `x` dtype {x.dtype}")
    check_same_device(op, x=x, fc_weight=fc_weight, fc_bias=fc_bias, proj_weight=proj_weight, proj_bias=proj_bias,
                      residual=residual)
