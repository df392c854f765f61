import pytest
import torch
import torch.nn.functional as F

import clipfast
from clipfast.kernels import attention as kernel
from clipfast.kernels import runtime
from clipfast.kernels.attention_common import dv_splits, launch

from .conftest import DEVICE, DTYPES, ON_GPU, run_without_interpreter
from .numerics import assert_op_matches, randn

# CLIP's sequence lengths (text 77; ViT-B/32 50, B/16 197, L/14 257, L/14@336 577) and block-boundary sizes
SEQ_LENS = [1, 2, 50, 63, 65, 77, 129, 197, 257, 577]
HEAD_DIMS = [32, 64, 80, 128]


def eager_attention(q, k, v, mask=None, is_causal=False, scale=None):
    """SDPA in the inputs' dtype (float64 for the reference), with the kernel's convention for rows whose
    keys are all masked: output 0 and no gradient (SDPA itself returns NaN there)."""
    lq, lk = q.shape[-2], k.shape[-2]
    keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if is_causal:
        keep = keep.tril()
    if mask is not None:
        if mask.dim() == 2 and mask.shape[0] != lq and mask.shape[0] != 1:
            mask = mask[:, None, None, :]  # [B, Lk] key padding
        keep = keep & (mask if mask.dtype == torch.bool else torch.isfinite(mask))
    keep = keep.expand(q.shape[:-2] + (lq, lk))
    row_live = keep.any(-1, keepdim=True)
    keep = keep | ~row_live  # dead rows attend everything, then are zeroed
    bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
    if mask is not None and mask.dtype != torch.bool:
        bias = bias + torch.where(torch.isfinite(mask), mask, 0).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    return out * row_live.to(out.dtype)


def qkv(b, h, lq, lk, d, **kw):
    return (randn(b, h, lq, d, device=DEVICE, **kw), randn(b, h, lk, d, device=DEVICE, **kw),
            randn(b, h, lk, d, device=DEVICE))


def check(q, k, v, dtype, mask=None, is_causal=False, scale=None, name="flash_attention"):
    # fp32 floor: the flash backward's ds = p * (dp - rowsum(dO * O)) cancels to a few ulps of |dO||v| on rows
    # that one key dominates (outlier channels), where eager's p * (dp - sum(p * dp)) cancels exactly; the
    # error is tiny in absolute terms but can be several times eager's when both are near zero.
    assert_op_matches(
        name, lambda q, k, v: clipfast.flash_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale),
        lambda q, k, v: eager_attention(q, k, v, mask, is_causal, scale), [q, k, v], dtype,
        floor_ulps=64.0 if dtype == torch.float32 else 8.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen", SEQ_LENS)
def test_matches_float64(dtype, causal, seqlen):
    d = HEAD_DIMS[SEQ_LENS.index(seqlen) % len(HEAD_DIMS)]  # every head dim meets several lengths
    b, h = (1, 2) if seqlen < 100 or ON_GPU else (1, 1)
    # outlier channels saturate the softmax of one or two keys completely (every gradient is cancellation
    # noise), so they are used where rows have more keys to spread over
    q, k, v = qkv(b, h, seqlen, seqlen, d, outliers=2 if seqlen > 2 else 0)
    if seqlen > 1:
        check(q, k, v, dtype, is_causal=causal)
        return
    # one key: softmax is exactly 1, dq and dk are 0 up to cancellation noise (no relative error to speak of)
    assert_op_matches("flash_attention", lambda q, k, v: clipfast.flash_attention(q, k, v, is_causal=causal),
                      eager_attention, [q, k, v], dtype, differentiable=[False, False, True])
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out = clipfast.flash_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(out, v, atol=0, rtol=0)
    do = torch.randn_like(out)
    dq, dk = torch.autograd.grad(out, (q, k), do)
    bound = 16 * d * float(do.abs().max() * v.detach().abs().max()) * (2.0**-24 if dtype == torch.float32 else 2.0**-11)
    assert dq.abs().max() <= bound and dk.abs().max() <= bound


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq,lk,causal", [(1, 50, False), (1, 197, False), (77, 50, True), (50, 129, False),
                                          (129, 65, True)])
def test_query_and_key_lengths_differ(dtype, lq, lk, causal):
    # Lq=1: attention pooling (one mean-token query over every position); causal is top-left aligned (SDPA)
    check(*qkv(2, 1, lq, lk, 64), dtype, is_causal=causal)


