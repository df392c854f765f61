"""LayerNorm and residual-add + LayerNorm as torch custom ops with Triton forward and backward.

Pattern every op in clipfast follows:
- ``clipfast::<op>_fwd`` / ``clipfast::<op>_bwd`` custom ops (``custom_op`` from ``_custom_op``: a
  ``torch.library`` custom op, called directly outside tracing) that run the Triton launcher when
  ``runtime.uses_triton`` says so and the eager reference otherwise;
- ``register_fake`` for both, so ``torch.compile(fullgraph=True)`` traces them without a graph break;
- ``register_autograd`` on the forward op calling the backward op (fused Triton backward, no eager
  recomputation);
- one eager reference per op (``reference_<op>``, on the op's canonical arguments): the CPU path without
  the interpreter, the ``torch`` candidate of ``clipfast.dispatching`` and the benchmarks' eager baseline;
- ``<op>_args``: validation (the usual call in one pass, the per-argument checks only when that fails),
  returning the canonical arguments; ``kernel_<op>``: clipfast's path on them; and the public function
  ``<op>`` = ``kernel_<op>(*<op>_args(...))``, which no dispatch decision reaches (``clipfast.<op>`` is the
  dispatched one).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from clipfast.kernels import layer_norm as kernel

from .._validate import check_same_device, check_shape, check_tensor, kernel_takes_width, plain_float_tensors_on
from ._custom_op import custom_op


def _use_kernel(x: Tensor) -> bool:
    return kernel_takes_width("layer_norm", x, kernel.MAX_COLS)


# ----------------------------------------------------------------------------------------------
# Eager reference: ``F.layer_norm``, the parameters in the activations' dtype (what PyTorch code runs)
# ----------------------------------------------------------------------------------------------

def _same_dtype(t: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    return t.to(like.dtype) if t is not None and t.dtype != like.dtype else t


def reference_layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), _same_dtype(weight, x), _same_dtype(bias, x), eps)


def reference_add_layer_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                             eps: float) -> tuple[Tensor, Tensor]:
    h = x + residual
    return h, reference_layer_norm(h, weight, bias, eps)


# The custom ops' CPU path without the interpreter: PyTorch's own LayerNorm, which also returns the fp32
# statistics the backward op reads; the parameters in their own dtype (fp32 ones with fp16/bf16 activations).

def _eager_fwd(x, residual, weight, bias, eps):
    h = x + residual if residual is not None else x
    weight, bias = (p if p is None or p.dtype in (h.dtype, torch.float32) else p.float() for p in (weight, bias))
    y, mean, rstd = torch.native_layer_norm(h, (h.shape[-1],), weight, bias, eps)
    return y, (h if residual is not None else None), mean.reshape(-1), rstd.reshape(-1)


def _eager_bwd(dy, dh, x, weight, bias, mean, rstd):
    n = x.shape[-1]
    xf, dyf = x.float().reshape(-1, n), dy.float().reshape(-1, n)
    xhat = (xf - mean[:, None]) * rstd[:, None]
    g = dyf * weight.float() if weight is not None else dyf
    dx = (g - xhat * (g * xhat).mean(-1, keepdim=True) - g.mean(-1, keepdim=True)) * rstd[:, None]
    if dh is not None:
        dx = dx + dh.float().reshape(-1, n)
    dweight = (dyf * xhat).sum(0).to(weight.dtype) if weight is not None else None
    dbias = dyf.sum(0).to(bias.dtype) if bias is not None else None
    return dx.reshape(x.shape).to(x.dtype), dweight, dbias


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------

@custom_op("clipfast::layer_norm_fwd")
def layer_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, h, mean, rstd); h is empty when there is no residual."""
    impl = kernel.layer_norm_fwd if _use_kernel(x) else _eager_fwd
    y, h, mean, rstd = impl(x, residual, weight, bias, eps)
    if h is None:
        h = x.new_empty(0)
    elif h is x or h is residual:  # custom ops may not return their inputs
        h = h.clone(memory_format=torch.contiguous_format)
    # contiguous whatever the input's layout (the kernels write rows in order; the fake declares it)
    return y.contiguous(), h.contiguous(), mean, rstd


@layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps):
    n_rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    stats = x.new_empty((n_rows,), dtype=torch.float32)
    h = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape), h, stats, stats.clone()


