"""Flash attention, forward and backward, for CLIP's short and odd sequence lengths.

Shapes and layouts
------------------
q [B, H, Lq, D], k/v [B, H, Lk, D] with any strides on every dimension (the strided views that an
in-projection ``[B, L, 3, H, D]`` split produces are read in place). Any Lq, Lk >= 1 and head dims up to
256: the head dim is padded to ``BLOCK_D = next_power_of_2(D)`` (at least 16) with masked loads. The grid
is one flattened axis 0 (up to 2**31 - 1 programs) with the sequence block varying fastest within a
(batch, head), so the programs sharing one head's k/v (or q/dO) run together and read it from L2. Offsets
within a (batch, head) slice are 32-bit unless some slice spans 2**31 elements (then 64-bit, see
``_indices``); batch and head offsets are always 64-bit. Outputs (o, dq, dk, dv) are written in a
[B, L, H, D] memory layout returned as [B, H, L, D] views, so merging the heads for the out-projection is
free.

Tiles are data (``tiles.Tile`` rows in one ``AttentionTileTable`` per kernel, default first) with one filter
(``AttentionTileTable.offered``) that picks those for a head dim, architecture and Triton version; autotuning keys on
sequence lengths rounded up to a multiple of 32 (``runtime.seqlen_bucket``). At head dim 256 Hopper's forward
tile splits the value columns over two programs (``SPLIT_DV``, see ``_value_columns``).

Tensor descriptors (TMA) for k and v were measured and are not shipped. A forward that loads k/v through
``tl.make_tensor_descriptor`` (block [BLOCK_N, BLOCK_D] at [start_n, 0]; out-of-range rows and columns read
as zero, as ``_load_tile``'s masks give) compiles for sm_90 without spills and with UTMALDG + HGMMA under
triton 3.6 and 3.8 (registers, that prototype vs the shipped kernel: 3.8 130 vs 183 at 128x64 / 8 warps /
head dim 64, 142 vs 201 at 64x32 / 4 warps / 128; 3.6 152 vs 207, 198 vs 198, causal 164 vs 214; the prototype
had no bias and one loop, so part of the gap is not TMA), and the interpreter of both versions runs it
right (causal, L=77, fp16 error 6e-4 / 8e-4 vs float64, fp16 rounding). What keeps it out: a descriptor made
in the kernel needs global scratch memory from ``triton.set_allocator``, a process-wide setting a library
should not make for its users (host-side ``TensorDescriptor`` arguments avoid it, but need the block shape set
per autotune config in a pre-hook and change every launcher and AOT signature); TMA needs a 16-byte aligned
base, 16-byte multiple row strides and a unit head-dim stride, so the autotune key would have to carry that
(a TMA config tuned on one view must never be reused for an unaligned one); and no TMA launch has run on a GPU.

Masks: ``IS_CAUSAL`` (query i attends keys j <= i, top-left aligned like SDPA) skips the key blocks above
the diagonal. Each loop runs in two parts: the blocks every query of the tile sees whole (no mask
arithmetic) and the few crossing the end of the keys or the diagonal (masked); the key-block kernel
masks only the causal diagonal. An additive fp32 bias (``-inf`` = masked) is either per key (``BIAS_KIND=1``: key-padding
masks [B, 1, 1, Lk], loaded as one vector per key block) or a full [B?, H?, Lq, Lk] tile (``BIAS_KIND=2``,
broadcast dimensions have stride 0). A query row whose keys are all masked gets output 0, log-sum-exp
+inf, and so zero gradients (SDPA returns NaN there).

Algorithm
---------
Forward (one program per [BLOCK_M] query rows of one head): q stays in registers; for each key block,
``s = q k^T * scale * log2(e) + bias * log2(e)`` in fp32, online softmax in base 2 (running max ``m``,
running sum ``l``, rescale the fp32 accumulator by ``exp2(m_old - m_new)``), ``acc += p v``. Stores
``o = acc / l`` and the base-2 log-sum-exp as its two parts ``(m, log2(l))`` (fp32, [B*H, 2, Lq]; one
rounded ``m + log2(l)`` would cost fp32 accuracy when scores are large). Memory traffic: read q
once, k and v once per query block, write o and lse; the Lq x Lk scores never touch memory.

Backward (deterministic, no atomics): a preprocess computes ``delta = rowsum(dO * O)`` (fp32). The key
kernel keeps one [BLOCK_N] block of k, v and fp32 dk, dv accumulators in registers and walks the query
blocks (from the diagonal when causal): ``p^T = exp2((s^T - m) - log2(l))``, ``dv += p^T dO``, ``dp^T = v dO^T``,
``ds^T = p^T (dp^T - delta)``, ``dk += ds^T q``. The query kernel does the mirror walk over key blocks for
``dq += ds k``. Each recomputes the probabilities from the saved statistics; traffic is q, k, v, dO read once per
opposite block, and each gradient written once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import runtime
from .attention_common import (_ALL_DTYPES, _AMPERE, _ANY_D, _BEFORE_3_8, _D128, _D256, _FP32, _FROM_3_8, _HOPPER,
                               _SMALL, AOT_PRECISIONS, BWD_SPILL_FREE_MAX_D, FULL_BIAS, KEY_BIAS, LOG2E, NO_BIAS,
                               AttentionAotCase, AttentionTileTable, _aot_signature, _aot_tiles,
                               launch, tile,
                               _attn_bwd_preprocess_kernel, _dot_precision, _dq_key_blocks, _fwd_key_blocks,
                               _head_dim_indices, _head_offset, _indices, _load_tile, _mask_scores, _program_block,
                               _store_tile, _unmasked_key_end, _value_columns, block_d, grid, has_wide_offsets,
                               preprocess_block)
# how the tile tables' autotune configs and the launch's architecture are read (tests and the GPU check use them
# through this module)
from .attention_common import _arch, _config_key  # noqa: F401

# Largest head dim the kernels keep in registers; larger head dims are sent to PyTorch SDPA by the op.
MAX_HEAD_DIM = 256
# The tile helpers, the score masking, the forward and dq block loops, the delta preprocess kernel, the tile types
# and the launch and AOT helpers are shared with the packed kernels: ``kernels/attention_common.py``.


@triton.jit
def _load_stats(LSE, bh, offs_m, seqlen_q):
    """Saved row max and log2(sum) of head ``bh``; rows past the end read as fully masked."""
    stats = LSE + bh.to(tl.int64) * 2 * seqlen_q + offs_m
    m_ok = offs_m < seqlen_q
    return tl.load(stats, mask=m_ok, other=float("inf")), tl.load(stats + seqlen_q, mask=m_ok, other=0.0)


# ---------------------------------------------------------------------------------------------
# Tiles (``tile`` rows, ``AttentionTileTable`` and the tables' vocabulary: ``kernels/attention_common.py``)
# ---------------------------------------------------------------------------------------------

# Each tile was compiled (`clipfast aot`, triton 3.6 and 3.8) for the architectures it is offered on, at the
# head dims it ships for: no spills, tensor-core MMAs (HMMA / HGMMA). The first tile offered is the default
# for a head dim and architecture (what CLIPFAST_AUTOTUNE=0 runs; the interpreter runs the first row); the
# defaults are also compiled causal, with a key-padding mask and causal with a full mask. 8 warps on 64 MMA
# rows are Ampere tiles; Hopper keeps them only where every 4-warp or 128-row tile tried spills (dk/dv at head
# dim 128). 128-row and 3-stage 4-warp tiles spill on sm_80 (Hopper only). At head dim 256 the forward splits
# the value columns over two programs on Hopper (``_value_columns``): the whole 64 x 256 accumulator spills
# 88-120 bytes under triton 3.6 at every 64- and 128-row tile tried (4 or 8 warps, 1-3 stages), and
# reloading q in the loop instead spills more. Tiles chosen per Triton version (under 3.6 the 3.8 defaults
# spill 8-32 bytes: dk/dv causal at head dims up to 64 on sm_80; forward and dq causal + full mask at head
# dim 128 on sm_80). Tried and not shipped at head dim 128 on sm_90: forward 128x64 (8 warps) spills 16 bytes
# plain and 128x32 (8 warps) 16 bytes causal + full mask (triton 3.8); dq 64x32 (4 or 8 warps), 128x16,
# 128x32 and 128x64 (8 warps) spill causal + full mask; dk/dv 16x64 (4 warps, 1-2 stages) and 16x128 (8 warps)
# spill plain.
# Exact fp32 (``dtypes=_FP32`` rows; the fp16/bf16 tiles are offered to fp16 and bf16 only): FMA products keep
# each thread's rows of both operands over the whole head dim in registers, and every fp16/bf16 tile spills
# there (triton 3.8: 16-14,256 B; 64x64 w8 at head dim 128 also needs 180,480 B of shared memory on sm_80), so
# fp32 runs small 2-stage tiles, compiled without spills for sm_80 and sm_90 in every mask variant (triton 3.8
# and 3.6; under 3.6 the forward and dq at head dims up to 64 and dq at 128 spill 8-520 B at 2 stages, also
# 16x16 / 16x32 tiles, so there the forward and dq run single-stage and dk/dv runs 16x32). Tried and not
# shipped (3.8, causal + full mask): forward 32x16 (4 warps) at 128 spills 184-448 B, dq
# 64x32 (8 warps) at 64 24 B on sm_80 and 32x16 (4 warps) at 128 216-360 B, dk/dv 16x64 (8 warps) at 128
# 16 B on sm_80. The backward's 16x16 single-stage tile at head dim 256 is what fits 99 KB in fp32.
FWD = AttentionTileTable((
    tile(128, 64, 8, 3, _SMALL, _HOPPER), tile(64, 16, 8, 3, _D128, _AMPERE, tritons=_BEFORE_3_8),
    tile(64, 32, 8, 3, _ANY_D), tile(128, 128, 8, 3, _SMALL, _HOPPER), tile(64, 64, 4, 3, _SMALL),
    tile(128, 32, 8, 3, _SMALL), tile(64, 32, 4, 3, _ANY_D), tile(64, 64, 8, 3, _ANY_D),
    tile(128, 16, 8, 3, _D128, _HOPPER), tile(64, 16, 4, 3, _D256, _HOPPER, dv_splits=2), tile(64, 16, 8, 3, _D256),
    tile(32, 32, 4, 2, _SMALL, dtypes=_FP32, tritons=_FROM_3_8),
    tile(16, 16, 4, 1, _SMALL, dtypes=_FP32, tritons=_BEFORE_3_8),
    tile(16, 32, 8, 2, _D128, dtypes=_FP32), tile(16, 16, 4, 2, _D256, dtypes=_FP32),
), mma_rows="BLOCK_M", streamed=2, resident=1, scores=1)
DKDV = AttentionTileTable((
    tile(32, 64, 4, 3, _SMALL, _HOPPER), tile(32, 32, 4, 2, _SMALL, _AMPERE, tritons=_BEFORE_3_8),
    tile(32, 64, 8, 2, _SMALL), tile(32, 128, 8, 3, _SMALL, _HOPPER), tile(16, 64, 4, 2, _SMALL),
    tile(16, 64, 8, 2, _D128 + _D256), tile(32, 64, 8, 2, _SMALL, dtypes=_FP32, tritons=_FROM_3_8),
    tile(16, 32, 4, 2, _D128, dtypes=_FP32), tile(16, 32, 4, 2, _SMALL, dtypes=_FP32, tritons=_BEFORE_3_8),
    tile(16, 16, 4, 1, _D256, dtypes=_ALL_DTYPES),
), mma_rows="BLOCK_N", streamed=2, resident=2, scores=2, streamed_stats=3)
DQ = AttentionTileTable((
    tile(64, 32, 4, 3, _SMALL), tile(128, 64, 8, 3, _SMALL), tile(64, 16, 8, 2, _D128, _AMPERE, tritons=_BEFORE_3_8),
    tile(64, 32, 8, 2, _ANY_D), tile(64, 64, 8, 2, _SMALL), tile(128, 32, 8, 2, _SMALL),
    tile(64, 16, 4, 2, _D128, _HOPPER), tile(64, 16, 8, 2, _D256),
    tile(32, 32, 4, 2, _SMALL, dtypes=_FP32, tritons=_FROM_3_8),
    tile(16, 32, 8, 2, _D128, dtypes=_FP32, tritons=_FROM_3_8),
    tile(32, 32, 4, 1, _SMALL, dtypes=_FP32, tritons=_BEFORE_3_8),
    tile(16, 32, 8, 1, _D128, dtypes=_FP32, tritons=_BEFORE_3_8),
    tile(16, 16, 4, 1, _D256, dtypes=_ALL_DTYPES),
), mma_rows="BLOCK_M", streamed=2, resident=2, scores=2)
# Autotune keys: lengths bucketed (nearby lengths share one tuning), the padded head dim and the variant.
_TUNE_KEY = ["bucket_q", "bucket_k", "BLOCK_D", "IS_CAUSAL", "BIAS_KIND"]


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@runtime.autotune(FWD.configs(), key=_TUNE_KEY,
                  prune_configs_by={"early_config_prune": FWD.early_prune})
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, BIAS, O, LSE,
    q_strides, k_strides, v_strides, bias_strides, o_strides,
    n_heads, seqlen_q, seqlen_k, bucket_q, bucket_k, head_dim, qk_scale,
    IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_WIDE_OFFSETS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_DV: tl.constexpr = 1,
):
    """One [BLOCK_M] block of queries (and, with ``SPLIT_DV``, its share of the value columns). Strides: one
    tuple per tensor, [batch, head, row, head dim]; the bias's [batch, head, query, key]."""
    bh, pid_m = _program_block(seqlen_q, BLOCK_M, SPLIT_DV)
    q_base = Q + _head_offset(bh, n_heads, q_strides)
    k_base = K + _head_offset(bh, n_heads, k_strides)
    v_base = V + _head_offset(bh, n_heads, v_strides)
    b_base = BIAS + _head_offset(bh, n_heads, bias_strides)
    offs_d = _head_dim_indices(BLOCK_D, HAS_WIDE_OFFSETS)
    offs_m = _indices(pid_m * BLOCK_M, BLOCK_M, offs_d)
    offs_dv = _value_columns(offs_d, BLOCK_D, SPLIT_DV)

    q = _load_tile(q_base, offs_m, offs_d, q_strides, seqlen_q, head_dim)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D // SPLIT_DV], tl.float32)

    hi = seqlen_k
    if IS_CAUSAL:  # no work above the diagonal
        hi = tl.minimum(seqlen_k, (pid_m + 1) * BLOCK_M)
    mid = _unmasked_key_end(pid_m * BLOCK_M, seqlen_k, IS_CAUSAL, BLOCK_N)
    # the blocks every query of the tile sees whole, then the masked ones (end of the keys, causal diagonal)
    acc, l_i, m_i = _fwd_key_blocks(
        acc, l_i, m_i, q, offs_m=offs_m, offs_d=offs_d, offs_dv=offs_dv, lo=0, hi=mid,
        k_base=k_base, k_strides=k_strides, v_base=v_base, v_strides=v_strides, bias_base=b_base,
        bias_strides=bias_strides, seqlen_q=seqlen_q, seqlen_k=seqlen_k, head_dim=head_dim, qk_scale=qk_scale,
        IS_CAUSAL=IS_CAUSAL, BIAS_KIND=BIAS_KIND, DOT_PRECISION=DOT_PRECISION, MASKED=False, BLOCK_N=BLOCK_N)
    acc, l_i, m_i = _fwd_key_blocks(
        acc, l_i, m_i, q, offs_m=offs_m, offs_d=offs_d, offs_dv=offs_dv, lo=mid, hi=hi,
        k_base=k_base, k_strides=k_strides, v_base=v_base, v_strides=v_strides, bias_base=b_base,
        bias_strides=bias_strides, seqlen_q=seqlen_q, seqlen_k=seqlen_k, head_dim=head_dim, qk_scale=qk_scale,
        IS_CAUSAL=IS_CAUSAL, BIAS_KIND=BIAS_KIND, DOT_PRECISION=DOT_PRECISION, MASKED=True, BLOCK_N=BLOCK_N)

    has_keys = l_i > 0.0
    l_i = tl.where(has_keys, l_i, 1.0)
    o_base = O + _head_offset(bh, n_heads, o_strides)
    _store_tile(o_base, acc / l_i[:, None], offs_m, offs_dv, o_strides, seqlen_q, head_dim)
    # the log-sum-exp as its two parts: max (+inf on rows without keys, so their p is 0) and log2(sum)
    stats = LSE + bh.to(tl.int64) * 2 * seqlen_q + offs_m
    tl.store(stats, tl.where(has_keys, m_i, float("inf")), mask=offs_m < seqlen_q)
    tl.store(stats + seqlen_q, tl.math.log2(l_i), mask=offs_m < seqlen_q)


