"""Fused MLP: one GEMM kernel with constexpr epilogues, plus the standalone activation kernel.

GEMM
----
``C[m, n] = epilogue(sum_k A[m, k] * B[n, k])`` with ``B`` in ``nn.Linear`` layout ([N, K]). Both operands
are addressed through their strides, so every product the MLP needs is this one kernel over views, with
no transposed copy materialized:

====================  =================  =================  ===========================================================
product               A [M, K]           B [N, K]           epilogue
====================  =================  =================  ===========================================================
fc forward            x                  W1                 + b1, store Z (training), act -> H
proj forward          H                  W2                 + b2 (+ residual) -> Y
proj dgrad            dY                 W2.T (a view)      * act'(Z) -> dZ, column sums -> db1 (dH never stored)
proj wgrad            dY.T (a view)      act(Z).T (a view)  -> dW2 (split-K when few tiles)
fc wgrad              dZ.T (a view)      x.T (a view)       -> dW1 (split-K when few tiles)
fc dgrad              dZ                 W1.T (a view)      -> dx
====================  =================  =================  ===========================================================

Each program computes one [BLOCK_M, BLOCK_N] tile with an fp32 accumulator, walking K in BLOCK_K steps
(``tl.dot`` on tensor cores: HMMA on sm_80, HGMMA on sm_90). Programs are ordered in groups of GROUP_M
tile rows, so the B tiles a group reads stay in L2 while the group sweeps N. fp32 inputs take the
precision of ``runtime.dot_precision`` (IS_TF32): exact fp32 products (``input_precision="ieee"``, as eager
by default) unless torch allows TF32 matmuls, which is when eager cuBLAS uses TF32 too.

Memory traffic: the GEMM reads A and B once per tile row/column (the L2 grouping keeps the re-reads on
chip) and writes C once; the epilogue adds reads of the bias (N), the residual or Z (M x N) only when
the variant needs them. Compared with eager Linear -> act -> Linear, the fused forward skips the separate
activation pass (read Z, write H), and the fused dgrad skips storing dH and the activation-backward pass
(read dH and Z, write dZ).

What the backward keeps
-----------------------
Training needs H (the B operand of the proj wgrad) and act'(Z) (for dZ). The fc epilogue writes the
pre-activation Z (only when a gradient is needed) and the backward keeps Z alone: the proj wgrad applies
act() to each Z tile as it loads it (IS_B_ACTIVATED) and the dgrad epilogue computes act'(Z) from the same
Z, so H never outlives the forward (exact fp32 and unaligned operands take a transient act(Z) instead,
activated once before the product: the loop has no registers to spare there). That halves the activation
memory of the block against eager nn.GELU (x, Z, H) and saves two of three M x hidden tensors against
QuickGELU written out (Z, sigmoid, H) (bench/results/mlp_saved_bytes_cpu has the measured table). The cost
is a few fp32 flops per loaded Z element in one of the six GEMMs, hidden behind the tensor-core loop
(ViT-B/16, bf16: storing H instead would be another 310 MB per layer at batch 256). The forward applies
act() to Z rounded to the output dtype, exactly what the backward recomputes, so forward and backward see
the same H.

Bias gradients, off the GEMM main loop: db1 = sum_m dZ is summed where dZ is produced, in the dgrad
epilogue (HAS_COLSUM: each tile adds up its stored dZ values per 64-row group into an fp32 partial row,
[M / 64, hidden] fp32, about 1/16 of dZ's bytes in bf16); db2 = sum_m dY is one read of dY (D_out
columns, a quarter of a hidden-wide tensor). Both finish in ``column_sums``: fixed-order fp32 sums over
row chunks, deterministic and without atomics.

Split-K
-------
The weight gradients have small outputs and a long K (ViT-B/16 at batch 256: 768 x 3072 outputs, K =
50432 tokens: 144 tiles of 128x128 for 132 SMs, 1.1 waves). When a weight gradient has fewer output
tiles than ``SPLIT_K_WAVES`` x SMs, it runs as S programs per tile over K slices (grid axis 1), each
writing an fp32 partial [M, N]; ``column_sums`` adds the S partials in a fixed order and casts (one
extra read/write of S x M x N fp32, ~1% of the GEMM's operand traffic at that shape). No atomics, so the
result does not depend on scheduling.

Persistent TMA variant (sm_90+)
-------------------------------
Tiles marked ``persistent`` run the same kernel with IS_PERSISTENT: one program per SM walks the output
tiles in the same grouped order (tile t, t + programs, ...), and the operands are read through tensor
descriptors built in the kernel (``tl.make_tensor_descriptor``), which sm_90 executes as TMA copies
(UTMALDG) straight into shared memory: no per-element address arithmetic or cp.async bookkeeping in
registers, and no K-tail step (boxes past an edge read zeros). The epilogue (``_finish_tile``: bias,
activation or its gradient, residual, Z, column sums, split-K partials) is the pointer variant's. The
autotuner is offered these tiles only where ``tma_applies``: sm_90 or newer, operands the launcher found
16-byte aligned (TMA needs 16-byte base addresses and row strides: CLIP widths always are; any token
count is fine), and a triton with in-kernel descriptors; and to fp16/bf16 operands only (``Tile.avoid``).
Memory traffic is that of the pointer variant; what changes is the issue cost of the loads, and one wave
of programs instead of several. Descriptors built in a kernel live in global scratch that Triton
allocates per launch (128 bytes per descriptor and program, ``_ensure_descriptor_scratch``).

The Triton interpreter (3.6 and 3.8) runs tensor descriptors, including TMA's checks (16-byte strides)
and its zero fill past the edges, so the tests run this variant end to end on CPU, forward and every
gradient (``forced_config``); what only a compile shows (UTMALDG in the SASS, registers, spills) is
checked by ``clipfast aot``, and the speed only on a GPU.

Indexing is 64-bit wherever index products can pass 2**31 (row x stride in loads and the epilogue, the
K-slice offsets, the split partials), so one launch covers any output size. Tensor-descriptor
coordinates are 32-bit (as TMA takes them; every dimension is below 2**31).

Activation kernel
-----------------
``quick_gelu`` (and the other activations) elementwise, forward ``act(x)`` and backward
``dy * act'(x)`` computed in fp32 from the input: one read and one write per element (two reads in
the backward), the minimum.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import runtime

# Activation codes (constexpr in the kernels).
ACTIVATIONS = {"none": 0, "quick_gelu": 1, "gelu": 2, "gelu_tanh": 3}

# Constants in the kernels: 0.7071... = 1/sqrt(2), 0.3989... = 1/sqrt(2 pi), 1.5957... = 2 sqrt(2/pi),
# 0.134145 = 3 * 0.044715.


@triton.jit
def _sigmoid_pair(x):
    """(sigmoid(x), 1 - sigmoid(x)) without cancellation or overflow: both from exp(-|x|) <= 1."""
    e = tl.exp(-tl.abs(x))
    big = 1.0 / (1.0 + e)
    small = e * big
    pos = x >= 0
    return tl.where(pos, big, small), tl.where(pos, small, big)


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    """act(z) in fp32. gelu_tanh uses 0.5 * (1 + tanh(u)) == sigmoid(2u)."""
    y = z
    if ACTIVATION == 1:
        s, _ = _sigmoid_pair(1.702 * z)
        y = z * s
    elif ACTIVATION == 2:
        y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACTIVATION == 3:
        s, _ = _sigmoid_pair(1.5957691216057308 * (z + 0.044715 * z * z * z))
        y = z * s
    return y


@triton.jit
def _activation_grad(z, ACTIVATION: tl.constexpr):
    """act'(z) in fp32."""
    d = tl.full(z.shape, 1.0, tl.float32)
    if ACTIVATION == 1:
        s, s_neg = _sigmoid_pair(1.702 * z)
        d = s + 1.702 * z * s * s_neg
    elif ACTIVATION == 2:
        d = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACTIVATION == 3:
        s, s_neg = _sigmoid_pair(1.5957691216057308 * (z + 0.044715 * z * z * z))
        d = s + z * s * s_neg * 1.5957691216057308 * (1.0 + 0.134145 * z * z)
    return d