@pytest.mark.parametrize("head_dim", [16, 88, 104, 256] + ([8, 40] if ON_GPU else []))
def test_head_dims_padded_to_power_of_two(head_dim):
    check(*qkv(1, 2, 33, 33, head_dim), torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_custom_scale(dtype):
    check(*qkv(1, 2, 77, 77, 64), dtype, scale=0.3)
    check(*qkv(1, 2, 50, 50, 64), dtype, is_causal=True, scale=1.0 / 64)


def _padding(b, lk, n_dead_batches=1):
    """bool [B, Lk], True = takes part; the first batches keep a few keys, the last keeps none."""
    keep = torch.ones(b, lk, dtype=torch.bool, device=DEVICE)
    for i in range(b):
        keep[i, max(1, lk - 7 * (i + 1)):] = False
    keep[b - n_dead_batches:] = False
    return keep


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["bool [B,Lk]", "bool [B,1,1,Lk]", "float [B,1,1,Lk]", "float [B,Lk] +causal"])
def test_key_padding_masks(dtype, form):
    b, lq, lk = 3, 77, 77
    keep = _padding(b, lk)
    if form.startswith("float"):
        mask = torch.where(keep, 0.5 * torch.randn(b, lk, device=DEVICE), torch.tensor(float("-inf"), device=DEVICE))
    else:
        mask = keep
    if "[B,1,1,Lk]" in form:
        mask = mask[:, None, None, :]
    check(*qkv(b, 1, lq, lk, 64), dtype, mask=mask, is_causal="causal" in form)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["bool [Lq,Lk]", "float [B,1,Lq,Lk]", "float [B,H,Lq,Lk] +causal"])
def test_general_masks(dtype, form):
    b, h, lq, lk = 2, 2 if ON_GPU else 1, 65, 129
    shape = {"bool [Lq,Lk]": (lq, lk), "float [B,1,Lq,Lk]": (b, 1, lq, lk), "float [B,H,Lq,Lk] +causal": (b, h, lq, lk)}[form]
    keep = torch.rand(shape, device=DEVICE) > 0.3
    keep[..., 5, :] = False  # a fully masked row
    mask = keep if form.startswith("bool") else torch.where(keep, torch.randn(shape, device=DEVICE), float("-inf"))
    check(*qkv(b, h, lq, lk, 64), dtype, mask=mask, is_causal="causal" in form)


def test_fully_masked_rows_give_zero_output_and_zero_gradients():
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 65, 65, 64))
    keep = _padding(2, 65)  # batch 1 has no key at all
    out = clipfast.flash_attention(q, k, v, attn_mask=keep)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert torch.equal(t.grad[1], torch.zeros_like(t.grad[1]))
    assert q.grad[0].abs().sum() > 0
    # keys masked out of every row get no gradient either
    assert torch.equal(k.grad[0, :, 65 - 7:], torch.zeros_like(k.grad[0, :, 65 - 7:]))


def test_in_projection_split_views_are_read_in_place(monkeypatch):
    # x @ in_proj.T gives [B, L, 3*H*D]; its [B, L, 3, H, D] split permuted to [B, H, L, D] is strided on
    # every dim. The kernel must read those views directly.
    b, lq, h, d = 2, 77, 2, 64
    qkv_buf = randn(b, lq, 3, h, d, device=DEVICE)
    q, k, v = (t.permute(0, 2, 1, 3) for t in qkv_buf.unbind(2))
    seen = []
    launcher = kernel.attention_fwd

    def spy(q, k, v, *args):
        seen.append((q.data_ptr(), k.data_ptr(), v.data_ptr()))
        return launcher(q, k, v, *args)

    monkeypatch.setattr(kernel, "attention_fwd", spy)
    check(q, k, v, torch.float32, is_causal=True)
    assert (q.data_ptr(), k.data_ptr(), v.data_ptr()) in seen
    # head dim not unit-stride, and an expanded (stride 0) key/value
    qt = randn(b, h, d, lq, device=DEVICE).transpose(-1, -2)
    kv = randn(b, 1, lq, d, device=DEVICE).expand(b, h, lq, d)
    check(qt, kv, kv, torch.float16)


def test_grid_is_one_axis_with_sequence_blocks_fastest():
    # B=1024, H=16 at 197 tokens in blocks of 64: 16384 heads x 4 blocks on axis 0 (which takes 2**31 - 1
    # programs; axes 1 and 2 take 65535)
    assert kernel.grid(1024, 16, 197, 64) == (1024 * 16 * 4,)
    assert kernel.grid(2**20, 16, 77, 64) == (2**21 * 16,)
    with pytest.raises(ValueError, match="programs"):
        kernel.grid(2**24, 16, 577, 64)


def test_attention_kernels_take_at_most_32_arguments():
    # every @triton.jit function of the attention files (dense, packed and what they share), constexprs included:
    # strides travel as one tuple per tensor; the packed file imports the shared module, not the dense one
    import ast

    from clipfast.kernels import attention_common, attention_varlen

    counts, imports = {}, {}
    for module in (kernel, attention_varlen, attention_common):
        with open(module.__file__) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                counts[f"{module.__name__.rsplit('.', 1)[-1]}.{node.name}"] = \
                    len(node.args.args) + len(node.args.kwonlyargs)
        imports[module] = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}
    assert len(counts) >= 20 and max(counts.values()) <= 32, sorted(counts.items(), key=lambda kv: -kv[1])[:5]
    assert imports[attention_varlen] == {None, "attention_common"}, imports[attention_varlen]  # `from . import`


