"""Variable-length (packed) flash attention, forward and backward: many sequences of different lengths in one
launch, with no padding computed.

Shapes and layouts
------------------
q [total_q, H, D], k/v [total_k, H, D] with any strides (the views of a packed ``[T, 3, H, D]``
in-projection are read in place); sequence ``b`` owns tokens ``cu_seqlens[b] .. cu_seqlens[b + 1] - 1``
(int32 cumulative offsets, FlashAttention's varlen convention). Every sequence attends only its own keys;
with ``IS_CAUSAL`` query i of a sequence sees its keys j <= i (top-left aligned, as SDPA's ``is_causal``:
the usual self-attention case has equal query and key lengths, where both alignments agree). Outputs o, dq,
dk, dv are contiguous [T, H, D]. Token offsets are 64-bit (``start * stride`` in int64), so packed
tensors of any size are addressed correctly; offsets inside one sequence stay 32-bit (the launcher checks
``max_seqlen * token stride < 2**31``).

Grid: (batch * heads, blocks of the longest sequence); the forward's axis 0 is times ``SPLIT_DV`` where a tile
splits the value columns over programs (Hopper at head dim 256, as the dense forward). A program reads its
sequence's start and length from ``cu_seqlens`` and returns at once when its block lies past the end of a
shorter sequence, so the cost follows the real tokens (plus one launch slot per empty block).

Algorithm and memory traffic
----------------------------
The per-sequence work is the dense kernels' (``kernels/attention.py``), with the helpers both share
(``kernels/attention_common.py``):
forward with online base-2 softmax over key blocks (q read once, k/v once per query block, o and the
row statistics written once; the scores never touch memory); backward without atomics: ``delta =
rowsum(dO * O)`` (the dense preprocess kernel over the packed tokens), a key-block kernel (dk, dv in
registers, walking the query blocks of its sequence) and a query-block kernel (dq). Row statistics are
fp32 [H, 2, total_q]: row max (+inf past a sequence's end, so those probabilities are 0) and log2 of the
row sum, as in the dense kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import runtime
from .attention_common import (_ALL_DTYPES, _BEFORE_3_8, _D128, _D256, _FP32, _FROM_3_8, _HOPPER, _SMALL,
                               AOT_PRECISIONS, BWD_SPILL_FREE_MAX_D, LOG2E, AttentionAotCase, AttentionTileTable,
                               _aot_signature, _aot_tiles, _attn_bwd_preprocess_kernel, _dot_precision, _dq_key_blocks,
                               _fwd_key_blocks, _load_tile, _mask_scores, _store_tile, _unmasked_key_end,
                               _value_columns, block_d, grid, has_wide_offsets, launch, preprocess_block, tile)

MAX_HEAD_DIM = 256

# Shipped tiles (``tile`` rows, as in kernels/attention.py): the dense kernels' first
# tile per head-dim group, one per kernel (no autotuning), each compiled for sm_80 and sm_90 under triton
# 3.6 and 3.8 without spills. The key-block kernel takes 16 query rows a step: the dense kernels' (32, 64)
# tile spills 16-32 bytes on sm_80 under triton 3.6 with the per-sequence bookkeeping added.
# At head dim 256 the forward's (64, 16) tile spills 112-128 bytes on sm_90 under triton 3.6 (clean under
# 3.8, and on sm_80 under both); (32, 16, 8 warps) is spill-free there but runs HMMA instead of HGMMA, and
# (32, 32, 4 warps) and (64, 16, 2 stages) spill too. So Hopper splits the value columns over two programs
# (``SPLIT_DV``, as the dense forward): spill-free with HGMMA under both. CLIP's head dims are 64-128.
FWD = AttentionTileTable((
    tile(64, 32, 8, 3, _SMALL + _D128), tile(64, 16, 4, 3, _D256, _HOPPER, dv_splits=2), tile(64, 16, 8, 3, _D256),
    tile(32, 32, 4, 2, _SMALL, dtypes=_FP32, tritons=_FROM_3_8),
    tile(32, 32, 4, 1, _SMALL, dtypes=_FP32, tritons=_BEFORE_3_8),
    tile(16, 32, 8, 2, _D128, dtypes=_FP32), tile(16, 16, 4, 2, _D256, dtypes=_FP32),
), mma_rows="BLOCK_M", streamed=2, resident=1, scores=1)
DKDV = AttentionTileTable((
    tile(16, 64, 8, 2, _SMALL + _D128 + _D256), tile(16, 32, 4, 2, _SMALL + _D128, dtypes=_FP32),
    tile(16, 16, 4, 1, _D256, dtypes=_ALL_DTYPES),
), mma_rows="BLOCK_N", streamed=2, resident=2, scores=2, streamed_stats=3)
DQ = AttentionTileTable((
    tile(64, 32, 8, 2, _SMALL + _D128), tile(64, 16, 8, 2, _D256),
    tile(32, 32, 4, 2, _SMALL, dtypes=_FP32, tritons=_FROM_3_8),
    tile(16, 32, 8, 2, _D128, dtypes=_FP32, tritons=_FROM_3_8),
    tile(32, 32, 4, 1, _SMALL, dtypes=_FP32, tritons=_BEFORE_3_8),
    tile(16, 32, 8, 1, _D128, dtypes=_FP32, tritons=_BEFORE_3_8),
    tile(16, 16, 4, 1, _D256, dtypes=_ALL_DTYPES),
), mma_rows="BLOCK_M", streamed=2, resident=2, scores=2)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

@triton.jit
def _sequence(CU_SEQLENS, seq):
    """First token (int64) and length of sequence ``seq``."""
    start = tl.load(CU_SEQLENS + seq)
    return start.to(tl.int64), tl.load(CU_SEQLENS + seq + 1) - start


@triton.jit
def _token_base(ptr, start, head, strides):
    """Pointer to token ``start`` (int64) of head ``head`` (``strides``: [token, head, head dim]): 64-bit, so
    huge packed tensors cannot overflow."""
    return ptr + start * strides[0] + head.to(tl.int64) * strides[1]


@triton.jit
def _row_stats(stats_base, delta_base, total_q, offs_m, seqlen_q):
    """Saved row max, log2(sum) and delta of the rows ``offs_m`` of one sequence and head; rows past the
    sequence's end read as fully masked (max +inf, so their probabilities are 0)."""
    ok = offs_m < seqlen_q
    row_max = tl.load(stats_base + offs_m, mask=ok, other=float("inf"))
    log2_sum = tl.load(stats_base + total_q + offs_m, mask=ok, other=0.0)
    return row_max, log2_sum, tl.load(delta_base + offs_m, mask=ok, other=0.0)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@runtime.autotune(FWD.configs(), key=["len_bucket", "BLOCK_D", "IS_CAUSAL"],
                  prune_configs_by={"early_config_prune": FWD.early_prune})
