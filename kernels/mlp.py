"""Fused MLP: one GEMM kernel with constexpr epilogues, plus the standalone activation kernel.

GEMM
----
``C[m, n] = epilogue(sum_k A[m, k] * B[n, k])`` with ``B`` in ``nn.Linear`` layout ([N, K]). Both operands
are addressed through their strides, so every product the MLP needs is this one kernel over views, with
no transposed copy materialized:

====================  =================  =================  =========================================
product               A [M, K]           B [N, K]           epilogue
====================  =================  =================  =========================================
fc forward            x                  W1                 + b1, store Z (training), act -> H
proj forward          H                  W2                 + b2 (+ residual) -> Y
proj dgrad            dY                 W2.T (a view)      * act'(Z) -> dZ   (dH is never stored)
proj wgrad            dY.T (a view)      act(Z).T (a view)  -> dW2, and row sums of A -> db2
fc wgrad              dZ.T (a view)      x.T (a view)       -> dW1, and row sums of A -> db1
fc dgrad              dZ                 W1.T (a view)      -> dx
====================  =================  =================  =========================================

Each program computes one [BLOCK_M, BLOCK_N] tile with an fp32 accumulator, walking K in BLOCK_K steps
(``tl.dot`` on tensor cores: HMMA on sm_80, HGMMA on sm_90). Programs are ordered in groups of GROUP_M
tile rows, so the B tiles a group reads stay in L2 while the group sweeps N. fp32 inputs use
``input_precision="ieee"`` (exact fp32 products, as eager without TF32) unless TF32 is enabled in torch
(``torch.backends.cuda.matmul.allow_tf32`` / ``set_float32_matmul_precision("high")``), which is when
eager cuBLAS uses TF32 too.

Memory traffic: the GEMM reads A and B once per tile row/column (the L2 grouping keeps the re-reads on
chip) and writes C once; the epilogue adds reads of the bias (N), the residual or Z (M x N) only when
the variant needs them. Compared with eager Linear -> act -> Linear, the fused forward skips the separate
activation pass (read Z, write H), and the fused dgrad skips storing dH and the activation-backward pass
(read dH and Z, write dZ).

What the backward keeps
-----------------------
Training needs H (the B operand of the proj wgrad) and act'(Z) (for dZ). The fc epilogue writes the
pre-activation Z (only when a gradient is needed) and the backward keeps Z alone: the proj wgrad applies
act() to each Z tile as it loads it (IS_B_ACTIVATED) and the dgrad epilogue computes act'(Z) from the
same Z, so H never outlives the forward. That halves the activation memory of the block against eager
nn.GELU (x, Z, H) and saves two of three M x hidden tensors against QuickGELU written out (Z, sigmoid, H)
(bench/results/mlp_saved_bytes_cpu has the measured table). The cost is a few fp32 flops per loaded Z element in
one of the six GEMMs, hidden behind the tensor-core loop (ViT-B/16, bf16: storing H instead would be
another 310 MB per layer at batch 256). The forward applies act() to Z rounded to the output dtype,
exactly what the backward recomputes, so forward and backward see the same H.

Bias gradients: db2 = sum_m dY and db1 = sum_m dZ are the row sums of the A operand of the wgrad GEMMs
(dY.T, dZ.T). The programs of the first tile column already load every A tile, so they add its row sums
to an fp32 register vector and store it once: no extra pass over dY or dZ, fp32 accumulation, no atomics.

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
def _mma_step(a, b, acc, rowsum, pid_n, IS_A_ROW_MAJOR: tl.constexpr, IS_B_ROW_MAJOR: tl.constexpr,
              HAS_ROWSUM: tl.constexpr, IS_TF32: tl.constexpr, IS_B_ACTIVATED: tl.constexpr,
              ACTIVATION: tl.constexpr):
    """acc += A_tile @ act(B_tile).T on tensor cores (a, b as loaded, see ``_tile_ptrs``; act applied only
    when IS_B_ACTIVATED, in fp32 and rounded back to B's dtype); the first tile column also adds the row
    sums of the A tile (bias gradients)."""
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
    if HAS_ROWSUM:
        if pid_n == 0:
            rowsum += tl.sum(a.to(tl.float32), axis=1)
    return acc, rowsum


@triton.jit
def _epilogue(acc, rm, rn, M, N, stride_c, C, BIAS, RES, Z, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
              HAS_PRE_OUT: tl.constexpr, HAS_ACT_GRAD: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
              IS_B_ACTIVATED: tl.constexpr, IS_ALIGNED: tl.constexpr):
    """Bias, activation (or the activation gradient from the saved Z), residual and the store, for the
    rows rm and columns rn of the output. C, Z and RES share one layout (row stride stride_c).

    The activation is applied to the pre-activation rounded to the output dtype, the Z the backward sees:
    the H this forward uses and the H the weight gradient recomputes from Z are then the same values."""
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
    tl.store(_tile_ptrs(C, rm, rn, stride_c, IS_ALIGNED), acc.to(C.dtype.element_ty), mask=mask)


# Shipped tile configurations. The first one is what the interpreter runs (large tiles keep it fast)
# and a good default on both architectures. Every entry compiles without spills, software-pipelined, with
# tensor cores for fp16/bf16 on sm_80 and sm_90, for every epilogue on aligned operands (``aot_cases``).
# Measured out by the AOT check: 128x256 tiles (8 warps) and 4-warp tiles with BLOCK_K=64 spill with
# these epilogues. Operands that are not 16-byte aligned load element by element, which needs more
# registers, so they are tuned over the small tiles only (``_prune``).
GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
UNALIGNED_MAX_TILE = 64 * 64


def _prune(configs, named_args, **kwargs):
    """Unaligned operands (see ``_tile_ptrs``) are tuned over the small tiles only."""
    if named_args.get("IS_ALIGNED", kwargs.get("IS_ALIGNED", True)):
        return configs
    small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= UNALIGNED_MAX_TILE]
    return small or configs


@runtime.autotune(GEMM_CONFIGS, key=["M", "N", "K", "IS_A_ROW_MAJOR", "IS_B_ROW_MAJOR", "IS_ALIGNED"],
                  prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _gemm_kernel(
    A, B, C, BIAS, RES, Z, ROWSUM,
    M, N, K, stride_a, stride_b, stride_c,
    IS_A_ROW_MAJOR: tl.constexpr, IS_B_ROW_MAJOR: tl.constexpr, IS_ALIGNED: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_PRE_OUT: tl.constexpr, HAS_ACT_GRAD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_ROWSUM: tl.constexpr, IS_TF32: tl.constexpr, IS_B_ACTIVATED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """A: [M, K], unit stride along K (IS_A_ROW_MAJOR) or M; B: [N, K], unit stride along K (IS_B_ROW_MAJOR,
    nn.Linear layout) or N. C, and Z / RES when used, are [M, N] with row stride stride_c."""
    # Grouped tile order: GROUP_M tile rows sweep the tile columns together (B stays in L2).
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge load wrapped (valid) addresses and are never stored, so only K is masked.
    rm_load = (rm % M).to(tl.int64)
    rn_load = (rn % N).to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rowsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if IS_A_ROW_MAJOR:  # [BLOCK_M, BLOCK_K] tiles
        a_ptrs = _tile_ptrs(A, rm_load, rk, stride_a, IS_ALIGNED)
        a_step = BLOCK_K
    else:  # [BLOCK_K, BLOCK_M] tiles
        a_ptrs = _tile_ptrs(A, rk, rm_load, stride_a, IS_ALIGNED)
        a_step = BLOCK_K * stride_a
    if IS_B_ROW_MAJOR:  # [BLOCK_N, BLOCK_K] tiles
        b_ptrs = _tile_ptrs(B, rn_load, rk, stride_b, IS_ALIGNED)
        b_step = BLOCK_K
    else:  # [BLOCK_K, BLOCK_N] tiles
        b_ptrs = _tile_ptrs(B, rk, rn_load, stride_b, IS_ALIGNED)
        b_step = BLOCK_K * stride_b
    # Whole K tiles load without a mask, so they move in vectors and the loop is software-pipelined
    # whatever K is; a K tail (K % BLOCK_K) takes one masked step after the loop.
    k_tiles = K // BLOCK_K
    for _ in range(0, k_tiles):
        acc, rowsum = _mma_step(tl.load(a_ptrs), tl.load(b_ptrs), acc, rowsum, pid_n, IS_A_ROW_MAJOR, IS_B_ROW_MAJOR,
                                HAS_ROWSUM, IS_TF32, IS_B_ACTIVATED, ACTIVATION)
        a_ptrs += a_step
        b_ptrs += b_step
    k_left = K - k_tiles * BLOCK_K
    if k_left > 0:
        k_ok = rk < k_left
        a = tl.load(a_ptrs, mask=k_ok[None, :] if IS_A_ROW_MAJOR else k_ok[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[None, :] if IS_B_ROW_MAJOR else k_ok[:, None], other=0.0)
        acc, rowsum = _mma_step(a, b, acc, rowsum, pid_n, IS_A_ROW_MAJOR, IS_B_ROW_MAJOR, HAS_ROWSUM, IS_TF32,
                                IS_B_ACTIVATED, ACTIVATION)

    # Epilogue on the fp32 accumulator, one half of the tile columns at a time (fewer values live at
    # once: the activation and its gradient need several temporaries per element).
    acc_lo, acc_hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    rn_lo = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
    _epilogue(acc_lo, rm, rn_lo, M, N, stride_c, C, BIAS, RES, Z, HAS_BIAS, ACTIVATION, HAS_PRE_OUT, HAS_ACT_GRAD,
              HAS_RESIDUAL, IS_B_ACTIVATED, IS_ALIGNED)
    _epilogue(acc_hi, rm, rn_lo + BLOCK_N // 2, M, N, stride_c, C, BIAS, RES, Z, HAS_BIAS, ACTIVATION, HAS_PRE_OUT,
              HAS_ACT_GRAD, HAS_RESIDUAL, IS_B_ACTIVATED, IS_ALIGNED)
    if HAS_ROWSUM:
        if pid_n == 0:
            tl.store(ROWSUM + rm, rowsum, mask=rm < M)


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
# The most elements one GEMM launch writes (its epilogue offsets are 32-bit).
MAX_EPILOGUE_ELEMENTS = 2**31 - 1
ELEMENTWISE_WARPS = 8


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _allow_tf32(t: torch.Tensor) -> bool:
    """fp32 GEMMs use TF32 exactly when eager cuBLAS would."""
    return t.dtype == torch.float32 and t.is_cuda and torch.get_float32_matmul_precision() != "highest"


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


def gemm(a: torch.Tensor, b: torch.Tensor, *, bias=None, activation: str = "none", residual=None,
         save_pre: bool = False, pre=None, rowsum: bool = False, activate_b: bool = False):
    """``epilogue(a @ b.T)`` for 2-D views ``a`` [M, K] and ``b`` [N, K] with a unit stride along either
    axis (other views are copied).

    - ``bias`` [N] is added, then ``activation`` applied (``save_pre`` also returns the value before it);
    - ``pre`` [M, N] given (contiguous): the product is multiplied by ``activation'(pre)`` instead (dgrad);
    - ``residual`` [M, N] is added last;
    - ``rowsum``: also returns the fp32 row sums of ``a`` ([M]);
    - ``activate_b``: multiply by ``activation(b)`` instead of ``b`` (b holds the pre-activation Z; the
      epilogue then applies no activation).

    Returns ``(c, pre_activation or None, rowsum or None)``; ``c`` is contiguous in ``a``'s dtype.
    """
    M, K = a.shape
    N = b.shape[0]
    c = runtime.empty((M, N), a.dtype, a.device)
    z = runtime.empty((M, N), a.dtype, a.device) if save_pre else None
    sums = runtime.empty((M,), torch.float32, a.device) if rowsum else None
    if M == 0 or N == 0:
        return c, z, sums
    # K == 0 (e.g. the weight gradient of an empty batch) runs no loop step and writes the epilogue of 0.
    a, a_row_major, stride_a = _layout(a)
    b, b_row_major, stride_b = _layout(b)
    if residual is not None and residual.stride() != (N, 1):
        residual = residual.contiguous()
    zz = z if z is not None else pre
    if zz is not None:
        assert zz.stride() == (N, 1)
    # The epilogue addresses C, Z and RES with 32-bit offsets: outputs of 2**31 elements or more run
    # as several launches over row blocks (row slices of every operand are views).
    rows_per_launch = max(1, MAX_EPILOGUE_ELEMENTS // N)
    for start in range(0, M, rows_per_launch):
        rows = slice(start, min(M, start + rows_per_launch))
        _launch(a[rows], a_row_major, stride_a, b, b_row_major, stride_b, c[rows], bias,
                residual[rows] if residual is not None else None, zz[rows] if zz is not None else None,
                sums[rows] if sums is not None else None, activation, save_pre, pre is not None, activate_b)
    return c, z, sums


def _launch(a, a_row_major, stride_a, b, b_row_major, stride_b, c, bias, residual, zz, sums, activation,
            save_pre, act_grad, activate_b):
    M, K = a.shape
    N = b.shape[0]
    epilogue = [(t, True, N, N) for t in (c, zz, residual) if t is not None]
    aligned = _aligned((a, a_row_major, stride_a, M), (b, b_row_major, stride_b, N), *epilogue)

    def grid(meta):
        return (runtime.cdiv(M, meta["BLOCK_M"]) * runtime.cdiv(N, meta["BLOCK_N"]),)

    _gemm_kernel[grid](
        a, b, c, bias if bias is not None else c, residual if residual is not None else c,
        zz if zz is not None else c, sums if sums is not None else c,
        M, N, K, stride_a, stride_b, N,
        IS_A_ROW_MAJOR=a_row_major, IS_B_ROW_MAJOR=b_row_major, IS_ALIGNED=aligned,
        HAS_BIAS=bias is not None, ACTIVATION=ACTIVATIONS[activation], HAS_PRE_OUT=save_pre,
        HAS_ACT_GRAD=act_grad, HAS_RESIDUAL=residual is not None, HAS_ROWSUM=sums is not None,
        IS_TF32=_allow_tf32(a), IS_B_ACTIVATED=activate_b,
    )


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
        dw2, _, db2 = gemm(dy2.t(), z.t(), activation=activation, activate_b=True, rowsum=has_b2)
    if need_dx or need_fc_grads:
        dz, _, _ = gemm(dy2, w2.t(), activation=activation, pre=z)
        if need_fc_grads:
            dw1, _, db1 = gemm(dz.t(), x2.t(), rowsum=has_b1)
        if need_dx:
            dx, _, _ = gemm(dz, w1.t())
    return dx, dw1, db1, dw2, db2


def activation_fwd(x: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(x)`` elementwise; ``x`` contiguous."""
    out = runtime.empty(x.shape, x.dtype, x.device)
    n = x.numel()
    if n:
        _activation_kernel[(runtime.cdiv(n, ELEMENTWISE_BLOCK),)](
            x, x, out, n, ACTIVATION=ACTIVATIONS[activation], BACKWARD=False, BLOCK=ELEMENTWISE_BLOCK,
            num_warps=ELEMENTWISE_WARPS)
    return out


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
    "ROWSUM": "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_a": "i32", "stride_b": "i32", "stride_c": "i32",
}