def test_program_order_puts_one_heads_blocks_side_by_side():
    # which (head, block) each program id of the flattened grid runs, read back from the kernel's helper
    import triton
    import triton.language as tl

    @triton.jit
    def where(OUT, seqlen, BLOCK: tl.constexpr):
        bh, block = kernel._program_block(seqlen, BLOCK)
        tl.store(OUT + 2 * tl.program_id(0), bh)
        tl.store(OUT + 2 * tl.program_id(0) + 1, block)

    b, h, length, block = 2, 3, 77, 32
    (programs,) = kernel.grid(b, h, length, block)
    out = torch.full((programs, 2), -1, dtype=torch.int32, device=DEVICE)
    where[(programs,)](out, length, BLOCK=block)
    blocks = runtime.cdiv(length, block)
    expected = [(bh, blk) for bh in range(b * h) for blk in range(blocks)]
    assert [tuple(r) for r in out.tolist()] == expected


# ----------------------------------------------------------------------------------------------
# Shipped tiles: tables, the filter, and every tile run once (not only the one autotune picks)
# ----------------------------------------------------------------------------------------------

TABLES = {"fwd": (kernel.FWD, kernel._attn_fwd_kernel), "dkdv": (kernel.DKDV, kernel._attn_bwd_dkdv_kernel),
          "dq": (kernel.DQ, kernel._attn_bwd_dq_kernel)}
# a head dim that pads to each BLOCK_D (odd ones where the padding is exercised)
HEAD_DIM_FOR_BLOCK_D = {16: 16, 32: 24, 64: 64, 128: 80, 256: 256}


def skip_unless_offered_here(table, tile, dtype=torch.float16):
    """The interpreter runs every tile; on a GPU, a forced tile its table never offers at its smallest head
    dim to ``dtype`` on this architecture (``AttentionTileTable.why_not_offered``: another generation's tile, one for
    another dtype, one whose shared memory does not fit this GPU's per-block maximum) is skipped, with the
    reason: the autotuner never runs it there, and a launch over the shared-memory limit fails."""
    if not ON_GPU:
        return
    arch = kernel._arch({"Q": torch.empty(0, device=DEVICE)})
    reason = table.why_not_offered(tile, launch(min(tile.block_ds), arch, dtype))
    if reason:
        pytest.skip(f"{tile} is not offered to {dtype} on sm_{arch} at BLOCK_D={min(tile.block_ds)}: {reason}")


def _tile_id(label, tile, block_d):
    split = f"-split{dv_splits(tile)}" if dv_splits(tile) != 1 else ""
    return f"{label}-{tile.block_m}x{tile.block_n}-w{tile.warps}s{tile.stages}{split}-D{block_d}"


def test_tile_tables_offer_a_tile_for_every_head_dim_and_prune_hopper():
    for table, _ in TABLES.values():
        assert table.tiles[0] in table.offered(launch(64, 0))  # the default leads the table
        for block_d in HEAD_DIM_FOR_BLOCK_D:
            for arch in (0, 80, 90):
                assert table.offered(launch(block_d, arch)), (block_d, arch)
            for tile in table.offered(launch(block_d, 90)):
                rows = tile.block_m if table.mma_rows == "BLOCK_M" else tile.block_n
                # 8 warps on fewer than 128 MMA rows only where the head dim has nothing else on Hopper
                if tile.warps == 8 and rows < 128:
                    assert not any(table.fits_arch(t, 90) for t in table.tiles
                                   if block_d in t.block_ds and "fp16" in t.dtypes)
        pruned = table.early_prune(table.configs(), {"BLOCK_D": 64})
        assert [kernel._config_key(c) for c in pruned] == [t.key for t in table.offered(launch(64, 0))]


def test_tiles_are_chosen_per_triton_version(monkeypatch):
    # under triton 3.6 the 3.8 defaults spill on sm_80 (dk/dv causal at head dim 64, forward and dq causal +
    # full mask at 128): those few are replaced there, and each version's autotune list holds its own tiles
    defaults = {}
    for version in ((3, 6), (3, 8), (3, 9)):
        monkeypatch.setattr(runtime, "TRITON_VERSION", version)
        defaults[version] = [kernel.DKDV.offered(launch(64, 80))[0], kernel.FWD.offered(launch(128, 80))[0],
                             kernel.DQ.offered(launch(128, 80))[0]]
        for table, _ in TABLES.values():
            shipped = {t.key for t in table.tiles if t.ships_here}
            assert {kernel._config_key(c) for c in table.configs()} == shipped
    assert defaults[(3, 8)] == defaults[(3, 9)]
    assert all(old != new for old, new in zip(defaults[(3, 6)], defaults[(3, 8)]))
    assert all(t.tritons == ((3, 0), (3, 8)) and t.archs == (8,) for t in defaults[(3, 6)])


