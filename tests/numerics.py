"""The numerics standard (GUIDE §2) as one helper.

Every op is compared, forward and every gradient, against a float64 reference computed from the same
already-rounded inputs. A result passes when its error is no worse than eager PyTorch's own error in the
same dtype, up to a machine-independent floor: ``err_fused <= factor * err_eager + floor`` for both the
max-abs and the relative Frobenius error (``clipfast.numerics.judge``). NaN or inf never passes.

Eager's error depends on the CPU computing it, so the floor alone must hold a correct kernel on any machine:
``floor = (floor_ulps * u(dtype) + ACC_ULPS * K * u(float32)) * scale`` -- a few roundings to the dtype plus
the forward error bound of a length-``K`` float32-accumulated sum (``clipfast.numerics.floor_unit``), with
``K`` the longest reduction behind the tensor and ``scale`` its largest magnitude against float64 (for a
gradient: the largest gradient of the op's inputs, so a gradient that is 0 in exact arithmetic is judged
against the scale of the terms that cancel, not relatively).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from clipfast.numerics import EPS, errors, judge  # noqa: F401  (EPS, errors: re-exported for the tests)


def randn(*shape, dtype=torch.float32, device="cpu", outliers: int = 0, outlier_scale: float = 20.0):
    """Standard normal inputs, with ``outliers`` channels of the last dim scaled up (trained CLIP has a
    few large channels; they are where fp16 overflows)."""
    x = torch.randn(*shape, dtype=torch.float64, device=device)
    if outliers and x.dim() >= 1 and x.shape[-1] > 0:
        idx = torch.randperm(x.shape[-1], device=device)[:outliers]
        x[..., idx] *= outlier_scale
    return x.to(dtype)


def check(name: str, fused: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
          factor: float = 2.0, floor_ulps: float = 8.0, reduction: int = 1, scale: float = 0.0) -> str | None:
    """None when ``fused`` meets the standard, else a readable report.

    ``reduction``: the longest sum behind the tensor (a dot product's length, a softmax row's keys), which
    sizes the floor's accumulation term. ``scale``: the magnitude of the terms the tensor is computed from
    when it exceeds the reference's own (a gradient's op- or module-wide gradient scale); the floor is sized
    by the larger of the two."""
    if fused is None or ref is None:
        if fused is None and ref is None:
            return None
        return f"{name}: one side has no value (fused {fused is None}, reference {ref is None})"
    if tuple(fused.shape) != tuple(ref.shape):
        return f"{name}: shape {tuple(fused.shape)} != reference {tuple(ref.shape)}"
    ef, ee = errors(fused, ref), errors(eager, ref)
    verdict = judge(ef, ee, dtype, _magnitude(ref), scale, reduction, factor, floor_ulps)
    if verdict.passed:
        return None
    at = ef.where
    return (f"{name} [{str(dtype).replace('torch.', '')}, shape {tuple(ref.shape)}]: "
            f"fused max-abs {ef.max_abs:.3e} rel {ef.rel_fro:.3e} vs eager max-abs {ee.max_abs:.3e} rel {ee.rel_fro:.3e} "
            f"(allowed {factor}x eager + floor = {verdict.abs_allowed:.1e} / {verdict.rel_allowed:.1e}, "
            f"floor {verdict.abs_floor:.1e} / {verdict.rel_floor:.1e} at reduction {reduction}); worst at {at}: "
            f"fused {float(fused.detach().double()[at]):.6g}, "
            f"eager {float(eager.detach().double()[at]):.6g}, "
            f"reference {float(ref.detach().double()[at]):.6g}"
            + ("" if ef.finite else "; fused output has NaN/inf"))


def _magnitude(t: torch.Tensor | None) -> float:
    return float(t.detach().double().abs().max()) if t is not None and t.numel() else 0.0


def default_reduction(inputs: Sequence) -> int:
    """The largest dimension of any floating input: the ops tested here reduce along their inputs' axes
    (tokens, keys, channels, hidden units), so no output or gradient sums more terms than that."""
    dims = [d for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point() for d in t.shape]
    return max(dims, default=1)


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def assert_op_matches(name: str, fused_fn: Callable, eager_fn: Callable, inputs: Sequence, dtype: torch.dtype,
                      reference_fn: Callable | None = None, backward: bool = True,
                      differentiable: Sequence[bool] | None = None, factor: float = 2.0, floor_ulps: float = 8.0,
                      param_dtype_inputs: Sequence[int] = (), reduction: int | None = None) -> None:
    """Run ``fused_fn`` and ``eager_fn`` on ``inputs`` rounded to ``dtype`` and ``reference_fn`` (default
    ``eager_fn``) on float64 copies of the same rounded values; compare outputs and, with ``backward``,
    the gradient of every floating input for the same random upstream gradients.

    Inputs listed in ``param_dtype_inputs`` stay in their own dtype (e.g. fp32 parameters with fp16
    activations, as under autocast). ``reduction`` (default :func:`default_reduction`) sizes the floor's
    accumulation term; every gradient's floor is sized by the largest gradient of the op's inputs."""
    reference_fn = reference_fn or eager_fn
    reduction = default_reduction(inputs) if reduction is None else reduction
    differentiable = list(differentiable) if differentiable is not None else [True] * len(inputs)
    rounded = []
    for i, t in enumerate(inputs):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and i not in param_dtype_inputs:
            t = t.to(dtype)
        rounded.append(t)

    def call(fn, cast):
        leaves = []
        for i, (t, diff) in enumerate(zip(rounded, differentiable)):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                target = torch.float64 if cast == torch.float64 else t.dtype
                t = t.detach().to(target).requires_grad_(backward and diff)
            leaves.append(t)
        outs = _as_tuple(fn(*leaves))
        return leaves, outs

    ref_leaves, ref_outs = call(reference_fn, torch.float64)
    grad_outs64 = [torch.randn_like(o, dtype=torch.float64) if o.is_floating_point() else None for o in ref_outs]
    # round the upstream gradients to the output dtype first, so every side sees the same values
    fused_leaves, fused_outs = call(fused_fn, dtype)
    eager_leaves, eager_outs = call(eager_fn, dtype)
    grad_outs64 = [g.to(o.dtype).double() if g is not None else None for g, o in zip(grad_outs64, fused_outs)]

    problems = []
    for i, (f, e, r) in enumerate(zip(fused_outs, eager_outs, ref_outs)):
        problems.append(check(f"{name} output {i}", f, e, r, dtype, factor, floor_ulps, reduction))

    if backward:
        for leaves, outs in ((ref_leaves, ref_outs), (fused_leaves, fused_outs), (eager_leaves, eager_outs)):
            pairs = [(o, g.to(o.dtype)) for o, g in zip(outs, grad_outs64) if g is not None and o.requires_grad]
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grad_scale = max((_magnitude(r.grad) for r in ref_leaves if isinstance(r, torch.Tensor) and r.requires_grad),
                         default=0.0)
        for i, (f, e, r) in enumerate(zip(fused_leaves, eager_leaves, ref_leaves)):
            if isinstance(r, torch.Tensor) and r.requires_grad:
                problems.append(check(f"{name} grad of input {i}", f.grad, e.grad, r.grad, dtype, factor, floor_ulps,
                                      reduction, grad_scale))
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems)
