"""Flash attention, forward and backward, for CLIP's short and odd sequence lengths.

Shapes and layouts
------------------
q [B, H, Lq, D], k/v [B, H, Lk, D] with any strides on every dimension (the strided views that an
in-projection ``[B, L, 3, H, D]`` split produces are read in place). Any Lq, Lk >= 1 and head dims up to
256: the head dim is padded to ``BLOCK_D = next_power_of_2(D)`` (at least 16) with masked loads. The grid
puts batch*heads on axis 0 (up to 2**31 - 1 programs, so B=1024, H=16 launches) and sequence blocks on
axis 1. Outputs (o, dq, dk, dv) are written in a [B, L, H, D] memory layout returned as [B, H, L, D] views,
so merging the heads for the out-projection is free.

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

import math

import torch
import triton
import triton.language as tl

from . import runtime

# Largest head dim the kernels keep in registers; larger head dims are sent to PyTorch SDPA by the op.
MAX_HEAD_DIM = 256
LOG2E = math.log2(math.e)

# Bias kinds (constexpr BIAS_KIND)
NO_BIAS, KEY_BIAS, FULL_BIAS = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------

@triton.jit
def _offsets(rows, cols, stride_r, stride_c):
    """Element offsets ``rows * stride_r + cols * stride_c`` of a [len(rows), len(cols)] tile in 64 bits.

    The products pass 2**31 in real layouts (a row stride of B * 3E in the sequence-first in-projection
    output passes it from a few thousand sequences) and wrap in 32 bits. The index vectors are widened
    before the multiply: one 64-bit product per row and per column, not per element."""
    return rows.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c


@triton.jit
def _load_tile(base, rows, cols, stride_r, stride_c, n_rows, n_cols):
    """[len(rows), len(cols)] tile at base + rows * stride_r + cols * stride_c, zero outside."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(base + _offsets(rows, cols, stride_r, stride_c), mask=mask, other=0.0)