@triton.jit
def _varlen_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K,
    q_strides, k_strides, v_strides, o_strides,
    n_heads, total_q, head_dim, qk_scale, len_bucket,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_DV: tl.constexpr = 1,
):
    """One [BLOCK_M] block of queries of one sequence and head, and its share of the value columns
    (``len_bucket`` only keys the autotuner). Strides: one tuple per tensor, [token, head, head dim]."""
    seq = tl.program_id(0) // SPLIT_DV // n_heads
    head = tl.program_id(0) // SPLIT_DV % n_heads
    start_m = tl.program_id(1) * BLOCK_M
    q_start, seqlen_q = _sequence(CU_Q, seq)
    if start_m >= seqlen_q:
        return
    k_start, seqlen_k = _sequence(CU_K, seq)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = _value_columns(offs_d, BLOCK_D, SPLIT_DV)
    k_base = _token_base(K, k_start, head, k_strides)
    v_base = _token_base(V, k_start, head, v_strides)
    # a head's tiles are [token, head dim]: their (row, column) strides, as the shared helpers read them
    q_tile, o_tile = (q_strides[0], q_strides[2]), (o_strides[0], o_strides[2])
    k_tile, v_tile = (k_strides[0], k_strides[2]), (v_strides[0], v_strides[2])

    q = _load_tile(_token_base(Q, q_start, head, q_strides), offs_m, offs_d, q_tile, seqlen_q, head_dim)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D // SPLIT_DV], tl.float32)
    hi = seqlen_k
    if IS_CAUSAL:
        hi = tl.minimum(seqlen_k, start_m + BLOCK_M)
    mid = _unmasked_key_end(start_m, seqlen_k, IS_CAUSAL, BLOCK_N)
    # no bias: the bias pointer and strides are placeholders the helpers never read
    acc, l_i, m_i = _fwd_key_blocks(
        acc, l_i, m_i, q, offs_m=offs_m, offs_d=offs_d, offs_dv=offs_dv, lo=0, hi=mid,
        k_base=k_base, k_strides=k_tile, v_base=v_base, v_strides=v_tile, bias_base=K, bias_strides=k_tile,
        seqlen_q=seqlen_q, seqlen_k=seqlen_k, head_dim=head_dim, qk_scale=qk_scale,
        IS_CAUSAL=IS_CAUSAL, BIAS_KIND=0, DOT_PRECISION=DOT_PRECISION, MASKED=False, BLOCK_N=BLOCK_N)
    acc, l_i, m_i = _fwd_key_blocks(
        acc, l_i, m_i, q, offs_m=offs_m, offs_d=offs_d, offs_dv=offs_dv, lo=mid, hi=hi,
        k_base=k_base, k_strides=k_tile, v_base=v_base, v_strides=v_tile, bias_base=K, bias_strides=k_tile,
        seqlen_q=seqlen_q, seqlen_k=seqlen_k, head_dim=head_dim, qk_scale=qk_scale,
        IS_CAUSAL=IS_CAUSAL, BIAS_KIND=0, DOT_PRECISION=DOT_PRECISION, MASKED=True, BLOCK_N=BLOCK_N)

    has_keys = l_i > 0.0
    l_i = tl.where(has_keys, l_i, 1.0)
    _store_tile(_token_base(O, q_start, head, o_strides), acc / l_i[:, None], offs_m, offs_dv, o_tile, seqlen_q,
                head_dim)
    stats = LSE + head.to(tl.int64) * 2 * total_q + q_start + offs_m
    tl.store(stats, tl.where(has_keys, m_i, float("inf")), mask=offs_m < seqlen_q)
    tl.store(stats + total_q, tl.math.log2(l_i), mask=offs_m < seqlen_q)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _dkdv_query_blocks(dk, dv, k, v, offs_n, offs_d, lo, hi, q_base, q_strides, do_base, do_strides,
                       stats_base, delta_base, total_q, seqlen_q, seqlen_k, head_dim, qk_scale,
                       IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """dk, dv contributions of the query blocks in [lo, hi) of one sequence (masked only on the causal
    diagonal: keys past the sequence's end are never stored, queries past it have probability 0)."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base, offs_m, offs_d, q_strides, seqlen_q, head_dim)
        do = _load_tile(do_base, offs_m, offs_d, do_strides, seqlen_q, head_dim)
        row_max, log2_sum, delta = _row_stats(stats_base, delta_base, total_q, offs_m, seqlen_q)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        # no bias: the bias pointer and strides are placeholders never read
        s_t = _mask_scores(s_t, offs_m, offs_n, q_base, q_strides, seqlen_q, seqlen_k,
                           IS_CAUSAL=IS_CAUSAL, BIAS_KIND=0, Q_ON_ROWS=False, MASKED=IS_CAUSAL)
        p_t = tl.math.exp2((s_t - row_max[None, :]) - log2_sum[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        ds_t = p_t * (tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION) - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@runtime.autotune(DKDV.configs(), key=["len_bucket", "BLOCK_D", "IS_CAUSAL"],
                  prune_configs_by={"early_config_prune": DKDV.early_prune})
@triton.jit
def _varlen_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
    q_strides, k_strides, v_strides, do_strides, dk_strides, dv_strides,
    n_heads, total_q, head_dim, qk_scale, sm_scale, len_bucket,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One [BLOCK_N] block of keys of one sequence and head: dk, dv over every query block that sees it."""
    seq = tl.program_id(0) // n_heads
    head = tl.program_id(0) % n_heads
    start_n = tl.program_id(1) * BLOCK_N
    k_start, seqlen_k = _sequence(CU_K, seq)
    if start_n >= seqlen_k:
        return
    q_start, seqlen_q = _sequence(CU_Q, seq)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # a head's tiles are [token, head dim]: their (row, column) strides, as the shared helpers read them
    k_tile, v_tile = (k_strides[0], k_strides[2]), (v_strides[0], v_strides[2])
    dk_tile, dv_tile = (dk_strides[0], dk_strides[2]), (dv_strides[0], dv_strides[2])
    k = _load_tile(_token_base(K, k_start, head, k_strides), offs_n, offs_d, k_tile, seqlen_k, head_dim)
    v = _load_tile(_token_base(V, k_start, head, v_strides), offs_n, offs_d, v_tile, seqlen_k, head_dim)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    stats_base = LSE + head.to(tl.int64) * 2 * total_q + q_start
    delta_base = DELTA + head.to(tl.int64) * total_q + q_start

    lo = 0
    if IS_CAUSAL:  # queries above this key block's first key cannot see it
        lo = start_n // BLOCK_M * BLOCK_M
    dk, dv = _dkdv_query_blocks(
        dk, dv, k, v, offs_n=offs_n, offs_d=offs_d, lo=lo, hi=seqlen_q,
        q_base=_token_base(Q, q_start, head, q_strides), q_strides=(q_strides[0], q_strides[2]),
        do_base=_token_base(DO, q_start, head, do_strides), do_strides=(do_strides[0], do_strides[2]),
        stats_base=stats_base, delta_base=delta_base, total_q=total_q, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
        head_dim=head_dim, qk_scale=qk_scale, IS_CAUSAL=IS_CAUSAL, DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M)

    _store_tile(_token_base(DK, k_start, head, dk_strides), dk * sm_scale, offs_n, offs_d, dk_tile, seqlen_k,
                head_dim)
    _store_tile(_token_base(DV, k_start, head, dv_strides), dv, offs_n, offs_d, dv_tile, seqlen_k, head_dim)


@runtime.autotune(DQ.configs(), key=["len_bucket", "BLOCK_D", "IS_CAUSAL"],
                  prune_configs_by={"early_config_prune": DQ.early_prune})
@triton.jit
def _varlen_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    q_strides, k_strides, v_strides, do_strides, dq_strides,
    n_heads, total_q, head_dim, qk_scale, sm_scale, len_bucket,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One [BLOCK_M] block of queries of one sequence and head: dq over the key blocks it sees."""
    seq = tl.program_id(0) // n_heads
    head = tl.program_id(0) % n_heads
    start_m = tl.program_id(1) * BLOCK_M
    q_start, seqlen_q = _sequence(CU_Q, seq)
    if start_m >= seqlen_q:
        return
    k_start, seqlen_k = _sequence(CU_K, seq)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # a head's tiles are [token, head dim]: their (row, column) strides, as the shared helpers read them
    q_tile, do_tile = (q_strides[0], q_strides[2]), (do_strides[0], do_strides[2])
    k_tile, v_tile = (k_strides[0], k_strides[2]), (v_strides[0], v_strides[2])
    q = _load_tile(_token_base(Q, q_start, head, q_strides), offs_m, offs_d, q_tile, seqlen_q, head_dim)
    do = _load_tile(_token_base(DO, q_start, head, do_strides), offs_m, offs_d, do_tile, seqlen_q, head_dim)
    row_max, log2_sum, delta = _row_stats(LSE + head.to(tl.int64) * 2 * total_q + q_start,
                                          DELTA + head.to(tl.int64) * total_q + q_start, total_q, offs_m, seqlen_q)
    k_base = _token_base(K, k_start, head, k_strides)
    v_base = _token_base(V, k_start, head, v_strides)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = seqlen_k
    if IS_CAUSAL:
        hi = tl.minimum(seqlen_k, start_m + BLOCK_M)
    mid = _unmasked_key_end(start_m, seqlen_k, IS_CAUSAL, BLOCK_N)
    # no bias: the bias pointer and strides are placeholders the helpers never read
    dq = _dq_key_blocks(
        dq, q, do, row_max, log2_sum, delta, offs_m=offs_m, offs_d=offs_d, lo=0, hi=mid,
        k_base=k_base, k_strides=k_tile, v_base=v_base, v_strides=v_tile, bias_base=K, bias_strides=k_tile,
        seqlen_q=seqlen_q, seqlen_k=seqlen_k, head_dim=head_dim, qk_scale=qk_scale,
        IS_CAUSAL=IS_CAUSAL, BIAS_KIND=0, DOT_PRECISION=DOT_PRECISION, MASKED=False, BLOCK_N=BLOCK_N)
    dq = _dq_key_blocks(
        dq, q, do, row_max, log2_sum, delta, offs_m=offs_m, offs_d=offs_d, lo=mid, hi=hi,
        k_base=k_base, k_strides=k_tile, v_base=v_base, v_strides=v_tile, bias_base=K, bias_strides=k_tile,
        seqlen_q=seqlen_q, seqlen_k=seqlen_k, head_dim=head_dim, qk_scale=qk_scale,
        IS_CAUSAL=IS_CAUSAL, BIAS_KIND=0, DOT_PRECISION=DOT_PRECISION, MASKED=True, BLOCK_N=BLOCK_N)
    _store_tile(_token_base(DQ, q_start, head, dq_strides), dq * sm_scale, offs_m, offs_d,
                (dq_strides[0], dq_strides[2]), seqlen_q, head_dim)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _len_bucket(max_seqlen: int) -> int:
    """Autotune key for a batch's longest sequence: its power-of-two bucket (one tuning per bucket)."""
    return runtime.next_power_of_2(max_seqlen)


def _grid(batch: int, heads: int, max_seqlen: int):
    """(batch * heads * value-column splits, blocks of the longest sequence)."""
    return lambda meta, block="BLOCK_M": (batch * heads * meta.get("SPLIT_DV", 1),
                                          runtime.cdiv(max(max_seqlen, 1), meta[block]))


def fits_32bit_sequence_offsets(t: torch.Tensor, max_seqlen: int) -> bool:
    """Whether offsets inside one sequence (``max_seqlen * token stride``) fit in int32."""
    return max_seqlen * max(t.stride(0), 1) + t.shape[1] * t.stride(1) + t.shape[2] * t.stride(2) < 2**31


@runtime.on_tensor_device
def varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, is_causal: bool,
               scale: float):
    """Launch the forward. Returns (o [total_q, H, D], lse fp32 [H, 2, total_q]: row max, +inf on rows
    without keys, and log2 of the row sum)."""
    total_q, h, d = q.shape
    batch = cu_seqlens_q.shape[0] - 1
    o = runtime.empty((total_q, h, d), q.dtype, q.device)
    lse = runtime.empty((h, 2, total_q), torch.float32, q.device)
    if o.numel() == 0:
        return o, lse
    _varlen_fwd_kernel[_grid(batch, h, max_seqlen_q)](
        q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k,
        q.stride(), k.stride(), v.stride(), o.stride(),
        h, total_q, d, scale * LOG2E, _len_bucket(max(max_seqlen_q, max_seqlen_k)),
        IS_CAUSAL=is_causal, DOT_PRECISION=_dot_precision(q.dtype), BLOCK_D=block_d(d),
    )
    return o, lse


