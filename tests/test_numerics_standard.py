"""The numerics standard itself (tests/numerics.py, clipfast.numerics): its machine-independent floor passes
the rounding differences other CPUs produce, and it still fails real bugs."""
import math

import pytest
import torch
import torch.nn.functional as F

from clipfast.numerics import EPS, Errors, floor_unit, judge

from .numerics import assert_op_matches, check, randn


def with_error(ref: torch.Tensor, max_abs: float, seed: int = 0) -> torch.Tensor:
    """``ref`` (float64) plus noise of max-abs ``max_abs`` (one element at exactly that), in float32."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(ref.shape, generator=g, dtype=torch.float64) * 2 - 1
    noise.view(-1)[0] = 1.0
    return (ref + max_abs * noise).float()


def attention(q, k, v, causal=True, scale=None, diagonal=0):
    keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril(diagonal) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)


# ---- the floor -------------------------------------------------------------------------------------------

def test_floor_is_dtype_roundoff_plus_the_forward_error_bound_of_the_reduction():
    u32 = EPS[torch.float32]
    assert floor_unit(torch.float32, 1, 8.0, 4.0) == pytest.approx(12 * u32)
    assert floor_unit(torch.float32, 100, 8.0, 4.0) == pytest.approx((8 + 400) * u32)
    # low precision: rounding to the dtype, accumulation in float32
    assert floor_unit(torch.float16, 100, 8.0, 4.0) == pytest.approx(8 * EPS[torch.float16] + 400 * u32)


def test_reported_amd_varlen_dv_case_passes_on_the_floor_alone():
    """A 2-core AMD EPYC (AVX2, OpenBLAS Haswell path for the interpreter's tl.dot): a varlen flash
    attention's fp32 dv, shape (104, 1, 16), scale 12.5, 104 keys: fused 1.584e-4 against eager 2.804e-5.
    The recomputed probabilities of a flash backward are off by the logits' rounding, which depends on the
    BLAS; the floor covers it whatever eager's error is, even 0."""
    torch.manual_seed(0)
    ref = torch.randn(104, 1, 16, dtype=torch.float64)
    ref *= 12.5 / ref.abs().max()
    fused = with_error(ref, 1.584e-4, seed=1)
    for eager_err in (2.804e-5, 0.0):
        eager = with_error(ref, eager_err, seed=2) if eager_err else ref.float()
        problem = check("dv", fused, eager, ref, torch.float32, floor_ulps=64.0, reduction=104)
        assert problem is None, problem


def test_reported_amd_sdpa_vs_multihead_attention_difference_passes():
    """SDPA and nn.MultiheadAttention 2.4e-7 apart on outputs of magnitude ~3 (width 32, MLP 64)."""
    torch.manual_seed(0)
    ref = torch.randn(2, 5, 32, dtype=torch.float64)
    assert check("block", with_error(ref, 2.4e-7), ref.float(), ref, torch.float32, reduction=64) is None


def test_zero_in_exact_arithmetic_gradient_is_judged_against_the_module_scale():
    """A key bias's gradient (0 in exact arithmetic under softmax): clipfast 5.7e-8, eager 1.35e-8 from
    float64, the module's largest gradient (its weight's) 0.18. Relatively both are ~1e8 wrong; against the
    module's gradient scale both are rounding noise."""
    ref = torch.full((32,), 1e-17, dtype=torch.float64)
    fused, eager = with_error(ref, 5.7e-8), with_error(ref, 1.35e-8, seed=3)
    assert check("k_proj.bias", fused, eager, ref, torch.float32, floor_ulps=16.0, reduction=64, scale=0.18) is None
    # judged on its own scale (the old relative judgment) it fails
    assert check("k_proj.bias", fused, eager, ref, torch.float32, floor_ulps=16.0, reduction=64) is not None
    # and noise well above the module's rounding level still fails
    assert check("k_proj.bias", with_error(ref, 1e-4), eager, ref, torch.float32, floor_ulps=16.0, reduction=64,
                 scale=0.18) is not None


def test_verdict_does_not_depend_on_eager_when_the_floor_covers_the_error():
    fused = Errors(max_abs=1e-6, rel_fro=1e-7, where=(), finite=True)
    for eager_err in (0.0, 1e-9, 1e-7):
        eager = Errors(max_abs=eager_err, rel_fro=eager_err, where=(), finite=True)
        assert judge(fused, eager, torch.float32, ref_scale=1.0, reduction=64).passed
    nan = Errors(max_abs=math.inf, rel_fro=math.inf, where=(), finite=False)
    assert not judge(nan, nan, torch.float32, ref_scale=1.0, reduction=64).passed


# ---- real bugs still fail --------------------------------------------------------------------------------

@pytest.mark.parametrize("floor_ulps,reduction", [(8.0, None), (64.0, 577)], ids=["default", "attention-floor"])
def test_one_part_in_a_thousand_fails_in_fp32(floor_ulps, reduction):
    q, k, v = (randn(1, 2, 77, 64) for _ in range(3))
    with pytest.raises(AssertionError):
        assert_op_matches("perturbed", lambda q, k, v: attention(q, k, v) * (1 + 1e-3), attention, [q, k, v],
                          torch.float32, floor_ulps=floor_ulps, reduction=reduction)


def test_a_dropped_element_fails():
    torch.manual_seed(0)
    ref = torch.randn(77, 64, dtype=torch.float64)
    fused = ref.float().clone()
    fused[40, 17] = 0.0
    assert check("dropped", fused, ref.float(), ref, torch.float32, floor_ulps=64.0, reduction=577) is not None


@pytest.mark.parametrize("bug", ["off-by-one causal mask", "scale 1/sqrt(d+1)"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_bugs_fail(bug, dtype):
    q, k, v = (randn(1, 2, 77, 64) for _ in range(3))
    if bug == "off-by-one causal mask":
        wrong = lambda q, k, v: attention(q, k, v, diagonal=1)  # noqa: E731
    else:
        wrong = lambda q, k, v: attention(q, k, v, scale=1 / math.sqrt(65))  # noqa: E731
    with pytest.raises(AssertionError):
        assert_op_matches(bug, wrong, attention, [q, k, v], dtype, backward=False,
                          floor_ulps=64.0 if dtype == torch.float32 else 8.0)