_NO_EPILOGUE = {"HAS_BIAS": False, "ACTIVATION": 0, "HAS_PRE_OUT": False, "HAS_ACT_GRAD": False, "HAS_RESIDUAL": False,
                "HAS_ROWSUM": False, "IS_TF32": False, "IS_B_ACTIVATED": False}

# The products of the MLP (see the table at the top) with the operand layouts they run with.
_FWD = {"IS_A_ROW_MAJOR": True, "IS_B_ROW_MAJOR": True}
_DGRAD = {"IS_A_ROW_MAJOR": True, "IS_B_ROW_MAJOR": False}
_WGRAD = {"IS_A_ROW_MAJOR": False, "IS_B_ROW_MAJOR": False}
_GEMM_VARIANTS = {
    "fc_fwd_quick_gelu": {**_FWD, "HAS_BIAS": True, "ACTIVATION": 1, "HAS_PRE_OUT": True},
    "fc_fwd_gelu": {**_FWD, "HAS_BIAS": True, "ACTIVATION": 2, "HAS_PRE_OUT": True},
    "fc_fwd_gelu_tanh": {**_FWD, "HAS_BIAS": True, "ACTIVATION": 3, "HAS_PRE_OUT": True},
    "proj_fwd_residual": {**_FWD, "HAS_BIAS": True, "HAS_RESIDUAL": True},
    "dgrad_quick_gelu": {**_DGRAD, "ACTIVATION": 1, "HAS_ACT_GRAD": True},
    "dgrad_gelu": {**_DGRAD, "ACTIVATION": 2, "HAS_ACT_GRAD": True},
    "dgrad_gelu_tanh": {**_DGRAD, "ACTIVATION": 3, "HAS_ACT_GRAD": True},
    "wgrad_bias": {**_WGRAD, "HAS_ROWSUM": True},
    "wgrad_quick_gelu_b": {**_WGRAD, "HAS_ROWSUM": True, "ACTIVATION": 1, "IS_B_ACTIVATED": True},
    "wgrad_gelu_b": {**_WGRAD, "HAS_ROWSUM": True, "ACTIVATION": 2, "IS_B_ACTIVATED": True},
    "wgrad_gelu_tanh_b": {**_WGRAD, "HAS_ROWSUM": True, "ACTIVATION": 3, "IS_B_ACTIVATED": True},
    "dgrad_input": {**_DGRAD},
}
_QUICK_VARIANTS = ("fc_fwd_quick_gelu", "proj_fwd_residual", "dgrad_quick_gelu", "wgrad_bias", "wgrad_quick_gelu_b")