# ---------------------------------------------------------------------------------------------
# Backward (the delta preprocess kernel, ``_attn_bwd_preprocess_kernel``: ``kernels/attention_common.py``)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _dkdv_query_blocks(dk, dv, k, v, offs_n, offs_d, lo, hi, q_base, q_strides, do_base, do_strides,
                       bias_base, bias_strides, LSE, DELTA, bh, seqlen_q, seqlen_k, head_dim, qk_scale,
                       IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       MASKED: tl.constexpr, BLOCK_M: tl.constexpr):
    """dk, dv contributions of the query blocks in [lo, hi). Keys past the end need no masking here: their
    rows of dk and dv are never stored, and rows past the end of the queries have p = 0."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = _indices(start_m, BLOCK_M, offs_d)
        q = _load_tile(q_base, offs_m, offs_d, q_strides, seqlen_q, head_dim)
        do = _load_tile(do_base, offs_m, offs_d, do_strides, seqlen_q, head_dim)
        # rows past the end (and fully masked rows) have max = +inf, so their probabilities are 0
        row_max, log2_sum = _load_stats(LSE, bh, offs_m, seqlen_q)
        delta = tl.load(DELTA + bh.to(tl.int64) * seqlen_q + offs_m, mask=offs_m < seqlen_q, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        s_t = _mask_scores(s_t, offs_m, offs_n, bias_base, bias_strides, seqlen_q, seqlen_k,
                           IS_CAUSAL=IS_CAUSAL, BIAS_KIND=BIAS_KIND, Q_ON_ROWS=False, MASKED=MASKED)
        p_t = tl.math.exp2((s_t - row_max[None, :]) - log2_sum[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@runtime.autotune(DKDV.configs(), key=_TUNE_KEY,
                  prune_configs_by={"early_config_prune": DKDV.early_prune})
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, BIAS, DO, LSE, DELTA, DK, DV,
    q_strides, k_strides, v_strides, bias_strides, do_strides, dk_strides, dv_strides,
    n_heads, seqlen_q, seqlen_k, bucket_q, bucket_k, head_dim, qk_scale, sm_scale,
    IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_WIDE_OFFSETS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One [BLOCK_N] block of keys: dk, dv accumulated over every query block that sees it (strides as in
    the forward)."""
    bh, pid_n = _program_block(seqlen_k, BLOCK_N)
    q_base = Q + _head_offset(bh, n_heads, q_strides)
    do_base = DO + _head_offset(bh, n_heads, do_strides)
    b_base = BIAS + _head_offset(bh, n_heads, bias_strides)
    offs_d = _head_dim_indices(BLOCK_D, HAS_WIDE_OFFSETS)
    offs_n = _indices(pid_n * BLOCK_N, BLOCK_N, offs_d)

    k = _load_tile(K + _head_offset(bh, n_heads, k_strides), offs_n, offs_d, k_strides, seqlen_k, head_dim)
    v = _load_tile(V + _head_offset(bh, n_heads, v_strides), offs_n, offs_d, v_strides, seqlen_k, head_dim)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    lo = 0
    if IS_CAUSAL:  # queries above this key block's first key cannot see it
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    # one loop: only the causal diagonal needs a mask here (a second, unmasked loop for the blocks below it
    # would double the code and spill at head dim 128; CLIP's causal text is one or two blocks anyway)
    dk, dv = _dkdv_query_blocks(
        dk, dv, k, v, offs_n=offs_n, offs_d=offs_d, lo=lo, hi=seqlen_q, q_base=q_base, q_strides=q_strides,
        do_base=do_base, do_strides=do_strides, bias_base=b_base, bias_strides=bias_strides, LSE=LSE, DELTA=DELTA,
        bh=bh, seqlen_q=seqlen_q, seqlen_k=seqlen_k, head_dim=head_dim, qk_scale=qk_scale, IS_CAUSAL=IS_CAUSAL,
        BIAS_KIND=BIAS_KIND, DOT_PRECISION=DOT_PRECISION, MASKED=IS_CAUSAL, BLOCK_M=BLOCK_M)

    _store_tile(DK + _head_offset(bh, n_heads, dk_strides), dk * sm_scale, offs_n, offs_d, dk_strides, seqlen_k,
                head_dim)
    _store_tile(DV + _head_offset(bh, n_heads, dv_strides), dv, offs_n, offs_d, dv_strides, seqlen_k, head_dim)


