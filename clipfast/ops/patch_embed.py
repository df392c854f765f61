"""Patch embedding (conv (+ bias) -> flatten -> class token -> positional embedding, optional uint8
normalization and ln_pre) as a torch custom op with Triton forward and backward.

``clipfast::patch_embed_fwd`` builds the pre-LN tokens in one kernel; ``clipfast::patch_embed_bwd`` runs the
backward kernels (weight GEMM over patches, col2im pixel gradient, batch sums for the class and positional
embeddings, with the conv-bias gradient summed by the weight GEMM's programs). ln_pre, when requested, is the ``clipfast::layer_norm_fwd`` op applied to the tokens (a second
pass with the LayerNorm kernels; see ``clipfast.kernels.patch_embed`` for why it is not in the GEMM epilogue).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from clipfast.kernels import patch_embed as kernel
from clipfast.kernels import runtime

from .._validate import (FLOAT_DTYPES, PLAIN_TENSOR_TYPES, check_same_device, check_shape, check_tensor,
                         host_sync_forbidden, plain_float_tensors_on)
from . import _custom_op
from ._custom_op import custom_op
from .layer_norm import kernel_layer_norm, reference_layer_norm

PIXEL_DTYPES = FLOAT_DTYPES + (torch.uint8,)


# ----------------------------------------------------------------------------------------------
# Eager reference: conv2d -> flatten -> cat(class) -> + positional (-> F.layer_norm for ln_pre), on the
# canonical arguments (``patch_embed_args``). The pre-LN part is also the CPU path without the interpreter.
# ----------------------------------------------------------------------------------------------

def _normalized(pixels, scale, shift):
    if scale is None:
        return pixels
    return pixels.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def _reference_tokens(pixels, weight, bias, class_embedding, positional_embedding, scale, shift):
    bias = bias.to(weight.dtype) if bias is not None else None
    x = F.conv2d(_normalized(pixels, scale, shift).to(weight.dtype), weight, bias, stride=weight.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    if class_embedding is not None:
        cls = class_embedding.to(x.dtype).expand(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls, x], dim=1)
    if positional_embedding is not None:
        x = x + positional_embedding.to(x.dtype)
    return x


def reference_patch_embed(pixels, conv_weight, conv_bias, class_embedding, positional_embedding, scale, shift,
                          ln_weight, ln_bias, ln_eps) -> Tensor:
    tokens = _reference_tokens(pixels, conv_weight, conv_bias, class_embedding, positional_embedding, scale, shift)
    if ln_weight is None and ln_bias is None:
        return tokens
    return reference_layer_norm(tokens, ln_weight, ln_bias, ln_eps)


def _eager_fwd(pixels, weight, bias, class_embedding, positional_embedding, scale, shift):
    return _reference_tokens(pixels, weight, bias, class_embedding, positional_embedding, scale, shift).contiguous()


def _eager_bwd(dtokens, pixels, weight, scale, shift, has_cls, need_pixels, need_weight, need_bias, sum_rows):
    batch, _, height, width_px = pixels.shape
    p = weight.shape[-1]
    dpatches = dtokens[:, int(has_cls):].transpose(1, 2).reshape(batch, weight.shape[0], height // p, width_px // p)
    dpixels = dweight = dbias = dsum = None
    if need_pixels:
        dx = torch.nn.grad.conv2d_input(pixels.shape, weight, dpatches, stride=p)
        if scale is not None:
            dx = dx.float() * scale.view(1, -1, 1, 1)
        dpixels = dx.to(pixels.dtype)
    if need_weight:
        x = _normalized(pixels, scale, shift).to(weight.dtype)
        dweight = torch.nn.grad.conv2d_weight(x.float(), weight.shape, dpatches.float(), stride=p)
    if need_bias:
        dbias = dpatches.float().sum((0, 2, 3))
    if sum_rows:
        dsum = dtokens[:, :sum_rows].float().sum(0)
    return dpixels, dweight, dbias, dsum


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------

@custom_op("clipfast::patch_embed_fwd")
def patch_embed_fwd(pixels: Tensor, weight: Tensor, bias: Optional[Tensor], class_embedding: Optional[Tensor],
                    positional_embedding: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor]) -> Tensor:
    """Tokens [B, (1 if class) + N, width] in ``weight``'s dtype (pre-LN)."""
    impl = kernel.patch_embed_fwd if runtime.uses_triton(pixels) else _eager_fwd
    return impl(pixels, weight, bias, class_embedding, positional_embedding, scale, shift)