def test_head_dim_256_forward_splits_the_value_columns_on_hopper():
    # the whole 64 x 256 fp32 accumulator spills on sm_90 under triton 3.6; Hopper's tile splits it in two
    (hopper,) = kernel.FWD.offered(launch(256, 90))
    assert dv_splits(hopper) == 2 and hopper.config().kwargs["SPLIT_DV"] == 2
    assert all(dv_splits(t) == 1 for t in kernel.FWD.offered(launch(256, 80)))
    assert kernel.grid(2, 3, 77, 64, splits=2) == (2 * 3 * 2 * 2,)
    assert "SPLIT_DV" not in kernel.DQ.tiles[0].config().kwargs  # only the forward kernels take it


def assert_offered_tiles_fit_shared_memory(tables):
    """Every tile ``tables`` offer for each architecture in ``runtime.MAX_SHARED_PER_BLOCK``, operand dtype,
    padded head dim and bias kind fits the architecture's shared memory per block by its estimate (which
    `clipfast aot` checks is an upper bound on the compiled kernel's), and something is offered everywhere:
    where nothing fits (Volta / Turing at the large head dims), the tile with the smallest estimate."""
    for table in tables:
        for arch, limit in runtime.MAX_SHARED_PER_BLOCK.items():
            for dtype in ("fp32", "fp16", "bf16"):
                for block_d in (16, 32, 64, 128, 256):
                    for bias_kind in (kernel.NO_BIAS, kernel.KEY_BIAS, kernel.FULL_BIAS):
                        offered = table.offered(launch(block_d, arch, dtype, bias_kind))
                        estimates = [table.shared_estimate(t, block_d, dtype, arch, bias_kind) for t in offered]
                        where = (arch, dtype, block_d, bias_kind)
                        assert offered, where
                        if max(estimates) > limit:
                            assert len(offered) == 1 and arch < 80, (where, offered, estimates)
                        if dtype == "fp32" and any(block_d in t.block_ds and "fp32" in t.dtypes for t in table.tiles):
                            assert all("fp32" in t.dtypes for t in offered), where  # fp32's own tiles


