"""What the dense (``kernels/attention.py``) and packed (``kernels/attention_varlen.py``) attention kernels share:
the tile helpers, the score masking, the forward and dq block loops, the ``delta = rowsum(dO * O)``
preprocess kernel, the tile tables' offer rules (``AttentionTileTable``, a ``tiles.TileTable`` of ``tiles.Tile``
rows) and vocabulary, and the AOT signature rule. The algorithm, layouts
and memory traffic are described in ``kernels/attention.py``; this module has no kernel family of its own
(no ``aot_cases``: each family compiles what it launches).

Strides travel as one tuple per tensor (Triton tuple arguments), in the tensor's dimension order: ``[batch,
head, row, head dim]`` for the dense kernels' tensors, ``[batch, head, query, key]`` for the bias, ``[token,
head, head dim]`` for the packed ones. The tile helpers read a tile's row and column strides as the last two
of a tuple (``strides[-2]``, ``strides[-1]``): the dense kernels pass their tensors' tuples, the packed
kernels the pair ``(token, head dim)`` built in the kernel (a tuple made in the kernel keeps a constant
element constant; measured, triton 3.6 and 3.8: passing the packed tensors' strides as [head, token, head dim]
instead, which needs no pair, moved the packed kernels' registers by -12 to +12 on sm_90, from the parameter
order alone). The JIT specializes each element of a tuple as it does a scalar argument: a head-dim stride of 1
compiles as the constant 1 (contiguous, vectorized loads), a stride past 2**31 as int64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import triton
import triton.language as tl

from . import runtime
from .tiles import (ANY_DTYPE, BEFORE_3_8, EVERY_TRITON, FP32, FROM_3_8, HALF, Launch, Tile, TileTable, config_key,
                    dtype_name)

LOG2E = math.log2(math.e)

# Bias kinds (constexpr BIAS_KIND)
NO_BIAS, KEY_BIAS, FULL_BIAS = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# Tile helpers
# ---------------------------------------------------------------------------------------------

@triton.jit
def _indices(start, BLOCK: tl.constexpr, like):
    """``start + arange(BLOCK)`` in the integer width of ``like``.

    Tile offsets are ``rows * stride_r + cols * stride_c``. They pass 2**31 in real layouts: q/k/v as views
    of the sequence-first in-projection output [L, B, 3E] have a row stride of B * 3E, so ``(L-1) * B * 3E``
    passes 2**31 from a few thousand sequences, and 32-bit products wrap and read the wrong memory. The
    kernels take ``HAS_WIDE_OFFSETS`` from the launcher (set when some tensor's span within one (batch,
    head) slice reaches 2**31) and then make the head-dim indices int64; every row index is made here in
    the same width, so the products are 64-bit exactly when they must be. 32-bit indices otherwise: the
    64-bit address math costs registers (spills in several tiles at head dim 128 and 256)."""
    return (start + tl.arange(0, BLOCK)).to(like.dtype)


@triton.jit
def _head_dim_indices(BLOCK_D: tl.constexpr, HAS_WIDE_OFFSETS: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    if HAS_WIDE_OFFSETS:
        offs_d = offs_d.to(tl.int64)
    return offs_d


@triton.jit
def _load_tile(base, rows, cols, strides, n_rows, n_cols):
    """[len(rows), len(cols)] tile at base + rows * strides[-2] + cols * strides[-1], zero outside (the index
    vectors' width decides the width of the offsets, see ``_indices``)."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(base + rows[:, None] * strides[-2] + cols[None, :] * strides[-1], mask=mask, other=0.0)


@triton.jit
def _store_tile(base, value, rows, cols, strides, n_rows, n_cols):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(base + rows[:, None] * strides[-2] + cols[None, :] * strides[-1], value.to(base.dtype.element_ty),
             mask=mask)


@triton.jit
def _mask_scores(s, offs_q, offs_k, bias_base, bias_strides, seqlen_q, seqlen_k,
                 IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, Q_ON_ROWS: tl.constexpr, MASKED: tl.constexpr):
    """Add the bias (natural-log units, converted to base 2; query stride ``bias_strides[-2]``, key stride
    ``bias_strides[-1]``) to the base-2 scores ``s``; with ``MASKED`` (blocks crossing the end of the keys
    or the causal diagonal) set keys past the end and above the diagonal to -inf. ``s`` is [queries, keys]
    when ``Q_ON_ROWS``, else [keys, queries] (the key-block kernel's transposed tile). Without a bias
    (``BIAS_KIND`` 0) ``bias_base`` and ``bias_strides`` are never read."""
    if Q_ON_ROWS:
        qi = offs_q[:, None]
        kj = offs_k[None, :]
    else:
        qi = offs_q[None, :]
        kj = offs_k[:, None]
    if BIAS_KIND == 1:
        s += tl.load(bias_base + kj * bias_strides[-1], mask=kj < seqlen_k, other=0.0) * 1.4426950408889634
    if BIAS_KIND == 2:
        bias_ok = (qi < seqlen_q) & (kj < seqlen_k)
        s += tl.load(bias_base + qi * bias_strides[-2] + kj * bias_strides[-1], mask=bias_ok,
                     other=0.0) * 1.4426950408889634
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
def _program_block(seqlen, BLOCK: tl.constexpr, SPLITS: tl.constexpr = 1):
    """(batch*head index, sequence block) of this program. The grid is one flattened axis 0 of
    ``B*H*cdiv(seqlen, BLOCK)*SPLITS`` programs with the sequence block varying fastest (after the
    ``SPLITS`` programs that share one block, see ``_value_columns``), so the blocks of one head run side by
    side and the operand they all read (k, v in the forward and dq; q, dO in dk/dv) comes from HBM about
    once and from L2 after that."""
    pid = tl.program_id(0) // SPLITS
    n_blocks = tl.cdiv(seqlen, BLOCK)
    return pid // n_blocks, pid % n_blocks


@triton.jit
def _value_columns(offs_d, BLOCK_D: tl.constexpr, SPLIT_DV: tl.constexpr):
    """The head-dim columns of v (and o) this forward program accumulates: all ``BLOCK_D`` of them, or with
    ``SPLIT_DV`` > 1 its share of ``BLOCK_D // SPLIT_DV`` (the programs of one query block are adjacent on
    axis 0). Each of the split programs recomputes the same scores and softmax (q k^T over the whole head
    dim) but keeps only a [BLOCK_M, BLOCK_D // SPLIT_DV] accumulator: at head dim 256 the whole fp32
    accumulator (128 registers a thread for 64 rows on 4 warps) plus q spills on sm_90 under triton 3.6,
    and halving it does not (``FWD``). Costs one more q k^T per split: 1.5x the forward's FLOPs at 2. The
    split programs store the same row statistics (identical values; no ordering needed)."""
    start = (tl.program_id(0) % SPLIT_DV) * (BLOCK_D // SPLIT_DV)
    return _indices(start, BLOCK_D // SPLIT_DV, offs_d)


@triton.jit
def _head_offset(bh, n_heads, strides):
    """Element offset of the (batch, head) slice ``bh`` of a [batch, head, ...] tensor; int64 so huge batches
    cannot overflow."""
    off_b = (bh // n_heads).to(tl.int64)
    off_h = (bh % n_heads).to(tl.int64)
    return off_b * strides[0] + off_h * strides[1]


# ---------------------------------------------------------------------------------------------
# Block loops (forward and dq; the key-block kernels walk their query blocks in their own files)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _fwd_key_blocks(acc, l_i, m_i, q, offs_m, offs_d, offs_dv, lo, hi,
                    k_base, k_strides, v_base, v_strides, bias_base, bias_strides,
                    seqlen_q, seqlen_k, head_dim, qk_scale,
                    IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over the key blocks in [lo, hi), accumulating ``p v`` in the value columns ``offs_dv``
    (``_value_columns``)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = _indices(start_n, BLOCK_N, offs_d)
        k = _load_tile(k_base, offs_n, offs_d, k_strides, seqlen_k, head_dim)
        v = _load_tile(v_base, offs_n, offs_dv, v_strides, seqlen_k, head_dim)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = _mask_scores(s, offs_m, offs_n, bias_base, bias_strides, seqlen_q, seqlen_k,
                         IS_CAUSAL=IS_CAUSAL, BIAS_KIND=BIAS_KIND, Q_ON_ROWS=True, MASKED=MASKED)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows with every key masked so far keep m = -inf; shift by 0 there so exp2 gives 0, not NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _dq_key_blocks(dq, q, do, row_max, log2_sum, delta, offs_m, offs_d, lo, hi,
                   k_base, k_strides, v_base, v_strides, bias_base, bias_strides,
                   seqlen_q, seqlen_k, head_dim, qk_scale,
                   IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq contributions of the key blocks in [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = _indices(start_n, BLOCK_N, offs_d)
        k = _load_tile(k_base, offs_n, offs_d, k_strides, seqlen_k, head_dim)
        v = _load_tile(v_base, offs_n, offs_d, v_strides, seqlen_k, head_dim)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = _mask_scores(s, offs_m, offs_n, bias_base, bias_strides, seqlen_q, seqlen_k,
                         IS_CAUSAL=IS_CAUSAL, BIAS_KIND=BIAS_KIND, Q_ON_ROWS=True, MASKED=MASKED)
        p = tl.math.exp2((s - row_max[:, None]) - log2_sum[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


# ---------------------------------------------------------------------------------------------
# Backward preprocess: delta = rowsum(dO * O)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA, o_strides, do_strides, n_heads, seqlen_q, head_dim,
    HAS_WIDE_OFFSETS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O) in fp32, [B*H, Lq] (strides: [batch, head, row, head dim]; the packed kernels
    run it on their [1, H, T, D] view)."""
    bh, pid_m = _program_block(seqlen_q, BLOCK_M)
    offs_d = _head_dim_indices(BLOCK_D, HAS_WIDE_OFFSETS)
    offs_m = _indices(pid_m * BLOCK_M, BLOCK_M, offs_d)
    o = _load_tile(O + _head_offset(bh, n_heads, o_strides), offs_m, offs_d, o_strides, seqlen_q, head_dim)
    do = _load_tile(DO + _head_offset(bh, n_heads, do_strides), offs_m, offs_d, do_strides, seqlen_q, head_dim)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * seqlen_q + offs_m, delta, mask=offs_m < seqlen_q)


def preprocess_block(block_d: int) -> int:
    """The preprocess kernel's rows per program: 2048 elements of each operand a program (16-64 rows)."""
    return max(16, min(64, 2048 // block_d))


# ---------------------------------------------------------------------------------------------
# Tiles: data, and one filter
# ---------------------------------------------------------------------------------------------

def tile(block_m: int, block_n: int, warps: int, stages: int, block_ds: tuple[int, ...],
         archs: tuple[int, ...] | None = None, dv_splits: int = 1,
         tritons: tuple[tuple[int, int], tuple[int, int]] = EVERY_TRITON, dtypes: tuple[str, ...] = HALF) -> Tile:
    """An attention tile (a ``tiles.Tile`` row): query and key block sizes, warps, pipeline stages, the padded
    head dims (BLOCK_D) it ships for, the GPU generations (compute capability majors: 8 Ampere, 9 Hopper) it is
    offered on (None: all), for forward tiles the programs a query block's value columns are split over
    (``SPLIT_DV``, see ``_value_columns``; a meta-parameter only where it is not 1, as only the forward kernels
    take it), the Triton versions ``[from, before)`` it ships under (register allocation differs between
    versions, so a few tiles that spill under one are replaced under it), and the operand dtypes it is offered
    to: fp16/bf16 (tensor cores) or exact fp32 (``input_precision="ieee"``: FMA products, whose operand layouts
    take about twice the registers, so fp32 has small tiles of its own)."""
    meta = (("SPLIT_DV", dv_splits),) if dv_splits != 1 else ()
    return Tile(block_m, block_n, None, warps, stages, meta=meta, archs=archs, tritons=tritons, dtypes=dtypes,
                block_ds=block_ds)


def dv_splits(tile: Tile) -> int:
    """The programs a forward tile splits a query block's value columns over (``SPLIT_DV``; 1: none)."""
    return tile.param("SPLIT_DV", 1)


_config_key = config_key


def _arch(named_args) -> int:
    return runtime.launch_arch(named_args, "Q")


def launch(block_d: int, arch: int = 0, dtype="fp16", bias_kind: int = NO_BIAS) -> Launch:
    """An attention launch as the offer rules see it: its padded head dim (BLOCK_D), architecture (sm number;
    0: any, the interpreter), operand dtype (a torch dtype or "fp16" / "bf16" / "fp32") and bias kind."""
    return Launch(arch=arch, dtype=dtype_name(dtype), kinds=bias_kind, block_d=block_d)


@dataclass(frozen=True)
class AttentionTileTable(TileTable):
    """A ``TileTable`` with attention's offer rules and shared-memory estimate. ``mma_rows`` names the block the
    kernel's MMAs run along (the query block in the forward and dq kernels, the key block in the dk/dv kernel):
    the operands of those rows stay resident, the other block's are loaded in the software-pipelined loop. The
    shared-memory estimate (``shared_estimate``) counts ``streamed`` [loop rows, BLOCK_D] operands and
    ``streamed_stats`` fp32 row statistics per pipeline buffer, ``resident`` [mma rows, BLOCK_D] operands, and
    ``scores`` [BLOCK_M, BLOCK_N] tiles staged for the second and third products. A launch's ``kinds`` is its
    bias kind (``NO_BIAS`` / ``KEY_BIAS`` / ``FULL_BIAS``)."""
    estimate: Callable[[Tile, Launch], int] | None = field(default=None, repr=False, compare=False)
    mma_rows: str = "BLOCK_M"  # or "BLOCK_N"
    streamed: int = 2
    resident: int = 1
    scores: int = 1
    streamed_stats: int = 0

    def __post_init__(self):
        object.__setattr__(self, "estimate", lambda t, run: self.shared_estimate(
            t, run.block_d, run.dtype, run.arch, run.kinds or NO_BIAS))

    def fits_arch(self, tile: Tile, arch: int, dtype="fp16") -> bool:
        """Whether ``tile`` is offered on ``arch`` (sm number; 0 = any, the interpreter). Besides the tile's
        own ``archs``: on Hopper a warpgroup (4 warps) issues 64-row wgmma and Triton lays the warps of
        chained dots along the MMA rows, so 8 warps on fewer than 128 rows would duplicate MMA work (fp16 and
        bf16; exact fp32 runs no MMA)."""
        if arch == 0:
            return True
        if tile.archs is not None and arch // 10 not in tile.archs:
            return False
        rows = tile.block_m if self.mma_rows == "BLOCK_M" else tile.block_n
        return not (arch // 10 == 9 and tile.warps == 8 and rows < 128 and dtype_name(dtype) != "fp32")

    def shared_estimate(self, tile: Tile, block_d: int, dtype="fp16", arch: int = 90,
                        bias_kind: int = NO_BIAS) -> int:
        """An upper bound on the shared memory of ``tile`` at ``block_d`` with ``dtype`` operands and a bias of
        ``bias_kind``, in bytes: the loop's operands (and row statistics, and the bias tile the masked loads
        bring in: [BLOCK_M, BLOCK_N] fp32 for a full mask, [BLOCK_N] per key) in ``stages`` buffers on sm_90
        and newer and ``stages - 1`` on Ampere/Ada (cp.async pipelines), the resident operands and score
        tiles once, ``runtime.SHARED_SCRATCH_ALLOWANCE`` and 8 bytes a row for the cross-warp row reductions.
        Measured (triton 3.8, `clipfast aot`): the forward at head dim 128, 64x64 w8 s3, exact fp32: 180,480 B
        on sm_80 (2 buffers of k and v, q, p and 256 B), over sm_80's 166,912 B; 128x64 w8 s3 at 64 in fp16 on
        sm_90: 32,768 B plain, 98,304 B with a full mask. `clipfast aot` fails a case whose compiled
        ``shared`` exceeds this."""
        size = runtime.ELEMENT_SIZE[dtype_name(dtype)]
        rows, loop_rows = ((tile.block_m, tile.block_n) if self.mma_rows == "BLOCK_M"
                           else (tile.block_n, tile.block_m))
        buffers = tile.stages if arch == 0 or arch >= 90 else max(tile.stages - 1, 1)
        per_buffer = self.streamed * loop_rows * block_d * size + self.streamed_stats * loop_rows * 4
        if bias_kind == FULL_BIAS:
            per_buffer += tile.block_m * tile.block_n * 4
        elif bias_kind == KEY_BIAS:
            per_buffer += tile.block_n * 4
        return (buffers * per_buffer + self.resident * rows * block_d * size
                + self.scores * tile.block_m * tile.block_n * size
                + runtime.SHARED_SCRATCH_ALLOWANCE + 8 * max(tile.block_m, tile.block_n))

    def offered(self, launch: Launch) -> list[Tile]:
        """The tiles for the launch's BLOCK_D on its architecture (0: any) with its operand dtype and bias kind
        under the running Triton: those shipped for the dtype (where it has none, every dtype's), by the
        architecture rule (where it leaves none, the head dim's tiles regardless, so every head dim has one),
        and of those the ones whose ``shared_estimate`` fits the architecture's shared memory per block
        (``runtime.MAX_SHARED_PER_BLOCK``); where none fits, the one with the smallest estimate."""
        arch, name = launch.arch, launch.dtype
        for_d = [t for t in self.tiles if launch.block_d in t.block_ds and t.ships_here]
        for_dtype = [t for t in for_d if name in t.dtypes] or for_d
        by_arch = ([t for t in for_dtype if self.fits_arch(t, arch, name)]
                   or [t for t in for_dtype if t.archs is None or arch // 10 in t.archs] or for_dtype)
        fit = [t for t in by_arch if runtime.fits_shared_memory(self.estimate(t, launch), arch)]
        return fit or [min(by_arch, key=lambda t: self.estimate(t, launch))]

    def why_not_offered(self, tile: Tile, launch: Launch) -> str | None:
        """Why ``tile`` is not among ``offered(launch)``, or None where it is."""
        if tile in self.offered(launch):
            return None
        arch, name = launch.arch, launch.dtype
        if launch.block_d not in tile.block_ds:
            return f"shipped for BLOCK_D {'/'.join(map(str, tile.block_ds))} only"
        if not tile.ships_here:
            (lo, hi) = ("%d.%d" % v for v in tile.tritons)
            return f"shipped for triton {lo} up to (not including) {hi} only"
        if name not in tile.dtypes:
            return f"offered to {'/'.join(tile.dtypes)} operands only"
        estimate = self.estimate(tile, launch)
        if not runtime.fits_shared_memory(estimate, arch):
            return (f"needs up to {estimate} B of shared memory ({name} operands), over sm_{arch}'s "
                    f"{runtime.max_shared_per_block(arch)} B per block")
        if not self.fits_arch(tile, arch, name):
            return f"not offered on sm_{arch} (the tile's architectures, or 8 warps on fewer than 128 MMA rows)"
        return "other tiles are offered there"

    def early_prune(self, configs, named_args, **kwargs) -> list[triton.Config]:
        """``early_config_prune`` for the autotuner: the configs of the offered tiles (``prune``) for the
        launch's head dim, architecture, q's dtype and bias kind, one per config (the interpreter's single
        config is kept as it is)."""
        block_d = named_args.get("BLOCK_D", kwargs.get("BLOCK_D", 64))
        q = named_args.get("Q")
        dtype = q.dtype if isinstance(q, torch.Tensor) and q.dtype in runtime.TRITON_TYPE_NAMES else "fp16"
        bias_kind = named_args.get("BIAS_KIND", kwargs.get("BIAS_KIND", NO_BIAS))
        pruned = self.prune(configs, launch(block_d, _arch(named_args), dtype, bias_kind))
        return list({config_key(c): c for c in pruned}.values())


# The tables' vocabulary: head dims (BLOCK_D) a tile ships for, GPU generations, Triton versions, dtypes.
_SMALL, _D128, _D256 = (16, 32, 64), (128,), (256,)
_ANY_D = _SMALL + _D128
_AMPERE, _HOPPER = (8,), (9,)
_BEFORE_3_8, _FROM_3_8 = BEFORE_3_8, FROM_3_8
_FP32, _ALL_DTYPES = FP32, ANY_DTYPE
# Head dims above 128 (BLOCK_D 256) keep k, v, dk and dv of a key block in registers: the backward tiles
# there spill on sm_80/sm_90 at every size tried (correct, slower); the forward does not.
BWD_SPILL_FREE_MAX_D = 128


# ---------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------

def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two, at least 16 (the smallest tensor-core K)."""
    return max(16, runtime.next_power_of_2(head_dim))


MAX_PROGRAMS = 2**31 - 1  # grid axis 0


def grid(batch: int, heads: int, seqlen: int, block: int, splits: int = 1) -> tuple[int]:
    """One flattened axis 0 of batch*heads*blocks*splits programs, the sequence block varying fastest (see
    ``_program_block``). Axis 0 takes 2**31 - 1 programs: B*H = 16M heads at 128 blocks each, far more than
    fits in memory at any CLIP width."""
    programs = batch * heads * runtime.cdiv(seqlen, block) * splits
    if programs > MAX_PROGRAMS:
        raise ValueError(f"flash_attention: batch {batch} x heads {heads} x {runtime.cdiv(seqlen, block)} "
                         f"sequence blocks x {splits} is {programs} programs, more than one launch takes "
                         f"({MAX_PROGRAMS})")
    return (programs,)


def has_wide_offsets(*tensors) -> bool:
    """Whether an element offset within one (batch, head) slice of any [B, H, L, D] tensor (or bias view)
    reaches 2**31, so the kernels must index in 64 bits (``HAS_WIDE_OFFSETS``, see ``_indices``). The batch
    and head offsets are 64-bit always."""
    return any(sum((n - 1) * abs(st) for n, st in zip(t.shape[2:], t.stride()[2:])) >= 2**31
               for t in tensors if t is not None and t.numel())


def _dot_precision(dtype: torch.dtype) -> str:
    """Attention's one exception to ``runtime.dot_precision``: fp32 inputs get exact fp32 products whatever
    torch allows, because the fp32 tiles are sized for FMA products (every fp16/bf16 tile spills in fp32) and
    no TF32 tile has been compiled and checked yet."""
    return "ieee" if dtype == torch.float32 else runtime.dot_precision(dtype)


# ---------------------------------------------------------------------------------------------
# AOT signatures and tiles
# ---------------------------------------------------------------------------------------------

AOT_ARCHS = (80, 90)
# The operand precisions compiled: fp16/bf16 on tensor cores, and exact fp32 (FMA products, as eager fp32)
AOT_PRECISIONS = {"half": (("fp16", "bf16"), "tf32"), "fp32": (("fp32",), "ieee")}
# Pointer parameters that are not in the case's dtype
_AOT_POINTERS = {"BIAS": "*fp32", "LSE": "*fp32", "DELTA": "*fp32", "CU_Q": "*i32", "CU_K": "*i32"}


def _aot_signature(kernel, rank: int) -> tuple[dict, dict]:
    """AOT signature from the kernel's parameter names: upper-case names are pointers (fp32 for the bias and
    the row statistics, int32 for the sequence offsets, the case dtype otherwise), the scales fp32, the
    stride tuples (``*_strides``, ``rank`` strides each) and everything else i32; and the constexprs that set
    every tensor's head-dim stride (the last of its tuple; not the bias's key stride) to 1, as the runtime
    specializes it. Those are keyed by the element's path, ``(parameter index, rank - 1)``, as Triton keys the
    constexpr elements of tuple arguments; their signature element is ``"constexpr"``."""
    sig, unit = {}, {}
    for index, param in enumerate(runtime.jit_function(kernel).params):
        name = param.name
        if param.is_constexpr:
            continue
        if name.isupper():
            sig[name] = _AOT_POINTERS.get(name, "*{dtype}")
        elif name.endswith("_scale"):
            sig[name] = "fp32"
        elif name.endswith("_strides") and name != "bias_strides":
            sig[name] = ("i32",) * (rank - 1) + ("constexpr",)
            unit[(index, rank - 1)] = 1
        elif name.endswith("_strides"):
            sig[name] = ("i32",) * rank
        else:
            sig[name] = "i32"
    return sig, unit


@dataclass
class AttentionAotCase(runtime.AotCase):
    """An AOT case of a kernel with tuple arguments: its ``signature`` types a tuple argument as a tuple of
    types, and its ``constexprs`` key a tuple's constant elements by path, ``(parameter index, element
    index)``, as Triton's own binder does (``_aot_signature``). The pointers compiled as 16-byte aligned are
    the top-level ``*`` types; the config text names the tile's meta-parameters (no path keys)."""

    def aligned_args(self) -> tuple[str, ...]:
        if self.divisible_by_16 is not None:
            return tuple(self.divisible_by_16)
        return tuple(k for k, v in self.signature.items() if isinstance(v, str) and v.startswith("*"))

    def config_text(self) -> str:
        meta = ",".join(f"{k}={v}" for k, v in self.constexprs.items()
                        if isinstance(k, str) and k.isupper() and not k.startswith(("HAS_", "IS_")))
        return f"{meta},w{self.num_warps},s{self.num_stages}"


def _aot_tiles(table: AttentionTileTable, block_d: int, precision: str = "half", bias_kind: int = NO_BIAS,
               default_only: bool = False) -> list[tuple[Tile, int, int]]:
    """(tile, architecture, shared-memory estimate) for each tile offered for ``block_d`` on sm_80 and sm_90
    with ``precision`` operands ("half": fp16 and bf16; "fp32") and a bias of ``bias_kind``, in table order
    (only the default, the first offered, with ``default_only``). One entry per architecture: the estimate
    differs (``AttentionTileTable.shared_estimate``)."""
    dtype = AOT_PRECISIONS[precision][0][0]
    found = []
    for tile in table.tiles:
        for arch in AOT_ARCHS:
            offered = table.offered(launch(block_d, arch, dtype, bias_kind))
            if tile in (offered[:1] if default_only else offered):
                found.append((tile, arch, table.shared_estimate(tile, block_d, dtype, arch, bias_kind)))
    return found
