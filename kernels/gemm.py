"""The GEMM engine: ``acc = A @ op(B).T`` tile by tile over strided views, the tiles it is offered by, and the
launch planning around it (operand layouts, split-K, the persistent TMA variant). ``kernels/mlp.py`` builds the
MLP's kernel from these pieces and its own epilogues (bias, activation, residual, column sums).

Operands: A [M, K] and B [N, K] (``nn.Linear`` layout) with a unit stride along either axis (``_layout``), so
every product of the MLP (forward, dgrad over transposed weights, wgrad over transposed activations) runs over
views without a transposed copy. Each program computes one [BLOCK_M, BLOCK_N] tile with an fp32 accumulator,
walking K in BLOCK_K steps (``tl.dot`` on tensor cores: HMMA on sm_80, HGMMA on sm_90); programs are ordered
in groups of GROUP_M tile rows (``_tile_coords``), so the B tiles a group reads stay in L2 while the group
sweeps N. Operand tiles are loaded in the orientation that puts their unit stride last (``_tile_ptrs``), with
16-byte vector hints where the launcher found them aligned (``_aligned``: IS_ALIGNED). B tiles may pass
through an elementwise function of the caller as they load (``_mma_step``: the MLP's act(Z) in the weight
gradient). fp32 operands take ``runtime.dot_precision`` (IS_TF32).

Memory traffic: A and B are read once per tile row / column (the grouping keeps the re-reads in L2), the
output written once by the caller's epilogue.

Main loops
----------
``_accumulate_from_pointers``: pointer loads, whole K tiles unmasked (vectorized, software-pipelined:
cp.async / LDGSTS) and one masked step for a K tail; rows and columns past the edge load wrapped (valid)
addresses and are never stored. ``_accumulate_from_descriptors``: the persistent variant's loads through
tensor descriptors built in the kernel (``_operand_descriptor``, ``tl.make_tensor_descriptor``), which sm_90
executes as TMA copies (UTMALDG) straight into shared memory: no per-element address arithmetic or cp.async
bookkeeping in registers, and no K-tail step (boxes past an edge read zeros).

Split-K
-------
The weight gradients have small outputs and a long K (ViT-B/16 at batch 256: 768 x 3072 outputs, K =
50432 tokens: 144 tiles of 128x128 for 132 SMs, 1.1 waves). When a product without epilogue has fewer output
tiles than ``SPLIT_K_WAVES`` x SMs, it runs as S programs per tile over K slices (``split_k_slices``: grid axis
1), each writing an fp32 partial [M, N] that the caller adds up in a fixed order (one extra read/write of
S x M x N fp32, ~1% of the GEMM's operand traffic at that shape). No atomics, so the result does not depend
on scheduling.

Persistent TMA variant (sm_90+)
-------------------------------
Tiles marked ``persistent`` run the kernel with IS_PERSISTENT: one program per SM walks the output tiles in
the same grouped order (tile t, t + programs, ...), loading through tensor descriptors. The autotuner is
offered these tiles only where ``tma_applies``: sm_90 or newer, operands the launcher found 16-byte aligned
(TMA needs 16-byte base addresses and row strides: CLIP widths always are; any token count is fine), and a
triton with in-kernel descriptors; and to fp16/bf16 operands only (``Tile.dtypes``). Memory traffic is that of
the pointer variant; what changes is the issue cost of the loads, and one wave of programs instead of
several. Descriptors built in a kernel live in global scratch that Triton allocates per launch (128 bytes per
descriptor and program, ``_ensure_descriptor_scratch``).

The Triton interpreter (3.6 and 3.8) runs tensor descriptors, including TMA's checks (16-byte strides) and its
zero fill past the edges, so the tests run this variant end to end on CPU (``forced_config``); what only a
compile shows (UTMALDG in the SASS, registers, spills) is checked by ``clipfast aot``, and the speed only on a
GPU.

Indexing is 64-bit wherever index products can pass 2**31 (row x stride in loads, the K-slice offsets), so one
launch covers any output size. Tensor-descriptor coordinates are 32-bit (as TMA takes them; every dimension is
below 2**31).
"""
from __future__ import annotations

import enum

import torch
import triton
import triton.language as tl

from . import runtime
from .tiles import ANY_DTYPE, BEFORE_3_8, FROM_3_8, HALF, Launch, Tile, TileTable