@triton.jit
def _store_tile(base, value, rows, cols, stride_r, stride_c, n_rows, n_cols):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(base + _offsets(rows, cols, stride_r, stride_c), value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _mask_scores(s, offs_q, offs_k, bias_base, stride_bm, stride_bn, seqlen_q, seqlen_k,
                 IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, Q_ON_ROWS: tl.constexpr, MASKED: tl.constexpr):
    """Add the bias (natural-log units, converted to base 2) to the base-2 scores ``s``; with ``MASKED``
    (blocks crossing the end of the keys or the causal diagonal) set keys past the end and above the
    diagonal to -inf. ``s`` is [queries, keys] when ``Q_ON_ROWS``, else [keys, queries] (the key-block
    kernel's transposed tile)."""
    if Q_ON_ROWS:
        qi = offs_q[:, None]
        kj = offs_k[None, :]
    else:
        qi = offs_q[None, :]
        kj = offs_k[:, None]
    if BIAS_KIND == 1:
        s += tl.load(bias_base + kj.to(tl.int64) * stride_bn, mask=kj < seqlen_k, other=0.0) * 1.4426950408889634
    if BIAS_KIND == 2:
        bias_ok = (qi < seqlen_q) & (kj < seqlen_k)
        bias_off = qi.to(tl.int64) * stride_bm + kj.to(tl.int64) * stride_bn
        s += tl.load(bias_base + bias_off, mask=bias_ok, other=0.0) * 1.4426950408889634
    if MASKED:
        valid = kj < seqlen_k
        if IS_CAUSAL:
            valid = valid & (kj <= qi)
        s = tl.where(valid, s, float("-inf"))
    return s


@triton.jit
def _unmasked_key_end(start_m, seqlen_k, IS_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """End of the key blocks that every query from ``start_m`` on sees whole: inside the sequence and,
    when causal, with their last key at or below the block's first query. Blocks after it are masked."""
    end = seqlen_k // BLOCK_N * BLOCK_N
    if IS_CAUSAL:
        end = tl.minimum(end, (start_m + 1) // BLOCK_N * BLOCK_N)
    return end


@triton.jit
def _load_stats(LSE, offs_m, seqlen_q):
    """Saved row max and log2(sum) of this program's head; rows past the end read as fully masked."""
    stats = LSE + tl.program_id(0).to(tl.int64) * 2 * seqlen_q + offs_m
    m_ok = offs_m < seqlen_q
    return tl.load(stats, mask=m_ok, other=float("inf")), tl.load(stats + seqlen_q, mask=m_ok, other=0.0)


@triton.jit
def _program_bases(n_heads, stride_b, stride_h):
    """Offset of this program's (batch, head) slice; int64 so huge batches cannot overflow."""
    pid_bh = tl.program_id(0)
    off_b = (pid_bh // n_heads).to(tl.int64)
    off_h = (pid_bh % n_heads).to(tl.int64)
    return off_b * stride_b + off_h * stride_h


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _fwd_key_blocks(acc, l_i, m_i, q, k_base, v_base, b_base, offs_m, offs_d, lo, hi,
                    stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                    seqlen_q, seqlen_k, head_dim, qk_scale,
                    IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over the key blocks in [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, offs_d, stride_kn, stride_kd, seqlen_k, head_dim)
        v = _load_tile(v_base, offs_n, offs_d, stride_vn, stride_vd, seqlen_k, head_dim)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = _mask_scores(s, offs_m, offs_n, b_base, stride_bm, stride_bn, seqlen_q, seqlen_k,
                         IS_CAUSAL, BIAS_KIND, True, MASKED)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows with every key masked so far keep m = -inf; shift by 0 there so exp2 gives 0, not NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# Shipped tiles: (BLOCK_M, BLOCK_N, warps, stages, the BLOCK_D values it serves). Each was compiled for
# sm_80 and sm_90 (`clipfast aot`) at those head dims: no spills, tensor-core MMAs. The first tile of each
# list is also the interpreter's (one config there) and the one the masked variants are checked at.
# The key-block kernel's MMA rows are keys (BLOCK_N >= 64 for HGMMA), the query kernels' are queries.
_SMALL, _D128, _D256 = (16, 32, 64), (128,), (256,)
FWD_TILES = [(64, 32, 8, 3, _SMALL + _D128), (64, 64, 8, 3, _SMALL + _D128), (128, 64, 8, 3, _SMALL),
             (64, 64, 4, 3, _SMALL), (128, 32, 8, 3, _SMALL), (64, 32, 4, 3, _SMALL + _D128), (64, 16, 8, 3, _D256)]
DKDV_TILES = [(32, 64, 8, 2, _SMALL), (32, 64, 4, 2, _SMALL), (32, 128, 8, 2, _SMALL), (16, 64, 4, 2, _SMALL),
              (16, 64, 8, 2, _D128 + _D256)]
DQ_TILES = [(64, 32, 8, 2, _SMALL + _D128), (64, 64, 8, 2, _SMALL), (128, 64, 8, 2, _SMALL), (128, 32, 8, 2, _SMALL),
            (64, 32, 4, 2, _SMALL), (64, 16, 8, 2, _D256)]
# Head dims above 128 (BLOCK_D 256) keep k, v, dk and dv of a key block in registers: the backward tiles
# there spill on sm_80/sm_90 at every size tried (correct, slower); the forward does not.
BWD_SPILL_FREE_MAX_D = 128


def _configs(tiles):
    configs = []
    for m, n, w, s, block_ds in tiles:
        cfg = triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        cfg.block_ds = block_ds  # the head-dim tiles it is shipped for (read by _prune)
        configs.append(cfg)
    return configs


def _prune(configs, named_args, **kwargs):
    """Keep the tiles shipped for this head dim (the interpreter keeps its single config)."""
    block_d = named_args.get("BLOCK_D", kwargs.get("BLOCK_D", 64))
    kept = [c for c in configs if block_d in c.block_ds]
    return kept or configs[:1]


@runtime.autotune(_configs(FWD_TILES), key=["seqlen_q", "seqlen_k", "BLOCK_D", "IS_CAUSAL", "BIAS_KIND"],
                  prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, BIAS, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ob, stride_oh, stride_om, stride_od,
    n_heads, seqlen_q, seqlen_k, head_dim, qk_scale,
    IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(1)
    q_base = Q + _program_bases(n_heads, stride_qb, stride_qh)
    k_base = K + _program_bases(n_heads, stride_kb, stride_kh)
    v_base = V + _program_bases(n_heads, stride_vb, stride_vh)
    b_base = BIAS + _program_bases(n_heads, stride_bb, stride_bh)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    q = _load_tile(q_base, offs_m, offs_d, stride_qm, stride_qd, seqlen_q, head_dim)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi = seqlen_k
    if IS_CAUSAL:  # no work above the diagonal
        hi = tl.minimum(seqlen_k, (pid_m + 1) * BLOCK_M)
    mid = _unmasked_key_end(pid_m * BLOCK_M, seqlen_k, IS_CAUSAL, BLOCK_N)
    acc, l_i, m_i = _fwd_key_blocks(acc, l_i, m_i, q, k_base, v_base, b_base, offs_m, offs_d, 0, mid,
                                    stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                                    seqlen_q, seqlen_k, head_dim, qk_scale,
                                    IS_CAUSAL, BIAS_KIND, DOT_PRECISION, False, BLOCK_N)
    acc, l_i, m_i = _fwd_key_blocks(acc, l_i, m_i, q, k_base, v_base, b_base, offs_m, offs_d, mid, hi,
                                    stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                                    seqlen_q, seqlen_k, head_dim, qk_scale,
                                    IS_CAUSAL, BIAS_KIND, DOT_PRECISION, True, BLOCK_N)

    has_keys = l_i > 0.0
    l_i = tl.where(has_keys, l_i, 1.0)
    o_base = O + _program_bases(n_heads, stride_ob, stride_oh)
    _store_tile(o_base, acc / l_i[:, None], offs_m, offs_d, stride_om, stride_od, seqlen_q, head_dim)
    # the log-sum-exp as its two parts: max (+inf on rows without keys, so their p is 0) and log2(sum)
    stats = LSE + tl.program_id(0).to(tl.int64) * 2 * seqlen_q + offs_m
    tl.store(stats, tl.where(has_keys, m_i, float("inf")), mask=offs_m < seqlen_q)
    tl.store(stats + seqlen_q, tl.math.log2(l_i), mask=offs_m < seqlen_q)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    n_heads, seqlen_q, head_dim,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O) in fp32, [B*H, Lq]."""
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + _program_bases(n_heads, stride_ob, stride_oh), offs_m, offs_d, stride_om, stride_od,
                   seqlen_q, head_dim)
    do = _load_tile(DO + _program_bases(n_heads, stride_dob, stride_doh), offs_m, offs_d, stride_dom, stride_dod,
                    seqlen_q, head_dim)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + tl.program_id(0).to(tl.int64) * seqlen_q + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _dkdv_query_blocks(dk, dv, k, v, q_base, do_base, b_base, LSE, DELTA, row_base, offs_n, offs_d, lo, hi,
                       stride_qm, stride_qd, stride_dom, stride_dod, stride_bm, stride_bn,
                       seqlen_q, seqlen_k, head_dim, qk_scale,
                       IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       MASKED: tl.constexpr, BLOCK_M: tl.constexpr):
    """dk, dv contributions of the query blocks in [lo, hi). Keys past the end need no masking here: their
    rows of dk and dv are never stored, and rows past the end of the queries have p = 0."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base, offs_m, offs_d, stride_qm, stride_qd, seqlen_q, head_dim)
        do = _load_tile(do_base, offs_m, offs_d, stride_dom, stride_dod, seqlen_q, head_dim)
        # rows past the end (and fully masked rows) have max = +inf, so their probabilities are 0
        row_max, log2_sum = _load_stats(LSE, offs_m, seqlen_q)
        delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < seqlen_q, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        s_t = _mask_scores(s_t, offs_m, offs_n, b_base, stride_bm, stride_bn, seqlen_q, seqlen_k,
                           IS_CAUSAL, BIAS_KIND, False, MASKED)
        p_t = tl.math.exp2((s_t - row_max[None, :]) - log2_sum[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@runtime.autotune(_configs(DKDV_TILES), key=["seqlen_q", "seqlen_k", "BLOCK_D", "IS_CAUSAL", "BIAS_KIND"],
                  prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, BIAS, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    n_heads, seqlen_q, seqlen_k, head_dim, qk_scale, sm_scale,
    IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One [BLOCK_N] block of keys: dk, dv accumulated over every query block that sees it."""
    pid_n = tl.program_id(1)
    q_base = Q + _program_bases(n_heads, stride_qb, stride_qh)
    do_base = DO + _program_bases(n_heads, stride_dob, stride_doh)
    b_base = BIAS + _program_bases(n_heads, stride_bb, stride_bh)
    row_base = tl.program_id(0).to(tl.int64) * seqlen_q
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    k = _load_tile(K + _program_bases(n_heads, stride_kb, stride_kh), offs_n, offs_d, stride_kn, stride_kd,
                   seqlen_k, head_dim)
    v = _load_tile(V + _program_bases(n_heads, stride_vb, stride_vh), offs_n, offs_d, stride_vn, stride_vd,
                   seqlen_k, head_dim)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    lo = 0
    if IS_CAUSAL:  # queries above this key block's first key cannot see it
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    # one loop: only the causal diagonal needs a mask here (a second, unmasked loop for the blocks below it
    # would double the code and spill at head dim 128; CLIP's causal text is one or two blocks anyway)
    dk, dv = _dkdv_query_blocks(dk, dv, k, v, q_base, do_base, b_base, LSE, DELTA, row_base, offs_n, offs_d,
                                lo, seqlen_q, stride_qm, stride_qd, stride_dom, stride_dod, stride_bm, stride_bn,
                                seqlen_q, seqlen_k, head_dim, qk_scale,
                                IS_CAUSAL, BIAS_KIND, DOT_PRECISION, IS_CAUSAL, BLOCK_M)

    _store_tile(DK + _program_bases(n_heads, stride_dkb, stride_dkh), dk * sm_scale, offs_n, offs_d,
                stride_dkn, stride_dkd, seqlen_k, head_dim)
    _store_tile(DV + _program_bases(n_heads, stride_dvb, stride_dvh), dv, offs_n, offs_d,
                stride_dvn, stride_dvd, seqlen_k, head_dim)


@triton.jit
def _dq_key_blocks(dq, q, do, row_max, log2_sum, delta, k_base, v_base, b_base, offs_m, offs_d, lo, hi,
                   stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                   seqlen_q, seqlen_k, head_dim, qk_scale,
                   IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq contributions of the key blocks in [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, offs_d, stride_kn, stride_kd, seqlen_k, head_dim)
        v = _load_tile(v_base, offs_n, offs_d, stride_vn, stride_vd, seqlen_k, head_dim)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = _mask_scores(s, offs_m, offs_n, b_base, stride_bm, stride_bn, seqlen_q, seqlen_k,
                         IS_CAUSAL, BIAS_KIND, True, MASKED)
        p = tl.math.exp2((s - row_max[:, None]) - log2_sum[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@runtime.autotune(_configs(DQ_TILES), key=["seqlen_q", "seqlen_k", "BLOCK_D", "IS_CAUSAL", "BIAS_KIND"],
                  prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, BIAS, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    n_heads, seqlen_q, seqlen_k, head_dim, qk_scale, sm_scale,
    IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One [BLOCK_M] block of queries: dq accumulated over the key blocks it sees."""
    pid_m = tl.program_id(1)
    k_base = K + _program_bases(n_heads, stride_kb, stride_kh)
    v_base = V + _program_bases(n_heads, stride_vb, stride_vh)
    b_base = BIAS + _program_bases(n_heads, stride_bb, stride_bh)
    row_base = tl.program_id(0).to(tl.int64) * seqlen_q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q

    q = _load_tile(Q + _program_bases(n_heads, stride_qb, stride_qh), offs_m, offs_d, stride_qm, stride_qd,
                   seqlen_q, head_dim)
    do = _load_tile(DO + _program_bases(n_heads, stride_dob, stride_doh), offs_m, offs_d, stride_dom, stride_dod,
                    seqlen_q, head_dim)
    row_max, log2_sum = _load_stats(LSE, offs_m, seqlen_q)
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi = seqlen_k
    if IS_CAUSAL:
        hi = tl.minimum(seqlen_k, (pid_m + 1) * BLOCK_M)
    mid = _unmasked_key_end(pid_m * BLOCK_M, seqlen_k, IS_CAUSAL, BLOCK_N)
    dq = _dq_key_blocks(dq, q, do, row_max, log2_sum, delta, k_base, v_base, b_base, offs_m, offs_d, 0, mid,
                        stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                        seqlen_q, seqlen_k, head_dim, qk_scale, IS_CAUSAL, BIAS_KIND, DOT_PRECISION, False, BLOCK_N)
    dq = _dq_key_blocks(dq, q, do, row_max, log2_sum, delta, k_base, v_base, b_base, offs_m, offs_d, mid, hi,
                        stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                        seqlen_q, seqlen_k, head_dim, qk_scale, IS_CAUSAL, BIAS_KIND, DOT_PRECISION, True, BLOCK_N)

    _store_tile(DQ + _program_bases(n_heads, stride_dqb, stride_dqh), dq * sm_scale, offs_m, offs_d,
                stride_dqm, stride_dqd, seqlen_q, head_dim)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two, at least 16 (the smallest tensor-core K)."""
    return max(16, runtime.next_power_of_2(head_dim))


def grid(batch: int, heads: int, seqlen: int, block: int) -> tuple[int, int]:
    """(batch*heads, sequence blocks): batch*heads on axis 0, which takes 2**31 - 1 programs."""
    return (batch * heads, runtime.cdiv(seqlen, block))


def bias_kind(bias) -> int:
    if bias is None:
        return NO_BIAS
    return KEY_BIAS if bias.shape[1] == 1 and bias.shape[2] == 1 else FULL_BIAS


def _bias_args(bias, q, shape):
    """Pointer and [b, h, m, n] strides of the bias broadcast to ``shape`` (0 on broadcast dims)."""
    if bias is None:
        return q, (0, 0, 0, 0)
    return bias, tuple(bias.expand(shape).stride())


def _strides(t):
    return tuple(t.stride())


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get full fp32 products (what eager fp32 matmul gives), not tf32
    return "ieee" if dtype == torch.float32 else "tf32"


def _blhd_empty(b, h, length, d, dtype, device):
    """An output in [B, L, H, D] memory, returned as a [B, H, L, D] view."""
    return runtime.empty((b, length, h, d), dtype, device).permute(0, 2, 1, 3)


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
    _attn_fwd_kernel[lambda meta: grid(b, h, lq, meta["BLOCK_M"])](
        q, k, v, bias_ptr, o, lse,
        *_strides(q), *_strides(k), *_strides(v), *bias_strides, *_strides(o),
        h, lq, lk, d, scale * LOG2E,
        IS_CAUSAL=is_causal, BIAS_KIND=bias_kind(bias), DOT_PRECISION=_dot_precision(q.dtype), BLOCK_D=bd,
    )
    return o, lse


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
    delta = runtime.empty((b * h, lq), torch.float32, q.device)
    pre_block = max(16, min(64, 2048 // bd))
    _attn_bwd_preprocess_kernel[grid(b, h, lq, pre_block)](
        o, do, delta, *_strides(o), *_strides(do), h, lq, d, BLOCK_D=bd, BLOCK_M=pre_block,
    )
    bias_ptr, bias_strides = _bias_args(bias, q, (b, h, lq, lk))
    common = dict(IS_CAUSAL=is_causal, BIAS_KIND=bias_kind(bias), DOT_PRECISION=_dot_precision(q.dtype), BLOCK_D=bd)
    _attn_bwd_dkdv_kernel[lambda meta: grid(b, h, lk, meta["BLOCK_N"])](
        q, k, v, bias_ptr, do, lse, delta, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *bias_strides, *_strides(do), *_strides(dk), *_strides(dv),
        h, lq, lk, d, scale * LOG2E, scale, **common,
    )
    _attn_bwd_dq_kernel[lambda meta: grid(b, h, lq, meta["BLOCK_M"])](
        q, k, v, bias_ptr, do, lse, delta, dq,
        *_strides(q), *_strides(k), *_strides(v), *bias_strides, *_strides(do), *_strides(dq),
        h, lq, lk, d, scale * LOG2E, scale, **common,
    )
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# AOT cases
# ---------------------------------------------------------------------------------------------

def _aot_signature(kernel) -> tuple[dict[str, str], dict[str, int]]:
    """AOT signature from the kernel's parameter names: upper-case names are pointers (fp32 for the bias
    and the row statistics, the case dtype otherwise), the scales fp32, everything else i32; and the
    head-dim strides, set to 1 (a constant, as the runtime specializes it)."""
    sig, unit = {}, {}
    for param in runtime.jit_function(kernel).params:
        name = param.name
        if param.is_constexpr:
            continue
        if name in ("BIAS", "LSE", "DELTA"):
            sig[name] = "*fp32"
        elif name.isupper():
            sig[name] = "*{dtype}"
        elif name.endswith("_scale"):
            sig[name] = "fp32"
        elif name.startswith("stride_") and name.endswith("d"):
            unit[name] = 1
        else:
            sig[name] = "i32"
    return sig, unit


def aot_cases() -> list[runtime.AotCase]:
    """Every shipped tile (after pruning) of the three kernels at head dims 64 (ViT-B/L, text) and 128
    (80/88/104/128 pad to it), the forward at 256; the causal, key-padding and full-mask variants at the
    first tile. Head-dim strides are 1, as the runtime specializes them for torch's layouts. The quick
    subset is head dim 64 at the first tile."""
    cases = []
    variants = [("", False, NO_BIAS), ("_causal", True, NO_BIAS), ("_keymask", False, KEY_BIAS),
                ("_causal_fullmask", True, FULL_BIAS)]
    kernels = ((_attn_fwd_kernel, "fwd"), (_attn_bwd_dkdv_kernel, "bwd_dkdv"), (_attn_bwd_dq_kernel, "bwd_dq"))
    for bd in (64, 128, 256):
        for suffix, causal, kind in variants:
            if bd == 256 and suffix:
                continue
            flags = {"IS_CAUSAL": causal, "BIAS_KIND": kind, "DOT_PRECISION": "tf32", "BLOCK_D": bd}
            for kernel, label in kernels:
                if label != "fwd" and bd > BWD_SPILL_FREE_MAX_D:
                    continue
                signature, unit_strides = _aot_signature(kernel)
                configs = _prune(kernel.shipped_configs, {"BLOCK_D": bd})
                for i, cfg in enumerate(configs if not suffix else configs[:1]):
                    cases.append(runtime.AotCase(
                        name=f"attention_{label}{suffix}[D={bd}]", kernel=runtime.jit_function(kernel),
                        signature=signature, constexprs={**flags, **cfg.kwargs, **unit_strides},
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages, expects_mma=True,
                        quick=bd == 64 and i == 0 and (not suffix or (suffix == "_causal" and label == "fwd")),
                    ))
        signature, unit_strides = _aot_signature(_attn_bwd_preprocess_kernel)
        cases.append(runtime.AotCase(
            name=f"attention_bwd_preprocess[D={bd}]", kernel=_attn_bwd_preprocess_kernel, signature=signature,
            constexprs={"BLOCK_D": bd, "BLOCK_M": max(16, min(64, 2048 // bd)), **unit_strides}, quick=False,
        ))
    return cases