@runtime.on_tensor_device
def varlen_bwd(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
               is_causal: bool, scale: float):
    """Launch the backward. Returns (dq, dk, dv), contiguous [total, H, D] in the inputs' dtype."""
    total_q, h, d = q.shape
    batch = cu_seqlens_q.shape[0] - 1
    dq = runtime.empty(q.shape, q.dtype, q.device)
    dk = runtime.empty(k.shape, k.dtype, k.device)
    dv = runtime.empty(v.shape, v.dtype, v.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    bd = block_d(d)
    # delta over the packed tokens: the dense preprocess kernel on the [1, H, total_q, D] view
    delta = runtime.empty((h, total_q), torch.float32, q.device)
    pre_block = preprocess_block(bd)
    o4, do4 = o.unsqueeze(0).transpose(1, 2), do.unsqueeze(0).transpose(1, 2)
    _attn_bwd_preprocess_kernel[grid(1, h, total_q, pre_block)](
        o4, do4, delta, o4.stride(), do4.stride(), h, total_q, d,
        HAS_WIDE_OFFSETS=has_wide_offsets(o4, do4), BLOCK_D=bd, BLOCK_M=pre_block,
    )
    common = dict(IS_CAUSAL=is_causal, DOT_PRECISION=_dot_precision(q.dtype), BLOCK_D=bd)
    bucket = _len_bucket(max(max_seqlen_q, max_seqlen_k))
    _varlen_bwd_dkdv_kernel[lambda meta: _grid(batch, h, max_seqlen_k)(meta, "BLOCK_N")](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k,
        q.stride(), k.stride(), v.stride(), do.stride(), dk.stride(), dv.stride(),
        h, total_q, d, scale * LOG2E, scale, bucket, **common,
    )
    _varlen_bwd_dq_kernel[_grid(batch, h, max_seqlen_q)](
        q, k, v, do, lse, delta, dq, cu_seqlens_q, cu_seqlens_k,
        q.stride(), k.stride(), v.stride(), do.stride(), dq.stride(),
        h, total_q, d, scale * LOG2E, scale, bucket, **common,
    )
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# AOT cases
# ---------------------------------------------------------------------------------------------

def aot_cases() -> list[runtime.AotCase]:
    """Every shipped tile of the three varlen kernels, on the architectures it is offered on, at head dims 64
    and 128, causal and bidirectional, and the forward at 256 (the backward at 256 spills in the dense kernels
    too), in fp16/bf16 and (cases ``..._fp32``) at the tiles offered to exact fp32; each case carries its
    tile's shared-memory estimate on its architecture. The quick subset is the causal text tower's head dim
    64 at the first tile, fp16/bf16. Head-dim strides are 1 (``_aot_signature``)."""
    cases = []
    kernels = ((_varlen_fwd_kernel, FWD, "fwd"), (_varlen_bwd_dkdv_kernel, DKDV, "bwd_dkdv"),
               (_varlen_bwd_dq_kernel, DQ, "bwd_dq"))
    for bd in (64, 128, 256):
        for precision, (dtypes, dot_precision) in AOT_PRECISIONS.items():
            for causal in (False, True):
                flags = {"IS_CAUSAL": causal, "DOT_PRECISION": dot_precision, "BLOCK_D": bd}
                for kernel, table, label in kernels:
                    if label != "fwd" and bd > BWD_SPILL_FREE_MAX_D:
                        continue
                    signature, unit_strides = _aot_signature(kernel, rank=3)
                    for tile, arch, estimate in _aot_tiles(table, bd, precision):
                        first = tile == table.offered(launch(bd, arch, dtypes[0]))[0]
                        cases.append(AttentionAotCase(
                            name=(f"attention_varlen_{label}{'_causal' if causal else ''}"
                                  f"{'_fp32' if precision == 'fp32' else ''}[D={bd}]"),
                            kernel=runtime.jit_function(kernel), signature=signature,
                            constexprs={**flags, **tile.config().kwargs, **unit_strides}, num_warps=tile.warps,
                            num_stages=tile.stages, expects_mma=precision == "half", dtypes=dtypes, archs=(arch,),
                            quick=precision == "half" and bd == 64 and first and causal, shared_estimate=estimate,
                        ))
    return cases