def test_offered_tiles_fit_the_shared_memory_per_block():
    assert_offered_tiles_fit_shared_memory((kernel.FWD, kernel.DKDV, kernel.DQ))
    # measured (triton 3.8): the forward at head dim 128, 64x64 w8 s3 in exact fp32 takes 180,480 B on sm_80
    # (over its 166,912 B): the estimate bounds that closely, and the tile is not offered to fp32 there
    tile = next(t for t in kernel.FWD.tiles if t.config().kwargs == {"BLOCK_M": 64, "BLOCK_N": 64} and t.warps == 8
                and t.stages == 3 and 128 in t.block_ds)
    assert 180480 <= kernel.FWD.shared_estimate(tile, 128, "fp32", 80) <= 180480 + 1024
    assert tile not in kernel.FWD.offered(launch(128, 80, torch.float32))
    assert "shared memory" in kernel.FWD.why_not_offered(tile, launch(128, 86, torch.float16, kernel.FULL_BIAS))
    assert tile in kernel.FWD.offered(launch(128, 80, torch.float16))
    assert tile in kernel.FWD.offered(launch(128, 86, torch.float16))
    # the pruning the autotuner runs reads q's dtype and the bias kind
    q32 = torch.empty(0, dtype=torch.float32)
    pruned = kernel.FWD.early_prune(kernel.FWD.configs(), {"Q": q32, "BLOCK_D": 64, "BIAS_KIND": kernel.NO_BIAS})
    offered = kernel.FWD.offered(launch(64, 0, torch.float32))
    assert [kernel._config_key(c) for c in pruned] == [t.key for t in offered]
    assert all("fp32" in t.dtypes for t in kernel.FWD.offered(launch(64, 0, torch.float32)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("label,tile", [pytest.param(label, tile, id=_tile_id(label, tile, min(tile.block_ds)))
                                        for label, (table, _) in TABLES.items() for tile in table.tiles])
def test_every_shipped_tile_runs_in_the_interpreter(label, tile, dtype):
    # the interpreter collapses autotuning to the first config; each other tile is forced once here, at
    # its smallest head dim, causal, with a block wholly below the diagonal and a ragged end. Outlier
    # channels in fp16 (where they overflow); in fp32 they make dq pure cancellation, where the 16-key dq
    # tiles measured 1.0-2.5x eager's max error at head dim 80 (the 32-key tiles 0.4-1.1x): more rounded
    # fp32 accumulator updates per row
    table, tuned = TABLES[label]
    skip_unless_offered_here(table, tile, dtype)
    d = HEAD_DIM_FOR_BLOCK_D[min(tile.block_ds)]
    length = tile.block_m + tile.block_n + 3
    with runtime.forced_config(tuned, tile.config()):
        check(*qkv(1, 1, length, length, d, outliers=2 if dtype == torch.float16 else 0), dtype, is_causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("label", list(TABLES))
def test_every_offered_tile_runs_on_gpu(label):
    # every tile offered on this GPU's architecture, at every head dim it ships for (16 and 32 run the
    # tiles of 64), in fp16, bf16 and fp32 (its own tiles), causal with key padding: a tile that only
    # compiled is never first run in a user's job
    table, tuned = TABLES[label]
    arch = kernel._arch({"Q": torch.empty(0, device=DEVICE)})
    failures = []
    for block_d in (64, 128, 256):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for tile in table.offered(launch(block_d, arch, dtype, kernel.KEY_BIAS)):
                with runtime.forced_config(tuned, tile.config()):
                    try:
                        outliers = 0 if dtype == torch.float32 else 2  # (fp32: see the interpreter test)
                        check(*qkv(2, 2, 197, 197, HEAD_DIM_FOR_BLOCK_D[block_d], outliers=outliers), dtype,
                              mask=_padding(2, 197, n_dead_batches=0), is_causal=True)
                    except AssertionError as exc:
                        failures.append(f"{_tile_id(label, tile, block_d)} {dtype}: {exc}")
    assert not failures, "\n".join(failures)


def test_seqlen_buckets_and_untimed_autotune(monkeypatch):
    assert [runtime.seqlen_bucket(n) for n in (1, 50, 64, 65, 77, 197, 257, 577, 1024, 1025, 5000)] == \
        [32, 64, 64, 96, 96, 224, 288, 608, 1024, 2048, 8192]
    assert runtime._untimed(None, quantiles=(0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
    # CLIPFAST_AUTOTUNE=0: the autotuner times nothing, so the first config the pruning keeps runs
    import triton

    monkeypatch.setattr(runtime, "AUTOTUNE", False)
    tuned = runtime.autotune([triton.Config({"B": 1}), triton.Config({"B": 2})], key=["n"])(
        kernel._attn_bwd_preprocess_kernel)
    assert tuned.do_bench is runtime._untimed


@pytest.mark.gpu
def test_large_batch_times_heads_runs_on_gpu():
    q, k, v = (randn(1024, 16, 77, 64, device=DEVICE, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    out = clipfast.flash_attention(q, k, v, is_causal=True)
    ref = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), is_causal=True)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_unbatched_three_dim_inputs():
    q, k, v = qkv(1, 2, 50, 50, 32)
    out = clipfast.flash_attention(q[0], k[0], v[0])
    assert out.shape == (2, 50, 32)
    torch.testing.assert_close(out, eager_attention(q, k, v)[0], atol=1e-5, rtol=1e-5)


def test_empty_inputs():
    q = torch.randn(0, 2, 5, 32, device=DEVICE, requires_grad=True)
    out = clipfast.flash_attention(q, q, q)
    assert out.shape == (0, 2, 5, 32)
    out.sum().backward()
    assert q.grad.shape == q.shape
    q = torch.randn(1, 2, 0, 32, device=DEVICE)
    assert clipfast.flash_attention(q, torch.randn(1, 2, 3, 32, device=DEVICE), torch.randn(1, 2, 3, 32, device=DEVICE)).shape == (1, 2, 0, 32)


def test_bad_input_errors():
    q = torch.randn(1, 2, 5, 32, device=DEVICE)
    with pytest.raises(TypeError, match="`q` must be a torch.Tensor"):
        clipfast.flash_attention([1.0], q, q)
    with pytest.raises(TypeError, match="`k` has dtype int64"):
        clipfast.flash_attention(q, q.long(), q)
    with pytest.raises(TypeError, match="one dtype"):
        clipfast.flash_attention(q, q.half(), q)
    with pytest.raises(ValueError, match="`q` must be \\[B, H, L, D\\]"):
        clipfast.flash_attention(q[0, 0], q[0, 0], q[0, 0])
    with pytest.raises(ValueError, match="same head dim"):
        clipfast.flash_attention(q, torch.randn(1, 2, 5, 16, device=DEVICE), q)
    with pytest.raises(ValueError, match="same length"):
        clipfast.flash_attention(q, q, torch.randn(1, 2, 6, 32, device=DEVICE))
    with pytest.raises(ValueError, match="batch and head"):
        clipfast.flash_attention(q, torch.randn(1, 3, 5, 32, device=DEVICE), torch.randn(1, 3, 5, 32, device=DEVICE))
    with pytest.raises(ValueError, match="`attn_mask` of shape"):
        clipfast.flash_attention(q, q, q, attn_mask=torch.ones(4, 5, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="`attn_mask` has dtype int64"):
        clipfast.flash_attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError, match="`scale`"):
        clipfast.flash_attention(q, q, q, scale="0.1")
    if ON_GPU:
        with pytest.raises(ValueError, match="one device"):
            clipfast.flash_attention(q, q.cpu(), q)


def test_unsupported_cases_run_sdpa_with_a_warning():
    q, k, v = qkv(1, 1, 9, 9, 320)
    with pytest.warns(RuntimeWarning, match="head dim 320"):
        out = clipfast.flash_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    mask = torch.randn(9, 9, device=DEVICE, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="requires grad"):
        out = clipfast.flash_attention(q[..., :64], k[..., :64], v[..., :64], attn_mask=mask)
    out.sum().backward()
    assert mask.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_eager_path_without_the_interpreter_matches_float64(dtype, monkeypatch):
    # what CPU tensors run when TRITON_INTERPRET is not set: the same forward statistics and backward math
    import clipfast.ops.attention as op

    monkeypatch.setattr(op.runtime, "uses_triton", lambda t: False)
    monkeypatch.setattr(kernel, "attention_fwd", None)  # must not be reached
    b, lq, lk = 2, 33, 40
    keep = _padding(b, lk)
    check(*qkv(b, 2, lq, lk, 32, outliers=2), dtype, mask=keep, is_causal=True)
    check(*qkv(b, 2, lq, lk, 32), dtype, mask=torch.randn(lq, lk, device=DEVICE))


def test_poisoned_outputs_are_fully_written():
    assert runtime._POISON
    q, k, v = (t.requires_grad_() for t in qkv(1, 3, 70, 33, 24))
    out = clipfast.flash_attention(q, k, v)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_interpreter_or_gpu_runs_the_triton_kernels(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("kernel launcher called")

    q = torch.randn(1, 1, 4, 16, device=DEVICE, requires_grad=True)
    monkeypatch.setattr(kernel, "attention_fwd", boom)
    with pytest.raises(RuntimeError, match="kernel launcher called"):
        clipfast.flash_attention(q, q, q)
    monkeypatch.undo()
    monkeypatch.setattr(kernel, "attention_bwd", boom)
    with pytest.raises(RuntimeError, match="kernel launcher called"):
        clipfast.flash_attention(q, q, q).sum().backward()


def test_compile_fullgraph_matches_eager():
    def block(q, k, v, mask):
        return clipfast.flash_attention(q, k, v, attn_mask=mask).square().sum() + \
            clipfast.flash_attention(q, k, v, is_causal=True).sum()

    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 20, 20, 32))
    mask = _padding(2, 20, n_dead_batches=0)
    expected = block(q, k, v, mask)
    expected_grads = torch.autograd.grad(expected, (q, k, v))
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, mask)
    grads = torch.autograd.grad(out, (q, k, v))
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_custom_op_registration_is_valid():
    q, k, v = qkv(1, 2, 9, 7, 16)
    bias = torch.zeros(1, 1, 1, 7, device=DEVICE)
    torch.library.opcheck(torch.ops.clipfast.flash_attention_fwd, (q, k, v, bias, True, 0.25),
                          test_utils=("test_schema", "test_faketensor"))
    out, lse = torch.ops.clipfast.flash_attention_fwd(q, k, v, None, False, 0.25)
    torch.library.opcheck(torch.ops.clipfast.flash_attention_bwd, (torch.randn_like(out), q, k, v, None, out, lse,
                                                                   False, 0.25),
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------------------------
# clipfast.nn.MultiheadAttention
# ----------------------------------------------------------------------------------------------

def _mha_pair(embed, heads, **kw):
    ref = torch.nn.MultiheadAttention(embed, heads, **kw).to(DEVICE)
    with torch.no_grad():
        ref.in_proj_bias.normal_(std=0.1) if ref.in_proj_bias is not None else None
        ref.out_proj.bias.normal_(std=0.1)
    fast = clipfast.nn.MultiheadAttention(embed, heads, **kw).to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _compare_mha(ref, fast, args, kwargs, atol=2e-5):
    leaves = [a for a in args if a.is_floating_point()]
    ref_out = ref(*args, need_weights=False, **kwargs)[0]
    fast_out, weights = fast(*args, need_weights=False, **kwargs)
    assert weights is None and fast_out.shape == ref_out.shape
    torch.testing.assert_close(fast_out, ref_out, atol=atol, rtol=1e-4)
    g = torch.randn_like(ref_out)
    params_ref = [p for p in ref.parameters()]
    params_fast = [p for p in fast.parameters()]
    grads_ref = torch.autograd.grad(ref_out, params_ref + leaves, g)
    grads_fast = torch.autograd.grad(fast_out, params_fast + leaves, g)
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, b, atol=10 * atol, rtol=1e-3)


@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_module_matches_torch_with_openai_causal_mask(batch_first, monkeypatch):
    ref, fast = _mha_pair(64, 2, batch_first=batch_first)
    assert isinstance(fast, torch.nn.MultiheadAttention)
    assert list(fast.state_dict()) == list(ref.state_dict())
    l, b = 77, 2
    x = torch.randn((b, l, 64) if batch_first else (l, b, 64), device=DEVICE, requires_grad=True)
    mask = torch.empty(l, l, device=DEVICE).fill_(float("-inf")).triu_(1)  # OpenAI CLIP's build_attention_mask
    calls = []
    flash = clipfast.nn.attention.flash_attention
    monkeypatch.setattr(clipfast.nn.attention, "flash_attention",
                        lambda *a, **kw: calls.append(kw) or flash(*a, **kw))
    _compare_mha(ref, fast, (x, x, x), {"attn_mask": mask})
    assert calls and calls[0]["is_causal"] and calls[0]["attn_mask"] is None  # recognised, not read per call


def test_mha_module_key_padding_and_general_masks():
    ref, fast = _mha_pair(64, 2, batch_first=True)
    b, l = 3, 33
    x = torch.randn(b, l, 64, device=DEVICE, requires_grad=True)
    pad = torch.zeros(b, l, dtype=torch.bool, device=DEVICE)
    pad[0, 30:] = True  # True = ignore (MultiheadAttention's convention)
    pad[2, 10:] = True
    _compare_mha(ref, fast, (x, x, x), {"key_padding_mask": pad})
    general = torch.rand(l, l, device=DEVICE) > 0.5
    general.fill_diagonal_(False)
    _compare_mha(ref, fast, (x, x, x), {"attn_mask": general, "key_padding_mask": pad})
    per_head = torch.randn(b * 2, l, l, device=DEVICE)
    _compare_mha(ref, fast, (x, x, x), {"attn_mask": per_head})


def test_mha_module_cross_attention_and_separate_kv_dims():
    ref, fast = _mha_pair(64, 2, kdim=32, vdim=48)
    q = torch.randn(1, 3, 64, device=DEVICE, requires_grad=True)  # one query (attention pooling), seq-first
    kv_k = torch.randn(50, 3, 32, device=DEVICE, requires_grad=True)
    kv_v = torch.randn(50, 3, 48, device=DEVICE, requires_grad=True)
    _compare_mha(ref, fast, (q, kv_k, kv_v), {})
    ref, fast = _mha_pair(64, 2)
    x = torch.randn(20, 64, device=DEVICE, requires_grad=True)  # unbatched
    _compare_mha(ref, fast, (x[:5], x, x), {})


def test_mha_module_need_weights_falls_back_to_torch():
    ref, fast = _mha_pair(32, 2)
    x = torch.randn(9, 2, 32, device=DEVICE)
    with pytest.warns(RuntimeWarning, match="need_weights=True"):
        out, weights = fast(x, x, x)
    ref_out, ref_weights = ref(x, x, x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(weights, ref_weights)
    # attention dropout exists only in torch's implementation: used while training, with a warning
    ref, fast = _mha_pair(32, 2, dropout=0.5)
    with pytest.warns(RuntimeWarning, match="dropout"):
        fast(x, x, x, need_weights=False)
    ref.eval(), fast.eval()
    _compare_mha(ref, fast, (x.requires_grad_(),) * 3, {})


def test_causal_mask_detection():
    from clipfast.nn.attention import is_causal_mask

    m = torch.full((7, 7), float("-inf"), device=DEVICE).triu(1)
    assert is_causal_mask(m) and is_causal_mask(m.half())
    assert is_causal_mask(torch.ones(7, 7, dtype=torch.bool, device=DEVICE).triu(1))
    assert not is_causal_mask(m.triu(2))
    m[0, 0] = -1.0
    assert not is_causal_mask(m)  # in-place change bumps the version: checked again
    assert not is_causal_mask(torch.zeros(7, 7, device=DEVICE))
    assert not is_causal_mask(torch.full((7, 8), float("-inf"), device=DEVICE).triu(1))


def test_mha_module_compiles_without_graph_break():
    _, fast = _mha_pair(32, 2, batch_first=True)
    x = torch.randn(2, 11, 32, device=DEVICE)
    mask = torch.full((11, 11), float("-inf"), device=DEVICE).triu(1)
    expected = fast(x, x, x, need_weights=False, attn_mask=mask)[0]
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: fast(x, x, x, need_weights=False, attn_mask=mask)[0], fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Patch rules: the reference model's text/vision blocks and ModifiedResNet's attention pooling
# ----------------------------------------------------------------------------------------------

def _attention_only_patch(model):
    return clipfast.patch(model, layer_norm=False, mlp=False, patch_embed=False, attention=True, unpad_text=False)


def _outputs_and_grads(model, image, text):
    model.zero_grad()
    img, txt = model.encode_image(image), model.encode_text(text)
    (img.square().sum() + txt.square().sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return img.detach(), txt.detach(), grads


@pytest.mark.parametrize("name", ["tiny", "tiny-RN"])
def test_patch_rules_match_the_unpatched_reference_model(name, monkeypatch):
    model = clipfast.models.create(name).to(DEVICE)
    res = model.visual.input_resolution if hasattr(model.visual, "input_resolution") else 32
    image = torch.randn(2, 3, res, res, device=DEVICE)
    text = torch.randint(1, 100, (2, model.context_length), device=DEVICE)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = _outputs_and_grads(model, image, text)

    report = _attention_only_patch(model)
    swapped = {s.path for s in report.swapped}
    mha_paths = {p for p, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)}
    assert mha_paths and mha_paths <= swapped
    if name == "tiny-RN":
        assert "visual.attnpool" in swapped
    assert list(model.state_dict()) == list(state)

    calls = []
    flash = clipfast.flash_attention
    for module_name in ("clipfast.nn.attention", "clipfast.patch_rules.attention"):
        monkeypatch.setattr(f"{module_name}.flash_attention", lambda *a, **kw: calls.append(kw) or flash(*a, **kw))
    got = _outputs_and_grads(model, image, text)
    assert any(kw.get("is_causal") for kw in calls)        # the text tower's float mask ran as causal
    assert len(calls) == len(mha_paths) + (name == "tiny-RN")
    for a, b in zip(got[:2], expected[:2]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert got[2].keys() == expected[2].keys()
    for key in expected[2]:
        torch.testing.assert_close(got[2][key], expected[2][key], atol=1e-3, rtol=1e-3, msg=key)

    clipfast.unpatch(model)
    assert not any(type(m).__name__.startswith("Fast") for m in model.modules())


def test_compiled_text_tower_runs_the_causal_kernel(monkeypatch):
    # the text blocks' float causal mask is recognised when the model is patched, so a compiled text tower
    # (which cannot look at the mask's values while tracing) runs the causal kernel, not the bias path
    model = clipfast.models.create("tiny").to(DEVICE)
    text = torch.randint(1, 100, (2, model.context_length), device=DEVICE)
    expected = model.encode_text(text)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(model.transformer.parameters()))
    _attention_only_patch(model)
    assert all(getattr(b.attn_mask, "_clipfast_causal", None) is not None for b in model.transformer.resblocks)
    launches = []
    for name in ("attention_fwd", "attention_bwd"):
        launcher = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, lambda *a, _f=launcher, _n=name: launches.append((_n, a)) or _f(*a))
    torch._dynamo.reset()
    compiled = torch.compile(model.encode_text, fullgraph=True, backend="aot_eager")
    out = compiled(text)
    grads = torch.autograd.grad(out.square().sum(), list(model.transformer.parameters()))
    fwd = [a for n, a in launches if n == "attention_fwd"]
    bwd = [a for n, a in launches if n == "attention_bwd"]
    assert len(fwd) == len(bwd) == len(model.transformer.resblocks)
    assert all(a[3] is None and a[4] is True for a in fwd)  # bias None, is_causal True
    assert all(a[4] is None and a[7] is True for a in bwd)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-3, rtol=1e-3)


def test_attention_pool_rule_leaves_unknown_layouts_alone():
    from clipfast.models import AttentionPool2d

    pool = AttentionPool2d(4, 64, 128 // 64 * 2, 32).to(DEVICE)  # 4 heads of 16
    pool.q_proj = torch.nn.Sequential(pool.q_proj)
    report = _attention_only_patch(torch.nn.Sequential(pool))
    assert not report.swapped and "q_proj" in report.skipped[0].reason


@pytest.mark.skipif(ON_GPU, reason="the eager reference runs on CPU without the interpreter")
def test_eager_path_under_compile_matches_the_declared_layout():
    """On CPU without the interpreter the op runs its eager reference; its outputs and gradients must have
    the [B, L, H, D] memory the fake implementation declares, or compiled graphs read them wrongly."""
    script = """
import torch, torch.nn.functional as F, clipfast
q, k, v = (torch.randn(2, 3, 7, 16, requires_grad=True) for _ in range(3))
merged = lambda o: o.transpose(1, 2).view(2, 7, 48)  # a view only where the heads are merged in memory
f = torch.compile(lambda q, k, v: merged(clipfast.flash_attention(q, k, v, is_causal=True)),
                  fullgraph=True, backend="aot_eager")
out = f(q, k, v)
ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 7, 48)
torch.testing.assert_close(out, ref)
grads = torch.autograd.grad(out.square().sum(), (q, k, v))
expected = torch.autograd.grad(ref.square().sum(), (q, k, v))
for g, e in zip(grads, expected):
    torch.testing.assert_close(g, e)
print("ok")
"""
    assert "ok" in run_without_interpreter(script)