@runtime.autotune(DQ.configs(), key=_TUNE_KEY,
                  prune_configs_by={"early_config_prune": DQ.early_prune})
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, BIAS, DO, LSE, DELTA, DQ,
    q_strides, k_strides, v_strides, bias_strides, do_strides, dq_strides,
    n_heads, seqlen_q, seqlen_k, bucket_q, bucket_k, head_dim, qk_scale, sm_scale,
    IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_WIDE_OFFSETS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One [BLOCK_M] block of queries: dq accumulated over the key blocks it sees (strides as in the
    forward)."""
    bh, pid_m = _program_block(seqlen_q, BLOCK_M)
    k_base = K + _head_offset(bh, n_heads, k_strides)
    v_base = V + _head_offset(bh, n_heads, v_strides)
    b_base = BIAS + _head_offset(bh, n_heads, bias_strides)
    row_base = bh.to(tl.int64) * seqlen_q
    offs_d = _head_dim_indices(BLOCK_D, HAS_WIDE_OFFSETS)
    offs_m = _indices(pid_m * BLOCK_M, BLOCK_M, offs_d)
    m_ok = offs_m < seqlen_q

    q = _load_tile(Q + _head_offset(bh, n_heads, q_strides), offs_m, offs_d, q_strides, seqlen_q, head_dim)
    do = _load_tile(DO + _head_offset(bh, n_heads, do_strides), offs_m, offs_d, do_strides, seqlen_q, head_dim)
    row_max, log2_sum = _load_stats(LSE, bh, offs_m, seqlen_q)
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi = seqlen_k
    if IS_CAUSAL:
        hi = tl.minimum(seqlen_k, (pid_m + 1) * BLOCK_M)
    mid = _unmasked_key_end(pid_m * BLOCK_M, seqlen_k, IS_CAUSAL, BLOCK_N)
    dq = _dq_key_blocks(
        dq, q, do, row_max, log2_sum, delta, offs_m=offs_m, offs_d=offs_d, lo=0, hi=mid,
        k_base=k_base, k_strides=k_strides, v_base=v_base, v_strides=v_strides, bias_base=b_base,
        bias_strides=bias_strides, seqlen_q=seqlen_q, seqlen_k=seqlen_k, head_dim=head_dim, qk_scale=qk_scale,
        IS_CAUSAL=IS_CAUSAL, BIAS_KIND=BIAS_KIND, DOT_PRECISION=DOT_PRECISION, MASKED=False, BLOCK_N=BLOCK_N)
    dq = _dq_key_blocks(
        dq, q, do, row_max, log2_sum, delta, offs_m=offs_m, offs_d=offs_d, lo=mid, hi=hi,
        k_base=k_base, k_strides=k_strides, v_base=v_base, v_strides=v_strides, bias_base=b_base,
        bias_strides=bias_strides, seqlen_q=seqlen_q, seqlen_k=seqlen_k, head_dim=head_dim, qk_scale=qk_scale,
        IS_CAUSAL=IS_CAUSAL, BIAS_KIND=BIAS_KIND, DOT_PRECISION=DOT_PRECISION, MASKED=True, BLOCK_N=BLOCK_N)

    _store_tile(DQ + _head_offset(bh, n_heads, dq_strides), dq * sm_scale, offs_m, offs_d, dq_strides, seqlen_q,
                head_dim)


# ---------------------------------------------------------------------------------------------
# Launchers (``block_d``, ``grid`` and ``has_wide_offsets``: ``kernels/attention_common.py``)
# ---------------------------------------------------------------------------------------------

def _buckets(lq: int, lk: int) -> tuple[int, int]:
    """The autotune key's sequence lengths (``runtime.seqlen_bucket``)."""
    return runtime.seqlen_bucket(lq), runtime.seqlen_bucket(lk)


