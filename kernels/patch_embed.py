"""Fused patch embedding: pixels -> tokens (conv with kernel = stride = patch, optional conv bias, class
token, positional embedding, optional uint8 normalization), forward and backward.

Algorithm
---------
The convolution is a GEMM ``tokens = A @ W^T`` whose operand A is never materialized: row ``r = (b, patch)``
and column ``k = (c, ky, kx)`` of A is the pixel ``pixels[b, c, py * P + ky, px * P + kx]``, so the im2col
happens in the loads (``_patch_tile``). W is the conv weight viewed as ``[width, C * P * P]``.

Forward (``_patch_embed_fwd_kernel``): one program per ``[BLOCK_M patches, BLOCK_N channels]`` tile of the
flattened ``B * N`` patch rows; the K loop gathers pixel tiles (uint8 pixels are normalized in registers,
``x * scale[c] + shift[c]`` in fp32, then rounded to the compute dtype), accumulates in fp32, and the
epilogue adds the conv bias (SigLIP, timm) and the positional-embedding row and stores into
``tokens[b, 1 + patch]``. The programs of the
first patch tile also write the class-token rows ``tokens[:, 0] = class_embedding + pos[0]``, so the
output is built by one kernel (no ``torch.cat``). Memory traffic: pixels read once (uint8: 1 byte a pixel),
tokens written once, W and the positional embedding re-read from L2.

ln_pre is NOT fused into the GEMM epilogue. Normalizing in the epilogue needs a whole row per program,
i.e. BLOCK_N = next_power_of_2(width) (1024 for both ViT-B's 768 and ViT-L's 1024): a 64 x 1024 fp32
accumulator is 256 KiB, the entire register file of an SM, and with 768 a quarter of the tensor-core work
is padding. Measured with the AOT compile (this kernel at BLOCK_M=64, BLOCK_N=1024, BLOCK_K=32, before any
LayerNorm code is even added): 8 warps spill 2056 bytes on sm_90 and 5184 on sm_80; 16 warps spill 2408
bytes on sm_80 and do not compile on sm_90 (ptxas needs more than the 128 registers a thread can have).
The shipped 128 x 128 / 64 x 256 tiles do not spill. So the op runs the LayerNorm kernels of
``layer_norm.py`` as a second pass over the tokens (one extra read and write of the tokens, which are
about the size of the pixels), forward and backward.

Backward, from ``dtokens`` (the gradient of the pre-LN tokens):
- ``_patch_embed_dweight_kernel``: ``dW = dT^T @ A`` over all patch rows, A gathered from the pixels again
  (no saved im2col). The M = B * N reduction is split over a few programs per output tile so the grid fills
  the GPU; each split writes an fp32 partial ``[S, width, K]`` that is summed afterwards (deterministic, no
  atomics). Traffic: each output tile re-reads its slices of dT and of the pixels, so dT is read
  K / BLOCK_K times and the pixels width / BLOCK_N times (6 each at ViT-B/16), partly from L2.
- ``_bias_grad_kernel``: the conv-bias gradient ``db[n] = sum_r dT[r, n]`` over the patch rows, split over
  row runs like dW (fp32 partial ``[S, width]``): one more read of dT. Summing inside the dW programs
  instead (the first K tile's programs already read every dT row of their columns) costs registers: the
  AOT compile measured 96 and 112 bytes of spills on sm_80 for the 4-warp tiles (64 x 128 x 64 and
  32 x 128 x 128), so it is a kernel of its own.
- ``_patch_embed_dpixels_kernel``: ``dA = dT @ W``, scattered back into the image (col2im). Patches do
  not overlap (stride == kernel), so every pixel belongs to exactly one (row, column) of A: a plain
  scatter store, no atomics. Normalized float pixels get the ``scale[c]`` chain factor. Only run when the
  pixels require grad.
- ``_sum_over_batch_kernel``: ``d pos = sum_b dT[b]`` and ``d class_embedding = sum_b dT[b, 0]`` in fp32.

Precision: fp32 operands follow ``runtime.dot_precision`` like every kernel (exact fp32 products unless torch
allows TF32 matmuls), not cuDNN's own switch that eager ``F.conv2d`` follows (``torch.backends.cudnn.allow_tf32``,
on by default): by default this fp32 GEMM is exact where eager's convolution may use TF32.

Offsets: every index product that can pass 2**31 elements (a batch, token, channel or row index times a
stride of a strided view, e.g. tokens read through a [T, B, width] transpose) is formed in int64; only
products bounded by one weight or positional-embedding matrix stay in int32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import runtime
from .tiles import FP32, Launch, Tile, TileTable, dtype_name

# ---------------------------------------------------------------------------------------------
# im2col addressing, shared by the three GEMM kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _row_offsets(rows, n_patches, n_patches_w, stride_b, stride_h, stride_w, PATCH: tl.constexpr):
    """Patch rows r = b * N + patch -> (pixel offset of the patch's top-left corner, b, patch)."""
    b = rows // n_patches
    patch = rows % n_patches
    py = patch // n_patches_w
    px = patch % n_patches_w
    offset = b.to(tl.int64) * stride_b + (py * PATCH).to(tl.int64) * stride_h + (px * PATCH).to(tl.int64) * stride_w
    return offset, b, patch


@triton.jit
def _col_offsets(k, stride_c, stride_h, stride_w, PATCH: tl.constexpr):
    """Columns k = (c * P + ky) * P + kx -> (pixel offset inside a patch, channel)."""
    c = k // (PATCH * PATCH)
    rem = k % (PATCH * PATCH)
    offset = c.to(tl.int64) * stride_c + (rem // PATCH).to(tl.int64) * stride_h + (rem % PATCH).to(tl.int64) * stride_w
    return offset, c


@triton.jit
def _ptrs(BASE, offs0, offs1, VEC: tl.constexpr, AXIS: tl.constexpr):
    """``BASE + offs0[:, None] + offs1[None, :]``, declared to run in aligned groups of VEC contiguous
    elements along AXIS when VEC > 1. The launchers check that this holds (``_vec``); it lets the gathers
    load 16-byte vectors instead of single elements, which also keeps the per-element addresses from
    spilling. (The hint must be made where the pointers are computed: Triton drops hints on values that
    arrive as function arguments.)"""
    ptrs = BASE + offs0[:, None] + offs1[None, :]
    if VEC > 1:
        nbytes: tl.constexpr = VEC * (BASE.dtype.element_ty.primitive_bitwidth // 8)
        if AXIS == 1:
            ptrs = tl.max_contiguous(tl.multiple_of(ptrs, [1, nbytes]), [1, VEC])
        else:
            ptrs = tl.max_contiguous(tl.multiple_of(ptrs, [nbytes, 1]), [VEC, 1])
    return ptrs


@triton.jit
def _patch_tile(PIX, SCALE, SHIFT, row_off, row_ok, k, K, stride_c, stride_h, stride_w,
                PATCH: tl.constexpr, HAS_NORM: tl.constexpr, VEC: tl.constexpr, DTYPE: tl.constexpr):
    """A [BLOCK_M, BLOCK_K] tile of the implicit im2col matrix, normalized and rounded to DTYPE;
    zero outside the matrix."""
    col_off, c = _col_offsets(k, stride_c, stride_h, stride_w, PATCH)
    col_ok = k < K
    mask = row_ok[:, None] & col_ok[None, :]
    a = tl.load(_ptrs(PIX, row_off, col_off, VEC, 1), mask=mask, other=0)
    if HAS_NORM:
        scale = tl.load(SCALE + c, mask=col_ok, other=0.0)
        shift = tl.load(SHIFT + c, mask=col_ok, other=0.0)
        a = tl.where(mask, a.to(tl.float32) * scale[None, :] + shift[None, :], 0.0)
    return a.to(DTYPE)


# ---------------------------------------------------------------------------------------------
# Tiles of the three GEMM kernels
# ---------------------------------------------------------------------------------------------

def _operand_elements(label: str, tile: Tile) -> int:
    """Elements of the two operand tiles GEMM kernel ``label`` pipelines through shared memory: the forward's
    pixel tile [BLOCK_M, BLOCK_K] and weight tile [BLOCK_K, BLOCK_N], dweight's dT [BLOCK_M, BLOCK_N] and pixel
    [BLOCK_M, BLOCK_K] tiles, dpixels' dT [BLOCK_M, BLOCK_N] and weight [BLOCK_N, BLOCK_K] tiles."""
    m, n, k = tile.block_m, tile.block_n, tile.block_k
    return {"fwd": m * k + k * n, "dweight": m * n + m * k, "dpixels": m * n + n * k}[label]


def _estimate(label: str):
    def estimate(tile: Tile, launch: Launch) -> int:
        """An upper bound on the shared memory of GEMM kernel ``label`` at ``tile`` with ``launch.dtype``
        operands (uint8 pixels are counted at the compute dtype), in bytes: ``stages`` buffers of its two operand
        tiles (``runtime.gemm_shared_estimate``: Hopper keeps that many, Ampere one fewer) plus scratch.
        Measured (triton 3.8): the forward's 64x256x64 3-stage tile takes 245,760 B in exact fp32 on sm_90, over
        its 232,448 B. `clipfast aot` fails a case whose compiled ``shared`` exceeds this."""
        size = runtime.ELEMENT_SIZE[launch.dtype]
        return tile.stages * _operand_elements(label, tile) * size + runtime.SHARED_SCRATCH_ALLOWANCE
    return estimate


# Each GEMM kernel's tiles (``kernels/tiles.py``), default first; the first is also what the interpreter runs
# (large tiles keep it fast). Under triton 3.6 the forward default's K step is 32: at 64 the uint8 forward
# (pixels normalized in fp32 in registers) spills 8 bytes on sm_80 (16-24 at 2 or 4 stages); at 32 it takes
# 227 registers and does not (`clipfast aot`). The last row of each is exact fp32's (``dtypes=FP32``; the others
# fp16/bf16): FMA products, each thread holding its rows and columns of both operands over BLOCK_K, spill at
# every fp16/bf16 tile (16-12,656 B, triton 3.8; their 3-stage 128-wide tiles also need 196-246 KB of shared
# memory), so fp32 has small tiles of its own, spill-free on sm_80 and sm_90 (64-128 registers; tried and not
# shipped: the forward's 64x64x32 spills 8 B on sm_90 with 8 warps and 32 B on sm_80 with 4, its 32x64x32
# (8 warps) 8 B on sm_80 under triton 3.6; dweight's 32x64x32 spills 8 B on sm_90 with uint8 pixels (8 warps;
# 16 B plain with 4), hence the K step of 16 (128 registers with uint8); 64x64x32 dpixels with 4 warps 272 B on
# sm_80). Each offers a launch the rows for its dtype whose estimate fits the architecture's shared memory per
# block (``TileTable.offered``; where none fits, Volta / Turing, the smallest).
TABLES = {
    "fwd": TileTable((
        Tile(128, 128, 64 if runtime.triton_at_least(3, 8) else 32, 8, 3), Tile(64, 256, 64, 8, 3),
        Tile(64, 128, 64, 4, 4), Tile(32, 64, 16, 8, 3, dtypes=FP32),
    ), estimate=_estimate("fwd")),
    "dweight": TileTable((
        Tile(64, 128, 128, 8, 3), Tile(64, 128, 64, 4, 4), Tile(32, 128, 128, 4, 3),
        Tile(32, 64, 16, 8, 3, dtypes=FP32),
    ), estimate=_estimate("dweight")),
    "dpixels": TileTable((
        Tile(128, 64, 128, 8, 3), Tile(128, 64, 64, 4, 4), Tile(64, 64, 128, 4, 3), Tile(32, 64, 32, 4, 3, dtypes=FP32),
    ), estimate=_estimate("dpixels")),
}
FWD_CONFIGS, DWEIGHT_CONFIGS, DPIXELS_CONFIGS = (TABLES[label].configs() for label in ("fwd", "dweight", "dpixels"))


def shared_estimate(label: str, cfg: triton.Config, dtype) -> int:
    """The shared-memory estimate of GEMM kernel ``label`` ("fwd", "dweight", "dpixels") at its config ``cfg``
    with ``dtype`` operands (torch dtype or "fp16" / "bf16" / "fp32")."""
    table = TABLES[label]
    return table.estimate(table.tile_of(cfg), Launch(0, dtype_name(dtype)))


def offered(label: str, configs, dtype, arch: int) -> list[triton.Config]:
    """The configs of GEMM kernel ``label`` offered to ``dtype`` operands on ``arch`` (10 x major + minor; 0:
    the interpreter, no limit), in table order (``TileTable.offered``)."""
    return TABLES[label].prune(configs, Launch(arch, dtype_name(dtype)))


def why_not_offered(label: str, cfg: triton.Config, dtype, arch: int) -> str | None:
    """Why ``cfg`` of GEMM kernel ``label`` is not offered to ``dtype`` operands on ``arch``, or None."""
    table = TABLES[label]
    return table.why_not_offered(table.tile_of(cfg), Launch(arch, dtype_name(dtype)))


def _pruner(label: str, operand: str):
    """``early_config_prune`` of GEMM kernel ``label``: the configs ``offered`` to the dtype of its
    ``operand`` argument (the compute dtype) on the launch's architecture."""
    def prune(configs, named_args, **kwargs):
        t = named_args.get(operand)
        dtype = t.dtype if isinstance(t, torch.Tensor) and t.dtype in runtime.ELEMENT_SIZE else torch.float16
        return offered(label, configs, dtype, runtime.launch_arch(named_args))
    return prune


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@runtime.autotune(FWD_CONFIGS, key=["width", "K"], prune_configs_by={"early_config_prune": _pruner("fwd", "W")})
@triton.jit
def _patch_embed_fwd_kernel(
    PIX, W, BIAS, CLS, POS, SCALE, SHIFT, OUT,
    n_rows, n_patches, n_patches_w, n_batch, width, K,
    stride_pb, stride_pc, stride_ph, stride_pw,
    PATCH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CLS: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_NORM: tl.constexpr,
    VEC: tl.constexpr, W_VEC: tl.constexpr, N_VEC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(width, BLOCK_N)
    pid_m = pid // n_tiles_n  # consecutive programs share a pixel tile (L2 reuse)
    pid_n = pid % n_tiles_n
    dtype = OUT.dtype.element_ty

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    row_off, b, patch = _row_offsets(rows, n_patches, n_patches_w, stride_pb, stride_ph, stride_pw, PATCH)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < width

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = _patch_tile(PIX, SCALE, SHIFT, row_off, row_ok, k, K, stride_pc, stride_ph, stride_pw,
                        PATCH, HAS_NORM, VEC, dtype)
        w = tl.load(_ptrs(W, k, cols * K, W_VEC, 0), mask=col_ok[None, :] & (k < K)[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

    if HAS_CLS:
        tok = patch + 1
    else:
        tok = patch
    n_tokens = n_patches + HAS_CLS
    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:  # the conv's own bias: patch rows only, never the class token
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_POS:
        pos_ptrs = _ptrs(POS, tok * width, cols, N_VEC, 1)
        acc += tl.load(pos_ptrs, mask=mask, other=0.0).to(tl.float32)
    out_rows = b.to(tl.int64) * n_tokens + tok
    tl.store(_ptrs(OUT, out_rows * width, cols, N_VEC, 1), acc.to(dtype), mask=mask)

    if HAS_CLS:
        if pid_m == 0:  # row 0 of every image: class_embedding + pos[0]
            first = tl.load(CLS + cols, mask=col_ok, other=0.0).to(tl.float32)
            if HAS_POS:
                first += tl.load(POS + cols, mask=col_ok, other=0.0).to(tl.float32)
            first_tile = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32) + first[None, :]
            for b0 in range(0, n_batch, BLOCK_M):
                bs = b0 + tl.arange(0, BLOCK_M)
                cls_rows = bs.to(tl.int64) * n_tokens
                tl.store(OUT + cls_rows[:, None] * width + cols[None, :], first_tile.to(dtype),
                         mask=(bs < n_batch)[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------

@runtime.autotune(DWEIGHT_CONFIGS, key=["width", "K"],
                  prune_configs_by={"early_config_prune": _pruner("dweight", "DT")})
@triton.jit
def _patch_embed_dweight_kernel(
    PIX, SCALE, SHIFT, DT, DW_PARTIAL,
    n_rows, n_patches, n_patches_w, width, K, n_splits,
    stride_pb, stride_pc, stride_ph, stride_pw, stride_db, stride_dt, stride_dn,
    PATCH: tl.constexpr, HAS_CLS: tl.constexpr, HAS_NORM: tl.constexpr,
    VEC: tl.constexpr, W_VEC: tl.constexpr, DT_VEC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW[n, k] = sum over patch rows r of dT[r, n] * A[r, k]; program (tile, split) covers one run of rows
    and writes its fp32 partial."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_tiles_k = tl.cdiv(K, BLOCK_K)
    pid_n = pid // n_tiles_k
    pid_k = pid % n_tiles_k
    dtype = DT.dtype.element_ty

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < width
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)

    rows_per_split = tl.cdiv(tl.cdiv(n_rows, n_splits), BLOCK_M) * BLOCK_M
    first_row = split * rows_per_split
    end_row = tl.minimum(first_row + rows_per_split, n_rows)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for start in range(first_row, end_row, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < end_row
        row_off, b, patch = _row_offsets(rows, n_patches, n_patches_w, stride_pb, stride_ph, stride_pw, PATCH)
        if HAS_CLS:
            tok = patch + 1
        else:
            tok = patch
        dt_ptrs = _ptrs(DT, b.to(tl.int64) * stride_db + tok.to(tl.int64) * stride_dt,
                        cols.to(tl.int64) * stride_dn, DT_VEC, 1)
        dt = tl.load(dt_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        a = _patch_tile(PIX, SCALE, SHIFT, row_off, row_ok, k, K, stride_pc, stride_ph, stride_pw,
                        PATCH, HAS_NORM, VEC, dtype)
        acc = tl.dot(tl.trans(dt), a, acc, input_precision=DOT_PRECISION)

    out = _ptrs(DW_PARTIAL + split.to(tl.int64) * width * K, cols * K, k, W_VEC, 1)
    tl.store(out, acc, mask=col_ok[:, None] & (k < K)[None, :])


@triton.jit
def _bias_grad_kernel(DT, DB_PARTIAL, n_rows, n_patches, width, n_splits, stride_db, stride_dt, stride_dn,
                      HAS_CLS: tl.constexpr, DT_VEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """DB_PARTIAL[split, n] = sum over the split's patch rows r of dT[r, n] in fp32 (the conv-bias gradient).
    Rows accumulate elementwise in a [BLOCK_M, BLOCK_N] tile, reduced across rows once at the end."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < width
    rows_per_split = tl.cdiv(tl.cdiv(n_rows, n_splits), BLOCK_M) * BLOCK_M
    first_row = split * rows_per_split
    end_row = tl.minimum(first_row + rows_per_split, n_rows)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(first_row, end_row, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        tok = rows % n_patches + HAS_CLS
        dt_rows = (rows // n_patches).to(tl.int64) * stride_db + tok.to(tl.int64) * stride_dt
        ptrs = _ptrs(DT, dt_rows, cols.to(tl.int64) * stride_dn, DT_VEC, 1)
        acc += tl.load(ptrs, mask=(rows < end_row)[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    tl.store(DB_PARTIAL + split.to(tl.int64) * width + cols, tl.sum(acc, axis=0), mask=col_ok)


BIAS_TILE = Tile(32, 128, warps=4)


@runtime.autotune(DPIXELS_CONFIGS, key=["width", "K"],
                  prune_configs_by={"early_config_prune": _pruner("dpixels", "DT")})
@triton.jit
def _patch_embed_dpixels_kernel(
    DT, W, SCALE, DPIX,
    n_rows, n_patches, n_patches_w, width, K,
    stride_db, stride_dt, stride_dn, stride_xb, stride_xc, stride_xh, stride_xw,
    PATCH: tl.constexpr, HAS_CLS: tl.constexpr, HAS_NORM: tl.constexpr,
    VEC: tl.constexpr, W_VEC: tl.constexpr, DT_VEC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dA = dT @ W for a [BLOCK_M, BLOCK_K] tile, stored straight into the image (col2im)."""
    pid = tl.program_id(0)
    n_tiles_k = tl.cdiv(K, BLOCK_K)
    pid_m = pid // n_tiles_k
    pid_k = pid % n_tiles_k
    dtype = DT.dtype.element_ty

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    row_off, b, patch = _row_offsets(rows, n_patches, n_patches_w, stride_xb, stride_xh, stride_xw, PATCH)
    if HAS_CLS:
        tok = patch + 1
    else:
        tok = patch
    dt_rows = b.to(tl.int64) * stride_db + tok.to(tl.int64) * stride_dt
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K

    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, width, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < width
        dt = tl.load(_ptrs(DT, dt_rows, n.to(tl.int64) * stride_dn, DT_VEC, 1),
                     mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(_ptrs(W, n * K, k, W_VEC, 1),
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(dtype)
        acc = tl.dot(dt, w, acc, input_precision=DOT_PRECISION)

    col_off, c = _col_offsets(k, stride_xc, stride_xh, stride_xw, PATCH)
    if HAS_NORM:  # d/dx of (x * scale + shift)
        acc *= tl.load(SCALE + c, mask=k_ok, other=0.0)[None, :]
    tl.store(_ptrs(DPIX, row_off, col_off, VEC, 1), acc.to(DPIX.dtype.element_ty),
             mask=row_ok[:, None] & k_ok[None, :])


@triton.jit
def _sum_over_batch_kernel(DT, OUT, n_batch, n_elems, width, stride_db, stride_dt, stride_dn,
                           DT_VEC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[t * width + n] = sum_b DT[b, t, n] in fp32 (the positional / class embedding gradients)."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e_ok = e < n_elems
    offsets = (e // width).to(tl.int64) * stride_dt + (e % width).to(tl.int64) * stride_dn
    acc = tl.zeros([BLOCK_B, BLOCK], dtype=tl.float32)
    for b0 in range(0, n_batch, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        ptrs = _ptrs(DT, bs.to(tl.int64) * stride_db, offsets, DT_VEC, 1)
        acc += tl.load(ptrs, mask=(bs < n_batch)[:, None] & e_ok[None, :], other=0.0).to(tl.float32)
    tl.store(OUT + e, tl.sum(acc, axis=0), mask=e_ok)


SUM_TILE = {"BLOCK_B": 8, "BLOCK": 512, "num_warps": 4}


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _vec(t: torch.Tensor, strides, run: int, inner_stride: int = 1) -> int:
    """Elements per aligned contiguous group the kernels may assume for ``t`` (see ``_ptrs``): the largest
    power of two v <= 8 with v * itemsize <= 16 bytes that divides ``run`` (the contiguous run length), every
    outer stride, and the base address; 1 when the innermost stride is not 1."""
    if inner_stride != 1:
        return 1
    v = max(1, min(8, 16 // t.element_size()))  # 16-byte vectors; 8-byte for uint8 (register pressure)
    while v > 1 and (run % v or any(s % v for s in strides) or t.data_ptr() % (v * t.element_size())):
        v //= 2
    return v


def _geometry(pixels: torch.Tensor, weight: torch.Tensor) -> dict:
    batch, channels, height, width_px = pixels.shape
    patch = weight.shape[-1]
    n_patches_w = width_px // patch
    n_patches = (height // patch) * n_patches_w
    return {"batch": batch, "patch": patch, "n_patches": n_patches, "n_patches_w": n_patches_w,
            "n_rows": batch * n_patches, "width": weight.shape[0], "K": channels * patch * patch}


@runtime.on_tensor_device
def patch_embed_fwd(pixels, weight, bias, class_embedding, positional_embedding, scale, shift) -> torch.Tensor:
    """Tokens ``[B, (1 if class) + N, width]`` in ``weight``'s dtype. ``pixels`` [B, C, H, W] in any
    layout (float, or uint8 with ``scale``/``shift``: fp32 [C]); H and W multiples of the patch size;
    ``bias`` the conv's bias [width] or None."""
    g = _geometry(pixels, weight)
    has_cls = class_embedding is not None
    n_tokens = g["n_patches"] + int(has_cls)
    out = runtime.empty((g["batch"], n_tokens, g["width"]), weight.dtype, weight.device)
    if out.numel() == 0:
        return out
    w2 = weight.reshape(g["width"], g["K"]).contiguous()
    pos = positional_embedding.contiguous() if positional_embedding is not None else None
    has_norm = scale is not None
    grid = lambda meta: (runtime.cdiv(g["n_rows"], meta["BLOCK_M"]) * runtime.cdiv(g["width"], meta["BLOCK_N"]),)  # noqa: E731
    _patch_embed_fwd_kernel[grid](
        pixels, w2, bias if bias is not None else w2, class_embedding if has_cls else w2,
        pos if pos is not None else w2, scale if has_norm else w2, shift if has_norm else w2, out,
        g["n_rows"], g["n_patches"], g["n_patches_w"], g["batch"], g["width"], g["K"],
        *pixels.stride(),
        PATCH=g["patch"], HAS_BIAS=bias is not None, HAS_CLS=has_cls, HAS_POS=pos is not None, HAS_NORM=has_norm,
        VEC=_vec(pixels, pixels.stride()[:3], g["patch"], pixels.stride(3)), W_VEC=_vec(w2, (g["K"],), g["K"]),
        N_VEC=min(_vec(out, (g["width"],), g["width"]), _vec(pos, (g["width"],), g["width"]) if pos is not None else 16),
        DOT_PRECISION=runtime.dot_precision(weight.dtype),
    )
    return out


def _dweight_splits(n_rows: int, width: int, K: int, device: torch.device) -> int:
    """Split the patch-row reduction so that (output tiles x splits) is about two waves of programs."""
    tiles = runtime.cdiv(width, 128) * runtime.cdiv(K, 128)
    return max(1, min(runtime.cdiv(n_rows, 256), runtime.cdiv(2 * runtime.sm_count(device), tiles)))


@runtime.on_tensor_device
def patch_embed_bwd(dtokens, pixels, weight, scale, shift, has_cls: bool, need_pixels: bool, need_weight: bool,
                    need_bias: bool, sum_rows: int):
    """Gradients from ``dtokens`` (the gradient of the tokens): ``(dpixels, dweight, dbias, dsum)``.

    ``dpixels`` (pixels' dtype and shape) only with ``need_pixels``; ``dweight`` (fp32, weight's shape)
    only with ``need_weight``; ``dbias`` (fp32 [width], the sum of the patch rows of ``dtokens``) only with
    ``need_bias``; ``dsum`` = fp32 ``sum_b dtokens[b, :sum_rows]`` of shape [sum_rows, width]
    (``sum_rows`` 0 skips it). Absent results are None."""
    g = _geometry(pixels, weight)
    width, K = g["width"], g["K"]
    precision = runtime.dot_precision(dtokens.dtype)
    db, dt, dn = dtokens.stride()
    dt_vec = _vec(dtokens, (db, dt), width, dn)
    dpixels = dweight = dbias = dsum = None

    if need_weight:
        splits = _dweight_splits(g["n_rows"], width, K, pixels.device)
        partial = runtime.empty((splits, width, K), torch.float32, pixels.device)
        has_norm = scale is not None
        grid = lambda meta: (runtime.cdiv(width, meta["BLOCK_N"]) * runtime.cdiv(K, meta["BLOCK_K"]), splits)  # noqa: E731
        _patch_embed_dweight_kernel[grid](
            pixels, scale if has_norm else partial, shift if has_norm else partial, dtokens, partial,
            g["n_rows"], g["n_patches"], g["n_patches_w"], width, K, splits,
            *pixels.stride(), db, dt, dn,
            PATCH=g["patch"], HAS_CLS=has_cls, HAS_NORM=has_norm,
            VEC=_vec(pixels, pixels.stride()[:3], g["patch"], pixels.stride(3)), W_VEC=_vec(partial, (K,), K),
            DT_VEC=dt_vec, DOT_PRECISION=precision,
        )
        dweight = partial.sum(0).reshape(weight.shape)

    if need_bias:
        splits = _dweight_splits(g["n_rows"], width, 1, pixels.device)
        partial = runtime.empty((splits, width), torch.float32, pixels.device)
        _bias_grad_kernel[(runtime.cdiv(width, BIAS_TILE.block_n), splits)](
            dtokens, partial, g["n_rows"], g["n_patches"], width, splits, db, dt, dn, HAS_CLS=has_cls,
            DT_VEC=dt_vec, BLOCK_M=BIAS_TILE.block_m, BLOCK_N=BIAS_TILE.block_n, num_warps=BIAS_TILE.warps,
        )
        dbias = partial.sum(0)

    if need_pixels:
        dpixels = runtime.empty(pixels.shape, pixels.dtype, pixels.device)
    if need_pixels and dpixels.numel() > 0:
        w2 = weight.reshape(width, K).contiguous()
        has_norm = scale is not None
        grid = lambda meta: (runtime.cdiv(g["n_rows"], meta["BLOCK_M"]) * runtime.cdiv(K, meta["BLOCK_K"]),)  # noqa: E731
        _patch_embed_dpixels_kernel[grid](
            dtokens, w2, scale if has_norm else w2, dpixels,
            g["n_rows"], g["n_patches"], g["n_patches_w"], width, K,
            db, dt, dn, *dpixels.stride(),
            PATCH=g["patch"], HAS_CLS=has_cls, HAS_NORM=has_norm,
            VEC=_vec(dpixels, dpixels.stride()[:3], g["patch"], dpixels.stride(3)), W_VEC=_vec(w2, (K,), K),
            DT_VEC=dt_vec, DOT_PRECISION=precision,
        )

    if sum_rows:
        n_elems = sum_rows * width
        dsum = runtime.empty((sum_rows, width), torch.float32, dtokens.device)
        _sum_over_batch_kernel[(runtime.cdiv(n_elems, SUM_TILE["BLOCK"]),)](
            dtokens, dsum, g["batch"], n_elems, width, db, dt, dn, DT_VEC=dt_vec,
            BLOCK_B=SUM_TILE["BLOCK_B"], BLOCK=SUM_TILE["BLOCK"], num_warps=SUM_TILE["num_warps"],
        )
    return dpixels, dweight, dbias, dsum


# ---------------------------------------------------------------------------------------------
# AOT cases
# ---------------------------------------------------------------------------------------------

def _clip_vecs(label: str, patch: int, uint8: bool) -> dict:
    """The alignment constexprs ``_vec`` picks at CLIP shapes (contiguous 224/336 images, widths 768/1024,
    16-bit activations): 16 bytes wherever the patch size allows."""
    pix = min(8, patch & -patch)  # largest power of two dividing the patch, capped as in `_vec`
    k = 3 * patch * patch
    w_vec = min(4 if label == "dweight" else 8, k & -k)  # dweight stores fp32 partials
    vecs = {"VEC": pix, "W_VEC": w_vec}
    vecs.update({"N_VEC": 8} if label == "fwd" else {"DT_VEC": 8})
    return vecs


def aot_cases() -> list[runtime.AotCase]:
    """Every GEMM config offered (``offered``, on sm_80 / sm_90) at patch 16 (ViT-B/16) for CLIP (class token,
    no conv bias) and, in the forward, for SigLIP (conv bias, no class token), the first config at patches 14
    (SigLIP SO400M/14 too) and 32, the uint8 forward, in fp16/bf16 and (cases ``..._fp32`` / ``..._tf32``:
    patch 16 and the uint8 pixels) fp32, exact and with TF32 allowed (``runtime.dot_precision``), each with its
    shared-memory estimate (TF32 runs the fp32 tiles on mma.sync tensor cores, HMMA on sm_90 too: wgmma takes
    64-row tiles, so no HGMMA is expected of them); the conv-bias gradient and batch-sum
    kernels. Quick subset: the first config of each kernel at patch 16, CLIP and SigLIP, fp16/bf16."""
    geometry = {"n_rows": "i32", "n_patches": "i32", "n_patches_w": "i32"}
    pix_strides = {"stride_pb": "i32", "stride_pc": "i32", "stride_ph": "i32", "stride_pw": "i32"}
    dt_strides = {"stride_db": "i32", "stride_dt": "i32", "stride_dn": "i32"}
    kernels = {
        "fwd": (_patch_embed_fwd_kernel,
                {"PIX": "{pix}", "W": "*{dtype}", "BIAS": "*{dtype}", "CLS": "*{dtype}", "POS": "*{dtype}",
                 "SCALE": "*fp32", "SHIFT": "*fp32", "OUT": "*{dtype}", **geometry, "n_batch": "i32",
                 "width": "i32", "K": "i32", **pix_strides},
                {"HAS_POS": True}),
        "dweight": (_patch_embed_dweight_kernel,
                    {"PIX": "{pix}", "SCALE": "*fp32", "SHIFT": "*fp32", "DT": "*{dtype}", "DW_PARTIAL": "*fp32",
                     **geometry, "width": "i32", "K": "i32", "n_splits": "i32", **pix_strides, **dt_strides},
                    {}),
        "dpixels": (_patch_embed_dpixels_kernel,
                    {"DT": "*{dtype}", "W": "*{dtype}", "SCALE": "*fp32", "DPIX": "*{dtype}", **geometry,
                     "width": "i32", "K": "i32", **dt_strides, "stride_xb": "i32", "stride_xc": "i32",
                     "stride_xh": "i32", "stride_xw": "i32"},
                    {}),
    }
    # (patch, uint8 pixels, config index, SigLIP: conv bias and no class token)
    cases = []
    for label, (fn, signature, flags) in kernels.items():
        configs = fn.shipped_configs
        for precision, dtypes, dot_precision in (("half", ("fp16", "bf16"), "tf32"), ("fp32", ("fp32",), "ieee"),
                                                 ("tf32", ("fp32",), "tf32")):
            # the configs offered to this precision on sm_80 / sm_90, with the architectures they are offered on
            archs_of: dict[int, list[int]] = {}
            for arch in (80, 90):
                for cfg in offered(label, configs, dtypes[0], arch):
                    archs_of.setdefault(configs.index(cfg), []).append(arch)
            indices = sorted(archs_of)
            first = indices[0]
            variants = [(16, False, i, False) for i in indices]
            if precision == "half":
                variants += [(14, False, first, False), (32, False, first, False)]
            if label != "dpixels":  # uint8 pixels have no gradient
                variants.append((16, True, first, False))
            if label == "fwd":  # the bias is only in the forward's epilogue (its gradient: _bias_grad_kernel)
                variants += [(16, False, i, True) for i in indices]
                if precision == "half":
                    variants.append((14, False, first, True))
            for patch, uint8, config, siglip in variants:
                cfg = configs[config]
                sig = {k: v.replace("{pix}", "*u8" if uint8 else "*{dtype}") for k, v in signature.items()}
                bias_flag = {"HAS_BIAS": siglip} if label == "fwd" else {}
                archs = tuple(archs_of[config])
                cases.append(runtime.AotCase(
                    name=(f"patch_embed_{label}{'' if precision == 'half' else '_' + precision}"
                          f"[p={patch}{',u8' if uint8 else ''}{',bias' if siglip else ''}]"),
                    kernel=runtime.jit_function(fn), signature=sig,
                    constexprs={"PATCH": patch, "HAS_CLS": not siglip, "HAS_NORM": uint8, **flags, **bias_flag,
                                **_clip_vecs(label, patch, uint8), "DOT_PRECISION": dot_precision, **cfg.kwargs},
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages, expects_mma=precision == "half",
                    dtypes=dtypes, archs=None if archs == (80, 90) else archs,
                    quick=(precision == "half" and patch == 16 and config == 0 and not uint8),
                    shared_estimate=shared_estimate(label, cfg, dtypes[0]),
                ))
    cases.append(runtime.AotCase(
        name="patch_embed_bias_grad", kernel=_bias_grad_kernel,
        signature={"DT": "*{dtype}", "DB_PARTIAL": "*fp32", "n_rows": "i32", "n_patches": "i32", "width": "i32",
                   "n_splits": "i32", **dt_strides},
        constexprs={"HAS_CLS": False, "DT_VEC": 8, **BIAS_TILE.kwargs()}, num_warps=BIAS_TILE.warps, quick=True,
    ))
    cases.append(runtime.AotCase(
        name="patch_embed_sum_over_batch", kernel=_sum_over_batch_kernel,
        signature={"DT": "*{dtype}", "OUT": "*fp32", "n_batch": "i32", "n_elems": "i32", "width": "i32", **dt_strides},
        constexprs={"DT_VEC": 8, "BLOCK_B": SUM_TILE["BLOCK_B"], "BLOCK": SUM_TILE["BLOCK"]},
        num_warps=SUM_TILE["num_warps"], quick=True,
    ))
    return cases
