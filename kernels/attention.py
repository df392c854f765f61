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

Tiles are data (``Tile`` rows in one ``TileTable`` per kernel, default first) with one filter
(``TileTable.offered``) that picks those for a head dim, architecture and Triton version; autotuning keys on
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

import math
from dataclasses import dataclass

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
def _load_tile(base, rows, cols, stride_r, stride_c, n_rows, n_cols):
    """[len(rows), len(cols)] tile at base + rows * stride_r + cols * stride_c, zero outside (the index
    vectors' width decides the width of the offsets, see ``_indices``)."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(base + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)


@triton.jit
def _store_tile(base, value, rows, cols, stride_r, stride_c, n_rows, n_cols):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(base + rows[:, None] * stride_r + cols[None, :] * stride_c, value.to(base.dtype.element_ty), mask=mask)


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
        s += tl.load(bias_base + kj * stride_bn, mask=kj < seqlen_k, other=0.0) * 1.4426950408889634
    if BIAS_KIND == 2:
        bias_ok = (qi < seqlen_q) & (kj < seqlen_k)
        s += tl.load(bias_base + qi * stride_bm + kj * stride_bn, mask=bias_ok, other=0.0) * 1.4426950408889634
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
def _load_stats(LSE, bh, offs_m, seqlen_q):
    """Saved row max and log2(sum) of head ``bh``; rows past the end read as fully masked."""
    stats = LSE + bh.to(tl.int64) * 2 * seqlen_q + offs_m
    m_ok = offs_m < seqlen_q
    return tl.load(stats, mask=m_ok, other=float("inf")), tl.load(stats + seqlen_q, mask=m_ok, other=0.0)


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
def _head_offset(bh, n_heads, stride_b, stride_h):
    """Element offset of the (batch, head) slice ``bh``; int64 so huge batches cannot overflow."""
    off_b = (bh // n_heads).to(tl.int64)
    off_h = (bh % n_heads).to(tl.int64)
    return off_b * stride_b + off_h * stride_h


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _fwd_key_blocks(acc, l_i, m_i, q, k_base, v_base, b_base, offs_m, offs_d, offs_dv, lo, hi,
                    stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                    seqlen_q, seqlen_k, head_dim, qk_scale,
                    IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over the key blocks in [lo, hi), accumulating ``p v`` in the value columns ``offs_dv``
    (``_value_columns``)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = _indices(start_n, BLOCK_N, offs_d)
        k = _load_tile(k_base, offs_n, offs_d, stride_kn, stride_kd, seqlen_k, head_dim)
        v = _load_tile(v_base, offs_n, offs_dv, stride_vn, stride_vd, seqlen_k, head_dim)
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


# ---------------------------------------------------------------------------------------------
# Tiles: data, and one filter
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tile:
    """One shipped tile: query and key block sizes, warps, pipeline stages, the padded head dims (BLOCK_D)
    it ships for, the GPU generations (compute capability majors: 8 Ampere, 9 Hopper) it is offered on
    (None: all), for forward tiles the programs a query block's value columns are split over (``SPLIT_DV``,
    see ``_value_columns``), the Triton versions ``[from, before)`` it ships under (register allocation
    differs between versions, so a few tiles that spill under one are replaced under it), and the operand
    dtypes it is offered to: fp16/bf16 (tensor cores) or exact fp32 (``input_precision="ieee"``: FMA
    products, whose operand layouts take about twice the registers, so fp32 has small tiles of its own)."""
    block_m: int
    block_n: int
    warps: int
    stages: int
    block_ds: tuple[int, ...]
    archs: tuple[int, ...] | None = None
    dv_splits: int = 1
    tritons: tuple[tuple[int, int], tuple[int, int]] = ((3, 0), (99, 0))
    dtypes: tuple[str, ...] = ("fp16", "bf16")

    @property
    def ships_here(self) -> bool:
        """Whether the running Triton is one this tile ships under."""
        return runtime.triton_at_least(*self.tritons[0]) and not runtime.triton_at_least(*self.tritons[1])

    @property
    def key(self) -> tuple[int, int, int, int, int]:
        return (self.block_m, self.block_n, self.warps, self.stages, self.dv_splits)

    def config(self) -> triton.Config:
        meta = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}
        if self.dv_splits != 1:  # only the forward kernels take SPLIT_DV (default 1)
            meta["SPLIT_DV"] = self.dv_splits
        return triton.Config(meta, num_warps=self.warps, num_stages=self.stages)


def _config_key(cfg: triton.Config) -> tuple[int, int, int, int, int]:
    return (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages,
            cfg.kwargs.get("SPLIT_DV", 1))


def _arch(named_args) -> int:
    major, minor = runtime.capability(named_args["Q"].device) if "Q" in named_args else (0, 0)
    return 10 * major + minor


def dtype_name(dtype) -> str:
    """"fp16" / "bf16" / "fp32" for a torch dtype or such a name (the AOT check's dtype names)."""
    return dtype if isinstance(dtype, str) else runtime.TRITON_TYPE_NAMES[dtype]


@dataclass(frozen=True)
class TileTable:
    """A kernel's shipped tiles, default first, and the one filter that picks those offered for a head dim,
    architecture and operand dtype. ``mma_rows`` names the block the kernel's MMAs run along (the query
    block in the forward and dq kernels, the key block in the dk/dv kernel): the operands of those rows stay
    resident, the other block's are loaded in the software-pipelined loop. The shared-memory estimate
    (``shared_estimate``) counts ``streamed`` [loop rows, BLOCK_D] operands and ``streamed_stats`` fp32 row
    statistics per pipeline buffer, ``resident`` [mma rows, BLOCK_D] operands, and ``scores``
    [BLOCK_M, BLOCK_N] tiles staged for the second and third products."""
    tiles: tuple[Tile, ...]
    mma_rows: str  # "BLOCK_M" or "BLOCK_N"
    streamed: int = 2
    resident: int = 1
    scores: int = 1
    streamed_stats: int = 0

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

    def offered(self, block_d: int, arch: int, dtype="fp16", bias_kind: int = NO_BIAS) -> list[Tile]:
        """The tiles for ``block_d`` on ``arch`` (arch 0: any) with ``dtype`` operands (a torch dtype or
        "fp16" / "bf16" / "fp32") and a bias of ``bias_kind`` under the running Triton: those shipped for the
        dtype (where it has none, every dtype's), by the architecture rule (where it leaves none, the head
        dim's tiles regardless, so every head dim has one), and of those the ones whose ``shared_estimate``
        fits the architecture's shared memory per block (``runtime.MAX_SHARED_PER_BLOCK``); where none fits,
        the one with the smallest estimate."""
        name = dtype_name(dtype)
        for_d = [t for t in self.tiles if block_d in t.block_ds and t.ships_here]
        for_dtype = [t for t in for_d if name in t.dtypes] or for_d
        by_arch = ([t for t in for_dtype if self.fits_arch(t, arch, name)]
                   or [t for t in for_dtype if t.archs is None or arch // 10 in t.archs] or for_dtype)
        fit = [t for t in by_arch
               if runtime.fits_shared_memory(self.shared_estimate(t, block_d, name, arch, bias_kind), arch)]
        return fit or [min(by_arch, key=lambda t: self.shared_estimate(t, block_d, name, arch, bias_kind))]

    def why_not_offered(self, tile: Tile, block_d: int, arch: int, dtype="fp16",
                        bias_kind: int = NO_BIAS) -> str | None:
        """Why ``tile`` is not among ``offered(block_d, arch, dtype, bias_kind)``, or None where it is."""
        if tile in self.offered(block_d, arch, dtype, bias_kind):
            return None
        name = dtype_name(dtype)
        if block_d not in tile.block_ds:
            return f"shipped for BLOCK_D {'/'.join(map(str, tile.block_ds))} only"
        if not tile.ships_here:
            (lo, hi) = ("%d.%d" % v for v in tile.tritons)
            return f"shipped for triton {lo} up to (not including) {hi} only"
        if name not in tile.dtypes:
            return f"offered to {'/'.join(tile.dtypes)} operands only"
        estimate = self.shared_estimate(tile, block_d, name, arch, bias_kind)
        if not runtime.fits_shared_memory(estimate, arch):
            return (f"needs up to {estimate} B of shared memory ({name} operands), over sm_{arch}'s "
                    f"{runtime.max_shared_per_block(arch)} B per block")
        if not self.fits_arch(tile, arch, name):
            return f"not offered on sm_{arch} (the tile's architectures, or 8 warps on fewer than 128 MMA rows)"
        return "other tiles are offered there"

    def configs(self) -> list[triton.Config]:
        """One config per distinct tile shipped under the running Triton, in table order (a tile may have one
        row per architecture, head dims, dtypes and Triton versions)."""
        first: dict[tuple, Tile] = {}
        for t in self.tiles:
            if t.ships_here:
                first.setdefault(t.key, t)
        return [t.config() for t in first.values()]

    def prune(self, configs, named_args, **kwargs):
        """``early_config_prune`` for the autotuner: the configs of the offered tiles for the launch's head
        dim, architecture, q's dtype and bias kind (the interpreter's single config is kept as it is)."""
        block_d = named_args.get("BLOCK_D", kwargs.get("BLOCK_D", 64))
        q = named_args.get("Q")
        dtype = q.dtype if isinstance(q, torch.Tensor) and q.dtype in runtime.TRITON_TYPE_NAMES else "fp16"
        bias_kind = named_args.get("BIAS_KIND", kwargs.get("BIAS_KIND", NO_BIAS))
        by_key = {_config_key(c): c for c in configs}
        # in the order offered: the first is the default (what a single-config policy runs)
        kept = {t.key: by_key[t.key] for t in self.offered(block_d, _arch(named_args), dtype, bias_kind)
                if t.key in by_key}
        return list(kept.values()) or configs[:1]


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
_SMALL, _D128, _D256 = (16, 32, 64), (128,), (256,)
_ANY_D = _SMALL + _D128
_AMPERE, _HOPPER = (8,), (9,)
_BEFORE_3_8 = ((3, 0), (3, 8))
_FROM_3_8 = ((3, 8), (99, 0))
_FP32, _ALL_DTYPES = ("fp32",), ("fp16", "bf16", "fp32")
FWD = TileTable((
    Tile(128, 64, 8, 3, _SMALL, _HOPPER), Tile(64, 16, 8, 3, _D128, _AMPERE, tritons=_BEFORE_3_8),
    Tile(64, 32, 8, 3, _ANY_D), Tile(128, 128, 8, 3, _SMALL, _HOPPER), Tile(64, 64, 4, 3, _SMALL),
    Tile(128, 32, 8, 3, _SMALL), Tile(64, 32, 4, 3, _ANY_D), Tile(64, 64, 8, 3, _ANY_D),
    Tile(128, 16, 8, 3, _D128, _HOPPER), Tile(64, 16, 4, 3, _D256, _HOPPER, dv_splits=2), Tile(64, 16, 8, 3, _D256),
    Tile(32, 32, 4, 2, _SMALL, dtypes=_FP32, tritons=_FROM_3_8),
    Tile(16, 16, 4, 1, _SMALL, dtypes=_FP32, tritons=_BEFORE_3_8),
    Tile(16, 32, 8, 2, _D128, dtypes=_FP32), Tile(16, 16, 4, 2, _D256, dtypes=_FP32),
), "BLOCK_M", streamed=2, resident=1, scores=1)
DKDV = TileTable((
    Tile(32, 64, 4, 3, _SMALL, _HOPPER), Tile(32, 32, 4, 2, _SMALL, _AMPERE, tritons=_BEFORE_3_8),
    Tile(32, 64, 8, 2, _SMALL), Tile(32, 128, 8, 3, _SMALL, _HOPPER), Tile(16, 64, 4, 2, _SMALL),
    Tile(16, 64, 8, 2, _D128 + _D256), Tile(32, 64, 8, 2, _SMALL, dtypes=_FP32, tritons=_FROM_3_8),
    Tile(16, 32, 4, 2, _D128, dtypes=_FP32), Tile(16, 32, 4, 2, _SMALL, dtypes=_FP32, tritons=_BEFORE_3_8),
    Tile(16, 16, 4, 1, _D256, dtypes=_ALL_DTYPES),
), "BLOCK_N", streamed=2, resident=2, scores=2, streamed_stats=3)
DQ = TileTable((
    Tile(64, 32, 4, 3, _SMALL), Tile(128, 64, 8, 3, _SMALL), Tile(64, 16, 8, 2, _D128, _AMPERE, tritons=_BEFORE_3_8),
    Tile(64, 32, 8, 2, _ANY_D), Tile(64, 64, 8, 2, _SMALL), Tile(128, 32, 8, 2, _SMALL),
    Tile(64, 16, 4, 2, _D128, _HOPPER), Tile(64, 16, 8, 2, _D256),
    Tile(32, 32, 4, 2, _SMALL, dtypes=_FP32, tritons=_FROM_3_8),
    Tile(16, 32, 8, 2, _D128, dtypes=_FP32, tritons=_FROM_3_8),
    Tile(32, 32, 4, 1, _SMALL, dtypes=_FP32, tritons=_BEFORE_3_8),
    Tile(16, 32, 8, 1, _D128, dtypes=_FP32, tritons=_BEFORE_3_8),
    Tile(16, 16, 4, 1, _D256, dtypes=_ALL_DTYPES),
), "BLOCK_M", streamed=2, resident=2, scores=2)
# Head dims above 128 (BLOCK_D 256) keep k, v, dk and dv of a key block in registers: the backward tiles
# there spill on sm_80/sm_90 at every size tried (correct, slower); the forward does not.
BWD_SPILL_FREE_MAX_D = 128
# Autotune keys: lengths bucketed (nearby lengths share one tuning), the padded head dim and the variant.
_TUNE_KEY = ["bucket_q", "bucket_k", "BLOCK_D", "IS_CAUSAL", "BIAS_KIND"]


@runtime.autotune(FWD.configs(), key=_TUNE_KEY, prune_configs_by={"early_config_prune": FWD.prune})
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, BIAS, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ob, stride_oh, stride_om, stride_od,
    n_heads, seqlen_q, seqlen_k, bucket_q, bucket_k, head_dim, qk_scale,
    IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_WIDE_OFFSETS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT_DV: tl.constexpr = 1,
):
    bh, pid_m = _program_block(seqlen_q, BLOCK_M, SPLIT_DV)
    q_base = Q + _head_offset(bh, n_heads, stride_qb, stride_qh)
    k_base = K + _head_offset(bh, n_heads, stride_kb, stride_kh)
    v_base = V + _head_offset(bh, n_heads, stride_vb, stride_vh)
    b_base = BIAS + _head_offset(bh, n_heads, stride_bb, stride_bh)
    offs_d = _head_dim_indices(BLOCK_D, HAS_WIDE_OFFSETS)
    offs_m = _indices(pid_m * BLOCK_M, BLOCK_M, offs_d)
    offs_dv = _value_columns(offs_d, BLOCK_D, SPLIT_DV)

    q = _load_tile(q_base, offs_m, offs_d, stride_qm, stride_qd, seqlen_q, head_dim)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D // SPLIT_DV], tl.float32)

    hi = seqlen_k
    if IS_CAUSAL:  # no work above the diagonal
        hi = tl.minimum(seqlen_k, (pid_m + 1) * BLOCK_M)
    mid = _unmasked_key_end(pid_m * BLOCK_M, seqlen_k, IS_CAUSAL, BLOCK_N)
    acc, l_i, m_i = _fwd_key_blocks(acc, l_i, m_i, q, k_base, v_base, b_base, offs_m, offs_d, offs_dv, 0, mid,
                                    stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                                    seqlen_q, seqlen_k, head_dim, qk_scale,
                                    IS_CAUSAL, BIAS_KIND, DOT_PRECISION, False, BLOCK_N)
    acc, l_i, m_i = _fwd_key_blocks(acc, l_i, m_i, q, k_base, v_base, b_base, offs_m, offs_d, offs_dv, mid, hi,
                                    stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                                    seqlen_q, seqlen_k, head_dim, qk_scale,
                                    IS_CAUSAL, BIAS_KIND, DOT_PRECISION, True, BLOCK_N)

    has_keys = l_i > 0.0
    l_i = tl.where(has_keys, l_i, 1.0)
    o_base = O + _head_offset(bh, n_heads, stride_ob, stride_oh)
    _store_tile(o_base, acc / l_i[:, None], offs_m, offs_dv, stride_om, stride_od, seqlen_q, head_dim)
    # the log-sum-exp as its two parts: max (+inf on rows without keys, so their p is 0) and log2(sum)
    stats = LSE + bh.to(tl.int64) * 2 * seqlen_q + offs_m
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
    HAS_WIDE_OFFSETS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O) in fp32, [B*H, Lq]."""
    bh, pid_m = _program_block(seqlen_q, BLOCK_M)
    offs_d = _head_dim_indices(BLOCK_D, HAS_WIDE_OFFSETS)
    offs_m = _indices(pid_m * BLOCK_M, BLOCK_M, offs_d)
    o = _load_tile(O + _head_offset(bh, n_heads, stride_ob, stride_oh), offs_m, offs_d, stride_om, stride_od,
                   seqlen_q, head_dim)
    do = _load_tile(DO + _head_offset(bh, n_heads, stride_dob, stride_doh), offs_m, offs_d, stride_dom, stride_dod,
                    seqlen_q, head_dim)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * seqlen_q + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _dkdv_query_blocks(dk, dv, k, v, q_base, do_base, b_base, LSE, DELTA, bh, offs_n, offs_d, lo, hi,
                       stride_qm, stride_qd, stride_dom, stride_dod, stride_bm, stride_bn,
                       seqlen_q, seqlen_k, head_dim, qk_scale,
                       IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       MASKED: tl.constexpr, BLOCK_M: tl.constexpr):
    """dk, dv contributions of the query blocks in [lo, hi). Keys past the end need no masking here: their
    rows of dk and dv are never stored, and rows past the end of the queries have p = 0."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = _indices(start_m, BLOCK_M, offs_d)
        q = _load_tile(q_base, offs_m, offs_d, stride_qm, stride_qd, seqlen_q, head_dim)
        do = _load_tile(do_base, offs_m, offs_d, stride_dom, stride_dod, seqlen_q, head_dim)
        # rows past the end (and fully masked rows) have max = +inf, so their probabilities are 0
        row_max, log2_sum = _load_stats(LSE, bh, offs_m, seqlen_q)
        delta = tl.load(DELTA + bh.to(tl.int64) * seqlen_q + offs_m, mask=offs_m < seqlen_q, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        s_t = _mask_scores(s_t, offs_m, offs_n, b_base, stride_bm, stride_bn, seqlen_q, seqlen_k,
                           IS_CAUSAL, BIAS_KIND, False, MASKED)
        p_t = tl.math.exp2((s_t - row_max[None, :]) - log2_sum[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@runtime.autotune(DKDV.configs(), key=_TUNE_KEY, prune_configs_by={"early_config_prune": DKDV.prune})
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
    n_heads, seqlen_q, seqlen_k, bucket_q, bucket_k, head_dim, qk_scale, sm_scale,
    IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_WIDE_OFFSETS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One [BLOCK_N] block of keys: dk, dv accumulated over every query block that sees it."""
    bh, pid_n = _program_block(seqlen_k, BLOCK_N)
    q_base = Q + _head_offset(bh, n_heads, stride_qb, stride_qh)
    do_base = DO + _head_offset(bh, n_heads, stride_dob, stride_doh)
    b_base = BIAS + _head_offset(bh, n_heads, stride_bb, stride_bh)
    offs_d = _head_dim_indices(BLOCK_D, HAS_WIDE_OFFSETS)
    offs_n = _indices(pid_n * BLOCK_N, BLOCK_N, offs_d)

    k = _load_tile(K + _head_offset(bh, n_heads, stride_kb, stride_kh), offs_n, offs_d, stride_kn, stride_kd,
                   seqlen_k, head_dim)
    v = _load_tile(V + _head_offset(bh, n_heads, stride_vb, stride_vh), offs_n, offs_d, stride_vn, stride_vd,
                   seqlen_k, head_dim)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    lo = 0
    if IS_CAUSAL:  # queries above this key block's first key cannot see it
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    # one loop: only the causal diagonal needs a mask here (a second, unmasked loop for the blocks below it
    # would double the code and spill at head dim 128; CLIP's causal text is one or two blocks anyway)
    dk, dv = _dkdv_query_blocks(dk, dv, k, v, q_base, do_base, b_base, LSE, DELTA, bh, offs_n, offs_d,
                                lo, seqlen_q, stride_qm, stride_qd, stride_dom, stride_dod, stride_bm, stride_bn,
                                seqlen_q, seqlen_k, head_dim, qk_scale,
                                IS_CAUSAL, BIAS_KIND, DOT_PRECISION, IS_CAUSAL, BLOCK_M)

    _store_tile(DK + _head_offset(bh, n_heads, stride_dkb, stride_dkh), dk * sm_scale, offs_n, offs_d,
                stride_dkn, stride_dkd, seqlen_k, head_dim)
    _store_tile(DV + _head_offset(bh, n_heads, stride_dvb, stride_dvh), dv, offs_n, offs_d,
                stride_dvn, stride_dvd, seqlen_k, head_dim)


@triton.jit
def _dq_key_blocks(dq, q, do, row_max, log2_sum, delta, k_base, v_base, b_base, offs_m, offs_d, lo, hi,
                   stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
                   seqlen_q, seqlen_k, head_dim, qk_scale,
                   IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq contributions of the key blocks in [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = _indices(start_n, BLOCK_N, offs_d)
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


@runtime.autotune(DQ.configs(), key=_TUNE_KEY, prune_configs_by={"early_config_prune": DQ.prune})
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, BIAS, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    n_heads, seqlen_q, seqlen_k, bucket_q, bucket_k, head_dim, qk_scale, sm_scale,
    IS_CAUSAL: tl.constexpr, BIAS_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_WIDE_OFFSETS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One [BLOCK_M] block of queries: dq accumulated over the key blocks it sees."""
    bh, pid_m = _program_block(seqlen_q, BLOCK_M)
    k_base = K + _head_offset(bh, n_heads, stride_kb, stride_kh)
    v_base = V + _head_offset(bh, n_heads, stride_vb, stride_vh)
    b_base = BIAS + _head_offset(bh, n_heads, stride_bb, stride_bh)
    row_base = bh.to(tl.int64) * seqlen_q
    offs_d = _head_dim_indices(BLOCK_D, HAS_WIDE_OFFSETS)
    offs_m = _indices(pid_m * BLOCK_M, BLOCK_M, offs_d)
    m_ok = offs_m < seqlen_q

    q = _load_tile(Q + _head_offset(bh, n_heads, stride_qb, stride_qh), offs_m, offs_d, stride_qm, stride_qd,
                   seqlen_q, head_dim)
    do = _load_tile(DO + _head_offset(bh, n_heads, stride_dob, stride_doh), offs_m, offs_d, stride_dom, stride_dod,
                    seqlen_q, head_dim)
    row_max, log2_sum = _load_stats(LSE, bh, offs_m, seqlen_q)
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

    _store_tile(DQ + _head_offset(bh, n_heads, stride_dqb, stride_dqh), dq * sm_scale, offs_m, offs_d,
                stride_dqm, stride_dqd, seqlen_q, head_dim)


# ---------------------------------------------------------------------------------------------
# Launchers
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


def _strides(t):
    return tuple(t.stride())


def has_wide_offsets(*tensors) -> bool:
    """Whether an element offset within one (batch, head) slice of any [B, H, L, D] tensor (or bias view)
    reaches 2**31, so the kernels must index in 64 bits (``HAS_WIDE_OFFSETS``, see ``_indices``). The batch
    and head offsets are 64-bit always."""
    return any(sum((n - 1) * abs(st) for n, st in zip(t.shape[2:], t.stride()[2:])) >= 2**31
               for t in tensors if t is not None and t.numel())


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get full fp32 products (what eager fp32 matmul gives), not tf32
    return "ieee" if dtype == torch.float32 else "tf32"


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
        *_strides(q), *_strides(k), *_strides(v), *bias_strides, *_strides(o),
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
    pre_block = max(16, min(64, 2048 // bd))
    _attn_bwd_preprocess_kernel[grid(b, h, lq, pre_block)](
        o, do, delta, *_strides(o), *_strides(do), h, lq, d, HAS_WIDE_OFFSETS=wide, BLOCK_D=bd, BLOCK_M=pre_block,
    )
    bias_ptr, bias_strides = _bias_args(bias, q, (b, h, lq, lk))
    common = dict(IS_CAUSAL=is_causal, BIAS_KIND=bias_kind(bias), DOT_PRECISION=_dot_precision(q.dtype),
                  HAS_WIDE_OFFSETS=wide, BLOCK_D=bd)
    _attn_bwd_dkdv_kernel[lambda meta: grid(b, h, lk, meta["BLOCK_N"])](
        q, k, v, bias_ptr, do, lse, delta, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *bias_strides, *_strides(do), *_strides(dk), *_strides(dv),
        h, lq, lk, *_buckets(lq, lk), d, scale * LOG2E, scale, **common,
    )
    _attn_bwd_dq_kernel[lambda meta: grid(b, h, lq, meta["BLOCK_M"])](
        q, k, v, bias_ptr, do, lse, delta, dq,
        *_strides(q), *_strides(k), *_strides(v), *bias_strides, *_strides(do), *_strides(dq),
        h, lq, lk, *_buckets(lq, lk), d, scale * LOG2E, scale, **common,
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


AOT_ARCHS = (80, 90)
# The operand precisions compiled: fp16/bf16 on tensor cores, and exact fp32 (FMA products, as eager fp32)
AOT_PRECISIONS = {"half": (("fp16", "bf16"), "tf32"), "fp32": (("fp32",), "ieee")}


def _aot_tiles(table: TileTable, block_d: int, precision: str = "half", bias_kind: int = NO_BIAS,
               default_only: bool = False) -> list[tuple[Tile, int, int]]:
    """(tile, architecture, shared-memory estimate) for each tile offered for ``block_d`` on sm_80 and sm_90
    with ``precision`` operands ("half": fp16 and bf16; "fp32") and a bias of ``bias_kind``, in table order
    (only the default, the first offered, with ``default_only``). One entry per architecture: the estimate
    differs (``TileTable.shared_estimate``)."""
    dtype = AOT_PRECISIONS[precision][0][0]
    found = []
    for tile in table.tiles:
        for arch in AOT_ARCHS:
            offered = table.offered(block_d, arch, dtype, bias_kind)
            if tile in (offered[:1] if default_only else offered):
                found.append((tile, arch, table.shared_estimate(tile, block_d, dtype, arch, bias_kind)))
    return found


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
                    signature, unit_strides = _aot_signature(kernel)
                    for tile, arch, estimate in _aot_tiles(table, bd, precision, kind, default_only=bool(suffix)):
                        default = tile == table.offered(bd, arch, dtypes[0], kind)[0]
                        cases.append(runtime.AotCase(
                            name=f"attention_{label}{suffix}{'_fp32' if precision == 'fp32' else ''}[D={bd}]",
                            kernel=runtime.jit_function(kernel), signature=signature,
                            constexprs={**flags, **tile.config().kwargs, **unit_strides}, num_warps=tile.warps,
                            num_stages=tile.stages, expects_mma=precision == "half", dtypes=dtypes, archs=(arch,),
                            quick=(precision == "half" and bd == 64 and default
                                   and suffix in ("", "_causal" if label == "fwd" else "")),
                            shared_estimate=estimate,
                        ))
        signature, unit_strides = _aot_signature(_attn_bwd_preprocess_kernel)
        cases.append(runtime.AotCase(
            name=f"attention_bwd_preprocess[D={bd}]", kernel=_attn_bwd_preprocess_kernel, signature=signature,
            constexprs={"HAS_WIDE_OFFSETS": False, "BLOCK_D": bd, "BLOCK_M": max(16, min(64, 2048 // bd)),
                        **unit_strides}, dtypes=("fp16", "bf16", "fp32"), quick=False,
        ))
    return cases
