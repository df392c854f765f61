"""Fused MLP: the MLP's GEMM kernel (the engine of ``kernels/gemm.py`` with constexpr epilogues), plus the
standalone activation kernel.

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

``_gemm_kernel`` runs the engine's main loop (``kernels/gemm.py``: tiles in grouped order, pointer or TMA
loads, split-K slices, the persistent variant; its tiles and offer rules) and finishes each tile with this
file's epilogue (``_finish_tile``: bias, activation or its gradient, residual, Z, column sums, split-K
partials), in EPILOGUE_SUBTILES column slices. The launcher (``gemm``) picks the epilogue flags, the operand
layouts and the split, and sums split-K partials with ``column_sums``.

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

Activation kernel
-----------------
``quick_gelu`` (and the other activations) elementwise, forward ``act(x)`` and backward
``dy * act'(x)`` computed in fp32 from the input: one read and one write per element (two reads in
the backward), the minimum.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import runtime
from .gemm import (GEMM_CONFIGS, SPLIT_K_ALIGN, TILES, Product, _accumulate_from_descriptors,  # noqa: F401
                   _accumulate_from_pointers, _aligned, _bucket, _ensure_descriptor_scratch, _layout,
                   _operand_descriptor, _tile, _tile_coords, _tile_ptrs, is_persistent, launch, offered,
                   shared_estimate, split_k_slices, tma_applies, why_not_offered)

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
def _epilogue(acc, rm, rn, row0, M, N, stride_c, C, BIAS, AUX, COLSUM, HAS_BIAS: tl.constexpr,
              ACTIVATION: tl.constexpr, HAS_PRE_OUT: tl.constexpr, HAS_ACT_GRAD: tl.constexpr,
              HAS_RESIDUAL: tl.constexpr, HAS_COLSUM: tl.constexpr, IS_B_ACTIVATED: tl.constexpr,
              IS_ALIGNED: tl.constexpr):
    """Bias, activation (or the activation gradient from the saved Z), residual, the store, and the
    column sums of the stored values, for the rows rm (int64) and columns rn of the output. AUX is the
    epilogue's one [M, N] operand: the pre-activation Z stored (HAS_PRE_OUT) or read (HAS_ACT_GRAD), or the
    residual (HAS_RESIDUAL); C and AUX share one layout (row stride stride_c).

    The activation is applied to the pre-activation rounded to the output dtype, the Z the backward sees:
    the H this forward uses and the H the weight gradient recomputes from Z are then the same values.
    Column sums (HAS_COLSUM, the bias gradient db1 = sum_m dZ) go to COLSUM[row // COLSUM_ROWS, column],
    one fp32 row per COLSUM_ROWS output rows (every BLOCK_M is a multiple), summed by the launcher."""
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if HAS_PRE_OUT:
        tl.store(_tile_ptrs(AUX, rm, rn, stride_c, IS_ALIGNED), acc.to(AUX.dtype.element_ty), mask=mask)
    if HAS_ACT_GRAD:
        z = tl.load(_tile_ptrs(AUX, rm, rn, stride_c, IS_ALIGNED), mask=mask, other=0.0).to(tl.float32)
        acc *= _activation_grad(z, ACTIVATION)
    elif ACTIVATION != 0 and not IS_B_ACTIVATED:
        acc = _activation(acc.to(C.dtype.element_ty).to(tl.float32), ACTIVATION)
    if HAS_RESIDUAL:
        acc += tl.load(_tile_ptrs(AUX, rm, rn, stride_c, IS_ALIGNED), mask=mask, other=0.0).to(tl.float32)
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
def _epilogue_halves(acc, rm, rn0, row0, M, N, stride_c, C, BIAS, AUX, COLSUM, HAS_BIAS: tl.constexpr,
                     ACTIVATION: tl.constexpr, HAS_PRE_OUT: tl.constexpr, HAS_ACT_GRAD: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr, HAS_COLSUM: tl.constexpr, IS_B_ACTIVATED: tl.constexpr,
                     IS_ALIGNED: tl.constexpr):
    """The epilogue over the two column halves of ``acc`` (columns rn0 + [0, BN)), one after the other."""
    HALF: tl.constexpr = acc.shape[1] // 2
    lo, hi = _split_columns(acc)
    rn = rn0 + tl.arange(0, HALF)
    _epilogue(lo, rm, rn, row0, M, N, stride_c, C, BIAS, AUX, COLSUM, HAS_BIAS, ACTIVATION, HAS_PRE_OUT,
              HAS_ACT_GRAD, HAS_RESIDUAL, HAS_COLSUM, IS_B_ACTIVATED, IS_ALIGNED)
    _epilogue(hi, rm, rn + HALF, row0, M, N, stride_c, C, BIAS, AUX, COLSUM, HAS_BIAS, ACTIVATION, HAS_PRE_OUT,
              HAS_ACT_GRAD, HAS_RESIDUAL, HAS_COLSUM, IS_B_ACTIVATED, IS_ALIGNED)


# Rows of output summed into one fp32 partial row by the column-sum epilogue (the smallest BLOCK_M).
COLSUM_ROWS: tl.constexpr = tl.constexpr(64)


_HEAVY_ACTIVATIONS = (2, 3)  # erf and tanh GELU

def _product_kinds(args: dict) -> Product:
    """The kinds of product (``gemm.Product``) a launch of ``_gemm_kernel`` makes, from its constexpr flags and
    operand dtype (alignment is IS_ALIGNED, apart)."""
    kinds = Product(0)
    if args.get("IS_B_ACTIVATED", False):
        kinds |= Product.ACTIVATED_B
    elif args.get("ACTIVATION", 0) in _HEAVY_ACTIVATIONS:
        kinds |= Product.HEAVY_ACTIVATION
    if args.get("HAS_ACT_GRAD", False):
        kinds |= Product.ACT_GRAD
    if args.get("HAS_RESIDUAL", False):
        kinds |= Product.RESIDUAL
    if args.get("IS_SPLIT", False):
        kinds |= Product.SPLIT_K
    if any(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in (args.get("A"), args.get("B"))):
        kinds |= Product.FP32
    return kinds


def _prune(configs, named_args, arch: int | None = None, **kwargs):
    """The configs offered to one launch (``gemm.TILES.offered``): its product kinds, operand alignment and
    device (``arch`` overrides the device, for the AOT cases); where none is (a GPU whose shared memory fits
    no tile of these operands), the smallest by shared memory that can take it."""
    args = {**named_args, **kwargs}
    arch = runtime.launch_arch(named_args, "A") if arch is None else arch
    return TILES.prune(configs, launch(_product_kinds(args), args.get("IS_ALIGNED", True), arch))


@triton.jit
def _finish_tile(acc, pid_m, pid_n, pid_k, M, N, stride_c, C, BIAS, AUX, COLSUM, HAS_BIAS: tl.constexpr,
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
        _epilogue_halves(left, rm, pid_n * BLOCK_N, row0, M, N, stride_c, C, BIAS, AUX, COLSUM, HAS_BIAS,
                         ACTIVATION, HAS_PRE_OUT, HAS_ACT_GRAD, HAS_RESIDUAL, HAS_COLSUM, IS_B_ACTIVATED, IS_ALIGNED)
        _epilogue_halves(right, rm, pid_n * BLOCK_N + BLOCK_N // 2, row0, M, N, stride_c, C, BIAS, AUX, COLSUM,
                         HAS_BIAS, ACTIVATION, HAS_PRE_OUT, HAS_ACT_GRAD, HAS_RESIDUAL, HAS_COLSUM, IS_B_ACTIVATED,
                         IS_ALIGNED)
    else:
        _epilogue_halves(acc, rm, pid_n * BLOCK_N, row0, M, N, stride_c, C, BIAS, AUX, COLSUM, HAS_BIAS,
                         ACTIVATION, HAS_PRE_OUT, HAS_ACT_GRAD, HAS_RESIDUAL, HAS_COLSUM, IS_B_ACTIVATED, IS_ALIGNED)


@runtime.autotune(GEMM_CONFIGS, key=["M_BUCKET", "N", "K_BUCKET", "IS_A_ROW_MAJOR", "IS_B_ROW_MAJOR", "IS_ALIGNED",
                                     "IS_SPLIT"],
                  prune_configs_by={"early_config_prune": _prune})
# Row and reduction counts (M, K, K_PER_SPLIT) are not specialized: the loads carry their own alignment hints
# (IS_ALIGNED) and wrap instead of masking, so a token count that is not a multiple of 16 (a packed text
# batch) reuses the compile of one that is, instead of doubling every product's compiles.
@triton.jit(do_not_specialize=["M", "K", "K_PER_SPLIT"])
def _gemm_kernel(
    A, B, C, BIAS, AUX, COLSUM,
    M, N, K, K_PER_SPLIT, stride_a, stride_b, stride_c, M_BUCKET, K_BUCKET,
    IS_A_ROW_MAJOR: tl.constexpr, IS_B_ROW_MAJOR: tl.constexpr, IS_ALIGNED: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_PRE_OUT: tl.constexpr, HAS_ACT_GRAD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_COLSUM: tl.constexpr, IS_TF32: tl.constexpr, IS_B_ACTIVATED: tl.constexpr,
    IS_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EPILOGUE_SUBTILES: tl.constexpr, IS_PERSISTENT: tl.constexpr,
):
    """A: [M, K], unit stride along K (IS_A_ROW_MAJOR) or M; B: [N, K], unit stride along K (IS_B_ROW_MAJOR,
    nn.Linear layout) or N. C, and AUX when used (``_epilogue``), are [M, N] with row stride stride_c.

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
            pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N)
            acc = _accumulate_from_descriptors(a_desc, b_desc, pid_m, pid_n, k_first, k_count, IS_A_ROW_MAJOR,
                                               IS_B_ROW_MAJOR, IS_TF32, IS_B_ACTIVATED, _activation, ACTIVATION,
                                               BLOCK_M, BLOCK_N, BLOCK_K)
            _finish_tile(acc, pid_m, pid_n, pid_k, M, N, stride_c, C, BIAS, AUX, COLSUM, HAS_BIAS, ACTIVATION,
                         HAS_PRE_OUT, HAS_ACT_GRAD, HAS_RESIDUAL, HAS_COLSUM, IS_B_ACTIVATED, IS_ALIGNED, IS_SPLIT,
                         EPILOGUE_SUBTILES)
    else:
        pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N)
        k_first = pid_k.to(tl.int64) * K_PER_SPLIT
        k_count = tl.minimum(K - k_first, K_PER_SPLIT)
        acc = _accumulate_from_pointers(A, B, pid_m, pid_n, M, N, k_first, k_count, stride_a, stride_b,
                                        IS_A_ROW_MAJOR, IS_B_ROW_MAJOR, IS_ALIGNED, IS_TF32, IS_B_ACTIVATED,
                                        _activation, ACTIVATION, BLOCK_M, BLOCK_N, BLOCK_K)
        _finish_tile(acc, pid_m, pid_n, pid_k, M, N, stride_c, C, BIAS, AUX, COLSUM, HAS_BIAS, ACTIVATION,
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
    assert zz is None or residual is None, "one [M, N] epilogue operand: the pre-activation or the residual"
    aux = zz if zz is not None else residual
    plain = bias is None and aux is None and not colsum
    slices = split_k_slices(M, N, K, a.device) if split_k and plain and K else 1
    per_slice = runtime.cdiv(runtime.cdiv(K, slices), SPLIT_K_ALIGN) * SPLIT_K_ALIGN if slices > 1 else K
    slices = runtime.cdiv(K, per_slice) if K else 1
    c = runtime.empty((slices, M, N) if slices > 1 else (M, N), torch.float32 if slices > 1 else a.dtype, a.device)
    partial = runtime.empty((runtime.cdiv(M, COLSUM_ROWS.value), N), torch.float32, a.device) if colsum else None
    epilogue = [(t, True, N, N) for t in (c, aux) if t is not None]
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
        a, b, c, bias if bias is not None else c, aux if aux is not None else c, partial if partial is not None else c,
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
    "A": "*{dtype}", "B": "*{dtype}", "C": "*{dtype}", "BIAS": "*{dtype}", "AUX": "*{dtype}",
    "COLSUM": "*fp32", "M": "i32", "N": "i32", "K": "i32", "K_PER_SPLIT": "i32", "stride_a": "i32", "stride_b": "i32",
    "stride_c": "i32", "M_BUCKET": "i32", "K_BUCKET": "i32",
}
# Integers the JIT sees as multiples of 16 at CLIP shapes (widths 512-1280 and 4x, their strides, the
# split length, the power-of-two buckets); M (batch x tokens, e.g. 256 x 197) and K of the wgrad GEMMs
# (tokens) are not. Pointers are 16-byte aligned (torch allocations).
_GEMM_DIVISIBLE = ("A", "B", "C", "BIAS", "AUX", "COLSUM", "N", "stride_a", "stride_b", "stride_c",
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
    kinds = _product_kinds(constexprs) | (Product.FP32 if precision != "half" else Product(0))
    return runtime.AotCase(
        name=(f"mlp_gemm_{variant}{'' if aligned else '_unaligned'}{'_tma' if persistent else ''}"
              f"{'' if precision == 'half' else '_' + precision}"),
        kernel=runtime.jit_function(_gemm_kernel), signature=signature, constexprs=constexprs,
        num_warps=config.num_warps, num_stages=config.num_stages, expects_mma=precision != "fp32",
        expects_tma=persistent, dtypes=("fp16", "bf16") if precision == "half" else ("fp32",), quick=quick,
        divisible_by_16=divisible, archs=archs, shared_estimate=shared_estimate(_tile(config), kinds))


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
                        or variant == _QUICK_VARIANTS[0] and is_persistent(_tile(cfg)) and first_persistent)
                    first_persistent = first_persistent and not is_persistent(_tile(cfg))
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