@triton.jit
def _tile_ptrs(BASE, rows, cols, stride, IS_ALIGNED: tl.constexpr):
    """Pointers to the [rows, cols] tile of a matrix with row stride ``stride`` and unit column stride.
    Every operand is loaded in the orientation that puts its unit stride on the tile's last axis (the
    dot takes a transposed view where needed), which is the layout the loads vectorize best.

    IS_ALIGNED declares the tile as 16-byte vectors along its rows: the launcher checked that the base
    address and the row stride are 16-byte multiples and that no vector straddles a wrapped edge. The JIT
    would otherwise only learn this from its argument specialization; without vectors every element needs
    its own address and the loop is not software-pipelined. (Hints must be made where the pointers are
    computed: Triton drops them on values passed into a function.)"""
    ptrs = BASE + rows[:, None] * stride + cols[None, :]
    if IS_ALIGNED:
        VEC: tl.constexpr = 128 // BASE.dtype.element_ty.primitive_bitwidth
        ptrs = tl.max_contiguous(tl.multiple_of(ptrs, [1, 16]), [1, VEC])
    return ptrs


@triton.jit
def _mma_step(a, b, acc, IS_A_ROW_MAJOR: tl.constexpr, IS_B_ROW_MAJOR: tl.constexpr, IS_TF32: tl.constexpr,
              IS_B_ACTIVATED: tl.constexpr, ACTIVATION: tl.constexpr):
    """acc += A_tile @ act(B_tile).T on tensor cores (a, b as loaded, see ``_tile_ptrs``; act applied only
    when IS_B_ACTIVATED, in fp32 and rounded back to B's dtype)."""
    if IS_B_ACTIVATED:
        b = _activation(b.to(tl.float32), ACTIVATION).to(b.dtype)
    if not IS_A_ROW_MAJOR:
        a = tl.trans(a)
    if IS_B_ROW_MAJOR:
        b = tl.trans(b)
    if IS_TF32:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _epilogue(acc, rm, rn, row0, M, N, stride_c, C, BIAS, RES, Z, COLSUM, HAS_BIAS: tl.constexpr,
              ACTIVATION: tl.constexpr, HAS_PRE_OUT: tl.constexpr, HAS_ACT_GRAD: tl.constexpr,
              HAS_RESIDUAL: tl.constexpr, HAS_COLSUM: tl.constexpr, IS_B_ACTIVATED: tl.constexpr,
              IS_ALIGNED: tl.constexpr):
    """Bias, activation (or the activation gradient from the saved Z), residual, the store, and the
    column sums of the stored values, for the rows rm (int64) and columns rn of the output. C, Z and RES
    share one layout (row stride stride_c).

    The activation is applied to the pre-activation rounded to the output dtype, the Z the backward sees:
    the H this forward uses and the H the weight gradient recomputes from Z are then the same values.
    Column sums (HAS_COLSUM, the bias gradient db1 = sum_m dZ) go to COLSUM[row // COLSUM_ROWS, column],
    one fp32 row per COLSUM_ROWS output rows (every BLOCK_M is a multiple), summed by the launcher."""
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if HAS_PRE_OUT:
        tl.store(_tile_ptrs(Z, rm, rn, stride_c, IS_ALIGNED), acc.to(Z.dtype.element_ty), mask=mask)
    if HAS_ACT_GRAD:
        z = tl.load(_tile_ptrs(Z, rm, rn, stride_c, IS_ALIGNED), mask=mask, other=0.0).to(tl.float32)
        acc *= _activation_grad(z, ACTIVATION)
    elif ACTIVATION != 0 and not IS_B_ACTIVATED:
        acc = _activation(acc.to(C.dtype.element_ty).to(tl.float32), ACTIVATION)
    if HAS_RESIDUAL:
        acc += tl.load(_tile_ptrs(RES, rm, rn, stride_c, IS_ALIGNED), mask=mask, other=0.0).to(tl.float32)
    out = acc.to(C.dtype.element_ty)
    tl.store(_tile_ptrs(C, rm, rn, stride_c, IS_ALIGNED), out, mask=mask)
    if HAS_COLSUM:
        GROUPS: tl.constexpr = acc.shape[0] // COLSUM_ROWS
        vals = tl.where(mask, out.to(tl.float32), 0.0)
        sums = tl.sum(tl.reshape(vals, (GROUPS, COLSUM_ROWS, acc.shape[1])), axis=1)
        g = row0 // COLSUM_ROWS + tl.arange(0, GROUPS)
        ok = (g < tl.cdiv(M, COLSUM_ROWS))[:, None] & (rn < N)[None, :]
        tl.store(COLSUM + g.to(tl.int64)[:, None] * N + rn[None, :], sums, mask=ok)


@triton.jit
def _split_columns(acc):
    """[BM, BN] -> the [BM, BN/2] left and right halves (sub-tiles for the epilogue)."""
    BM: tl.constexpr = acc.shape[0]
    BN: tl.constexpr = acc.shape[1]
    return tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))


@triton.jit
def _epilogue_halves(acc, rm, rn0, row0, M, N, stride_c, C, BIAS, RES, Z, COLSUM, HAS_BIAS: tl.constexpr,
                     ACTIVATION: tl.constexpr, HAS_PRE_OUT: tl.constexpr, HAS_ACT_GRAD: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr, HAS_COLSUM: tl.constexpr, IS_B_ACTIVATED: tl.constexpr,
                     IS_ALIGNED: tl.constexpr):
    """The epilogue over the two column halves of ``acc`` (columns rn0 + [0, BN)), one after the other."""
    HALF: tl.constexpr = acc.shape[1] // 2
    lo, hi = _split_columns(acc)
    rn = rn0 + tl.arange(0, HALF)
    _epilogue(lo, rm, rn, row0, M, N, stride_c, C, BIAS, RES, Z, COLSUM, HAS_BIAS, ACTIVATION, HAS_PRE_OUT,
              HAS_ACT_GRAD, HAS_RESIDUAL, HAS_COLSUM, IS_B_ACTIVATED, IS_ALIGNED)
    _epilogue(hi, rm, rn + HALF, row0, M, N, stride_c, C, BIAS, RES, Z, COLSUM, HAS_BIAS, ACTIVATION, HAS_PRE_OUT,
              HAS_ACT_GRAD, HAS_RESIDUAL, HAS_COLSUM, IS_B_ACTIVATED, IS_ALIGNED)


# Rows of output summed into one fp32 partial row by the column-sum epilogue (the smallest BLOCK_M).
COLSUM_ROWS: tl.constexpr = tl.constexpr(64)


