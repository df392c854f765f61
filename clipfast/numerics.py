"""Error measures and the pass/fail judgment shared by the test suite's numerics standard (tests/numerics.py)
and ``clipfast verify``: max-abs and relative Frobenius error of a result against a float64 reference, each
dtype's unit roundoff, and the machine-independent error floor.

The standard: a fused result passes when its error against float64 is at most
``factor * eager_error + floor`` for both the max-abs and the relative Frobenius error (NaN or inf never
passes). Eager's own error depends on the CPU that computes it (BLAS kernel, ISA, thread count), so it only
adds slack; the floor (:func:`floor_unit`) is computed from the dtype, the reduction length and the tensor's
scale alone, and is what a correct kernel meets on its own, whatever eager does on the machine at hand.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# unit roundoff of each dtype
EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}

#: units of accumulation roundoff allowed per reduced element (the constant of the forward error bound)
ACC_ULPS = 4.0


@dataclass
class Errors:
    max_abs: float
    rel_fro: float
    where: tuple
    finite: bool


def errors(out: torch.Tensor, ref: torch.Tensor) -> Errors:
    out64, ref64 = out.detach().double(), ref.detach().double()
    finite = bool(torch.isfinite(out64).all())
    if out64.numel() == 0:
        return Errors(0.0, 0.0, (), finite)
    diff = (out64 - ref64).abs()
    diff = torch.where(torch.isfinite(diff), diff, torch.full_like(diff, float("inf")))
    flat = int(torch.argmax(diff))
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    ref_norm = float(ref64.norm())
    rel = float((out64 - ref64).norm()) / ref_norm if ref_norm > 0 else float(diff.max())
    return Errors(float(diff.max()), rel, where, finite)


def accumulation_eps(dtype: torch.dtype) -> float:
    """Unit roundoff of the precision sums are accumulated in: float32 for float32, float16 and bfloat16
    (tensor cores and PyTorch's CPU kernels accumulate low-precision products in float32), float64 for
    float64."""
    return EPS[torch.float64] if dtype == torch.float64 else EPS[torch.float32]


def floor_unit(dtype: torch.dtype, reduction: int = 1, floor_ulps: float = 8.0, acc_ulps: float = ACC_ULPS) -> float:
    """The machine-independent error floor, relative to the tensor's scale (multiply by the scale for an
    absolute bound):

        floor_ulps * u(dtype) + acc_ulps * K * u_acc

    The first term is the rounding of the result (and of the values it is computed from) to ``dtype``: a few
    units of roundoff of the tensor's scale. The second is the standard forward error bound of a sum of
    ``K = reduction`` products accumulated in precision ``u_acc`` (:func:`accumulation_eps`),
    ``|fl(a.b) - a.b| <= gamma_K * sum|a_i b_i|`` with ``gamma_K ~ K * u_acc``, with ``sum|a_i b_i|``
    taken as the tensor's scale (its largest magnitude against float64): exact for sums of positive weights
    (softmax probabilities times values, a flash kernel's recomputed probabilities); for terms of random
    sign ``sum|a_i b_i| ~ sqrt(K) |a.b|`` and the probabilistic bound ``sqrt(K) * u_acc * sum|a_i b_i|``
    is the same ``K * u_acc * |a.b|``. Nothing in it depends on the machine: it is what a correct kernel
    meets whichever BLAS, ISA or thread count computes it, and still far below the error of a real bug
    (a 1e-3 relative perturbation, a dropped element, a wrong scale) at the sizes the tests use."""
    return floor_ulps * EPS[dtype] + acc_ulps * max(int(reduction), 1) * accumulation_eps(dtype)


@dataclass
class Verdict:
    passed: bool
    abs_allowed: float
    rel_allowed: float
    abs_floor: float
    rel_floor: float


def judge(fused: Errors, eager: Errors, dtype: torch.dtype, ref_scale: float, scale: float = 0.0,
          reduction: int = 1, factor: float = 2.0, floor_ulps: float = 8.0, acc_ulps: float = ACC_ULPS) -> Verdict:
    """The standard's verdict on ``fused``'s errors against float64, given eager's in the same dtype.

    ``ref_scale`` is the reference's largest magnitude; ``scale`` the magnitude of the terms it is summed
    from when that is larger (for a gradient, the largest gradient among its module's parameters or its op's
    inputs: a gradient that is exactly 0 in exact arithmetic, e.g. a key bias's under softmax, is rounding
    noise of terms of that size). The max-abs error is allowed ``factor * eager + floor * scale``; the
    relative error ``factor * eager + floor * scale / ref_scale`` -- a reference at the noise level of
    its terms has no digits to compare relatively and is then judged by the absolute bound alone."""
    unit = floor_unit(dtype, reduction, floor_ulps, acc_ulps)
    scale = max(scale, ref_scale)
    abs_floor = unit * max(scale, 1e-30)
    rel_floor = unit * scale / ref_scale if ref_scale > 0 else math.inf
    abs_allowed = factor * eager.max_abs + abs_floor
    rel_allowed = factor * eager.rel_fro + rel_floor
    passed = fused.finite and fused.max_abs <= abs_allowed and fused.rel_fro <= rel_allowed
    return Verdict(bool(passed), abs_allowed, rel_allowed, abs_floor, rel_floor)
