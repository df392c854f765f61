"""Fused (residual-add +) LayerNorm, forward and backward.

Algorithm
---------
Forward: each program normalizes a [BLOCK_M, BLOCK_N] tile of whole rows (BLOCK_N >= N, so a row is
read once): optional ``h = x + residual`` (rounded to the input dtype, as eager does, and stored),
mean and variance in fp32 from registers, ``y = (h - mean) * rstd * w + b``. Memory traffic: read x
(and residual), write y (and h), plus 8 bytes of statistics per row: the minimum for the op.

Backward: a persistent grid of G programs (G by row width and architecture, see ``bwd_programs``);
each walks a contiguous run of rows in a software-pipelined loop (``tl.range(..., num_stages=...)``:
the next tile's loads are issued while the current one is reduced, see ``bwd_stages``), recomputes
``xhat = (h - mean) * rstd`` from the saved statistics and writes
``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` with ``g = dy * w`` (plus the incoming gradient of
``h`` for the residual variant). Weight and bias gradients are accumulated per program in fp32
registers and written to fp32 partial rows [G, N] (every row written, so nothing is zero-filled); one
more launch (``_layer_norm_param_grad_kernel``) sums them over G in a fixed order and casts them to the
parameters' dtypes, so they are never accumulated in fp16/bf16 and need no atomics (deterministic).
Traffic: read h, dy (and dh), write dx, plus 2 x G x N fp32 partials written and read once.

Offsets: every row offset is ``row.to(int64) * stride``, so tensors past 2**31 elements (or views with
huge row strides) are addressed correctly.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from . import runtime
from .tiles import Tile

# Rows wider than this do not fit the registers of one program (the backward spills at 16384 with 16
# warps under triton 3.8, and already at 8192 under 3.6: see `clipfast aot`); the ops fall back to eager
# above it.
MAX_COLS = 8192 if runtime.triton_at_least(3, 8) else 4096
FWD_MAX_WARPS = 8


# n_rows is not specialized: the vision and the packed text towers' row counts share one compile.
@triton.jit(do_not_specialize=["n_rows"])
def _layer_norm_fwd_kernel(
    X, RES, H, Y, W, B, MEAN, RSTD,
    n_rows, n_cols, stride_x, stride_res, stride_h, stride_y, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    rows = rows.to(tl.int64)

    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(RES + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + rows[:, None] * stride_h + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)

    mean = tl.sum(x, axis=1) / n_cols
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / n_cols
    rstd = tl.rsqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]

    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit(do_not_specialize=["n_rows", "rows_per_program"])
def _layer_norm_bwd_kernel(
    DY, DH, X, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL,
    n_rows, n_cols, rows_per_program, stride_dy, stride_dh, stride_x, stride_dx,
    HAS_DH: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)

    first_row = pid * rows_per_program
    end_row = tl.minimum(first_row + rows_per_program, n_rows)
    for start in tl.range(first_row, end_row, BLOCK_M, num_stages=NUM_STAGES):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < end_row
        mask = row_ok[:, None] & col_ok[None, :]
        rows = rows.to(tl.int64)

        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)

        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy
        if HAS_WEIGHT:
            g = dy * w[None, :]
        mean_g_xhat = tl.sum(g * xhat, axis=1) / n_cols
        mean_g = tl.sum(g, axis=1) / n_cols
        dx = (g - xhat * mean_g_xhat[:, None] - mean_g[:, None]) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)

        if HAS_WEIGHT:
            dw_acc += tl.sum(dy * xhat, axis=0)
        if HAS_BIAS:
            db_acc += tl.sum(dy, axis=0)

    part = pid * n_cols + cols  # G x N partials: far below 2**31 elements (int32 keeps wide rows spill-free)
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + part, dw_acc, mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + part, db_acc, mask=col_ok)


@triton.jit(do_not_specialize=["n_partials"])
def _layer_norm_param_grad_kernel(
    DW_PARTIAL, DB_PARTIAL, DW, DB, n_partials, n_cols,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dW and dB for a BLOCK_N slice of the columns: the fp32 partial rows [G, N] summed over G in a fixed
    order (deterministic), stored in the parameters' dtypes."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    dw = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    for g0 in range(0, n_partials, BLOCK_G):
        parts = g0 + tl.arange(0, BLOCK_G)
        mask = (parts < n_partials)[:, None] & col_ok[None, :]
        offs = parts[:, None] * n_cols + cols[None, :]  # G x N < 2**31
        if HAS_WEIGHT:
            dw += tl.load(DW_PARTIAL + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            db += tl.load(DB_PARTIAL + offs, mask=mask, other=0.0)
    if HAS_WEIGHT:
        tl.store(DW + cols, tl.sum(dw, axis=0).to(DW.dtype.element_ty), mask=col_ok)
    if HAS_BIAS:
        tl.store(DB + cols, tl.sum(db, axis=0).to(DB.dtype.element_ty), mask=col_ok)


def row_tile(n_cols: int, max_warps: int = 16) -> Tile:
    """Tile and warp count for a row-wise kernel over ``n_cols`` columns: a whole row per tile, a few
    rows per tile when rows are short (about 2K elements a tile), 8 fp32 values per thread up to
    ``max_warps``. Chosen with `clipfast aot` (pointers aligned, as the JIT compiles them): the forward
    spills at 16 warps on sm_90 (ptxas keeps it to 64 registers), so it stops at 8; the backward, holding
    more per row, needs 16 for the widest rows."""
    block_n = runtime.next_power_of_2(n_cols)
    block_m = max(1, min(16, 2048 // block_n))
    num_warps = max(4, min(max_warps, block_m * block_n // 256))
    return Tile(block_m, block_n, warps=num_warps)


def bwd_tile(n_cols: int) -> Tile:
    """The backward's tile (``row_tile`` with up to 16 warps). Under triton < 3.8 a single row of 2048
    (1025..2048 columns) spills on sm_90 with 8 warps (8 bytes at 80 registers); 16 warps hold it in 56."""
    tile = row_tile(n_cols)
    if not runtime.triton_at_least(3, 8) and tile.block_m == 1 and tile.block_n == 2048:
        tile = replace(tile, warps=16)
    return tile


def _unit_stride_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """[..., N] -> [M, N] with unit column stride, as the row kernels read it: a view where one exists, else a
    contiguous copy."""
    t = t.reshape(-1, n_cols)
    return t if t.stride(-1) == 1 or t.shape[0] == 0 else t.contiguous()


@runtime.on_tensor_device
def layer_norm_fwd(x, residual, weight, bias, eps: float):
    """Launch the forward kernel. Returns ``(y, h, mean, rstd)`` with ``h`` None without a residual.
    ``x``/``residual`` are [..., N]; ``y``/``h`` have x's shape and dtype; statistics are fp32 [M]."""
    n_cols = x.shape[-1]
    x2 = _unit_stride_rows(x, n_cols)
    n_rows = x2.shape[0]
    y = runtime.empty(x.shape, x.dtype, x.device)
    h = runtime.empty(x.shape, x.dtype, x.device) if residual is not None else None
    mean = runtime.empty((n_rows,), torch.float32, x.device)
    rstd = runtime.empty((n_rows,), torch.float32, x.device)
    if n_rows == 0:
        return y, h, mean, rstd
    res2 = _unit_stride_rows(residual, n_cols) if residual is not None else x2
    h2 = h.view(-1, n_cols) if h is not None else x2
    y2 = y.view(-1, n_cols)
    tile = row_tile(n_cols, FWD_MAX_WARPS)
    grid = (runtime.cdiv(n_rows, tile.block_m),)
    _layer_norm_fwd_kernel[grid](
        x2, res2, h2, y2, weight if weight is not None else x2, bias if bias is not None else x2, mean, rstd,
        n_rows, n_cols, x2.stride(0), res2.stride(0), h2.stride(0), y2.stride(0), eps,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, num_warps=tile.warps,
    )
    return y, h, mean, rstd