@patch_embed_fwd.register_fake
def _(pixels, weight, bias, class_embedding, positional_embedding, scale, shift):
    p = weight.shape[-1]
    n_tokens = (pixels.shape[2] // p) * (pixels.shape[3] // p) + (class_embedding is not None)
    return weight.new_empty((pixels.shape[0], n_tokens, weight.shape[0]))


@custom_op("clipfast::patch_embed_bwd")
def patch_embed_bwd(dtokens: Tensor, pixels: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                    has_cls: bool, need_pixels: bool, need_weight: bool, need_bias: bool,
                    sum_rows: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dpixels, dweight, dbias, dsum): dpixels in the pixels' dtype, dweight in the weight's dtype,
    dbias = fp32 sum of the patch rows of ``dtokens`` over the batch and the patches [width],
    dsum = fp32 sum over the batch of the first ``sum_rows`` token rows; empty tensors where not asked for."""
    impl = kernel.patch_embed_bwd if runtime.uses_triton(pixels) else _eager_bwd
    dpixels, dweight, dbias, dsum = impl(dtokens, pixels, weight, scale, shift, has_cls, need_pixels, need_weight,
                                         need_bias, sum_rows)
    empty = dtokens.new_empty(0)
    # contiguous whatever the inputs' memory format (channels_last pixels): what the fake below declares
    return (dpixels.contiguous() if dpixels is not None else empty,
            dweight.to(weight.dtype).contiguous() if dweight is not None else empty.clone(),
            dbias if dbias is not None else empty.clone(),
            dsum if dsum is not None else empty.clone())


@patch_embed_bwd.register_fake
def _(dtokens, pixels, weight, scale, shift, has_cls, need_pixels, need_weight, need_bias, sum_rows):
    return (pixels.new_empty(pixels.shape) if need_pixels else dtokens.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else dtokens.new_empty(0),
            dtokens.new_empty((weight.shape[0],), dtype=torch.float32) if need_bias else dtokens.new_empty(0),
            dtokens.new_empty((sum_rows, dtokens.shape[-1]), dtype=torch.float32) if sum_rows else dtokens.new_empty(0))


def _setup_context(ctx, inputs, output):
    pixels, weight, bias, class_embedding, positional_embedding, scale, shift = inputs
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.cls_dtype = class_embedding.dtype if class_embedding is not None else None
    ctx.pos_dtype = positional_embedding.dtype if positional_embedding is not None else None
    ctx.pixels_float = pixels.is_floating_point()
    ctx.save_for_backward(pixels, weight, scale, shift)


def _backward(ctx, dtokens):
    pixels, weight, scale, shift = ctx.saved_tensors
    need_pixels = ctx.needs_input_grad[0] and ctx.pixels_float
    need_weight = ctx.needs_input_grad[1]
    need_bias = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
    need_cls = ctx.cls_dtype is not None and ctx.needs_input_grad[3]
    need_pos = ctx.pos_dtype is not None and ctx.needs_input_grad[4]
    sum_rows = dtokens.shape[1] if need_pos else int(need_cls)
    dpixels, dweight, dbias, dsum = patch_embed_bwd(dtokens, pixels, weight, scale, shift, ctx.cls_dtype is not None,
                                                    need_pixels, need_weight, need_bias, sum_rows)
    return (dpixels if need_pixels else None, dweight if need_weight else None,
            dbias.to(ctx.bias_dtype) if need_bias else None,
            dsum[0].to(ctx.cls_dtype) if need_cls else None, dsum.to(ctx.pos_dtype) if need_pos else None,
            None, None)


patch_embed_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------

def _per_channel(op: str, name: str, value, channels: int, device) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float64, device=device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"{op}: `{name}` must have one value per channel ({channels}), got {t.numel()}")
    return t


def _scale_shift(op: str, pixels: Tensor, mean, std) -> tuple[Optional[Tensor], Optional[Tensor]]:
    if (mean is None) != (std is None):
        raise ValueError(f"{op}: give both `mean` and `std` or neither")
    if mean is None:
        if pixels.dtype == torch.uint8:
            raise ValueError(f"{op}: uint8 `pixels` need `mean` and `std` (per channel, 0..1 units)")
        return None, None
    unit = 255.0 if pixels.dtype == torch.uint8 else 1.0
    key = _constant_key(mean, std, unit, pixels)
    if key is None:
        return _scale_shift_values(op, mean, std, unit, pixels.shape[1], pixels.device)
    hit = _NORMALIZATIONS.get((key, pixels.device))
    if hit is None:
        host = _NORMALIZATIONS.get((key, None))
        if host is None:
            host = _NORMALIZATIONS[(key, None)] = _scale_shift_values(op, mean, std, unit, pixels.shape[1], "cpu")
        hit = _NORMALIZATIONS[(key, pixels.device)] = (host[0].to(pixels.device), host[1].to(pixels.device))
    return hit


# ((mean, std, unit, channels), device or None for the host copy) -> (scale, shift), for mean/std given as
# numbers
_NORMALIZATIONS: dict[tuple, tuple[Tensor, Tensor]] = {}


def _constant_key(mean, std, unit: float, pixels: Tensor) -> Optional[tuple]:
    """Mean and std given as Python numbers normalize the same way on every call: their scale and shift are
    computed once on the host (the zero-std check reads no device memory) and kept on the device, so later
    calls neither copy them to the device nor synchronize (CUDA graph capture). None for tensors, odd
    values (the full path reports them) and while tracing (a cache would keep traced tensors)."""
    if isinstance(mean, Tensor) or isinstance(std, Tensor) or _custom_op.needs_custom_op((pixels,)):
        return None
    try:
        return (_numbers(mean), _numbers(std), unit, pixels.shape[1])
    except (TypeError, ValueError):
        return None


def _numbers(value) -> tuple:
    return tuple(float(v) for v in value) if hasattr(value, "__iter__") else (float(value),)


def _scale_shift_values(op: str, mean, std, unit: float, channels: int, device) -> tuple[Tensor, Tensor]:
    mean = _per_channel(op, "mean", mean, channels, device)
    std = _per_channel(op, "std", std, channels, device)
    # reads the values: a host sync when std is a GPU tensor (mean/std given as numbers are checked on the host)
    if not host_sync_forbidden() and bool((std == 0).any()):
        raise ValueError(f"{op}: `std` must be non-zero")
    return (1.0 / (unit * std)).float(), (-mean / std).float()


def _common_case(pixels, weight, bias, class_embedding, positional_embedding) -> bool:
    """The usual call (see ``plain_float_tensors_on``); anything else takes the full checks."""
    try:
        if pixels.dim() != 4 or weight.dim() != 4:
            return False
        width, channels, p, p2 = weight.shape
        _, c, height, width_px = pixels.shape
        if p != p2 or p < 1 or c != channels or height < p or width_px < p or height % p or width_px % p:
            return False
        n_tokens = (height // p) * (width_px // p) + (class_embedding is not None)
        pos = positional_embedding
        return ((bias is None or bias.shape == (width,))
                and (class_embedding is None or class_embedding.shape == (width,))
                and (pos is None or pos.shape == (n_tokens, width) or pos.shape == (1, n_tokens, width))
                and type(pixels) in PLAIN_TENSOR_TYPES and pixels.dtype in PIXEL_DTYPES
                and plain_float_tensors_on(pixels.device, weight, bias, class_embedding, pos))
    except (AttributeError, TypeError):
        return False


def _check(op, pixels, weight, bias, class_embedding, positional_embedding):
    if _common_case(pixels, weight, bias, class_embedding, positional_embedding):
        return
    check_tensor(op, "pixels", pixels, dtypes=PIXEL_DTYPES, ndim=4)
    check_tensor(op, "conv_weight", weight, ndim=4)
    width, channels, p, p2 = weight.shape
    if p != p2 or p < 1:
        raise ValueError(f"{op}: `conv_weight` must be [width, C, p, p] with a square patch, got {tuple(weight.shape)}")
    if pixels.shape[1] != channels:
        raise ValueError(f"{op}: `pixels` has {pixels.shape[1]} channels but `conv_weight` expects {channels} "
                         f"(pixels must be [B, C, H, W])")
    height, width_px = pixels.shape[2:]
    if height < p or width_px < p or height % p or width_px % p:
        raise ValueError(f"{op}: image size {height}x{width_px} is not a positive multiple of the patch size {p}")
    check_tensor(op, "conv_bias", bias, optional=True, ndim=1)
    if bias is not None and bias.shape[0] != width:
        raise ValueError(f"{op}: `conv_bias` must have shape ({width},), got {tuple(bias.shape)}")
    check_tensor(op, "class_embedding", class_embedding, optional=True, ndim=1)
    if class_embedding is not None and class_embedding.shape[0] != width:
        raise ValueError(f"{op}: `class_embedding` must have shape ({width},), got {tuple(class_embedding.shape)}")
    check_tensor(op, "positional_embedding", positional_embedding, optional=True)
    if positional_embedding is not None:
        n_tokens = (height // p) * (width_px // p) + (class_embedding is not None)
        shape = tuple(positional_embedding.shape)
        if shape not in ((n_tokens, width), (1, n_tokens, width)):
            raise ValueError(f"{op}: `positional_embedding` must have shape ({n_tokens}, {width}) for a "
                             f"{height}x{width_px} image with patch {p}"
                             f"{' and a class token' if class_embedding is not None else ''}, got {shape}")
    check_same_device(op, pixels=pixels, conv_weight=weight, conv_bias=bias, class_embedding=class_embedding,
                      positional_embedding=positional_embedding)


def patch_embed(pixels: Tensor, conv_weight: Tensor, class_embedding: Optional[Tensor] = None,
                positional_embedding: Optional[Tensor] = None, *, conv_bias: Optional[Tensor] = None,
                mean: Union[Sequence[float], Tensor, None] = None, std: Union[Sequence[float], Tensor, None] = None,
                ln_weight: Optional[Tensor] = None, ln_bias: Optional[Tensor] = None, ln_eps: float = 1e-5) -> Tensor:
    """ViT patch embedding in one kernel: ``conv2d(pixels, conv_weight, conv_bias, stride=p)`` -> flatten ->
    prepend ``class_embedding`` -> add ``positional_embedding``, returning tokens ``[B, (1 if class) + N, width]``.

    - ``pixels`` [B, C, H, W], any layout, H and W multiples of the patch size. Float pixels are computed in
      ``conv_weight``'s dtype (as ``conv1(x.type(conv1.weight.dtype))`` in CLIP), which is the dtype of the
      result; their gradient comes back in their own dtype.
    - ``mean``/``std`` (per channel, sequences or tensors): normalization ``(x - mean) / std`` folded into the
      pixel loads. For uint8 pixels (required there) they are in the 0..1 convention of CLIP's published
      constants and torchvision's ``Normalize``: the value used is ``(v / 255 - mean) / std``. For float
      pixels they apply to the values as given.
    - ``conv_bias`` [width] (keyword; None = a conv without bias, as CLIP's): added to the patch tokens only
      (SigLIP, timm), its gradient summed in the backward's weight kernel.
    - ``positional_embedding`` [(1 if class) + N, width] (or with a leading 1); ``class_embedding`` [width].
    - ``ln_weight``/``ln_bias``: when either is given, ln_pre (LayerNorm over width with fp32 statistics,
      ``ln_eps``) is applied and only the normalized tokens are returned (CLIP never uses the pre-LN tokens;
      autograd keeps them for the LayerNorm backward).
    """
    return kernel_patch_embed(*patch_embed_args(pixels, conv_weight, class_embedding, positional_embedding,
                                                conv_bias=conv_bias, mean=mean, std=std, ln_weight=ln_weight,
                                                ln_bias=ln_bias, ln_eps=ln_eps))


def patch_embed_args(pixels: Tensor, conv_weight: Tensor, class_embedding: Optional[Tensor] = None,
                     positional_embedding: Optional[Tensor] = None, *, conv_bias: Optional[Tensor] = None,
                     mean: Union[Sequence[float], Tensor, None] = None, std: Union[Sequence[float], Tensor, None] = None,
                     ln_weight: Optional[Tensor] = None, ln_bias: Optional[Tensor] = None, ln_eps: float = 1e-5) -> tuple:
    """The canonical arguments ``(pixels, conv_weight, conv_bias, class_embedding, positional_embedding [N,
    width], scale, shift, ln_weight, ln_bias, ln_eps)``, the normalization folded into ``scale``/``shift``."""
    op = "patch_embed"
    _check(op, pixels, conv_weight, conv_bias, class_embedding, positional_embedding)
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is not None and not (type(t) in PLAIN_TENSOR_TYPES and t.shape == conv_weight.shape[:1]):
            check_tensor(op, name, t, ndim=1)
            check_shape(op, name, t, conv_weight.shape[:1])
    scale, shift = _scale_shift(op, pixels, mean, std)
    pos = positional_embedding
    if pos is not None and pos.dim() == 3:
        pos = pos.reshape(pos.shape[1:])
    return pixels, conv_weight, conv_bias, class_embedding, pos, scale, shift, ln_weight, ln_bias, ln_eps


def kernel_patch_embed(pixels, conv_weight, conv_bias, class_embedding, positional_embedding, scale, shift,
                       ln_weight, ln_bias, ln_eps) -> Tensor:
    """clipfast's path: the patch-embedding kernel, then ln_pre (the LayerNorm kernels) when asked for."""
    tokens = patch_embed_fwd(pixels, conv_weight, conv_bias, class_embedding, positional_embedding, scale, shift)
    if ln_weight is None and ln_bias is None:
        return tokens
    return kernel_layer_norm(tokens, ln_weight, ln_bias, float(ln_eps))
