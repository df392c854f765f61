"""Fused contrastive losses (CLIP softmax cross-entropy and SigLIP sigmoid loss), forward and backward,
without ever materializing the N x M logits matrix.

Notation: ``A`` [N, d] holds the query features (images), ``B`` [M, d] the key features (texts),
``z_ij = <s * Ahat_i, Bhat_j>`` the logits (hat: L2-normalized when asked), and the positive of row ``i``
is column ``i + offset`` (``offset = rank * N`` for the rectangular local loss of a data-parallel rank, 0
for the square loss).

Algorithm
---------
Operands (``_prepare_kernel``): one pass over the rows, ``Ahat = s * x / max(||x||, eps)`` and
``Bhat = x / max(||x||, eps)`` in the input dtype (the tensor-core operands), like ``F.normalize`` with
``eps = 1e-12`` (a zero row stays zero). Folding s into A rounds the logits as open_clip's
``logit_scale * image_features @ text_features.T`` does. Traffic: read x, write the operand.

Forward (``_contrastive_fwd_kernel``): a grid of P x S programs. Program (p, s) walks the row blocks
p, p + P, ... and, for each, the column blocks of column split s; each [BLOCK_M, BLOCK_N] tile of z is
computed with ``tl.dot`` over d (fp32 accumulation) and consumed at once:
- CLIP rows: an online (max, sum of exp(z - max) over the negatives) per row in registers, written once
  per (split, row) as partials [S, N]; the positive logit of each row is picked from the diagonal tile.
- CLIP columns (square loss only): the tile's column max and sum of exponentials are merged into the
  program's own partial (max, sum) row [P, M] (read-modify-write by that program only: no atomics,
  deterministic).
- SigLIP: ``-logsigmoid(y * (z + b))`` (``y = +1`` on the positives, -1 elsewhere) summed per row into
  [S, N] partials.
The partials are combined over S and P outside the kernel (see ``_combine``); keeping the positive out
of the sums keeps the digits of a nearly one-hot softmax, where ``1 - softmax`` rounds to 0. Memory: 2 * (S + P) * (N + M) fp32 values with
P * S about two programs per SM: O(N + M), never O(N * M). Traffic: A and B stream from L2 once per
tile, like any GEMM; nothing of size N * M touches memory.

Backward (``_contrastive_grad_kernel``): with ``G_ij = dloss/dz_ij`` divided by the loss's constant
factor (1/N or 1/2N, applied later in fp32 so that fp16/bf16 tiles do not underflow),
    CLIP:   G_ij = [softmax_row(z)_ij - 1{j = i + offset}] + [softmax_col(z)_ij - 1{j = i + offset}]
            (the column term only for the square loss), recomputed from the saved statistics
            (``softmax - 1`` at the positive is saved, exact);
    SigLIP: G_ij = -y_ij * sigmoid(-y_ij * (z_ij + b)).
One program per (row block, d-chunk, column split) recomputes the tiles of its rows and accumulates
``acc = sum_j G_ij Bhat_j`` over the columns of its split for a BLOCK_D slice of the features (fp32
registers), written as an fp32 partial [S, N, d]; the feature-gradient kernel sums the S partials in split
order (``grad_splits``: S = 1 for square losses, whose row blocks fill the GPU; a local loss of 256 rows
against 32k gathered columns gets its columns split until there are ~2 programs per SM, instead of 4 x
d / BLOCK_D programs). The same kernel on the transposed problem (B as rows, A as columns, statistics
swapped, offset negated) gives ``sum_i G_ij Ahat_i``. No N x M buffer, no atomics: deterministic.

GEMM passes (``gemm_passes``, counted from the launch grid and tiles; a pass is the N x M x d product):
each program recomputes the full-depth z tile for its d-chunk, so one side costs
``chunks * (d + BLOCK_D) / d`` passes, ``chunks = ceil(d / BLOCK_D)``. ``GRAD_TILES`` ships two chunk
widths for fp16/bf16: 256 (64 x 64 tiles, any width) and 512 (64 x 32 tiles, a 64 x 512 fp32 accumulator
that fits in 255 registers without spills only with the 16-aligned widths and strides the JIT specializes
on: every CLIP width). ``grad_plan`` covers 16-aligned features with 512-wide chunks and the rest
(``d % 512``) with one launch of the narrowest tile that holds it, starting at feature ``d_start`` (both
launches write the same column-split partials); other widths take 256-wide chunks. Whole backward (both
sides, also for the 256 x 32768 local loss, whose column split adds no work; ``backward_gemm_passes``):

    d        chunk 256   chunks of 512 + rest (default when aligned)
    512      6           4
    768      8           6      (512 + 256)
    1024     10          6

Not taken: one program producing both sides' products from one recomputed tile (3 passes) needs, without
atomics, a partial of one side per program along the other (O(N * M * d / tile) memory for square losses;
for the 256-row local loss O(S * N * d), but with an fp32 read-modify-write of a 64 x BLOCK_D partial per
tile: ~80 FLOP/byte, L2-bound on H100); keeping every chunk's accumulator of a row block in registers is
the 512-wide tile (a 64 x 768 fp32 accumulator does not fit: 16 warps spill at their 128-register cap).
The 256-wide chunk stays a dispatch candidate (``clipfast.dispatching.candidates``): twice the column tile re-reads
the row operand half as often, which may win on a GPU despite the passes.
The programs of the first d-chunk on the A side also sum ``G_ij`` and ``G_ij * z_ij`` per row in fp32,
from which the gradients of the bias and of the scale follow (for fp32 operands the scale's gradient
comes more accurately from ``sum_i <xhat_i, acc_i>``, see below; fp16/bf16 operands saw G rounded).

Feature gradients (``_feature_grad_kernel``): ``acc`` summed over the column splits,
``dxhat = coef * acc`` (``coef``: upstream gradient times the loss factor, times s on the A side), back
through the normalization ``dx = (dxhat - xhat * <xhat, dxhat>) / max(||x||, eps)`` (no projection for
rows clamped by eps), and optionally ``<xhat_i, acc_i>``. Traffic: read x and the S partials of acc,
write dx.

Offsets: row offsets are ``row.to(int64) * stride`` and partial offsets int64 pointer steps, so operands
and partials past 2**31 elements are addressed correctly.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from . import runtime
from .layer_norm import row_tile
from .tiles import Tile

# Widest feature dimension the row kernels hold in registers (the ops fall back to eager above it).
MAX_DIM = 8192

CLIP = 0
SIGLIP = 1


# ---------------------------------------------------------------------------------------------
# Row kernels: normalization and the feature gradients
# ---------------------------------------------------------------------------------------------

@triton.jit
def _prepare_kernel(X, Y, SCALE, n_rows, n_cols, stride_x, stride_y, eps,
                    NORMALIZE: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows = rows.to(tl.int64)
    y = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if NORMALIZE:
        y = y / tl.maximum(tl.sqrt(tl.sum(y * y, axis=1)), eps)[:, None]
    if HAS_SCALE:
        y = y * tl.load(SCALE).to(tl.float32)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _feature_grad_kernel(X, ACC, DX, COEF, DOT,
                         n_rows, n_cols, n_splits, stride_x, stride_split, stride_acc, stride_dx, eps,
                         NORMALIZE: tl.constexpr, HAS_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    rows = rows.to(tl.int64)
    c = tl.load(COEF).to(tl.float32)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # the column splits' fp32 partials, summed in split order (deterministic)
    acc_ptrs = ACC + rows[:, None] * stride_acc + cols[None, :]
    acc = tl.load(acc_ptrs, mask=mask, other=0.0)
    for _ in range(1, n_splits):
        acc_ptrs += stride_split
        acc += tl.load(acc_ptrs, mask=mask, other=0.0)
    if NORMALIZE:
        norm = tl.sqrt(tl.sum(x * x, axis=1))
        r = 1.0 / tl.maximum(norm, eps)
        xhat = x * r[:, None]
        dxhat = c * acc
        # rows whose norm was clamped to eps are scaled by a constant: no projection term
        proj = tl.where(norm > eps, tl.sum(xhat * dxhat, axis=1), 0.0)
        dx = r[:, None] * (dxhat - xhat * proj[:, None])
    else:
        xhat = x
        dx = c * acc
    tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_DOT:  # <xhat_i, acc_i>: summed, the gradient of the scale (fp32 operands)
        tl.store(DOT + rows, tl.sum(xhat * acc, axis=1), mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Tile kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _dot_tile(A, B, rows, cols, n_a, n_b, n_cols, stride_a, stride_b,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """A[rows] @ B[cols]^T in fp32, accumulated over the feature dim in BLOCK_K steps. Rows and columns
    past the end are clamped to the last one (in bounds, no masks; the callers discard them), so with
    EVEN_K (d a multiple of BLOCK_K) the loads need no masks at all."""
    a_ptrs = A + tl.minimum(rows, n_a - 1).to(tl.int64)[:, None] * stride_a + tl.arange(0, BLOCK_K)[None, :]
    b_ptrs = B + tl.minimum(cols, n_b - 1).to(tl.int64)[:, None] * stride_b + tl.arange(0, BLOCK_K)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, n_cols, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = (k0 + tl.arange(0, BLOCK_K)) < n_cols
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@triton.jit
def _softplus_neg(t):
    """-logsigmoid(t) = log(1 + exp(-t)) without overflow, with an accurate log1p for small exp(-|t|)."""
    u = tl.exp(-tl.abs(t))
    w = 1.0 + u
    log1p_u = tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))
    return tl.maximum(-t, 0.0) + log1p_u


@triton.jit
def _contrastive_fwd_kernel(
    A, B, BIAS, ROW_M, ROW_L, COL_M, COL_L, POS,
    n_a, n_b, n_cols, stride_a, stride_b, offset, cols_per_split, n_row_programs,
    KIND: tl.constexpr, HAS_COLS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_s = tl.program_id(1)
    if KIND == 1:
        bias = tl.load(BIAS).to(tl.float32)
    col_begin = pid_s * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, n_b)
    first_row = pid_p * BLOCK_M
    for row0 in range(first_row, n_a, n_row_programs * BLOCK_M):
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_a
        # -1e30 rather than -inf marks "nothing yet" and masked entries: masked lanes then never compute
        # -inf - (-inf), and no logit comes near it
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        pos = tl.zeros([BLOCK_M], dtype=tl.float32)
        for col0 in range(col_begin, col_end, BLOCK_N):
            cols = col0 + tl.arange(0, BLOCK_N)
            col_ok = cols < col_end
            z = _dot_tile(A, B, rows, cols, n_a, n_b, n_cols, stride_a, stride_b,
                          BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION)
            valid = row_ok[:, None] & col_ok[None, :]
            is_pos = (rows + offset)[:, None] == cols[None, :]
            if KIND == 0:
                z = tl.where(valid, z, -1.0e30)
                m_new = tl.maximum(m_i, tl.max(z, axis=1))
                # the sum leaves the positive out: exact gradients and loss when the softmax is one-hot
                l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.where(is_pos, 0.0, tl.exp(z - m_new[:, None])), axis=1)
                m_i = m_new
                pos += tl.sum(tl.where(is_pos & valid, z, 0.0), axis=1)
                if HAS_COLS:
                    m_c = tl.max(z, axis=0)
                    l_c = tl.sum(tl.where(is_pos, 0.0, tl.exp(z - m_c[None, :])), axis=0)
                    # merge into this program's running column (max, sum) (written by this program only)
                    not_first = col_ok & (row0 != first_row)
                    part = pid_p.to(tl.int64) * n_b + cols
                    m_old = tl.load(COL_M + part, mask=not_first, other=-1.0e30)
                    l_old = tl.load(COL_L + part, mask=not_first, other=0.0)
                    m = tl.maximum(m_old, m_c)
                    tl.store(COL_M + part, m, mask=col_ok)
                    tl.store(COL_L + part, l_old * tl.exp(m_old - m) + l_c * tl.exp(m_c - m), mask=col_ok)
            else:
                t = tl.where(is_pos, 1.0, -1.0) * (z + bias)
                l_i += tl.sum(tl.where(valid, _softplus_neg(t), 0.0), axis=1)
        tl.store(ROW_L + pid_s.to(tl.int64) * n_a + rows, l_i, mask=row_ok)
        if KIND == 0:
            tl.store(ROW_M + pid_s.to(tl.int64) * n_a + rows, m_i, mask=row_ok)
            diag = rows + offset
            tl.store(POS + rows, pos, mask=row_ok & (diag >= col_begin) & (diag < col_end))
        # the next row block re-reads this program's column partials: make the stores visible first
        tl.debug_barrier()


@triton.jit
def _contrastive_grad_kernel(
    A, B, LSE_A, LSE_B, BIAS, OUT, ROW_SUMS,
    n_a, n_b, n_cols, stride_a, stride_b, stride_out, stride_split, offset, cols_per_split, d_start,
    KIND: tl.constexpr, HAS_LSE_A: tl.constexpr, HAS_LSE_B: tl.constexpr, HAS_ROW_SUMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)  # column split: its partial goes to OUT[pid_s] (and ROW_SUMS[pid_s])
    col_begin = pid_s * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, n_b)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_a
    dcols = d_start + pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # this launch's features start at d_start
    d_ok = dcols < n_cols
    if KIND == 1:
        bias = tl.load(BIAS).to(tl.float32)
    if HAS_LSE_A:  # per row: max, log of the sum of exp(z - max), and softmax - 1 at the positive
        m_a = tl.load(LSE_A + rows, mask=row_ok, other=1.0e30)  # past the end: exp(z - m) = 0
        log_l_a = tl.load(LSE_A + n_a + rows, mask=row_ok, other=0.0)
        g_pos_a = tl.load(LSE_A + 2 * n_a + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    g_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    gz_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for col0 in range(col_begin, col_end, BLOCK_N):
        cols = col0 + tl.arange(0, BLOCK_N)
        col_ok = cols < col_end
        z = _dot_tile(A, B, rows, cols, n_a, n_b, n_cols, stride_a, stride_b,
                      BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PRECISION)
        is_pos = (rows + offset)[:, None] == cols[None, :]
        if KIND == 0:
            g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if HAS_LSE_A:
                g += tl.where(is_pos, g_pos_a[:, None], tl.exp((z - m_a[:, None]) - log_l_a[:, None]))
            if HAS_LSE_B:
                m_b = tl.load(LSE_B + cols, mask=col_ok, other=1.0e30)
                log_l_b = tl.load(LSE_B + n_b + cols, mask=col_ok, other=0.0)
                g_pos_b = tl.load(LSE_B + 2 * n_b + cols, mask=col_ok, other=0.0)
                g += tl.where(is_pos, g_pos_b[None, :], tl.exp((z - m_b[None, :]) - log_l_b[None, :]))
        else:
            y = tl.where(is_pos, 1.0, -1.0)
            g = -y * tl.sigmoid(-y * (z + bias))
        g = tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)
        if HAS_ROW_SUMS:  # for the gradients of the bias and the scale, in fp32
            g_sum += tl.sum(g, axis=1)
            gz_sum += tl.sum(g * z, axis=1)
        b = tl.load(B + cols.to(tl.int64)[:, None] * stride_b + dcols[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(g.to(b.dtype), b, acc, input_precision=DOT_PRECISION)
    out = OUT + pid_s.to(tl.int64) * stride_split
    tl.store(out + rows.to(tl.int64)[:, None] * stride_out + dcols[None, :], acc,
             mask=row_ok[:, None] & d_ok[None, :])
    if HAS_ROW_SUMS:
        sums = ROW_SUMS + pid_s.to(tl.int64) * (2 * n_a)
        tl.store(sums + rows, g_sum, mask=row_ok & (pid_d == 0))
        tl.store(sums + n_a + rows, gz_sum, mask=row_ok & (pid_d == 0))


# ---------------------------------------------------------------------------------------------
# Tiles and launchers
# ---------------------------------------------------------------------------------------------

# The fp16/bf16 gradient tiles, by feature-chunk width: each program recomputes the full-depth logit tile
# once per chunk, so a wider chunk means fewer GEMM passes (``gemm_passes``). The 512-wide chunk holds a
# 64 x 512 fp32 accumulator and compiles without spills for sm_80 and sm_90 only with the 16-aligned widths
# and strides the JIT specializes on (d % 16 == 0: every CLIP width), so it needs them (``aligned``); the
# 256-wide chunk with twice the column tile takes every width.
GRAD_TILES = {
    256: Tile(64, 64, warps=8, stages=2, meta=(("BLOCK_D", 256),)),
    512: Tile(64, 32, warps=8, stages=2, meta=(("BLOCK_D", 512),)),
}
ALIGNED_ONLY = (512,)


def _chunk(tile: Tile, block_k: int, block_d: int) -> Tile:
    """``tile`` with its feature step BLOCK_K and its feature chunk BLOCK_D set."""
    return replace(tile, block_k=block_k).with_meta(BLOCK_D=block_d)


def tiles(dtype: torch.dtype, n_cols: int, block_d: int = 0) -> dict[str, Tile]:
    """The forward (``fwd``) and gradient (``grad``) kernels' tiles (``kernels/tiles.py``; the gradient's feature
    chunk is its BLOCK_D). The fp16/bf16 ones are the largest that compile without spills for sm_80 and sm_90
    (``clipfast aot``); BLOCK_K = 32 keeps the operand tiles of the nested loops small enough. ``block_d`` picks
    a gradient tile of ``GRAD_TILES`` (0: the interpreter's tile, or ``GRAD_TILES[256]``), its chunk shrunk to a
    narrower ``n_cols``."""
    p2 = runtime.next_power_of_2(n_cols)
    k = max(16, min(32, p2))
    if runtime.INTERPRET:  # few, large tiles: the interpreter's cost is per tile operation
        ik = max(16, min(128, p2))
        fwd = Tile(64, 64, ik, warps=4, stages=1)
        if not block_d:
            return {"fwd": fwd, "grad": _chunk(fwd, ik, max(16, min(1024, p2)))}
        return {"fwd": fwd, "grad": _chunk(GRAD_TILES[block_d], k, max(16, min(block_d, p2)))}
    if dtype == torch.float32:
        return {"fwd": Tile(64, 64, k, warps=8, stages=2),
                "grad": _chunk(Tile(64, 32, warps=8, stages=2), k, max(16, min(128, p2)))}
    return {"fwd": Tile(64, 128, k, warps=8, stages=3),
            "grad": _chunk(GRAD_TILES[block_d or 256], k, max(16, min(block_d or 256, p2)))}


def shared_estimate(kind: str, tile: Tile, dtype, arch: int = 90) -> int:
    """An upper bound on the shared memory of the ``kind`` ("fwd" / "grad") kernel at ``tile`` (``tiles``) with
    ``dtype`` features on ``arch`` (10 x major + minor), in bytes: ``num_stages`` buffers of the logit tile's
    [BLOCK_M, BLOCK_K] and [BLOCK_N, BLOCK_K] operands (``runtime.gemm_shared_estimate``), and for the
    gradient also ``num_stages`` buffers of the [BLOCK_N, BLOCK_D] feature chunk and the [BLOCK_M, BLOCK_N] G
    tile of its second product; on sm_90 and newer at least the gradient's [BLOCK_M, BLOCK_D] fp32
    accumulator, which the store stages through shared memory there once the loop's buffers are free
    (measured, triton 3.8: 131,072 B for the 512-wide chunk in fp16 on sm_90, 36,864 B on sm_80). `clipfast
    aot` fails a case whose compiled ``shared`` exceeds this."""
    size = runtime.ELEMENT_SIZE[dtype]
    bm, bn, bk, stages = tile.block_m, tile.block_n, tile.block_k, tile.stages
    second = stages * bn * tile.param("BLOCK_D") * size + bm * bn * size if kind == "grad" else 0
    estimate = runtime.gemm_shared_estimate(bm, bn, bk, stages, size, second)
    if kind == "grad" and (arch == 0 or arch >= 90):
        estimate = max(estimate, bm * tile.param("BLOCK_D") * 4 + runtime.SHARED_SCRATCH_ALLOWANCE)
    return estimate


def grad_plan(dtype: torch.dtype, n_cols: int, aligned: bool, block_d: int = 0,
              arch: int = 0) -> list[tuple[int, Tile]]:
    """The gradient launches over the features: ``(d_start, tile)`` pairs, each launch covering the
    features from ``d_start`` to the next launch's start in chunks of the tile's BLOCK_D.

    fp16/bf16 with 16-aligned rows (``aligned_rows``; ``block_d`` 0 or 512): 512-wide chunks, and the
    rest (``d % 512``) as one chunk of the narrowest tile that holds it (d = 768: 512 + 256, 6 passes for
    the backward instead of 6.67 with a padded second 512 chunk). Otherwise one launch: ``block_d`` =
    256 (or unaligned rows, or an ``arch`` whose shared memory per block the 512-wide tile does not fit by
    its ``shared_estimate``: consumer Blackwell's 99 KB) gives 256-wide chunks; fp32 its own tile; the
    interpreter its large tile."""
    if dtype == torch.float32 or (runtime.INTERPRET and not block_d):
        return [(0, tiles(dtype, n_cols)["grad"])]
    wide = shared_estimate("grad", tiles(dtype, 512, 512)["grad"], dtype, arch)
    wide_fits = runtime.fits_shared_memory(wide, arch)
    if block_d == 256 or not aligned or not wide_fits:
        return [(0, tiles(dtype, n_cols, 256)["grad"])]
    wide = n_cols - n_cols % 512
    plan = [(0, tiles(dtype, n_cols, 512)["grad"])] if wide else []
    if n_cols > wide:
        rest = n_cols - wide
        rest_tile = tiles(dtype, rest, 256 if rest <= 256 else 512)["grad"]
        plan.append((wide, replace(rest_tile, block_k=tiles(dtype, n_cols, 512)["grad"].block_k)))
    return plan


def launch_ranges(plan: list[tuple[int, Tile]], n_cols: int):
    """``(d_start, d_end, tile)`` of each launch of ``plan``: the features it covers."""
    for i, (d_start, cfg) in enumerate(plan):
        yield d_start, (plan[i + 1][0] if i + 1 < len(plan) else n_cols), cfg


def gemm_passes(n_a: int, n_b: int, n_cols: int, plan: list[tuple[int, Tile]], cols_per_split: int) -> float:
    """Tensor-core work of the gradient launches of ``plan`` (``grad_plan``) for one side, in GEMM passes
    (units of the ``n_a x n_b x d`` product), counted from their grids and tiles: every program (row
    block, feature chunk, column split) computes, per column tile of its split, the full-depth logit tile
    (d rounded up to BLOCK_K) and the product of its G tile with a BLOCK_D-wide chunk of the columns'
    features. Padded rows, columns and features count: it is the work the tensor cores do."""
    n_splits = runtime.cdiv(n_b, cols_per_split)
    last = n_b - (n_splits - 1) * cols_per_split
    macs = 0
    for d_start, d_end, cfg in launch_ranges(plan, n_cols):
        bm, bn, bk, bd = cfg.block_m, cfg.block_n, cfg.block_k, cfg.param("BLOCK_D")
        col_tiles = (n_splits - 1) * runtime.cdiv(cols_per_split, bn) + runtime.cdiv(last, bn)
        programs = runtime.cdiv(n_a, bm) * runtime.cdiv(d_end - d_start, bd)
        macs += programs * col_tiles * bm * bn * (runtime.cdiv(n_cols, bk) * bk + bd)
    return macs / (n_a * n_b * n_cols)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@runtime.on_tensor_device
def prepare(x: torch.Tensor, scale, normalize: bool, eps: float) -> torch.Tensor:
    """The tile operand ``scale * x / max(||x||, eps)`` (without normalization: ``scale * x``; ``scale``
    None: 1) in x's dtype, contiguous rows."""
    x = _rows(x)
    y = runtime.empty(x.shape, x.dtype, x.device)
    tile = row_tile(x.shape[1])
    _prepare_kernel[(runtime.cdiv(x.shape[0], tile.block_m),)](
        x, y, scale if scale is not None else x, x.shape[0], x.shape[1], x.stride(0), y.stride(0), eps,
        NORMALIZE=normalize, HAS_SCALE=scale is not None,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, num_warps=tile.warps)
    return y


def _split(n_a: int, n_b: int, block_m: int, block_n: int, device) -> tuple[int, int, int]:
    """P row programs and S column splits (about two programs per SM), and columns per split."""
    target = 2 * runtime.sm_count(device)
    n_rb, n_cb = runtime.cdiv(n_a, block_m), runtime.cdiv(n_b, block_n)
    n_p = min(n_rb, target)
    n_s = min(n_cb, max(1, target // n_p), runtime.MAX_GRID_YZ)
    blocks_per_split = runtime.cdiv(n_cb, n_s)
    n_s = runtime.cdiv(n_cb, blocks_per_split)
    return n_p, n_s, blocks_per_split * block_n


@runtime.on_tensor_device
def contrastive_fwd(a, b, bias, kind: int, offset: int, both_directions: bool):
    """Forward tile pass over the operands ``a`` [N, d] (scaled) x ``b`` [M, d] (see ``prepare``).

    Returns ``(rows, cols)``, each None or a pair (per-row cross-entropies, backward statistics [3, n])
    (see ``_combine``): CLIP rows, and columns for the square loss; SigLIP: (per-row loss sums, None), None.
    All fp32."""
    a, b = _rows(a), _rows(b)
    n_a, n_b, n_cols = a.shape[0], b.shape[0], a.shape[1]
    cfg = tiles(a.dtype, n_cols)["fwd"]
    n_p, n_s, cols_per_split = _split(n_a, n_b, cfg.block_m, cfg.block_n, a.device)
    has_cols = kind == CLIP and both_directions
    row_m, row_l = (runtime.empty((n_s, n_a), torch.float32, a.device) for _ in range(2))
    col_m, col_l = ((runtime.empty((n_p, n_b), torch.float32, a.device) for _ in range(2)) if has_cols
                    else (row_m, row_l))
    pos = runtime.empty((n_a,), torch.float32, a.device) if kind == CLIP else row_m
    _contrastive_fwd_kernel[(n_p, n_s)](
        a, b, bias if bias is not None else row_m, row_m, row_l, col_m, col_l, pos,
        n_a, n_b, n_cols, a.stride(0), b.stride(0), offset, cols_per_split, n_p,
        KIND=kind, HAS_COLS=has_cols, EVEN_K=n_cols % cfg.block_k == 0, DOT_PRECISION=runtime.dot_precision(a.dtype),
        **cfg.launch_options())
    if kind == SIGLIP:
        return (row_l.sum(0), None), None
    return _combine(row_m, row_l, pos), (_combine(col_m, col_l, pos) if has_cols else None)


def _combine(m: torch.Tensor, r: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial (max, sum of exp(z - max) over the negatives) pairs [K, n] and the positive logits [n] ->
    per-row cross-entropies [n] and the backward's statistics [3, n]: the max, the log of the full sum,
    and softmax - 1 at the positive.

    The positive is kept out of the sums so that ``-sum_neg / sum`` (the positive's gradient) and
    ``log1p(sum_neg)`` (the loss where the positive is the max) keep their digits when the softmax is
    nearly one-hot; ``1 - softmax`` would round to 0 there."""
    top = torch.maximum(m.max(0).values, pos)
    neg = (r * torch.exp(m - top)).sum(0)
    total = torch.exp(pos - top) + neg
    log_total = torch.log(total)
    loss = torch.where(pos >= top, torch.log1p(neg), log_total - (pos - top))
    return loss, torch.stack([top, log_total, -neg / total])


def grad_splits(n_a: int, n_b: int, n_cols: int, plan: list[tuple[int, Tile]], device) -> tuple[int, int]:
    """Column splits S of the gradient grid, and columns per split (``split_columns`` on ``device``)."""
    return split_columns(n_a, n_b, n_cols, plan, runtime.sm_count(device))


def split_columns(n_a: int, n_b: int, n_cols: int, plan: list[tuple[int, Tile]], sm_count: int) -> tuple[int, int]:
    """Column splits S of the gradient grid, and columns per split (a multiple of every launch's
    BLOCK_N: all launches of ``plan`` write the same S partials). Row blocks x feature chunks alone fill
    the GPU for square losses (S = 1: no partials at all); a rectangular local loss (256 rows against 32k
    gathered columns: 4 row blocks) gets its columns split until the first launch's grid has about two
    programs per SM. Partials cost S x N x d fp32 values, at most ~2 x SMs x BLOCK_M x BLOCK_D."""
    cfg = plan[0][1]
    block_n = max(c.block_n for _, c in plan)
    n_rb, n_cb = runtime.cdiv(n_a, cfg.block_m), runtime.cdiv(n_b, block_n)
    base = n_rb * runtime.cdiv(next(launch_ranges(plan, n_cols))[1], cfg.param("BLOCK_D"))
    n_s = min(n_cb, max(1, 2 * sm_count // base), runtime.MAX_GRID_YZ)
    blocks_per_split = runtime.cdiv(n_cb, n_s)
    return runtime.cdiv(n_cb, blocks_per_split), blocks_per_split * block_n


def aligned_rows(*tensors) -> bool:
    """Whether rows start 16-byte aligned with widths and row strides multiples of 16, as the JIT then
    specializes them (and the 512-wide gradient tile needs)."""
    return all(t.data_ptr() % 16 == 0 and t.shape[1] % 16 == 0 and t.stride(0) % 16 == 0 for t in tensors)


@runtime.on_tensor_device
def contrastive_grad(a, b, lse_a, lse_b, bias, kind: int, offset: int, want_sums: bool, block_d: int = 0):
    """``acc_i = sum_j G_ij b_j`` for the tiles of the operands ``a`` against ``b``, as fp32 partials
    [S, N, d] over S column splits (``feature_grad`` sums them); with ``want_sums`` also the per-row sums
    of ``G_ij`` and of ``G_ij z_ij`` (fp32 [S, 2, N]), from which the gradients of the bias and the scale
    follow. See the module docstring for G; the launches over the features: ``grad_plan`` (``block_d``:
    0 for the fewest GEMM passes, 256 or 512 to pick a tile)."""
    a, b = _rows(a), _rows(b)
    n_a, n_b, n_cols = a.shape[0], b.shape[0], a.shape[1]
    plan = grad_plan(a.dtype, n_cols, aligned_rows(a, b), block_d, runtime.device_arch(a.device))
    n_s, cols_per_split = grad_splits(n_a, n_b, n_cols, plan, a.device)
    acc = runtime.empty((n_s, n_a, n_cols), torch.float32, a.device)
    sums = runtime.empty((n_s, 2, n_a), torch.float32, a.device) if want_sums else acc
    for d_start, d_end, cfg in launch_ranges(plan, n_cols):
        grid = (runtime.cdiv(n_a, cfg.block_m), runtime.cdiv(d_end - d_start, cfg.param("BLOCK_D")), n_s)
        _contrastive_grad_kernel[grid](
            a, b, lse_a if lse_a is not None else acc, lse_b if lse_b is not None else acc,
            bias if bias is not None else acc, acc, sums,
            n_a, n_b, n_cols, a.stride(0), b.stride(0), acc.stride(1), acc.stride(0), offset, cols_per_split,
            d_start, KIND=kind, HAS_LSE_A=lse_a is not None, HAS_LSE_B=lse_b is not None,
            HAS_ROW_SUMS=want_sums and d_start == 0, EVEN_K=n_cols % cfg.block_k == 0,
            DOT_PRECISION=runtime.dot_precision(a.dtype), **cfg.launch_options())
    return acc, (sums if want_sums else None)


def backward_gemm_passes(n_a: int, n_b: int, n_cols: int, sm_count: int, block_d: int = 0) -> float:
    """GEMM passes of the whole loss backward for 16-aligned fp16/bf16 features (both sides: ``a``
    against ``b`` and the transposed problem) on a GPU of ``sm_count`` SMs, counted from the launches
    ``contrastive_grad`` makes (``grad_plan``, ``gemm_passes``); ``block_d`` as there."""
    plan = grad_plan(torch.float16, n_cols, True, block_d or 512)
    return sum(gemm_passes(rows, cols, n_cols, plan, split_columns(rows, cols, n_cols, plan, sm_count)[1])
               for rows, cols in ((n_a, n_b), (n_b, n_a)))


@runtime.on_tensor_device
def feature_grad(x, acc, coef, normalize: bool, eps: float, want_dot: bool = False):
    """Gradient of the raw features ``x`` from ``acc`` (the [S, N, d] partials of ``contrastive_grad``,
    summed here; see the module docstring), in x's dtype; with ``want_dot`` also ``<xhat_i, acc_i>`` per
    row (fp32 [N])."""
    x = _rows(x)
    dx = runtime.empty(x.shape, x.dtype, x.device)
    dot = runtime.empty((x.shape[0],), torch.float32, x.device) if want_dot else acc
    tile = row_tile(x.shape[1])
    _feature_grad_kernel[(runtime.cdiv(x.shape[0], tile.block_m),)](
        x, acc, dx, coef, dot, x.shape[0], x.shape[1], acc.shape[0], x.stride(0), acc.stride(0), acc.stride(1),
        dx.stride(0), eps,
        NORMALIZE=normalize, HAS_DOT=want_dot,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, num_warps=tile.warps)
    return dx, (dot if want_dot else None)


# ---------------------------------------------------------------------------------------------
# AOT cases
# ---------------------------------------------------------------------------------------------

# Arguments 16-aligned when the 512-wide gradient tile runs (``aligned_rows``): pointers, width, strides.
ALIGNED_GRAD_ARGS = ("A", "B", "LSE_A", "LSE_B", "BIAS", "OUT", "ROW_SUMS", "n_cols", "stride_a", "stride_b",
                     "stride_out", "d_start")


def aot_cases() -> list[runtime.AotCase]:
    """The shipped fp16/bf16 tiles (the same for every d >= 256; BLOCK_D shrinks below) for each loss
    variant, the unmasked (d a multiple of BLOCK_K) and masked feature loops, and the row kernels."""
    cases = []
    fwd_sig = {"A": "*{dtype}", "B": "*{dtype}", "BIAS": "*fp32", "ROW_M": "*fp32", "ROW_L": "*fp32",
               "COL_M": "*fp32", "COL_L": "*fp32", "POS": "*fp32", "n_a": "i32", "n_b": "i32", "n_cols": "i32",
               "stride_a": "i32", "stride_b": "i32", "offset": "i32", "cols_per_split": "i32",
               "n_row_programs": "i32"}
    grad_sig = {"A": "*{dtype}", "B": "*{dtype}", "LSE_A": "*fp32", "LSE_B": "*fp32", "BIAS": "*fp32",
                "OUT": "*fp32", "ROW_SUMS": "*fp32", "n_a": "i32", "n_b": "i32", "n_cols": "i32",
                "stride_a": "i32", "stride_b": "i32", "stride_out": "i32", "stride_split": "i32", "offset": "i32",
                "cols_per_split": "i32", "d_start": "i32"}
    for d in (512, 80, 784):
        t = tiles(torch.float16, d)
        fwd = t["fwd"].kwargs()
        even = d % fwd["BLOCK_K"] == 0
        for name, kind, has_cols in (("clip", CLIP, True), ("clip_rows", CLIP, False), ("siglip", SIGLIP, False)):
            if d == 784:  # (the forward's tiles are those of d = 80)
                break
            cases.append(runtime.AotCase(
                name=f"contrastive_fwd_{name}[d={d}]", kernel=_contrastive_fwd_kernel, signature=fwd_sig,
                constexprs={"KIND": kind, "HAS_COLS": has_cols, "EVEN_K": even, "DOT_PRECISION": "tf32", **fwd},
                num_warps=t["fwd"].warps, num_stages=t["fwd"].stages, expects_mma=True,
                quick=d == 512 and name != "clip_rows", shared_estimate=shared_estimate("fwd", t["fwd"], "fp16")))
        # the 256-wide chunk for any width; the 512-wide one, which needs 16-aligned widths and strides,
        # compiled with that alignment (as the JIT specializes it), unmasked (512) and masked (784 = 512 + 272)
        for block_d in {512: GRAD_TILES, 80: [256], 784: [512]}[d]:
            g = tiles(torch.float16, d, block_d)["grad"]
            aligned = block_d in ALIGNED_ONLY
            for name, kind, lse_a, lse_b in (("clip", CLIP, True, True), ("clip_rows", CLIP, True, False),
                                             ("clip_rows_t", CLIP, False, True), ("siglip", SIGLIP, False, False)):
                cases.append(runtime.AotCase(
                    name=f"contrastive_grad_{name}[d={d},chunk={block_d}]", kernel=_contrastive_grad_kernel,
                    signature=grad_sig,
                    constexprs={"KIND": kind, "HAS_LSE_A": lse_a, "HAS_LSE_B": lse_b, "HAS_ROW_SUMS": True,
                                "EVEN_K": even, "DOT_PRECISION": "tf32", **g.kwargs()},
                    num_warps=g.warps, num_stages=g.stages, expects_mma=True,
                    quick=d == 512 and name in ("clip", "siglip"),
                    divisible_by_16=ALIGNED_GRAD_ARGS if aligned else None,
                    shared_estimate=shared_estimate("grad", g, "fp16")))
    # fp32 features: exact dots (FMA, no tensor cores) unless torch allows TF32 (``runtime.dot_precision``)
    t = tiles(torch.float32, 512)
    for key, kernel, sig, extra in (("fwd", _contrastive_fwd_kernel, fwd_sig, {"HAS_COLS": True}),
                                    ("grad", _contrastive_grad_kernel, grad_sig,
                                     {"HAS_LSE_A": True, "HAS_LSE_B": True, "HAS_ROW_SUMS": True})):
        for precision in ("ieee", "tf32"):
            cases.append(runtime.AotCase(
                name=f"contrastive_{key}_clip_fp32_{precision}[d=512]", kernel=kernel, signature=sig,
                constexprs={"KIND": CLIP, **extra, "EVEN_K": True, "DOT_PRECISION": precision,
                            **t[key].kwargs()},
                num_warps=t[key].warps, num_stages=t[key].stages, dtypes=("fp32",),
                expects_mma=precision == "tf32", quick=False, shared_estimate=shared_estimate(key, t[key], "fp32")))
    for d in (512, 1024):
        tile = row_tile(d)
        meta = tile.kwargs()
        cases.append(runtime.AotCase(
            name=f"contrastive_prepare[d={d}]", kernel=_prepare_kernel,
            signature={"X": "*{dtype}", "Y": "*{dtype}", "SCALE": "*fp32", "n_rows": "i32", "n_cols": "i32",
                       "stride_x": "i32", "stride_y": "i32", "eps": "fp32"},
            constexprs={"NORMALIZE": True, "HAS_SCALE": True, **meta}, num_warps=tile.warps, quick=d == 512))
        cases.append(runtime.AotCase(
            name=f"contrastive_feature_grad[d={d}]", kernel=_feature_grad_kernel,
            signature={"X": "*{dtype}", "ACC": "*fp32", "DX": "*{dtype}", "COEF": "*fp32", "DOT": "*fp32",
                       "n_rows": "i32", "n_cols": "i32", "n_splits": "i32", "stride_x": "i32", "stride_split": "i32",
                       "stride_acc": "i32", "stride_dx": "i32", "eps": "fp32"},
            constexprs={"NORMALIZE": True, "HAS_DOT": False, **meta}, num_warps=tile.warps, quick=d == 512))
    return cases