def bwd_shared_estimate(tile: Tile, stages: int, dtype, residual: bool) -> int:
    """An upper bound on the backward's shared memory at ``tile`` (``bwd_tile``) and ``stages`` (``bwd_stages``)
    with ``dtype`` activations, in bytes: ``stages`` buffers of the dy and x (and dh) row tiles and the fp32
    row statistics the pipelined loop copies ahead, plus scratch (Hopper keeps ``stages`` buffers, Ampere one
    fewer). Measured (triton 3.8): 16,436-24,736 B in fp32 at 512-1280 columns (one buffer), 2,048-4,096 B
    in fp16. `clipfast aot` fails a case whose compiled ``shared`` exceeds this."""
    rows = tile.block_m
    per_buffer = (3 if residual else 2) * rows * tile.block_n * runtime.ELEMENT_SIZE[dtype] + 2 * rows * 4
    return stages * per_buffer + runtime.SHARED_SCRATCH_ALLOWANCE


def bwd_stages(block_n: int, dtype=torch.float16, arch: int = 0, residual: bool = True) -> int:
    """Depth of the backward's software-pipelined row loop: the next tile's loads are issued before the
    current tile is reduced (`clipfast aot` shows LDGSTS async copies for the row statistics on sm_90).
    Rows of 8192 columns keep enough bytes in flight alone and spill when pipelined; a pipelined tile whose
    ``bwd_shared_estimate`` for ``dtype`` does not fit ``arch``'s shared memory per block (10 x major + minor;
    0: the interpreter) runs unpipelined."""
    if block_n >= 8192:
        return 1
    tile = bwd_tile(block_n)
    fits = runtime.fits_shared_memory(bwd_shared_estimate(tile, 2, dtype, residual), arch)
    return 2 if fits else 1