@dataclass(frozen=True)
class Tile:
    """One shipped GEMM tile. ``epilogue_subtiles`` (2 or 4) column slices are finished one after the
    other, so the epilogue's fp32 temporaries cover a half or a quarter of the accumulator.

    ``avoid`` lists the kinds of product (``_product_kinds``) the tile is not offered to, because the AOT
    check measured it spilling there: "heavy" (erf/tanh activation epilogues: fc forward, dgrad),
    "activated_b" (the proj weight gradient applying the activation to its [BLOCK_K, BLOCK_N] B tiles in
    registers as it loads them), "act_grad" (the dgrad epilogue: act'(Z) from the loaded Z times the
    product, and the column sums), "residual" (the proj forward's residual epilogue), "split" (split-K
    weight gradients storing fp32 partials), "fp32" (fp32 operands). ``unaligned``: offered to operands that
    load element by element (more registers per value). ``persistent``: the persistent tensor-descriptor
    (TMA) variant, offered only where ``tma_applies``. ``archs``: the compute capability majors (8 Ampere,
    9 Hopper) the tile is offered on (None: every one). Besides these, a tile is offered only where its
    ``shared_estimate`` for the product fits the architecture's shared memory per block (``offered``)."""

    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    epilogue_subtiles: int = 2
    avoid: tuple[str, ...] = ()
    unaligned: bool = False
    group_m: int = 8
    persistent: bool = False
    archs: tuple[int, ...] | None = None

    @property
    def key(self) -> tuple:
        return (self.block_m, self.block_n, self.block_k, self.warps, self.stages, self.persistent)

    def config(self) -> triton.Config:
        return triton.Config({"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k,
                              "GROUP_M": self.group_m, "EPILOGUE_SUBTILES": self.epilogue_subtiles,
                              "IS_PERSISTENT": self.persistent},
                             num_warps=self.warps, num_stages=self.stages)

    def shared_estimate(self, kinds: set[str] | frozenset = frozenset()) -> int:
        """Bytes of shared memory the tile is offered by for a product of ``kinds`` (an upper bound, see
        ``runtime.gemm_shared_estimate``): ``stages`` buffers of the A and B tiles, 4-byte elements for
        "fp32" operands and 2-byte otherwise, plus one [block_m, block_n / epilogue_subtiles] slice of the
        output (fp32 partials for "split") that the epilogue stages. Measured (triton 3.8, sm_90): the
        persistent tiles use the stages plus that slice (128x256x64: 163,864 B in fp16, 327,704 B in fp32),
        the pointer tiles the stages alone (294,912 B for 128x256x64 in fp32); sm_80 keeps one stage fewer
        (98,304 B for 128x256x64 in fp16)."""
        size = runtime.ELEMENT_SIZE["fp32" if "fp32" in kinds else "fp16"]
        out = runtime.ELEMENT_SIZE["fp32"] if "split" in kinds else size
        epilogue = self.block_m * (self.block_n // self.epilogue_subtiles) * out
        return runtime.gemm_shared_estimate(self.block_m, self.block_n, self.block_k, self.stages, size, epilogue)


# Shipped tiles. The first is what the interpreter runs (large tiles keep it fast) and a good default on
# both architectures. Every entry compiles without spills, software-pipelined, with tensor cores for
# fp16/bf16 on sm_80 and sm_90, for every epilogue it is offered to (``aot_cases``); the Hopper tiles
# (128x256 and 256x128 at 8 warps) fit by finishing the accumulator in quarters.
_FP32_BEFORE_3_8 = () if runtime.triton_at_least(3, 8) else ("fp32",)
TILES = [
    # measured spills where avoided (bf16, sm_80 / sm_90, triton 3.6 / 3.8): 16 B on sm_80 (128x128x64),
    # 80-1100 B (128x256; 8 B for its split-K fp32 stores on sm_80), 180-1000 B on sm_80 (256x128).
    Tile(128, 128, 32, warps=8, stages=4),
    Tile(128, 128, 64, warps=8, stages=3, avoid=("activated_b",)),
    # 128x256 on sm_80 under triton < 3.8: 255 registers and 8 B spilled for the plain dgrad (dX = dY W):
    # Hopper only there.
    Tile(128, 256, 64, warps=8, stages=3, epilogue_subtiles=4, avoid=("activated_b", "split"),
         archs=None if runtime.triton_at_least(3, 8) else (9,)),
    # 256x128's split-K fp32 partial stores spill 16 B on sm_80 under triton 3.8: not offered to split-K.
    Tile(256, 128, 64, warps=8, stages=3, epilogue_subtiles=4, avoid=("activated_b", "split")),
    # The two 4-warp tiles spill 8-48 B with exact fp32 operands on sm_80 under triton 3.6 (fc forward,
    # residual proj forward, plain and split-K weight gradients): fp16/bf16 only there.
    Tile(64, 128, 32, warps=4, stages=4, avoid=_FP32_BEFORE_3_8),
    # 128x64x32 spills 16-24 B on sm_80 under triton 3.6 for act(B) with the tanh GELU (as before the
    # persistent variant was added: 168 registers either way), so it is not offered to act(B).
    Tile(128, 64, 32, warps=4, stages=4, avoid=("activated_b",) + _FP32_BEFORE_3_8),
    Tile(64, 64, 32, warps=4, stages=4, unaligned=True),
    # One warpgroup on 128x128 (sm_90, fp16/bf16, triton 3.6 and 3.8): 218-237 registers and no spills for
    # the fc forward (every activation), the residual proj forward, dx and the plain / split-K weight
    # gradients, 96 KB of shared memory at 3 stages (8 warps per SM); the dgrad epilogue (act'(Z), column
    # sums) spills 8-300 B and act(B) 8-120 B at 255 registers. On sm_80 it needs 255 registers with every
    # epilogue and spills 8-16 B in the fc forward and residual epilogues under triton 3.6: Hopper only. With
    # fp32 operands it spills 584-1288 B (exact) and 104-808 B (TF32) at 255 registers (triton 3.8): fp16/bf16.
    Tile(128, 128, 64, warps=4, stages=3, avoid=("act_grad", "activated_b", "fp32"), archs=(9,)),
    # Persistent, tensor descriptors (TMA), sm_90+ and aligned operands only (``tma_applies``): no spills
    # for any product on sm_90 under triton 3.6 and 3.8 (100-255 registers, 128-180 KB of shared memory,
    # one 8-warp program per SM). fp16/bf16 only: with fp32 operands they do not fit sm_90's 227 KB of shared
    # memory (``Tile.shared_estimate``; compiled: 256-320 KB), and the exact-fp32 dgrad spills 27 KB (triton 3.8).
    Tile(128, 256, 64, warps=8, stages=3, epilogue_subtiles=4, persistent=True, avoid=("fp32",)),
    Tile(128, 128, 64, warps=8, stages=4, persistent=True, avoid=("fp32",)),
]
GEMM_CONFIGS = [t.config() for t in TILES]
_TILE_OF = {t.key: t for t in TILES}
_HEAVY_ACTIVATIONS = (2, 3)  # erf and tanh GELU

# Tensor descriptors built in the kernel (``tl.make_tensor_descriptor``): triton 3.6 and later have them.
HAS_TENSOR_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor")


def _tile(config: triton.Config) -> Tile:
    kw = config.kwargs
    return _TILE_OF[(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps, config.num_stages,
                     kw.get("IS_PERSISTENT", False))]


def tma_applies(arch: int, aligned: bool) -> bool:
    """Whether the persistent TMA variant can run: sm_90 or newer (``arch`` = 10 x major + minor), operands
    that the launcher found 16-byte aligned (TMA needs 16-byte base addresses and row strides), and a
    triton with in-kernel tensor descriptors."""
    return arch >= 90 and aligned and HAS_TENSOR_DESCRIPTORS


def _product_kinds(args: dict) -> set[str]:
    """The kinds of product (see ``Tile.avoid``) a launch's constexpr flags make."""
    kinds = set()
    if args.get("IS_B_ACTIVATED", False):
        kinds.add("activated_b")
    elif args.get("ACTIVATION", 0) in _HEAVY_ACTIVATIONS:
        kinds.add("heavy")
    if args.get("HAS_ACT_GRAD", False):
        kinds.add("act_grad")
    if args.get("HAS_RESIDUAL", False):
        kinds.add("residual")
    if args.get("IS_SPLIT", False):
        kinds.add("split")
    if any(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in (args.get("A"), args.get("B"))):
        kinds.add("fp32")
    return kinds


def why_not_offered(tile: Tile, kinds: set[str], aligned: bool, arch: int) -> str | None:
    """Why ``tile`` is not offered to a product of ``kinds`` (``_product_kinds``) on operands that are
    ``aligned`` or not, on ``arch`` (10 x major + minor; 0: unknown, e.g. the interpreter), or None where
    it is: the tile avoids one of the kinds, needs aligned operands, ships for other architectures, its
    ``shared_estimate`` exceeds the architecture's shared memory per block (``runtime.MAX_SHARED_PER_BLOCK``),
    or it is the persistent TMA variant where that cannot run (``tma_applies``)."""
    if kinds & set(tile.avoid):
        return f"not offered to {', '.join(sorted(kinds & set(tile.avoid)))} products"
    if not (tile.unaligned or aligned):
        return "offered to aligned operands only"
    if tile.archs is not None and arch // 10 not in tile.archs:
        return f"offered on compute capability {'/'.join(map(str, tile.archs))}.x only"
    estimate = tile.shared_estimate(kinds)
    if not runtime.fits_shared_memory(estimate, arch):
        return (f"needs up to {estimate} B of shared memory ({'fp32' if 'fp32' in kinds else 'fp16/bf16'} "
                f"operands), over sm_{arch}'s {runtime.max_shared_per_block(arch)} B per block")
    if tile.persistent and not tma_applies(arch, aligned):
        return "the persistent TMA variant needs sm_90 or newer, aligned operands and tensor descriptors"
    return None


def offered(tile: Tile, kinds: set[str], aligned: bool, arch: int) -> bool:
    """Whether ``tile`` is offered to a product of ``kinds`` on operands that are ``aligned`` or not, on
    ``arch`` (see ``why_not_offered``)."""
    return why_not_offered(tile, kinds, aligned, arch) is None


def _prune(configs, named_args, arch: int | None = None, **kwargs):
    """The tiles offered to one launch (see ``offered``): its epilogue, operand alignment and device
    (``arch`` overrides the device, for the AOT cases)."""
    args = {**named_args, **kwargs}
    arch = runtime.launch_arch(named_args, "A") if arch is None else arch
    kinds = _product_kinds(args)
    aligned = args.get("IS_ALIGNED", True)
    kept = [c for c in configs if offered(_tile(c), kinds, aligned, arch)]
    # none offered (a GPU whose shared memory fits no tile of these operands): the smallest by shared memory
    return kept or [min(configs, key=lambda c: (not (_tile(c).unaligned or aligned), _tile(c).shared_estimate(kinds)))]


@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(tile row, tile column) of output tile number ``tile`` in grouped order: GROUP_M tile rows sweep the
    tile columns together, so the B tiles a group reads stay in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (tile // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % tiles_per_group) % group_rows, (tile % tiles_per_group) // group_rows


@triton.jit
def _accumulate_from_pointers(A, B, pid_m, pid_n, M, N, k_first, k_count, stride_a, stride_b,
                              IS_A_ROW_MAJOR: tl.constexpr, IS_B_ROW_MAJOR: tl.constexpr, IS_ALIGNED: tl.constexpr,
                              IS_TF32: tl.constexpr, IS_B_ACTIVATED: tl.constexpr, ACTIVATION: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The fp32 [BLOCK_M, BLOCK_N] product of one tile over k in [k_first, k_first + k_count), loading
    through pointers (cp.async pipelines, LDGSTS)."""
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge load wrapped (valid) addresses and are never stored, so only K is masked.
    # Offsets are 64-bit wherever a product of indices can pass 2**31 (rows x strides, split offsets).
    rm_load = (rm % M).to(tl.int64)
    rn_load = (rn % N).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if IS_A_ROW_MAJOR:  # [BLOCK_M, BLOCK_K] tiles
        a_ptrs = _tile_ptrs(A + k_first, rm_load, rk, stride_a, IS_ALIGNED)
        a_step = BLOCK_K
    else:  # [BLOCK_K, BLOCK_M] tiles
        a_ptrs = _tile_ptrs(A + k_first * stride_a, rk, rm_load, stride_a, IS_ALIGNED)
        a_step = BLOCK_K * stride_a
    if IS_B_ROW_MAJOR:  # [BLOCK_N, BLOCK_K] tiles
        b_ptrs = _tile_ptrs(B + k_first, rn_load, rk, stride_b, IS_ALIGNED)
        b_step = BLOCK_K
    else:  # [BLOCK_K, BLOCK_N] tiles
        b_ptrs = _tile_ptrs(B + k_first * stride_b, rk, rn_load, stride_b, IS_ALIGNED)
        b_step = BLOCK_K * stride_b
    # Whole K tiles load without a mask, so they move in vectors and the loop is software-pipelined
    # whatever K is; a K tail (K % BLOCK_K) takes one masked step after the loop.
    k_tiles = k_count // BLOCK_K
    for _ in range(0, k_tiles):
        acc = _mma_step(tl.load(a_ptrs), tl.load(b_ptrs), acc, IS_A_ROW_MAJOR, IS_B_ROW_MAJOR, IS_TF32,
                        IS_B_ACTIVATED, ACTIVATION)
        a_ptrs += a_step
        b_ptrs += b_step
    k_left = k_count - k_tiles * BLOCK_K
    if k_left > 0:
        k_ok = rk < k_left
        a = tl.load(a_ptrs, mask=k_ok[None, :] if IS_A_ROW_MAJOR else k_ok[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[None, :] if IS_B_ROW_MAJOR else k_ok[:, None], other=0.0)
        acc = _mma_step(a, b, acc, IS_A_ROW_MAJOR, IS_B_ROW_MAJOR, IS_TF32, IS_B_ACTIVATED, ACTIVATION)
    return acc


@triton.jit
def _operand_descriptor(X, rows, K, stride, IS_ROW_MAJOR: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """A tensor descriptor (TMA on sm_90) of a [rows, K] operand in its stored orientation: [rows, K]
    blocks of [BLOCK_ROWS, BLOCK_K] when K has the unit stride, else [K, rows] blocks of [BLOCK_K,
    BLOCK_ROWS]. Boxes past the matrix edge read zeros."""
    if IS_ROW_MAJOR:
        desc = tl.make_tensor_descriptor(X, shape=[rows, K], strides=[stride, 1], block_shape=[BLOCK_ROWS, BLOCK_K])
    else:
        desc = tl.make_tensor_descriptor(X, shape=[K, rows], strides=[stride, 1], block_shape=[BLOCK_K, BLOCK_ROWS])
    return desc


@triton.jit
def _accumulate_from_descriptors(a_desc, b_desc, pid_m, pid_n, k_first, k_count, IS_A_ROW_MAJOR: tl.constexpr,
                                 IS_B_ROW_MAJOR: tl.constexpr, IS_TF32: tl.constexpr, IS_B_ACTIVATED: tl.constexpr,
                                 ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_K: tl.constexpr):
    """``_accumulate_from_pointers`` through tensor descriptors: one TMA copy per operand tile into shared
    memory (UTMALDG), no address arithmetic in registers, and no K tail step (the descriptor zero-fills
    past K, and act(0) == 0 for every activation)."""
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, tl.cdiv(k_count, BLOCK_K)):
        k = k_first + i * BLOCK_K
        if IS_A_ROW_MAJOR:
            a = a_desc.load([off_m, k])
        else:
            a = a_desc.load([k, off_m])
        if IS_B_ROW_MAJOR:
            b = b_desc.load([off_n, k])
        else:
            b = b_desc.load([k, off_n])
        acc = _mma_step(a, b, acc, IS_A_ROW_MAJOR, IS_B_ROW_MAJOR, IS_TF32, IS_B_ACTIVATED, ACTIVATION)
    return acc


@triton.jit
def _finish_tile(acc, pid_m, pid_n, pid_k, M, N, stride_c, C, BIAS, RES, Z, COLSUM, HAS_BIAS: tl.constexpr,
                 ACTIVATION: tl.constexpr, HAS_PRE_OUT: tl.constexpr, HAS_ACT_GRAD: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr, HAS_COLSUM: tl.constexpr, IS_B_ACTIVATED: tl.constexpr,
                 IS_ALIGNED: tl.constexpr, IS_SPLIT: tl.constexpr, EPILOGUE_SUBTILES: tl.constexpr):
    """The epilogue of tile (pid_m, pid_n) on its fp32 accumulator, in EPILOGUE_SUBTILES column slices
    (fewer values live at once: the activation and its gradient need several temporaries per element);
    a split-K slice pid_k stores its partial to C + pid_k * M * N."""
    BLOCK_M: tl.constexpr = acc.shape[0]
    BLOCK_N: tl.constexpr = acc.shape[1]
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row0 = pid_m * BLOCK_M
    if IS_SPLIT:
        C += pid_k.to(tl.int64) * M * N
    if EPILOGUE_SUBTILES == 4:
        left, right = _split_columns(acc)
        _epilogue_halves(left, rm, pid_n * BLOCK_N, row0, M, N, stride_c, C, BIAS, RES, Z, COLSUM, HAS_BIAS,
                         ACTIVATION, HAS_PRE_OUT, HAS_ACT_GRAD, HAS_RESIDUAL, HAS_COLSUM, IS_B_ACTIVATED, IS_ALIGNED)
        _epilogue_halves(right, rm, pid_n * BLOCK_N + BLOCK_N // 2, row0, M, N, stride_c, C, BIAS, RES, Z, COLSUM,
                         HAS_BIAS, ACTIVATION, HAS_PRE_OUT, HAS_ACT_GRAD, HAS_RESIDUAL, HAS_COLSUM, IS_B_ACTIVATED,
                         IS_ALIGNED)
    else:
        _epilogue_halves(acc, rm, pid_n * BLOCK_N, row0, M, N, stride_c, C, BIAS, RES, Z, COLSUM, HAS_BIAS,
                         ACTIVATION, HAS_PRE_OUT, HAS_ACT_GRAD, HAS_RESIDUAL, HAS_COLSUM, IS_B_ACTIVATED, IS_ALIGNED)


@runtime.autotune(GEMM_CONFIGS, key=["M_BUCKET", "N", "K_BUCKET", "IS_A_ROW_MAJOR", "IS_B_ROW_MAJOR", "IS_ALIGNED",
                                     "IS_SPLIT"],
                  prune_configs_by={"early_config_prune": _prune})
# Row and reduction counts (M, K, K_PER_SPLIT) are not specialized: the loads carry their own alignment hints
# (IS_ALIGNED) and wrap instead of masking, so a token count that is not a multiple of 16 (a packed text
# batch) reuses the compile of one that is, instead of doubling every product's compiles.
@triton.jit(do_not_specialize=["M", "K", "K_PER_SPLIT"])
def _gemm_kernel(
    A, B, C, BIAS, RES, Z, COLSUM,
    M, N, K, K_PER_SPLIT, stride_a, stride_b, stride_c, M_BUCKET, K_BUCKET,
    IS_A_ROW_MAJOR: tl.constexpr, IS_B_ROW_MAJOR: tl.constexpr, IS_ALIGNED: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_PRE_OUT: tl.constexpr, HAS_ACT_GRAD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_COLSUM: tl.constexpr, IS_TF32: tl.constexpr, IS_B_ACTIVATED: tl.constexpr,
    IS_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SUBTILES: tl.constexpr, IS_PERSISTENT: tl.constexpr,
):
    """A: [M, K], unit stride along K (IS_A_ROW_MAJOR) or M; B: [N, K], unit stride along K (IS_B_ROW_MAJOR,
    nn.Linear layout) or N. C, and Z / RES when used, are [M, N] with row stride stride_c.

    One program per output tile (grid axis 0 = tiles), or, IS_PERSISTENT, a fixed number of programs (one
    per SM) that walk the tiles ``program_id, program_id + programs, ...`` loading through tensor
    descriptors (``_accumulate_from_descriptors``; aligned operands only, see ``gemm``).
    Split-K (IS_SPLIT): program (tile, s) of a grid (tiles, S) sums k in [s * K_PER_SPLIT, (s + 1) *
    K_PER_SPLIT) and writes its fp32 partial to C + s * M * N (C is an [S, M, N] fp32 buffer; no epilogue
    flags). Without it, the grid is (tiles, 1) and K_PER_SPLIT = K.
    M_BUCKET and K_BUCKET only key the autotune cache (powers of two of M and K)."""
    pid_k = tl.program_id(1)
    if IS_PERSISTENT:
        a_desc = _operand_descriptor(A, M, K, stride_a, IS_A_ROW_MAJOR, BLOCK_M, BLOCK_K)
        b_desc = _operand_descriptor(B, N, K, stride_b, IS_B_ROW_MAJOR, BLOCK_N, BLOCK_K)
        k_first = pid_k * K_PER_SPLIT  # 32-bit: descriptor coordinates
        k_count = tl.minimum(K - k_first, K_PER_SPLIT)
        tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=True):
            pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            acc = _accumulate_from_descriptors(a_desc, b_desc, pid_m, pid_n, k_first, k_count, IS_A_ROW_MAJOR,
                                               IS_B_ROW_MAJOR, IS_TF32, IS_B_ACTIVATED, ACTIVATION, BLOCK_M, BLOCK_N,
                                               BLOCK_K)
            _finish_tile(acc, pid_m, pid_n, pid_k, M, N, stride_c, C, BIAS, RES, Z, COLSUM, HAS_BIAS, ACTIVATION,
                         HAS_PRE_OUT, HAS_ACT_GRAD, HAS_RESIDUAL, HAS_COLSUM, IS_B_ACTIVATED, IS_ALIGNED, IS_SPLIT,
                         EPILOGUE_SUBTILES)
    else:
        pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        k_first = pid_k.to(tl.int64) * K_PER_SPLIT
        k_count = tl.minimum(K - k_first, K_PER_SPLIT)
        acc = _accumulate_from_pointers(A, B, pid_m, pid_n, M, N, k_first, k_count, stride_a, stride_b,
                                        IS_A_ROW_MAJOR, IS_B_ROW_MAJOR, IS_ALIGNED, IS_TF32, IS_B_ACTIVATED,
                                        ACTIVATION, BLOCK_M, BLOCK_N, BLOCK_K)
        _finish_tile(acc, pid_m, pid_n, pid_k, M, N, stride_c, C, BIAS, RES, Z, COLSUM, HAS_BIAS, ACTIVATION,
                     HAS_PRE_OUT, HAS_ACT_GRAD, HAS_RESIDUAL, HAS_COLSUM, IS_B_ACTIVATED, IS_ALIGNED, IS_SPLIT,
                     EPILOGUE_SUBTILES)


@triton.jit(do_not_specialize=["S"])  # any row count shares one compile
def _column_sum_kernel(X, OUT, S, R, stride_x, ROWS_PER_PROGRAM, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr):
    """OUT[p, r] = sum of X[s, r] over the rows s of chunk p ([p * ROWS_PER_PROGRAM, (p + 1) * ...)), in
    fp32, in a fixed order (deterministic). Reads X once; one program per (column block, row chunk)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    chunk = tl.program_id(1)
    first = chunk.to(tl.int64) * ROWS_PER_PROGRAM
    last = tl.minimum(first + ROWS_PER_PROGRAM, S)
    acc = tl.zeros((BLOCK_S, BLOCK_R), dtype=tl.float32)
    for s0 in range(first, last, BLOCK_S):
        rows = s0 + tl.arange(0, BLOCK_S)
        ok = (rows < last)[:, None] & (cols < R)[None, :]
        acc += tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + chunk.to(tl.int64) * R + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=cols < R)


@triton.jit
def _activation_kernel(X, DY, OUT, n, ACTIVATION: tl.constexpr, BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    if BACKWARD:
        out = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32) * _activation_grad(x, ACTIVATION)
    else:
        out = _activation(x, ACTIVATION)
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=ok)


ELEMENTWISE_BLOCK = 4096
ELEMENTWISE_WARPS = 8


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _is_tf32(t: torch.Tensor) -> bool:
    """fp32 operands whose products run in TF32 (``runtime.dot_precision``); IS_TF32 is False for fp16/bf16."""
    return t.dtype == torch.float32 and runtime.dot_precision(t.dtype) == "tf32"


def _layout(t: torch.Tensor) -> tuple[torch.Tensor, bool, int]:
    """(matrix, row_major, leading stride) for a 2-D view; copies only a view with no unit stride."""
    if t.stride(1) == 1:
        return t, True, t.stride(0)
    if t.stride(0) == 1:
        return t, False, t.stride(1)
    t = t.contiguous()
    return t, True, t.stride(0)


def _aligned(*operands) -> bool:
    """Whether every (tensor, row_major, stride, wrapped extent) operand moves in 16-byte vectors: base
    and leading stride are 16-byte multiples, and a unit-stride axis that wraps at the matrix edge (the
    M or N axis of a column-major operand) is a multiple of the vector length."""
    for t, row_major, stride, extent in operands:
        vec = 16 // t.element_size()
        if t.data_ptr() % 16 or stride % vec or (not row_major and extent % vec):
            return False
    return True


def _bucket(n: int) -> int:
    """Autotune cache key of a size that varies with the batch: the next power of two, so a new batch
    size re-tunes only when it crosses one."""
    return runtime.next_power_of_2(n)


# Split-K: a product with fewer than SPLIT_K_WAVES x SMs output tiles (of the 128x128 tiles that the
# large shapes tune to) splits K into up to MAX_SPLIT_K slices of at least MIN_K_PER_SPLIT each.
SPLIT_K_WAVES = 2
MAX_SPLIT_K = 16
MIN_K_PER_SPLIT = 2048
SPLIT_K_ALIGN = 64  # slice length multiple: every tile's BLOCK_K divides it
FORCE_SPLIT_K: int | None = None  # tests: force this many slices on every split-eligible product


def split_k_slices(M: int, N: int, K: int, device: torch.device) -> int:
    """How many K slices a product without epilogue runs in (1: no split)."""
    if FORCE_SPLIT_K is not None:
        return max(1, min(FORCE_SPLIT_K, runtime.cdiv(K, SPLIT_K_ALIGN)))
    tiles = runtime.cdiv(M, 128) * runtime.cdiv(N, 128)
    target = SPLIT_K_WAVES * runtime.sm_count(device)
    if tiles >= target:
        return 1
    return max(1, min(MAX_SPLIT_K, runtime.cdiv(target, tiles), K // MIN_K_PER_SPLIT))


COLUMN_SUM_ROWS = 1024  # rows one column-sum program adds up
COLUMN_SUM_BLOCK = (16, 256)  # (rows, columns) loaded per step


@runtime.on_tensor_device
def column_sums(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x.sum(0)`` of a 2-D ``x`` with unit column stride, accumulated in fp32 in a fixed order: chunks of
    COLUMN_SUM_ROWS rows are summed into an fp32 partial, then the partials (a second pass while more
    than one chunk is left). Deterministic, no atomics."""
    S, R = x.shape
    if S == 0 or R == 0:
        return torch.zeros(R, dtype=dtype, device=x.device)
    if x.stride(1) != 1:
        x = x.contiguous()
    while True:
        chunks = runtime.cdiv(S, COLUMN_SUM_ROWS)
        out = runtime.empty((chunks, R), dtype if chunks == 1 else torch.float32, x.device)
        grid = (runtime.cdiv(R, COLUMN_SUM_BLOCK[1]), chunks)
        _column_sum_kernel[grid](x, out, S, R, x.stride(0), COLUMN_SUM_ROWS, BLOCK_S=COLUMN_SUM_BLOCK[0],
                                 BLOCK_R=COLUMN_SUM_BLOCK[1], num_warps=4)
        if chunks == 1:
            return out[0]
        x, S = out, chunks


def _scratch(size: int, alignment: int, stream):
    # called by Triton inside a launch: the launcher's device guard made the tensors' device current
    return torch.empty(size, dtype=torch.int8, device=torch.device("cuda", torch.cuda.current_device()))


def _ensure_descriptor_scratch() -> None:
    """Tensor descriptors built in a kernel live in global scratch memory that Triton asks its allocator
    for at launch (128 bytes per descriptor and program). Triton has none by default; where none is set in
    this thread's context (autograd runs the backward in its own threads), a torch-allocated one is set.
    An allocator the user set is kept."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


@runtime.on_tensor_device
def gemm(a: torch.Tensor, b: torch.Tensor, *, bias=None, activation: str = "none", residual=None,
         save_pre: bool = False, pre=None, colsum: bool = False, activate_b: bool = False, split_k: bool = False):
    """``epilogue(a @ b.T)`` for 2-D views ``a`` [M, K] and ``b`` [N, K] with a unit stride along either
    axis (other views are copied).

    - ``bias`` [N] is added, then ``activation`` applied (``save_pre`` also returns the value before it);
    - ``pre`` [M, N] given (contiguous): the product is multiplied by ``activation'(pre)`` instead (dgrad);
    - ``residual`` [M, N] is added last;
    - ``colsum``: also returns the fp32 column sums of the output ([N], the bias gradient of a dgrad);
    - ``activate_b``: multiply by ``activation(b)`` instead of ``b`` (b holds the pre-activation Z; the
      epilogue then applies no activation).

    ``split_k`` (weight gradients: no epilogue, few output tiles, long K) lets the product run in K slices
    (``split_k_slices``): fp32 partials, then one deterministic sum. Returns ``(c, pre_activation or None,
    column sums or None)``; ``c`` is contiguous in ``a``'s dtype.
    """
    M, K = a.shape
    N = b.shape[0]
    z = runtime.empty((M, N), a.dtype, a.device) if save_pre else None
    if M == 0 or N == 0:
        sums = torch.zeros(N, dtype=torch.float32, device=a.device) if colsum else None
        return runtime.empty((M, N), a.dtype, a.device), z, sums
    # K == 0 (e.g. the weight gradient of an empty batch) runs no loop step and writes the epilogue of 0.
    a, a_row_major, stride_a = _layout(a)
    b, b_row_major, stride_b = _layout(b)
    if residual is not None and residual.stride() != (N, 1):
        residual = residual.contiguous()
    zz = z if z is not None else pre
    if zz is not None:
        assert zz.stride() == (N, 1)
    plain = bias is None and residual is None and zz is None and not colsum
    slices = split_k_slices(M, N, K, a.device) if split_k and plain and K else 1
    per_slice = runtime.cdiv(runtime.cdiv(K, slices), SPLIT_K_ALIGN) * SPLIT_K_ALIGN if slices > 1 else K
    slices = runtime.cdiv(K, per_slice) if K else 1
    c = runtime.empty((slices, M, N) if slices > 1 else (M, N), torch.float32 if slices > 1 else a.dtype, a.device)
    partial = runtime.empty((runtime.cdiv(M, COLSUM_ROWS.value), N), torch.float32, a.device) if colsum else None
    epilogue = [(t, True, N, N) for t in (c, zz, residual) if t is not None]
    aligned = _aligned((a, a_row_major, stride_a, M), (b, b_row_major, stride_b, N), *epilogue)
    tf32 = _is_tf32(a)
    exact_fp32 = a.dtype == torch.float32 and not tf32
    if activate_b and (not aligned or exact_fp32):
        # element-by-element loads, or exact fp32 products (FMA: the operands' register layouts are twice
        # the fp16 ones), leave no registers for act() in the loop (AOT: the exact-fp32 act(B) weight
        # gradients spill 368-6,512 B at every tile, triton 3.8): activate B once
        b = activation_fwd(b.contiguous() if b_row_major else b.t().contiguous(), activation)
        b, activate_b, activation = (b if b_row_major else b.t()), False, "none"

    if a.is_cuda and tma_applies(runtime.device_arch(a.device), aligned):
        _ensure_descriptor_scratch()

    def grid(meta):
        tiles = runtime.cdiv(M, meta["BLOCK_M"]) * runtime.cdiv(N, meta["BLOCK_N"])
        if meta["IS_PERSISTENT"]:  # one program per SM walks the tiles
            tiles = min(tiles, runtime.sm_count(a.device))
        return (tiles, slices)

    _gemm_kernel[grid](
        a, b, c, bias if bias is not None else c, residual if residual is not None else c,
        zz if zz is not None else c, partial if partial is not None else c,
        M, N, K, per_slice, stride_a, stride_b, N, _bucket(M), _bucket(K),
        IS_A_ROW_MAJOR=a_row_major, IS_B_ROW_MAJOR=b_row_major, IS_ALIGNED=aligned,
        HAS_BIAS=bias is not None, ACTIVATION=ACTIVATIONS[activation], HAS_PRE_OUT=save_pre,
        HAS_ACT_GRAD=pre is not None, HAS_RESIDUAL=residual is not None, HAS_COLSUM=colsum,
        IS_TF32=tf32, IS_B_ACTIVATED=activate_b, IS_SPLIT=slices > 1,
    )
    if slices > 1:  # summed in fp32 like every column sum (one compile shared with them), rounded once after
        c = column_sums(c.view(slices, M * N)).view(M, N).to(a.dtype)
    return c, z, column_sums(partial) if colsum else None


def mlp_fwd(x2, w1, b1, w2, b2, residual2, activation: str, save_for_backward: bool):
    """Forward over 2-D ``x2`` [M, D]. Returns ``(y [M, D_out], z [M, hidden] or None)``: the pre-activation
    Z only when a backward will need it; H lives only between the two GEMMs."""
    h, z, _ = gemm(x2, w1, bias=b1, activation=activation, save_pre=save_for_backward)
    y, _, _ = gemm(h, w2, bias=b2, residual=residual2)
    return y, z


def mlp_bwd(dy2, x2, w1, w2, z, activation: str, need_dx: bool, need_fc_grads: bool, need_proj_grads: bool,
            has_b1: bool, has_b2: bool):
    """Backward over 2-D tensors from the saved Z (H = act(Z) is recomputed as the proj weight gradient
    loads its Z tiles). Returns ``(dx, dw1, db1, dw2, db2)``: weight gradients in the weights' dtype, bias
    gradients in fp32, None where not requested."""
    dw2 = db2 = dx = dw1 = db1 = None
    if need_proj_grads:
        dw2, _, _ = gemm(dy2.t(), z.t(), activation=activation, activate_b=True, split_k=True)
        db2 = column_sums(dy2) if has_b2 else None
    if need_dx or need_fc_grads:
        dz, _, db1 = gemm(dy2, w2.t(), activation=activation, pre=z, colsum=need_fc_grads and has_b1)
        if need_fc_grads:
            dw1, _, _ = gemm(dz.t(), x2.t(), split_k=True)
        if need_dx:
            dx, _, _ = gemm(dz, w1.t())
    return dx, dw1, db1, dw2, db2


@runtime.on_tensor_device
def activation_fwd(x: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(x)`` elementwise; ``x`` contiguous."""
    out = runtime.empty(x.shape, x.dtype, x.device)
    n = x.numel()
    if n:
        _activation_kernel[(runtime.cdiv(n, ELEMENTWISE_BLOCK),)](
            x, x, out, n, ACTIVATION=ACTIVATIONS[activation], BACKWARD=False, BLOCK=ELEMENTWISE_BLOCK,
            num_warps=ELEMENTWISE_WARPS)
    return out


@runtime.on_tensor_device
def activation_bwd(dy: torch.Tensor, x: torch.Tensor, activation: str) -> torch.Tensor:
    """``dy * act'(x)`` elementwise; ``dy`` and ``x`` contiguous, same shape."""
    dx = runtime.empty(x.shape, x.dtype, x.device)
    n = x.numel()
    if n:
        _activation_kernel[(runtime.cdiv(n, ELEMENTWISE_BLOCK),)](
            x, dy, dx, n, ACTIVATION=ACTIVATIONS[activation], BACKWARD=True, BLOCK=ELEMENTWISE_BLOCK,
            num_warps=ELEMENTWISE_WARPS)
    return dx


# ---------------------------------------------------------------------------------------------
# AOT cases
# ---------------------------------------------------------------------------------------------

_GEMM_SIGNATURE = {
    "A": "*{dtype}", "B": "*{dtype}", "C": "*{dtype}", "BIAS": "*{dtype}", "RES": "*{dtype}", "Z": "*{dtype}",
    "COLSUM": "*fp32", "M": "i32", "N": "i32", "K": "i32", "K_PER_SPLIT": "i32", "stride_a": "i32", "stride_b": "i32",
    "stride_c": "i32", "M_BUCKET": "i32", "K_BUCKET": "i32",
}
# Integers the JIT sees as multiples of 16 at CLIP shapes (widths 512-1280 and 4x, their strides, the
# split length, the power-of-two buckets); M (batch x tokens, e.g. 256 x 197) and K of the wgrad GEMMs
# (tokens) are not. Pointers are 16-byte aligned (torch allocations).
_GEMM_DIVISIBLE = ("A", "B", "C", "BIAS", "RES", "Z", "COLSUM", "N", "stride_a", "stride_b", "stride_c",
                   "M_BUCKET", "K_BUCKET")  # M, K, K_PER_SPLIT are never specialized (_gemm_kernel)
_FWD_DIVISIBLE = _GEMM_DIVISIBLE

_NO_EPILOGUE = {"HAS_BIAS": False, "ACTIVATION": 0, "HAS_PRE_OUT": False, "HAS_ACT_GRAD": False, "HAS_RESIDUAL": False,
                "HAS_COLSUM": False, "IS_TF32": False, "IS_B_ACTIVATED": False, "IS_SPLIT": False}

# The products of the MLP (see the table at the top) with the operand layouts they run with.
_FWD = {"IS_A_ROW_MAJOR": True, "IS_B_ROW_MAJOR": True}
_DGRAD = {"IS_A_ROW_MAJOR": True, "IS_B_ROW_MAJOR": False}
_WGRAD = {"IS_A_ROW_MAJOR": False, "IS_B_ROW_MAJOR": False}
_GEMM_VARIANTS = {
    "fc_fwd_quick_gelu": {**_FWD, "HAS_BIAS": True, "ACTIVATION": 1, "HAS_PRE_OUT": True},
    "fc_fwd_gelu": {**_FWD, "HAS_BIAS": True, "ACTIVATION": 2, "HAS_PRE_OUT": True},
    "fc_fwd_gelu_tanh": {**_FWD, "HAS_BIAS": True, "ACTIVATION": 3, "HAS_PRE_OUT": True},
    "proj_fwd_residual": {**_FWD, "HAS_BIAS": True, "HAS_RESIDUAL": True},
    "dgrad_quick_gelu": {**_DGRAD, "ACTIVATION": 1, "HAS_ACT_GRAD": True, "HAS_COLSUM": True},
    "dgrad_gelu": {**_DGRAD, "ACTIVATION": 2, "HAS_ACT_GRAD": True, "HAS_COLSUM": True},
    "dgrad_gelu_tanh": {**_DGRAD, "ACTIVATION": 3, "HAS_ACT_GRAD": True, "HAS_COLSUM": True},
    "dgrad_input": {**_DGRAD},
    "wgrad": {**_WGRAD},
    "wgrad_quick_gelu_b": {**_WGRAD, "ACTIVATION": 1, "IS_B_ACTIVATED": True},
    "wgrad_gelu_b": {**_WGRAD, "ACTIVATION": 2, "IS_B_ACTIVATED": True},
    "wgrad_gelu_tanh_b": {**_WGRAD, "ACTIVATION": 3, "IS_B_ACTIVATED": True},
    # split-K weight gradients write fp32 partials
    "wgrad_split": {**_WGRAD, "IS_SPLIT": True, "_C": "*fp32"},
    "wgrad_quick_gelu_b_split": {**_WGRAD, "ACTIVATION": 1, "IS_B_ACTIVATED": True, "IS_SPLIT": True, "_C": "*fp32"},
}
_QUICK_VARIANTS = ("fc_fwd_quick_gelu", "proj_fwd_residual", "dgrad_quick_gelu", "wgrad_quick_gelu_b_split")


def gemm_aot_case(variant: str, config: triton.Config, aligned: bool = True, quick: bool = False,
                  archs: tuple[int, ...] | None = None, precision: str = "half") -> runtime.AotCase:
    """The AOT case of one MLP product (``_GEMM_VARIANTS``) at one tile config, for ``archs`` (sm numbers;
    None: every one), with operands of ``precision``: "half" (fp16 and bf16, tensor cores), "fp32" (exact
    fp32 products, as eager: FMA, no tensor cores) or "tf32" (fp32 operands with TF32 enabled: tensor cores).
    The persistent variant's cases are named ``..._tma`` and must show TMA loads; the fp32 ones ``..._fp32``
    / ``..._tf32``. The case carries the tile's ``shared_estimate`` for its product, which the compiled
    kernel must not exceed."""
    flags = dict(_GEMM_VARIANTS[variant])
    signature = {**_GEMM_SIGNATURE, "C": flags.pop("_C", _GEMM_SIGNATURE["C"])}
    constexprs = {**_NO_EPILOGUE, **flags, "IS_ALIGNED": aligned, **config.kwargs, "IS_TF32": precision == "tf32"}
    divisible = (_GEMM_DIVISIBLE if not flags["IS_A_ROW_MAJOR"] else _FWD_DIVISIBLE) if aligned else ()
    persistent = bool(config.kwargs.get("IS_PERSISTENT"))
    kinds = _product_kinds(constexprs) | ({"fp32"} if precision != "half" else set())
    return runtime.AotCase(
        name=(f"mlp_gemm_{variant}{'' if aligned else '_unaligned'}{'_tma' if persistent else ''}"
              f"{'' if precision == 'half' else '_' + precision}"),
        kernel=runtime.jit_function(_gemm_kernel), signature=signature, constexprs=constexprs,
        num_warps=config.num_warps, num_stages=config.num_stages, expects_mma=precision != "fp32",
        expects_tma=persistent, dtypes=("fp16", "bf16") if precision == "half" else ("fp32",), quick=quick,
        divisible_by_16=divisible, archs=archs, shared_estimate=_tile(config).shared_estimate(kinds))


AOT_ARCHS = (80, 90)


def aot_cases() -> list[runtime.AotCase]:
    """Every MLP product at every tile it is offered (``_prune``) on each architecture on aligned operands
    (CLIP widths), and on unaligned operands at the tiles they are tuned over, in fp16/bf16 and, at the
    tiles offered to fp32 operands, in fp32 (exact and TF32; exact fp32 has no act(B) weight gradient: the
    launcher activates B first); the column-sum kernel; the activation kernel.
    The quick subset (fp16/bf16): the first tile of a few products, and the first persistent tile of the
    first of them."""
    cases = []
    for precision in ("half", "fp32", "tf32"):
        # the operand dtype the offer rules see (``_product_kinds``)
        operand = {"A": torch.empty(0, dtype=torch.float16 if precision == "half" else torch.float32)}
        for variant, flags in _GEMM_VARIANTS.items():
            for aligned in (True, False):
                if not aligned and ("split" in variant or flags.get("IS_B_ACTIVATED")):
                    continue  # split-K runs aligned tiles only in the AOT set; unaligned act(B) is activated first
                if precision == "fp32" and flags.get("IS_B_ACTIVATED"):
                    continue  # exact fp32 act(B) is activated first too (``gemm``): the plain wgrad runs
                archs_of: dict[tuple, list[int]] = {}
                for arch in AOT_ARCHS:
                    args = {**_NO_EPILOGUE, **flags, "IS_ALIGNED": aligned, **operand}
                    for cfg in _prune(_gemm_kernel.shipped_configs, args, arch=arch):
                        archs_of.setdefault(_tile(cfg).key, []).append(arch)
                first_persistent = True
                for i, cfg in enumerate(c for c in _gemm_kernel.shipped_configs if _tile(c).key in archs_of):
                    archs = tuple(archs_of[_tile(cfg).key])
                    quick = precision == "half" and aligned and (
                        variant in _QUICK_VARIANTS and i == 0
                        or variant == _QUICK_VARIANTS[0] and _tile(cfg).persistent and first_persistent)
                    first_persistent = first_persistent and not _tile(cfg).persistent
                    cases.append(gemm_aot_case(variant, cfg, aligned, quick=quick,
                                               archs=None if archs == AOT_ARCHS else archs, precision=precision))
    for out in ("fp32", "{dtype}"):
        cases.append(runtime.AotCase(
            name=f"mlp_column_sum_to_{'fp32' if out == 'fp32' else 'dtype'}", kernel=_column_sum_kernel,
            signature={"X": "*fp32" if out != "fp32" else "*{dtype}", "OUT": f"*{out}", "S": "i32", "R": "i32",
                       "stride_x": "i32", "ROWS_PER_PROGRAM": "i32"},
            constexprs={"BLOCK_S": COLUMN_SUM_BLOCK[0], "BLOCK_R": COLUMN_SUM_BLOCK[1]}, num_warps=4, quick=True))
    for backward in (False, True):
        cases.append(runtime.AotCase(
            name=f"quick_gelu_{'bwd' if backward else 'fwd'}", kernel=_activation_kernel,
            signature={"X": "*{dtype}", "DY": "*{dtype}", "OUT": "*{dtype}", "n": "i32"},
            constexprs={"ACTIVATION": 1, "BACKWARD": backward, "BLOCK": ELEMENTWISE_BLOCK},
            num_warps=ELEMENTWISE_WARPS, quick=True,
        ))
    return cases
