import pytest
import torch
import torch.nn.functional as F

import clipfast
from clipfast.kernels import attention_varlen as kernel
from clipfast.kernels import runtime
from clipfast.kernels.attention_common import dv_splits

from .conftest import DEVICE, DTYPES
from .test_attention import assert_offered_tiles_fit_shared_memory, skip_unless_offered_here
from .numerics import assert_op_matches, randn

# lengths 1, primes, CLIP's 77 and block-boundary sizes, mixed in one batch
MIXED = [1, 77, 2, 13, 5, 31]


def cu_seqlens(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def per_sequence_sdpa(q, k, v, cu_q, cu_k, is_causal=False, scale=None):
    """The reference: SDPA on each sequence alone, in the inputs' dtype (float64 for the reference)."""
    outs = []
    for qs, qe, ks, ke in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        o = F.scaled_dot_product_attention(q[qs:qe].transpose(0, 1), k[ks:ke].transpose(0, 1),
                                           v[ks:ke].transpose(0, 1), is_causal=is_causal, scale=scale)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


def check(lengths_q, dtype, heads=2, head_dim=32, is_causal=False, lengths_k=None, scale=None, outliers=2):
    lengths_k = lengths_k or lengths_q
    cu_q, cu_k = cu_seqlens(lengths_q), cu_seqlens(lengths_k)
    tq, tk = sum(lengths_q), sum(lengths_k)
    q = randn(tq, heads, head_dim, device=DEVICE, outliers=outliers)
    k = randn(tk, heads, head_dim, device=DEVICE, outliers=outliers)
    v = randn(tk, heads, head_dim, device=DEVICE)
    # fp32 floor as in test_attention: ds = p * (dp - delta) cancels to a few ulps on rows one key dominates.
    # The longest reduction is a sequence's keys (or queries, for dk and dv) or the head dim, not the packed total.
    assert_op_matches(
        "flash_attention_varlen",
        lambda q, k, v: clipfast.flash_attention_varlen(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k),
                                                        is_causal=is_causal, scale=scale),
        lambda q, k, v: per_sequence_sdpa(q, k, v, cu_q, cu_k, is_causal, scale), [q, k, v], dtype,
        floor_ulps=64.0 if dtype == torch.float32 else 8.0, reduction=max(*lengths_q, *lengths_k, head_dim))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal,head_dim", [(False, 16), (True, 64), (False, 80), (True, 32)])