def aot_cases() -> list[runtime.AotCase]:
    """Every MLP product at every shipped config on aligned operands (CLIP widths), and on unaligned
    operands at the configs they are tuned over; plus the elementwise activation kernel."""
    cases = []
    for variant, flags in _GEMM_VARIANTS.items():
        for aligned in (True, False):
            constexprs = {**_NO_EPILOGUE, **flags, "IS_ALIGNED": aligned}
            configs = _prune(_gemm_kernel.shipped_configs, constexprs)
            for i, cfg in enumerate(configs):
                cases.append(runtime.AotCase(
                    name=f"mlp_gemm_{variant}{'' if aligned else '_unaligned'}",
                    kernel=runtime.jit_function(_gemm_kernel),
                    signature=_GEMM_SIGNATURE, constexprs={**constexprs, **cfg.kwargs}, num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages, expects_mma=True,
                    quick=aligned and i == 0 and variant in _QUICK_VARIANTS,
                ))
    for backward in (False, True):
        cases.append(runtime.AotCase(
            name=f"quick_gelu_{'bwd' if backward else 'fwd'}", kernel=_activation_kernel,
            signature={"X": "*{dtype}", "DY": "*{dtype}", "OUT": "*{dtype}", "n": "i32"},
            constexprs={"ACTIVATION": 1, "BACKWARD": backward, "BLOCK": ELEMENTWISE_BLOCK},
            num_warps=ELEMENTWISE_WARPS, quick=True,
        ))
    return cases