def bias_kind(bias) -> int:
    if bias is None:
        return NO_BIAS
    return KEY_BIAS if bias.shape[1] == 1 and bias.shape[2] == 1 else FULL_BIAS


def _bias_args(bias, q, shape):
    """Pointer and [b, h, m, n] strides of the bias broadcast to ``shape`` (0 on broadcast dims)."""
    if bias is None:
        return q, (0, 0, 0, 0)
    return bias, tuple(bias.expand(shape).stride())


def _blhd_empty(b, h, length, d, dtype, device):
    """An output in [B, L, H, D] memory, returned as a [B, H, L, D] view."""
    return runtime.empty((b, length, h, d), dtype, device).permute(0, 2, 1, 3)


@runtime.on_tensor_device
def attention_fwd(q, k, v, bias, is_causal: bool, scale: float):
    """Launch the forward. ``bias`` is None or fp32 [B|1, H|1, Lq|1, Lk]. Returns (o, lse): lse holds the
    base-2 log-sum-exp of the scaled scores as fp32 [B*H, 2, Lq], row max (+inf on rows with no unmasked
    key) and log2 of the row sum, so the backward's ``exp2((s - max) - log2(sum))`` loses no accuracy to
    rounding a large log-sum-exp."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    o = _blhd_empty(b, h, lq, d, q.dtype, q.device)
    lse = runtime.empty((b * h, 2, lq), torch.float32, q.device)
    if o.numel() == 0:
        return o, lse
    if lk == 0:  # no keys at all: every row is fully masked
        o.zero_()
        lse[:, 0].fill_(float("inf"))
        lse[:, 1].zero_()
        return o, lse
    bias_ptr, bias_strides = _bias_args(bias, q, (b, h, lq, lk))
    bd = block_d(d)
    wide = has_wide_offsets(q, k, v, o, bias.expand(b, h, lq, lk) if bias is not None else None)
    _attn_fwd_kernel[lambda meta: grid(b, h, lq, meta["BLOCK_M"], meta.get("SPLIT_DV", 1))](
        q, k, v, bias_ptr, o, lse,
        q.stride(), k.stride(), v.stride(), bias_strides, o.stride(),
        h, lq, lk, *_buckets(lq, lk), d, scale * LOG2E,
        IS_CAUSAL=is_causal, BIAS_KIND=bias_kind(bias), DOT_PRECISION=_dot_precision(q.dtype),
        HAS_WIDE_OFFSETS=wide, BLOCK_D=bd,
    )
    return o, lse


@runtime.on_tensor_device
def attention_bwd(do, q, k, v, bias, o, lse, is_causal: bool, scale: float):
    """Launch the backward. Returns (dq, dk, dv) in the inputs' dtype."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    dq = _blhd_empty(b, h, lq, d, q.dtype, q.device)
    dk = _blhd_empty(b, h, lk, d, k.dtype, k.device)
    dv = _blhd_empty(b, h, lk, d, v.dtype, v.device)
    if b * h == 0 or d == 0 or lq == 0 or lk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    bd = block_d(d)
    wide = has_wide_offsets(q, k, v, o, do, dq, dk, dv, bias.expand(b, h, lq, lk) if bias is not None else None)
    delta = runtime.empty((b * h, lq), torch.float32, q.device)
    pre_block = preprocess_block(bd)
    _attn_bwd_preprocess_kernel[grid(b, h, lq, pre_block)](
        o, do, delta, o.stride(), do.stride(), h, lq, d, HAS_WIDE_OFFSETS=wide, BLOCK_D=bd, BLOCK_M=pre_block,
    )
    bias_ptr, bias_strides = _bias_args(bias, q, (b, h, lq, lk))
    common = dict(IS_CAUSAL=is_causal, BIAS_KIND=bias_kind(bias), DOT_PRECISION=_dot_precision(q.dtype),
                  HAS_WIDE_OFFSETS=wide, BLOCK_D=bd)
    _attn_bwd_dkdv_kernel[lambda meta: grid(b, h, lk, meta["BLOCK_N"])](
        q, k, v, bias_ptr, do, lse, delta, dk, dv,
        q.stride(), k.stride(), v.stride(), bias_strides, do.stride(), dk.stride(), dv.stride(),
        h, lq, lk, *_buckets(lq, lk), d, scale * LOG2E, scale, **common,
    )
    _attn_bwd_dq_kernel[lambda meta: grid(b, h, lq, meta["BLOCK_M"])](
        q, k, v, bias_ptr, do, lse, delta, dq,
        q.stride(), k.stride(), v.stride(), bias_strides, do.stride(), dq.stride(),
        h, lq, lk, *_buckets(lq, lk), d, scale * LOG2E, scale, **common,
    )
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# AOT cases
# ---------------------------------------------------------------------------------------------