def test_mixed_lengths_match_per_sequence_sdpa_in_float64(dtype, causal, head_dim):
    check(MIXED, dtype, head_dim=head_dim, is_causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_77_and_one_long_many_short(dtype):
    check([77] * 2, dtype, is_causal=True)
    check([77] + [3, 4, 2, 5, 7, 3], dtype, is_causal=True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_query_and_key_lengths_differ(causal):
    check([1, 7, 40, 3], torch.float32, lengths_k=[5, 7, 33, 70], is_causal=causal, scale=0.3)


def test_head_dim_256():
    check([3, 17], torch.float16, heads=1, head_dim=256, outliers=0)


TABLES = {"fwd": (kernel.FWD, kernel._varlen_fwd_kernel), "dkdv": (kernel.DKDV, kernel._varlen_bwd_dkdv_kernel),
          "dq": (kernel.DQ, kernel._varlen_bwd_dq_kernel)}
HEAD_DIM_FOR_BLOCK_D = {16: 16, 64: 64, 128: 80, 256: 256}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("label,tile", [
    pytest.param(label, tile, id=f"{label}-{tile.block_m}x{tile.block_n}-w{tile.warps}s{tile.stages}"
                 f"-split{dv_splits(tile)}-D{min(tile.block_ds)}")
    for label, (table, _) in TABLES.items() for tile in table.tiles])
def test_every_shipped_tile_runs_in_the_interpreter(label, tile, dtype):
    # the interpreter runs the first config only; each tile is forced once at its smallest head dim, causal,
    # with a sequence spanning a block below the diagonal and a ragged end next to a short one
    table, tuned = TABLES[label]
    skip_unless_offered_here(table, tile, dtype)
    with runtime.forced_config(tuned, tile.config()):
        check([tile.block_m + tile.block_n + 3, 5], dtype, heads=1, head_dim=HEAD_DIM_FOR_BLOCK_D[min(tile.block_ds)],
              is_causal=True, outliers=0 if min(tile.block_ds) == 256 else 2)


def test_offered_tiles_fit_the_shared_memory_per_block():
    assert_offered_tiles_fit_shared_memory((kernel.FWD, kernel.DKDV, kernel.DQ))


def test_single_token_sequences():
    # one key per sequence: softmax is exactly 1, so the output is v and dq, dk are cancellation noise
    q, k, v = (randn(5, 2, 32, device=DEVICE).requires_grad_() for _ in range(3))
    cu = cu_seqlens([1] * 5)
    out = clipfast.flash_attention_varlen(q, k, v, cu, cu, 1, 1, is_causal=True)
    torch.testing.assert_close(out, v, atol=0, rtol=0)
    out.sum().backward()
    # p = exp2(s - max) recomputed from the transposed product k q^T: 1 up to an ulp or two
    torch.testing.assert_close(v.grad, torch.ones_like(v), atol=0, rtol=1e-6)
    assert q.grad.abs().max() < 1e-5 and k.grad.abs().max() < 1e-5


def test_packed_in_projection_views_are_read_in_place(monkeypatch):
    lengths = [9, 1, 30]
    qkv = randn(sum(lengths), 3, 2, 32, device=DEVICE)
    q, k, v = qkv.unbind(1)
    seen = []
    launch = kernel.varlen_fwd
    monkeypatch.setattr(kernel, "varlen_fwd", lambda *a: seen.append(a[0].data_ptr()) or launch(*a))
    cu = cu_seqlens(lengths)
    out = clipfast.flash_attention_varlen(q, k, v, cu, cu, 30, 30, is_causal=True)
    assert seen == [qkv.data_ptr()]
    torch.testing.assert_close(out, per_sequence_sdpa(q, k, v, cu, cu, True))


def test_larger_max_seqlen_is_accepted():
    q = randn(12, 1, 16, device=DEVICE)
    cu = cu_seqlens([5, 7])
    out = clipfast.flash_attention_varlen(q, q, q, cu, cu, 77, 77)
    torch.testing.assert_close(out, per_sequence_sdpa(q, q, q, cu, cu))


def test_bad_input_errors():
    q = randn(10, 2, 16, device=DEVICE)
    cu = cu_seqlens([4, 6])
    run = clipfast.flash_attention_varlen
    with pytest.raises(ValueError, match="empty"):
        run(q, q, q, cu_seqlens([4, 0, 6]), cu_seqlens([4, 0, 6]), 6, 6)
    with pytest.raises(ValueError, match="start at 0"):
        run(q, q, q, cu + 1, cu, 6, 6)
    with pytest.raises(ValueError, match="packed length 10"):
        run(q, q, q, cu_seqlens([4, 5]), cu_seqlens([4, 5]), 6, 6)
    with pytest.raises(ValueError, match="empty"):
        run(q, q, q, torch.tensor([0, 6, 4, 10], dtype=torch.int32, device=DEVICE), cu_seqlens([1, 2, 7]), 6, 7)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        run(q, q, q, cu, cu, 5, 6)
    with pytest.raises(TypeError, match="cu_seqlens_k"):
        run(q, q, q, cu, cu.long(), 6, 6)
    with pytest.raises(ValueError, match="same batch"):
        run(q, q, q, cu, cu_seqlens([10]), 6, 10)
    with pytest.raises(ValueError, match="`q`"):
        run(q[None], q, q, cu, cu, 6, 6)
    with pytest.raises(ValueError, match="share H"):
        run(q, q[:, :1], q[:, :1], cu, cu, 6, 6)
    with pytest.raises(TypeError, match="one dtype"):
        run(q, q.half(), q, cu, cu, 6, 6)
    with pytest.raises(TypeError, match="max_seqlen_k"):
        run(q, q, q, cu, cu, 6, 6.0)


def test_head_dims_the_kernels_do_not_take_run_sdpa_with_a_warning():
    q = randn(10, 1, 264, device=DEVICE)
    cu = cu_seqlens([4, 6])
    with pytest.warns(RuntimeWarning, match="head dim 264"):
        out = clipfast.flash_attention_varlen(q, q, q, cu, cu, 6, 6, is_causal=True)
    torch.testing.assert_close(out, per_sequence_sdpa(q, q, q, cu, cu, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_eager_path_without_the_interpreter_matches_float64(dtype, monkeypatch):
    import clipfast.ops.attention_varlen as op

    monkeypatch.setattr(op.runtime, "uses_triton", lambda t: False)
    monkeypatch.setattr(kernel, "varlen_fwd", None)  # must not be reached
    check([1, 13, 40], dtype, is_causal=True)
    check([3, 13], dtype, lengths_k=[20, 1])


def test_interpreter_or_gpu_runs_the_triton_kernels(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("kernel launcher called")

    q = torch.randn(4, 1, 16, device=DEVICE, requires_grad=True)
    cu = cu_seqlens([1, 3])
    monkeypatch.setattr(kernel, "varlen_fwd", boom)
    with pytest.raises(RuntimeError, match="kernel launcher called"):
        clipfast.flash_attention_varlen(q, q, q, cu, cu, 3, 3)
    monkeypatch.undo()
    monkeypatch.setattr(kernel, "varlen_bwd", boom)
    with pytest.raises(RuntimeError, match="kernel launcher called"):
        clipfast.flash_attention_varlen(q, q, q, cu, cu, 3, 3).sum().backward()


def test_poisoned_outputs_are_fully_written():
    assert runtime._POISON
    q, k, v = (randn(70, 3, 24, device=DEVICE).requires_grad_() for _ in range(3))
    cu = cu_seqlens([65, 1, 4])
    out = clipfast.flash_attention_varlen(q, k, v, cu, cu, 65, 65, is_causal=True)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_compile_fullgraph_matches_eager():
    def block(q, k, v, cu):
        return clipfast.flash_attention_varlen(q, k, v, cu, cu, 11, 11, is_causal=True).square().sum()

    q, k, v = (randn(20, 2, 16, device=DEVICE).requires_grad_() for _ in range(3))
    cu = cu_seqlens([9, 11])
    expected = block(q, k, v, cu)
    expected_grads = torch.autograd.grad(expected, (q, k, v))
    torch._dynamo.reset()
    out = torch.compile(block, fullgraph=True, backend="aot_eager")(q, k, v, cu)
    grads = torch.autograd.grad(out, (q, k, v))
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_custom_op_registration_is_valid():
    q, k, v = (randn(12, 2, 16, device=DEVICE) for _ in range(3))
    cu = cu_seqlens([5, 7])
    torch.library.opcheck(torch.ops.clipfast.flash_attention_varlen_fwd, (q, k, v, cu, cu, 7, 7, True, 0.25),
                          test_utils=("test_schema", "test_faketensor"))
    out, lse = torch.ops.clipfast.flash_attention_varlen_fwd(q, k, v, cu, cu, 7, 7, False, 0.25)
    torch.library.opcheck(torch.ops.clipfast.flash_attention_varlen_bwd,
                          (torch.randn_like(out), q, k, v, out, lse, cu, cu, 7, 7, False, 0.25),
                          test_utils=("test_schema", "test_faketensor"))