@custom_op("clipfast::layer_norm_bwd")
def layer_norm_bwd(dy: Tensor, dh: Optional[Tensor], x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dweight, dbias) with the parameter gradients in the parameters' dtypes (reduced and
    cast by the kernel); empty tensors where absent. ``bias`` is only read for its presence and dtype."""
    impl = kernel.layer_norm_bwd if _use_kernel(x) else _eager_bwd
    dx, dweight, dbias = impl(dy, dh, x, weight, bias, mean, rstd)
    dweight = dweight if dweight is not None else x.new_empty(0)
    return dx.contiguous(), dweight, dbias if dbias is not None else x.new_empty(0)


@layer_norm_bwd.register_fake
def _(dy, dh, x, weight, bias, mean, rstd):
    return (x.new_empty(x.shape), torch.empty_like(weight) if weight is not None else x.new_empty(0),
            torch.empty_like(bias) if bias is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps = inputs
    y, h, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(h if residual is not None else x, weight, bias, mean, rstd)


def _backward(ctx, dy, dh, dmean, drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = layer_norm_bwd(dy, dh if ctx.has_residual else None, x, weight, bias, mean, rstd)
    return (dx, dx if ctx.has_residual else None, dweight if weight is not None else None,
            dbias if bias is not None else None, None)


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------

def _common_case(op, x, residual, weight, bias) -> bool:
    """The usual call (see ``plain_float_tensors_on``); anything else takes the full checks."""
    try:
        if x.dim() == 0:
            return False
        n = x.shape[-1]
        return ((weight is None or weight.shape == (n,)) and (bias is None or bias.shape == (n,))
                and (residual.shape == x.shape and residual.dtype == x.dtype if residual is not None
                     else op == "layer_norm")
                and plain_float_tensors_on(x.device, x, residual, weight, bias))
    except (AttributeError, TypeError):
        return False


def _check(op, x, residual, weight, bias):
    if _common_case(op, x, residual, weight, bias):
        return
    check_tensor(op, "x", x, min_dim=1)
    n = x.shape[-1]
    if residual is not None or op == "add_layer_norm":
        check_tensor(op, "residual", residual)
        check_shape(op, "residual", residual, x.shape)
        if residual.dtype != x.dtype:
            raise TypeError(f"{op}: `residual` dtype {residual.dtype} differs from `x` dtype {x.dtype}")
    check_tensor(op, "weight", weight, optional=True, ndim=1)
    check_tensor(op, "bias", bias, optional=True, ndim=1)
    check_shape(op, "weight", weight, (n,))
    check_shape(op, "bias", bias, (n,))
    check_same_device(op, x=x, residual=residual, weight=weight, bias=bias)


def _unit_stride(t: Optional[Tensor]) -> Optional[Tensor]:
    """The kernels read weight and bias with unit stride: an expanded (stride-0) or strided view is copied
    (autograd sums the copy's gradient back into the view's source)."""
    return t if t is None or t.stride(0) == 1 else t.contiguous()


def layer_norm_args(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                    eps: float = 1e-5) -> tuple:
    _check("layer_norm", x, None, weight, bias)
    return x, weight, bias, eps


def add_layer_norm_args(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                        eps: float = 1e-5) -> tuple:
    _check("add_layer_norm", x, residual, weight, bias)
    return x, residual, weight, bias, eps


def kernel_layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    return layer_norm_fwd(x, None, _unit_stride(weight), _unit_stride(bias), float(eps))[0]


def kernel_add_layer_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          eps: float) -> tuple[Tensor, Tensor]:
    y, h, _, _ = layer_norm_fwd(x, residual, _unit_stride(weight), _unit_stride(bias), float(eps))
    return h, y


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dimension with fp32 statistics; returns x's dtype.

    ``weight``/``bias`` may be None or of another float dtype than ``x`` (fp32 parameters with fp16/bf16
    activations, as under autocast)."""
    return kernel_layer_norm(*layer_norm_args(x, weight, bias, eps))


def add_layer_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """``h = x + residual`` and ``layer_norm(h)`` in one pass; returns ``(h, y)``."""
    return kernel_add_layer_norm(*add_layer_norm_args(x, residual, weight, bias, eps))