def aot_cases() -> list[runtime.AotCase]:
    """Every tile the three kernels offer at head dims 64 (ViT-B/L, text) and 128 (80/88/104/128 pad to
    it), the forward also at 256, compiled for the architectures it is offered on, in fp16/bf16 and (the
    tiles offered to fp32, cases ``..._fp32``) exact fp32; the causal, key-padding and full-mask variants at
    each architecture's default (first offered) tile. Each case carries its tile's shared-memory estimate
    on its architecture, which the compiled kernel must not exceed. Head-dim strides are 1, as the runtime
    specializes them for torch's layouts. The quick subset is head dim 64 at each architecture's default
    tile, fp16/bf16."""
    cases = []
    variants = [("", False, NO_BIAS), ("_causal", True, NO_BIAS), ("_keymask", False, KEY_BIAS),
                ("_causal_fullmask", True, FULL_BIAS)]
    kernels = ((_attn_fwd_kernel, FWD, "fwd"), (_attn_bwd_dkdv_kernel, DKDV, "bwd_dkdv"),
               (_attn_bwd_dq_kernel, DQ, "bwd_dq"))
    for bd in (64, 128, 256):
        for precision, (dtypes, dot_precision) in AOT_PRECISIONS.items():
            for suffix, causal, kind in variants:
                if bd == 256 and suffix:
                    continue
                flags = {"IS_CAUSAL": causal, "BIAS_KIND": kind, "DOT_PRECISION": dot_precision,
                         "HAS_WIDE_OFFSETS": False, "BLOCK_D": bd}
                for kernel, table, label in kernels:
                    if label != "fwd" and bd > BWD_SPILL_FREE_MAX_D:
                        continue
                    signature, unit_strides = _aot_signature(kernel, rank=4)
                    for tile, arch, estimate in _aot_tiles(table, bd, precision, kind, default_only=bool(suffix)):
                        default = tile == table.offered(launch(bd, arch, dtypes[0], kind))[0]
                        cases.append(AttentionAotCase(
                            name=f"attention_{label}{suffix}{'_fp32' if precision == 'fp32' else ''}[D={bd}]",
                            kernel=runtime.jit_function(kernel), signature=signature,
                            constexprs={**flags, **tile.config().kwargs, **unit_strides}, num_warps=tile.warps,
                            num_stages=tile.stages, expects_mma=precision == "half", dtypes=dtypes, archs=(arch,),
                            quick=(precision == "half" and bd == 64 and default
                                   and suffix in ("", "_causal" if label == "fwd" else "")),
                            shared_estimate=estimate,
                        ))
        signature, unit_strides = _aot_signature(_attn_bwd_preprocess_kernel, rank=4)
        cases.append(AttentionAotCase(
            name=f"attention_bwd_preprocess[D={bd}]", kernel=runtime.jit_function(_attn_bwd_preprocess_kernel),
            signature=signature,
            constexprs={"HAS_WIDE_OFFSETS": False, "BLOCK_D": bd, "BLOCK_M": preprocess_block(bd), **unit_strides},
            dtypes=("fp16", "bf16", "fp32"), quick=False,
        ))
    return cases