# The dW/dB reduction: a [BLOCK_G, BLOCK_N] fp32 tile of partial rows per step, BLOCK_N columns a program.
PARAM_GRAD_TILE = {"BLOCK_G": 32, "BLOCK_N": 64, "num_warps": 4}


def bwd_programs(n_rows: int, n_cols: int, block_m: int, device: torch.device) -> int:
    """Programs of the backward's persistent grid: enough to keep bytes in flight on every SM. Narrow
    rows give each program little work per step, so more programs per SM are resident (Hopper: 8 per SM
    up to 1024 columns, as quack does; Ampere, with fewer registers and less shared memory a SM, half
    that); wide rows fill a SM with fewer. Never more programs than row tiles; every program gets at
    least one."""
    per_sm = 8 if n_cols <= 1024 else 4 if n_cols <= 4096 else 2
    if runtime.capability(device)[0] < 9:
        per_sm = max(1, per_sm // 2)
    return max(1, min(runtime.cdiv(n_rows, block_m), per_sm * runtime.sm_count(device)))


@runtime.on_tensor_device
def layer_norm_bwd(dy, dh, x, weight, bias, mean, rstd):
    """Launch the backward kernels. ``x`` is the normalized input (``h`` for the residual variant),
    ``dh`` the incoming gradient of ``h`` or None, ``weight``/``bias`` the parameters or None. Returns
    ``(dx, dweight, dbias)``: dx in x's dtype, the parameter gradients in the parameters' dtypes (None where
    absent). Two launches: the row pass and the dW/dB reduction."""
    n_cols = x.shape[-1]
    x2, dy2 = _unit_stride_rows(x, n_cols), _unit_stride_rows(dy, n_cols)
    n_rows = x2.shape[0]
    dx = runtime.empty(x.shape, x.dtype, x.device)
    has_weight, has_bias = weight is not None, bias is not None
    if n_rows == 0:
        zeros = lambda p: torch.zeros_like(p) if p is not None else None  # noqa: E731
        return dx, zeros(weight), zeros(bias)
    tile = bwd_tile(n_cols)
    stages = bwd_stages(tile.block_n, x.dtype, runtime.device_arch(x.device), dh is not None)
    n_programs = bwd_programs(n_rows, n_cols, tile.block_m, x.device)
    rows_per_program = runtime.cdiv(runtime.cdiv(n_rows, n_programs), tile.block_m) * tile.block_m
    n_programs = runtime.cdiv(n_rows, rows_per_program)  # every program has rows: every partial row is written
    partial = runtime.empty((int(has_weight) + int(has_bias), n_programs, n_cols), torch.float32, x.device)
    dw_partial = partial[0] if has_weight else mean
    db_partial = partial[-1] if has_bias else mean
    dh2 = _unit_stride_rows(dh, n_cols) if dh is not None else dy2
    dx2 = dx.view(-1, n_cols)
    _layer_norm_bwd_kernel[(n_programs,)](
        dy2, dh2, x2, weight if has_weight else x2, mean, rstd, dx2, dw_partial, db_partial,
        n_rows, n_cols, rows_per_program, dy2.stride(0), dh2.stride(0), x2.stride(0), dx2.stride(0),
        HAS_DH=dh is not None, HAS_WEIGHT=has_weight, HAS_BIAS=has_bias,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, NUM_STAGES=stages, num_warps=tile.warps,
    )
    if not (has_weight or has_bias):
        return dx, None, None
    dweight = runtime.empty(weight.shape, weight.dtype, x.device) if has_weight else None
    dbias = runtime.empty(bias.shape, bias.dtype, x.device) if has_bias else None
    red = PARAM_GRAD_TILE
    _layer_norm_param_grad_kernel[(runtime.cdiv(n_cols, red["BLOCK_N"]),)](
        dw_partial, db_partial, dweight if has_weight else dw_partial, dbias if has_bias else db_partial,
        n_programs, n_cols, HAS_WEIGHT=has_weight, HAS_BIAS=has_bias,
        BLOCK_G=red["BLOCK_G"], BLOCK_N=red["BLOCK_N"], num_warps=red["num_warps"],
    )
    return dx, dweight, dbias


def aot_cases() -> list[runtime.AotCase]:
    """The shipped configurations at CLIP widths (512..1280), plus the widest rows we hold in registers; the
    backward (a software-pipelined loop) also in fp32, with its shared-memory estimate."""
    cases = []
    for n_cols in (512, 768, 1024, 1280, MAX_COLS):
        fwd_tile, tile = row_tile(n_cols, FWD_MAX_WARPS), bwd_tile(n_cols)
        quick = n_cols in (768, MAX_COLS)
        for residual in (False, True):
            cases.append(runtime.AotCase(
                name=f"layer_norm_fwd{'_residual' if residual else ''}[N={n_cols}]",
                kernel=_layer_norm_fwd_kernel,
                signature={"X": "*{dtype}", "RES": "*{dtype}", "H": "*{dtype}", "Y": "*{dtype}", "W": "*fp32",
                           "B": "*fp32", "MEAN": "*fp32", "RSTD": "*fp32", "n_rows": "i32", "n_cols": "i32",
                           "stride_x": "i32", "stride_res": "i32", "stride_h": "i32", "stride_y": "i32", "eps": "fp32"},
                constexprs={"HAS_RESIDUAL": residual, "HAS_WEIGHT": True, "HAS_BIAS": True, **fwd_tile.kwargs()},
                num_warps=fwd_tile.warps, quick=quick,
            ))
            for dtypes in (("fp16", "bf16"), ("fp32",)):  # fp32: twice the bytes per pipeline buffer
                # (the stages sm_80 and sm_90 get: their shared memory fits every tile pipelined)
                stages = bwd_stages(tile.block_n, dtypes[0], 80, residual)
                cases.append(runtime.AotCase(
                    name=f"layer_norm_bwd{'_residual' if residual else ''}{'_fp32' if dtypes == ('fp32',) else ''}"
                         f"[N={n_cols}]",
                    kernel=_layer_norm_bwd_kernel,
                    signature={"DY": "*{dtype}", "DH": "*{dtype}", "X": "*{dtype}", "W": "*fp32", "MEAN": "*fp32",
                               "RSTD": "*fp32", "DX": "*{dtype}", "DW_PARTIAL": "*fp32", "DB_PARTIAL": "*fp32",
                               "n_rows": "i32", "n_cols": "i32", "rows_per_program": "i32", "stride_dy": "i32",
                               "stride_dh": "i32", "stride_x": "i32", "stride_dx": "i32"},
                    constexprs={"HAS_DH": residual, "HAS_WEIGHT": True, "HAS_BIAS": True, **tile.kwargs(),
                                "NUM_STAGES": stages},
                    num_warps=tile.warps, quick=quick and dtypes != ("fp32",), dtypes=dtypes,
                    shared_estimate=bwd_shared_estimate(tile, stages, dtypes[0], residual),
                ))
    # the dW/dB reduction, into fp32 parameters (autocast) and into parameters of the activations' dtype
    red = PARAM_GRAD_TILE
    for param in ("fp32", "{dtype}"):
        cases.append(runtime.AotCase(
            name=f"layer_norm_param_grad[{'fp32' if param == 'fp32' else 'same'} params]",
            kernel=_layer_norm_param_grad_kernel,
            signature={"DW_PARTIAL": "*fp32", "DB_PARTIAL": "*fp32", "DW": f"*{param}", "DB": f"*{param}",
                       "n_partials": "i32", "n_cols": "i32"},
            constexprs={"HAS_WEIGHT": True, "HAS_BIAS": True, "BLOCK_G": red["BLOCK_G"], "BLOCK_N": red["BLOCK_N"]},
            num_warps=red["num_warps"], quick=param == "fp32",
        ))
    return cases