# ---------------------------------------------------------------------------------------------
# Tiles and the rules that offer them
# ---------------------------------------------------------------------------------------------

class Product(enum.Flag):
    """The kinds of GEMM launch the tiles are offered by: one typed value per launch, read from its flags by
    ``kernels/mlp.py``'s ``_product_kinds`` (for the launcher's pruning and the AOT cases alike); a tile's
    ``avoid`` names those the AOT check measured it spilling in."""

    HEAVY_ACTIVATION = enum.auto()  # erf / tanh GELU epilogue (fc forward)
    ACTIVATED_B = enum.auto()  # act() on the [BLOCK_K, BLOCK_N] B tiles in registers as they load (proj wgrad)
    ACT_GRAD = enum.auto()  # act'(Z) from the loaded Z times the product, and the column sums (dgrad)
    RESIDUAL = enum.auto()  # the residual epilogue (proj forward)
    SPLIT_K = enum.auto()  # split-K weight gradients storing fp32 partials
    FP32 = enum.auto()  # fp32 operands (exact or TF32 products)
    UNALIGNED = enum.auto()  # operands that load element by element (not in 16-byte vectors)


NO_PRODUCT = Product(0)
# Tile rows a group of programs sweeps the tile columns with (``_tile_coords``): the same for every tile.
GROUP_M: tl.constexpr = tl.constexpr(8)


def _gemm_tile(block_m: int, block_n: int, block_k: int, warps: int, stages: int, *, subtiles: int = 2,
               persistent: bool = False, unaligned: bool = False, avoid: Product = NO_PRODUCT,
               dtypes: tuple[str, ...] = ANY_DTYPE, **where) -> Tile:
    """A GEMM row. ``subtiles`` (2 or 4) column slices of the accumulator are finished one after the other, so
    the epilogue's fp32 temporaries cover a half or a quarter of it; ``persistent``: the persistent
    tensor-descriptor (TMA) variant, offered only where ``tma_applies``; ``unaligned``: offered to operands that
    load element by element too (more registers per value); ``where``: ``archs`` / ``tritons``."""
    meta = (("EPILOGUE_SUBTILES", subtiles), ("IS_PERSISTENT", persistent))
    return Tile(block_m, block_n, block_k, warps, stages, meta=meta, dtypes=dtypes,
                avoid=avoid if unaligned else avoid | Product.UNALIGNED, **where)


def is_persistent(tile: Tile) -> bool:
    return bool(tile.param("IS_PERSISTENT"))


def _shared_estimate(tile: Tile, launch: Launch) -> int:
    """Bytes of shared memory a tile is offered by (an upper bound, see ``runtime.gemm_shared_estimate``):
    ``stages`` buffers of the A and B tiles, 4-byte elements for fp32 operands and 2-byte otherwise, plus one
    [block_m, block_n / EPILOGUE_SUBTILES] slice of the output (fp32 partials for split-K) that the epilogue
    stages. Measured (triton 3.8, sm_90): the persistent tiles use the stages plus that slice (128x256x64:
    163,864 B in fp16, 327,704 B in fp32), the pointer tiles the stages alone (294,912 B for 128x256x64 in
    fp32); sm_80 keeps one stage fewer (98,304 B for 128x256x64 in fp16)."""
    size = runtime.ELEMENT_SIZE[launch.dtype]
    out = runtime.ELEMENT_SIZE["fp32"] if launch.kinds is not None and Product.SPLIT_K in launch.kinds else size
    epilogue = tile.block_m * (tile.block_n // tile.param("EPILOGUE_SUBTILES")) * out
    return runtime.gemm_shared_estimate(tile.block_m, tile.block_n, tile.block_k, tile.stages, size, epilogue)


def _needs_tma(tile: Tile, launch: Launch) -> str | None:
    """The GEMM's own rule: the persistent variant only where ``tma_applies``."""
    if is_persistent(tile) and not tma_applies(launch.arch, Product.UNALIGNED not in launch.kinds):
        return "the persistent TMA variant needs sm_90 or newer, aligned operands and tensor descriptors"
    return None


# Shipped tiles (rows for one Triton version share the config of the other's). The first is what the
# interpreter runs (large tiles keep it fast) and a good default on both architectures. Every entry compiles
# without spills, software-pipelined, with tensor cores for fp16/bf16 on sm_80 and sm_90, for every product it
# is offered to (``aot_cases`` in ``kernels/mlp.py``); the Hopper tiles (128x256 and 256x128 at 8 warps) fit by
# finishing the accumulator in quarters.
_ACT_B, _SPLIT = Product.ACTIVATED_B, Product.SPLIT_K
TILES = TileTable((
    # measured spills where avoided (bf16, sm_80 / sm_90, triton 3.6 / 3.8): 16 B on sm_80 (128x128x64),
    # 80-1100 B (128x256; 8 B for its split-K fp32 stores on sm_80), 180-1000 B on sm_80 (256x128).
    _gemm_tile(128, 128, 32, 8, 4),
    _gemm_tile(128, 128, 64, 8, 3, avoid=_ACT_B),
    # 128x256 on sm_80 under triton < 3.8: 255 registers and 8 B spilled for the plain dgrad (dX = dY W):
    # Hopper only there.
    _gemm_tile(128, 256, 64, 8, 3, subtiles=4, avoid=_ACT_B | _SPLIT, tritons=FROM_3_8),
    _gemm_tile(128, 256, 64, 8, 3, subtiles=4, avoid=_ACT_B | _SPLIT, archs=(9,), tritons=BEFORE_3_8),
    # 256x128's split-K fp32 partial stores spill 16 B on sm_80 under triton 3.8: not offered to split-K.
    _gemm_tile(256, 128, 64, 8, 3, subtiles=4, avoid=_ACT_B | _SPLIT),
    # The two 4-warp tiles spill 8-48 B with exact fp32 operands on sm_80 under triton 3.6 (fc forward,
    # residual proj forward, plain and split-K weight gradients): fp16/bf16 only there.
    _gemm_tile(64, 128, 32, 4, 4, tritons=FROM_3_8),
    _gemm_tile(64, 128, 32, 4, 4, dtypes=HALF, tritons=BEFORE_3_8),
    # 128x64x32 spills 16-24 B on sm_80 under triton 3.6 for act(B) with the tanh GELU (as before the
    # persistent variant was added: 168 registers either way), so it is not offered to act(B).
    _gemm_tile(128, 64, 32, 4, 4, avoid=_ACT_B, tritons=FROM_3_8),
    _gemm_tile(128, 64, 32, 4, 4, avoid=_ACT_B, dtypes=HALF, tritons=BEFORE_3_8),
    _gemm_tile(64, 64, 32, 4, 4, unaligned=True),
    # One warpgroup on 128x128 (sm_90, fp16/bf16, triton 3.6 and 3.8): 218-237 registers and no spills for
    # the fc forward (every activation), the residual proj forward, dx and the plain / split-K weight
    # gradients, 96 KB of shared memory at 3 stages (8 warps per SM); the dgrad epilogue (act'(Z), column
    # sums) spills 8-300 B and act(B) 8-120 B at 255 registers. On sm_80 it needs 255 registers with every
    # epilogue and spills 8-16 B in the fc forward and residual epilogues under triton 3.6: Hopper only. With
    # fp32 operands it spills 584-1288 B (exact) and 104-808 B (TF32) at 255 registers (triton 3.8): fp16/bf16.
    _gemm_tile(128, 128, 64, 4, 3, avoid=Product.ACT_GRAD | _ACT_B, dtypes=HALF, archs=(9,)),
    # Persistent, tensor descriptors (TMA), sm_90+ and aligned operands only (``tma_applies``): no spills
    # for any product on sm_90 under triton 3.6 and 3.8 (100-255 registers, 128-180 KB of shared memory,
    # one 8-warp program per SM). fp16/bf16 only: with fp32 operands they do not fit sm_90's 227 KB of shared
    # memory (``_shared_estimate``; compiled: 256-320 KB), and the exact-fp32 dgrad spills 27 KB (triton 3.8).
    _gemm_tile(128, 256, 64, 8, 3, subtiles=4, persistent=True, dtypes=HALF),
    _gemm_tile(128, 128, 64, 8, 4, persistent=True, dtypes=HALF),
), estimate=_shared_estimate, rule=_needs_tma)
GEMM_CONFIGS = TILES.configs()

# Tensor descriptors built in the kernel (``tl.make_tensor_descriptor``): triton 3.6 and later have them.
HAS_TENSOR_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor")


def _tile(config: triton.Config) -> Tile:
    """The shipped row of a config of ``GEMM_CONFIGS``."""
    return TILES.tile_of(config)


def tma_applies(arch: int, aligned: bool) -> bool:
    """Whether the persistent TMA variant can run: sm_90 or newer (``arch`` = 10 x major + minor), operands
    that the launcher found 16-byte aligned (TMA needs 16-byte base addresses and row strides), and a
    triton with in-kernel tensor descriptors."""
    return arch >= 90 and aligned and HAS_TENSOR_DESCRIPTORS


def launch(kinds: Product, aligned: bool, arch: int) -> Launch:
    """The offer rules' view of a product of ``kinds`` on operands that are ``aligned`` or not, on ``arch``
    (10 x major + minor; 0: unknown, e.g. the interpreter)."""
    return Launch(arch, "fp32" if Product.FP32 in kinds else "fp16", kinds if aligned else kinds | Product.UNALIGNED)


def shared_estimate(tile: Tile, kinds: Product = NO_PRODUCT) -> int:
    """``_shared_estimate`` of ``tile`` for a product of ``kinds``."""
    return _shared_estimate(tile, launch(kinds, True, 0))


def why_not_offered(tile: Tile, kinds: Product, aligned: bool, arch: int) -> str | None:
    """Why ``tile`` is not offered to a product of ``kinds`` on operands that are ``aligned`` or not, on
    ``arch``, or None where it is (``TileTable.why_not_offered``: a row for another Triton version, the
    persistent TMA variant where that cannot run, another operand dtype or GPU generation, a kind it avoids
    (unaligned operands included), or a ``_shared_estimate`` over the architecture's shared memory per block)."""
    return TILES.why_not_offered(tile, launch(kinds, aligned, arch))


def offered(tile: Tile, kinds: Product, aligned: bool, arch: int) -> bool:
    """Whether ``tile`` is offered to a product of ``kinds`` on operands that are ``aligned`` or not, on
    ``arch`` (see ``why_not_offered``)."""
    return why_not_offered(tile, kinds, aligned, arch) is None


# ---------------------------------------------------------------------------------------------
# Main loops
# ---------------------------------------------------------------------------------------------

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
              IS_B_ACTIVATED: tl.constexpr, ACTIVATE: tl.constexpr, ACTIVATION: tl.constexpr):
    """acc += A_tile @ act(B_tile).T on tensor cores (a, b as loaded, see ``_tile_ptrs``; with IS_B_ACTIVATED,
    act = ``ACTIVATE(x, ACTIVATION)``, the caller's ``@triton.jit`` elementwise function, applied in fp32 and
    rounded back to B's dtype)."""
    if IS_B_ACTIVATED:
        b = ACTIVATE(b.to(tl.float32), ACTIVATION).to(b.dtype)
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
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
                              IS_TF32: tl.constexpr, IS_B_ACTIVATED: tl.constexpr, ACTIVATE: tl.constexpr,
                              ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr):
    """The fp32 [BLOCK_M, BLOCK_N] product of one tile over k in [k_first, k_first + k_count), loading
    through pointers (cp.async pipelines, LDGSTS); B tiles activated as ``_mma_step`` says."""
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
                        IS_B_ACTIVATED, ACTIVATE, ACTIVATION)
        a_ptrs += a_step
        b_ptrs += b_step
    k_left = k_count - k_tiles * BLOCK_K
    if k_left > 0:
        k_ok = rk < k_left
        a = tl.load(a_ptrs, mask=k_ok[None, :] if IS_A_ROW_MAJOR else k_ok[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[None, :] if IS_B_ROW_MAJOR else k_ok[:, None], other=0.0)
        acc = _mma_step(a, b, acc, IS_A_ROW_MAJOR, IS_B_ROW_MAJOR, IS_TF32, IS_B_ACTIVATED, ACTIVATE, ACTIVATION)
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
                                 ACTIVATE: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
        acc = _mma_step(a, b, acc, IS_A_ROW_MAJOR, IS_B_ROW_MAJOR, IS_TF32, IS_B_ACTIVATED, ACTIVATE, ACTIVATION)
    return acc

# ---------------------------------------------------------------------------------------------
# Launch planning
# ---------------------------------------------------------------------------------------------

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
