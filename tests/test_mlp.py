from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

import clipfast
from clipfast.kernels import gemm
from clipfast.kernels import mlp as kernel
from clipfast.kernels import runtime
from clipfast.ops.mlp import reference_activation

from .conftest import DEVICE, DTYPES, ON_GPU
from .numerics import assert_op_matches, randn

ACTIVATIONS = ["quick_gelu", "gelu", "gelu_tanh"]


def eager_act(z, activation):
    """What eager CLIP code computes, in the input dtype (float64 for the reference)."""
    if activation == "quick_gelu":
        return z * torch.sigmoid(1.702 * z)
    return F.gelu(z, approximate="tanh" if activation == "gelu_tanh" else "none")


def eager_mlp(activation, with_residual=False):
    def fn(x, w1, b1, w2, b2, residual=None):
        y = F.linear(eager_act(F.linear(x, w1, b1), activation), w2, b2)
        return y + residual if with_residual else y
    return fn


def fused_mlp(activation, with_residual=False):
    def fn(x, w1, b1, w2, b2, residual=None):
        return clipfast.mlp(x, w1, b1, w2, b2, activation, residual=residual if with_residual else None)
    return fn


def mlp_inputs(rows, width, hidden, out=None, outliers=2, lead=()):
    """x with a few outlier channels (trained CLIP has them), Linear-scaled weights, non-trivial biases."""
    out = out or width
    x = randn(*lead, rows, width, device=DEVICE, outliers=outliers)
    w1 = randn(hidden, width, device=DEVICE) / width ** 0.5
    b1 = 0.5 * randn(hidden, device=DEVICE)
    w2 = randn(out, hidden, device=DEVICE) / hidden ** 0.5
    b2 = 0.5 * randn(out, device=DEVICE)
    return [x, w1, b1, w2, b2]


# Awkward token counts (1, a prime, CLIP's 77 text and 197 ViT-B/16 tokens) at a small width with
# hidden = 4x; the interpreter's cost grows with the number of tiles, so widths stay small on CPU.
CASES = [(1, "quick_gelu"), (7, "quick_gelu"), (77, "quick_gelu"), (197, "quick_gelu"), (7, "gelu"), (77, "gelu"),
         (7, "gelu_tanh"), (197, "gelu_tanh")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,activation", CASES)
def test_mlp_matches_float64(dtype, rows, activation):
    width = 64 if rows != 77 else 96
    assert_op_matches(f"mlp[{activation}]", fused_mlp(activation), eager_mlp(activation),
                      mlp_inputs(rows, width, 4 * width), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_with_residual_matches_float64(dtype):
    inputs = mlp_inputs(23, 64, 256, lead=(2,)) + [randn(2, 23, 64, device=DEVICE)]
    assert_op_matches("mlp+residual", fused_mlp("quick_gelu", True), eager_mlp("quick_gelu", True), inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_k_not_a_multiple_of_16(dtype):
    # width 40 and hidden 100: both GEMMs have a K tail, and the unaligned (element-wise load) path runs
    assert_op_matches("mlp odd K", fused_mlp("gelu"), eager_mlp("gelu"), mlp_inputs(13, 40, 100, out=24), dtype)


def test_mlp_without_biases():
    x, w1, _, w2, _ = mlp_inputs(9, 64, 256)
    assert_op_matches("mlp no bias", lambda x, w1, w2: clipfast.mlp(x, w1, None, w2, None),
                      lambda x, w1, w2: eager_mlp("quick_gelu")(x, w1, None, w2, None), [x, w1, w2], torch.float32)


def test_mlp_non_contiguous_inputs():
    x, w1, b1, w2, b2 = mlp_inputs(10, 64, 256)
    base = randn(10, 3, 64, device=DEVICE)
    strided = base[:, 1, :]                      # row stride 192: read in place
    transposed = randn(64, 10, device=DEVICE).t()  # unit stride along rows: read as a column-major operand
    residual = randn(64, 10, device=DEVICE).t()
    for xs in (strided, transposed):
        assert not xs.is_contiguous()
        assert_op_matches("mlp strided x", fused_mlp("quick_gelu", True), eager_mlp("quick_gelu", True),
                          [xs, w1, b1, w2, b2, residual], torch.float32)
    # transposed weight views (e.g. tied or stored transposed)
    w1t = randn(64, 256, device=DEVICE).t() / 8
    torch.testing.assert_close(clipfast.mlp(x, w1t, b1, w2, b2), eager_mlp("quick_gelu")(x, w1t, b1, w2, b2),
                               atol=1e-5, rtol=1e-5)


def test_mlp_gradient_subsets():
    """Frozen weights skip their GEMMs; a frozen input skips dx; every requested gradient is still right."""
    x, w1, b1, w2, b2 = mlp_inputs(17, 64, 256)
    dy = randn(17, 64, device=DEVICE)
    ref = [t.detach().double().requires_grad_() for t in (x, w1, b1, w2, b2)]
    eager_mlp("quick_gelu")(*ref).backward(dy.double())
    for trainable in ([0], [1, 2], [3, 4], [0, 3], [2]):
        leaves = [t.detach().clone().requires_grad_(i in trainable) for i, t in enumerate((x, w1, b1, w2, b2))]
        clipfast.mlp(*leaves).backward(dy)
        for i, (leaf, r) in enumerate(zip(leaves, ref)):
            if i in trainable:
                torch.testing.assert_close(leaf.grad.double(), r.grad, atol=1e-4, rtol=1e-4)
            else:
                assert leaf.grad is None


def test_mlp_no_grad_does_not_save_the_pre_activation():
    x, w1, b1, w2, b2 = mlp_inputs(5, 64, 256)
    with torch.no_grad():
        y, z = torch.ops.clipfast.mlp_fwd(x, w1, b1, w2, b2, None, "quick_gelu", False)
    assert z.numel() == 0
    torch.testing.assert_close(y, eager_mlp("quick_gelu")(x, w1, b1, w2, b2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if ON_GPU else []))
def test_mlp_fp32_parameters_with_low_precision_activations(dtype):
    # fp32 master weights with fp16/bf16 activations: weights are cast like autocast casts nn.Linear's;
    # their gradients arrive in fp32
    x, w1, b1, w2, b2 = mlp_inputs(12, 64, 256)
    x = x.to(dtype).requires_grad_()
    params = [t.clone().requires_grad_() for t in (w1, b1, w2, b2)]
    y = clipfast.mlp(x, *params)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    ref = eager_mlp("quick_gelu")(x.detach().double(), *[p.detach().double() for p in params])
    torch.testing.assert_close(y.double(), ref, atol=3e-2, rtol=2e-2)


def test_mlp_empty_batch():
    x, w1, b1, w2, b2 = [t.requires_grad_() for t in mlp_inputs(0, 64, 256)]
    y = clipfast.mlp(x, w1, b1, w2, b2)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert x.grad.shape == (0, 64)
    for p in (w1, b1, w2, b2):
        assert torch.equal(p.grad, torch.zeros_like(p))


def test_mlp_bad_input_errors():
    x, w1, b1, w2, b2 = mlp_inputs(4, 16, 64)
    with pytest.raises(ValueError, match="`activation` must be one of"):
        clipfast.mlp(x, w1, b1, w2, b2, "relu")
    with pytest.raises(ValueError, match="`fc_weight` must have shape \\(64, 15\\)"):
        clipfast.mlp(x[:, :15], w1, b1, w2, b2)
    with pytest.raises(ValueError, match="`proj_weight` must have shape"):
        clipfast.mlp(x, w1, b1, w2[:, :63], b2)
    with pytest.raises(ValueError, match="`fc_bias` must have shape \\(64,\\)"):
        clipfast.mlp(x, w1, b1[:3], w2, b2)
    with pytest.raises(ValueError, match="`fc_weight` must have 2 dimensions"):
        clipfast.mlp(x, w1[0], b1, w2, b2)
    with pytest.raises(ValueError, match="`residual` must have shape"):
        clipfast.mlp(x, w1, b1, w2, b2, residual=torch.zeros(4, 15, device=DEVICE))
    with pytest.raises(TypeError, match="`residual` dtype"):
        clipfast.mlp(x, w1, b1, w2, b2, residual=torch.zeros(4, 16, device=DEVICE, dtype=torch.float16))
    with pytest.raises(TypeError, match="`x` has dtype int64"):
        clipfast.mlp(x.long(), w1, b1, w2, b2)
    with pytest.raises(TypeError, match="`x` must be a torch.Tensor"):
        clipfast.quick_gelu([1.0])
    if ON_GPU:
        with pytest.raises(ValueError, match="one device"):
            clipfast.mlp(x, w1.cpu(), b1, w2, b2)


def test_mlp_kernels_actually_run(monkeypatch):
    # guards against the suite silently testing the eager fallback instead of the kernels
    from clipfast.kernels import mlp as kernel

    calls = []
    real = kernel.gemm
    monkeypatch.setattr(kernel, "gemm", lambda *a, **k: calls.append(k) or real(*a, **k))
    x, w1, b1, w2, b2 = [t.requires_grad_() for t in mlp_inputs(3, 32, 128)]
    clipfast.mlp(x, w1, b1, w2, b2).sum().backward()
    # fc (+act), proj; proj wgrad (act(Z) operand), dgrad (*act', column sums -> db1), fc wgrad, dx
    assert len(calls) == 6
    assert calls[0]["activation"] == "quick_gelu" and calls[0]["save_pre"]
    assert sum(bool(c.get("colsum")) for c in calls) == 1 and sum(c.get("pre") is not None for c in calls) == 1
    assert sum(bool(c.get("split_k")) for c in calls) == 2
    assert sum(bool(c.get("activate_b")) for c in calls) == 1  # H recomputed from Z in the proj wgrad


def test_eager_fallback_matches_float64(monkeypatch):
    # CPU without the interpreter (a laptop) runs the eager reference: same ops, same numerics standard
    monkeypatch.setattr(runtime, "uses_triton", lambda t: False)
    for dtype in (torch.float32, torch.float16):
        assert_op_matches("mlp eager fallback", fused_mlp("gelu", True), eager_mlp("gelu", True),
                          mlp_inputs(9, 32, 128) + [randn(9, 32, device=DEVICE)], dtype)
        assert_op_matches("quick_gelu eager fallback", clipfast.quick_gelu, lambda x: eager_act(x, "quick_gelu"),
                          [randn(5, 33, device=DEVICE)], dtype)


def _tile_id(tile):
    return (f"{tile.block_m}x{tile.block_n}x{tile.block_k}w{tile.warps}s{tile.stages}e{tile.param('EPILOGUE_SUBTILES')}"
            f"{'-tma' if gemm.is_persistent(tile) else ''}")


TILES = gemm.TILES.shipped()
P = gemm.Product


def _unaligned(tile):
    return P.UNALIGNED not in tile.avoid


def _skip_unless_it_runs_here(tile, dtype):
    """The interpreter runs every tile. On a GPU, a forced tile the offer rules never give a plain product of
    this dtype on this architecture (``gemm.why_not_offered``: the persistent TMA variant before sm_90, a
    tile whose shared memory does not fit the GPU's per-block maximum in this dtype, ...) is skipped: the
    autotuner never runs it there, and a launch over the shared-memory limit fails (OutOfResources)."""
    if not ON_GPU:
        return
    arch = runtime.device_arch(DEVICE)
    reason = gemm.why_not_offered(tile, kernel._product_kinds({"A": torch.empty(0, dtype=dtype)}), True, arch)
    if reason:
        pytest.skip(f"{_tile_id(tile)} is not offered to {dtype} on sm_{arch}: {reason}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tile", TILES[1:], ids=_tile_id)
def test_every_shipped_tile_matches_float64(monkeypatch, tile, dtype):
    """The interpreter runs the first tile only: force each other one (its epilogue sub-tiles, 256-row
    tiles with several column-sum groups, the persistent TMA variant) on ragged shapes (rows past a 64-row
    group, N and K tails)."""
    _skip_unless_it_runs_here(tile, dtype)
    monkeypatch.setattr(kernel._gemm_kernel, "configs", [tile.config()])
    inputs = mlp_inputs(70, 48, 136) + [randn(70, 48, device=DEVICE)]
    assert_op_matches(f"mlp tile {_tile_id(tile)}", fused_mlp("gelu", True), eager_mlp("gelu", True), inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_k_weight_gradients_match_float64(monkeypatch, dtype):
    """Weight gradients in K slices (fp32 partials + one sum; the last slice has a K tail), and bias
    gradients summed over several chunks of rows (three passes of the column-sum kernel)."""
    monkeypatch.setattr(gemm, "FORCE_SPLIT_K", 3)
    monkeypatch.setattr(kernel, "COLUMN_SUM_ROWS", 16)
    calls = []
    real = kernel._column_sum_kernel.run
    monkeypatch.setattr(kernel._column_sum_kernel, "run", lambda *a, **k: calls.append(k["grid"]) or real(*a, **k))
    assert gemm.split_k_slices(64, 256, 300, torch.device("cpu")) == 3
    assert_op_matches("mlp split-K", fused_mlp("quick_gelu"), eager_mlp("quick_gelu"), mlp_inputs(300, 64, 256), dtype)
    assert any(g[1] == 19 for g in calls) and any(g[1] == 2 for g in calls)  # chunked db2 / db1 sums


def test_tiles_are_pruned_per_product_kind():
    """Each product is offered only the tiles AOT measured spill-free for its kind; unaligned operands the
    small tile; architecture-specific tiles only on their architecture."""
    def offered(arch=90, **flags):
        args = {**kernel._NO_EPILOGUE, "IS_ALIGNED": True, **flags}
        return {gemm._tile(c) for c in kernel._prune(gemm.GEMM_CONFIGS, args, arch=arch)}

    hopper = {t for t in TILES if gemm.offered(t, P(0), True, 90)}
    assert offered() == hopper
    assert {t for t in TILES if gemm.is_persistent(t)} <= hopper  # (triton 3.6+ has tensor descriptors)
    assert offered(ACTIVATION=1, IS_B_ACTIVATED=True) == {t for t in hopper if P.ACTIVATED_B not in t.avoid}
    assert offered(HAS_BIAS=True, HAS_RESIDUAL=True) == {t for t in hopper if P.RESIDUAL not in t.avoid}
    assert offered(ACTIVATION=2, HAS_ACT_GRAD=True) == {
        t for t in hopper if not (P.HEAVY_ACTIVATION | P.ACT_GRAD) & t.avoid}
    assert offered(ACTIVATION=1, HAS_ACT_GRAD=True) == {t for t in hopper if P.ACT_GRAD not in t.avoid}
    assert offered(IS_ALIGNED=False) == {t for t in TILES if _unaligned(t)}
    assert offered(IS_SPLIT=True) == {t for t in hopper if P.SPLIT_K not in t.avoid}
    fp32 = offered(A=torch.empty(1, 1))
    assert fp32 == {t for t in hopper if "fp32" in t.dtypes and gemm.offered(t, P.FP32, True, 90)}
    assert not any(gemm.is_persistent(t) or t.block_m * t.block_n > 128 * 128 for t in fp32)  # over 227 KB in fp32
    assert {t for t in TILES if gemm.is_persistent(t)} <= offered(A=torch.empty(1, 1, dtype=torch.float16))
    ampere = offered(arch=80)
    assert ampere == {t for t in TILES if not gemm.is_persistent(t) and t.archs in (None, (8,))}
    # not a CUDA tensor (the interpreter): every generation's tiles, no shared-memory limit, no TMA
    assert offered(arch=0) == {t for t in TILES if not gemm.is_persistent(t)}
    assert P.ACTIVATED_B | P.SPLIT_K in gemm._tile(gemm.GEMM_CONFIGS[3]).avoid  # a typed value, not strings


@pytest.mark.parametrize("arch", sorted(runtime.MAX_SHARED_PER_BLOCK))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_offered_tiles_fit_the_shared_memory_per_block(arch, dtype):
    """Every tile the offer rules give any MLP product (each epilogue, aligned or not) of ``dtype`` on
    ``arch`` fits the architecture's shared memory per block by the tile's estimate (which `clipfast aot`
    checks is an upper bound on the compiled kernel's), and every product is offered at least one tile."""
    limit = runtime.MAX_SHARED_PER_BLOCK[arch]
    for variant, flags in kernel._GEMM_VARIANTS.items():
        for aligned in (True, False):
            args = {**kernel._NO_EPILOGUE, **{k: v for k, v in flags.items() if not k.startswith("_")},
                    "IS_ALIGNED": aligned, "A": torch.empty(0, dtype=dtype)}
            kinds = kernel._product_kinds(args)
            kept = [gemm._tile(c) for c in kernel._prune(gemm.GEMM_CONFIGS, args, arch=arch)]
            if arch >= 80:  # (Turing's 64 KB fit no fp32 tile: the launch takes the smallest estimate)
                assert len(kept) == sum(gemm.offered(t, kinds, aligned, arch) for t in kept), (variant, aligned)
                for tile in kept:
                    assert gemm.shared_estimate(tile, kinds) <= limit, (variant, aligned, tile)
            else:
                assert min(gemm.shared_estimate(t, kinds) for t in kept) == min(
                    gemm.shared_estimate(t, kinds) for t in TILES if _unaligned(t) or aligned)
    # the tiles measured over the limit in fp32 (compiled: 294,912 B for the 128x256 tiles on sm_90, 262,168 B
    # and more for the persistent ones; 196,608 B for 128x256 on sm_80) are never offered to fp32 there
    if dtype == torch.float32 and arch in (80, 90):
        for t in TILES:
            if gemm.is_persistent(t) or t.block_m * t.block_n > 128 * 128:
                assert not gemm.offered(t, P.FP32, True, arch), t
                if "fp32" in t.dtypes and (t.archs is None or arch // 10 in t.archs):  # else: not on this arch
                    assert "shared memory" in gemm.why_not_offered(t, P.FP32, True, arch), t
    assert runtime.max_shared_per_block(0) is None and runtime.fits_shared_memory(10 ** 9, 0)  # the interpreter
    assert runtime.max_shared_per_block(91) == runtime.MAX_SHARED_PER_BLOCK[90]  # unlisted: its generation's least
    assert runtime.max_shared_per_block(150) == min(v for a, v in runtime.MAX_SHARED_PER_BLOCK.items() if a >= 80)


def test_persistent_tma_variant_needs_hopper_alignment_and_tensor_descriptors(monkeypatch):
    assert gemm.tma_applies(90, True) and gemm.tma_applies(100, True)
    assert not gemm.tma_applies(80, True) and not gemm.tma_applies(90, False)
    monkeypatch.setattr(gemm, "HAS_TENSOR_DESCRIPTORS", False)  # a triton without tl.make_tensor_descriptor
    assert not gemm.tma_applies(90, True)
    assert not any(gemm.is_persistent(gemm._tile(c)) for c in kernel._prune(gemm.GEMM_CONFIGS, {}, arch=90))


PERSISTENT_TILES = [t for t in TILES if gemm.is_persistent(t)]


@pytest.mark.parametrize("tile,dtype", list(zip(PERSISTENT_TILES, DTYPES[::-1] * len(PERSISTENT_TILES))),
                         ids=[_tile_id(t) for t in PERSISTENT_TILES])
def test_persistent_tiles_walk_several_tiles_per_program(monkeypatch, tile, dtype):
    """The persistent TMA variant with fewer programs (3 'SMs') than output tiles: each program walks
    several tiles of the grouped order, through tensor descriptors whose boxes cross the M, N and K edges
    (odd token count 197: K tail of the weight gradients; width 80: K tail of the fc forward)."""
    _skip_unless_it_runs_here(tile, dtype)
    monkeypatch.setattr(runtime, "sm_count", lambda device: 3)
    monkeypatch.setattr(kernel._gemm_kernel, "configs", [tile.config()])
    grids = []
    real = kernel._gemm_kernel.fn.run
    monkeypatch.setattr(kernel._gemm_kernel.fn, "run", lambda *a, **k: grids.append(k["grid"](k)) or real(*a, **k))
    inputs = mlp_inputs(197, 80, 384) + [randn(197, 80, device=DEVICE)]
    assert_op_matches(f"mlp persistent {_tile_id(tile)}", fused_mlp("quick_gelu", True), eager_mlp("quick_gelu", True),
                      inputs, dtype)
    assert max(g[0] for g in grids) == 3  # the fc forward has more tiles than programs


@pytest.mark.parametrize("dtype", DTYPES)
def test_persistent_split_k_weight_gradients_match_float64(monkeypatch, dtype):
    """Split-K slices through tensor descriptors: slice starts as descriptor coordinates, the last slice's
    K tail read as zeros."""
    _skip_unless_it_runs_here(PERSISTENT_TILES[-1], dtype)
    monkeypatch.setattr(gemm, "FORCE_SPLIT_K", 3)
    monkeypatch.setattr(kernel._gemm_kernel, "configs", [PERSISTENT_TILES[-1].config()])
    assert_op_matches("mlp persistent split-K", fused_mlp("gelu"), eager_mlp("gelu"), mlp_inputs(300, 32, 128), dtype)


def test_descriptor_scratch_allocator_is_set_once_and_keeps_the_users():
    """In-kernel tensor descriptors need Triton's global-scratch allocator; the launcher sets one where the
    thread has none (autograd's backward threads start with none) and keeps an allocator the user set."""
    import contextvars

    import triton
    from triton.runtime import _allocation

    def run(user_allocator):
        if user_allocator is not None:
            triton.set_allocator(user_allocator)
        gemm._ensure_descriptor_scratch()
        return _allocation._allocator.get()

    before = _allocation._allocator.get()  # whatever earlier tests left in this thread
    assert contextvars.Context().run(run, None) is gemm._scratch
    mine = lambda size, alignment, stream: None  # noqa: E731
    assert contextvars.Context().run(run, mine) is mine
    assert _allocation._allocator.get() is before  # this thread untouched


def test_unaligned_activated_operand_is_activated_first(monkeypatch):
    """Odd hidden widths: the proj weight gradient gets act(Z) from the elementwise kernel (no act() in an
    element-wise-load loop) and is still right."""
    calls = []
    real = kernel.activation_fwd
    monkeypatch.setattr(kernel, "activation_fwd", lambda *a: calls.append(a[1]) or real(*a))
    assert_op_matches("mlp odd hidden", fused_mlp("gelu"), eager_mlp("gelu"), mlp_inputs(13, 40, 102, out=24),
                      torch.float32)
    assert calls == ["gelu"]


def test_kernel_signatures_stay_short():
    """No @triton.jit function of these kernel files takes more than 32 parameters (the GEMM's epilogue has one
    [M, N] operand, AUX, for the pre-activation or the residual; GROUP_M is the engine's constant)."""
    import ast
    import inspect

    from clipfast.kernels import contrastive_loss, layer_norm, patch_embed

    longest = {}
    for module in (gemm, kernel, patch_embed, contrastive_loss, layer_norm):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                longest[f"{module.__name__}.{node.name}"] = len(node.args.args)
    assert len(longest) > 20 and max(longest.values()) <= 32, longest
    assert longest["clipfast.kernels.mlp._gemm_kernel"] == 32


def test_split_k_policy():
    """Split only when the output tiles do not fill SPLIT_K_WAVES waves, and only K long enough."""
    sms = runtime.sm_count(torch.device("cpu"))
    assert gemm.split_k_slices(768, 3072, 50432, torch.device("cpu")) == 1 or sms * 2 > 144
    few_tiles = gemm.split_k_slices(128, 128, 64 * 2048, torch.device("cpu"))
    assert few_tiles == min(gemm.MAX_SPLIT_K, gemm.SPLIT_K_WAVES * sms)
    assert gemm.split_k_slices(128, 128, 1000, torch.device("cpu")) == 1


def test_one_tf32_policy_for_every_kernel(monkeypatch):
    """``runtime.dot_precision``: fp32 products run in TF32 exactly where torch allows TF32 matmuls, never under
    the interpreter; fp16/bf16 take "tf32" (ignored for them). The MLP, the contrastive loss and patch
    embedding launch their fp32 products with it."""
    previous = torch.get_float32_matmul_precision()
    monkeypatch.setattr(runtime, "INTERPRET", False)
    try:
        for setting, want in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")):
            torch.set_float32_matmul_precision(setting)
            assert runtime.dot_precision(torch.float32) == want, setting
            assert runtime.dot_precision(torch.float16) == runtime.dot_precision(torch.bfloat16) == "tf32"
        monkeypatch.setattr(runtime, "INTERPRET", True)
        assert runtime.dot_precision(torch.float32) == "ieee"
    finally:
        torch.set_float32_matmul_precision(previous)
    asked = []
    real = runtime.dot_precision
    monkeypatch.setattr(runtime, "dot_precision", lambda dtype: asked.append(dtype) or real(dtype))
    x, w1, b1, w2, b2 = mlp_inputs(5, 16, 32)
    clipfast.mlp(x, w1, b1, w2, b2)
    clipfast.clip_loss(torch.randn(4, 16), torch.randn(4, 16), torch.tensor(2.0))
    clipfast.patch_embed(torch.randn(1, 3, 8, 8), torch.randn(16, 3, 4, 4))
    assert asked.count(torch.float32) >= 4  # two GEMMs, the loss forward, the patch embedding forward


def test_saved_activation_bytes_bound():
    """The fused MLP keeps x and Z for backward (H is recomputed): <= 0.6x eager nn.GELU's activation bytes
    (x, Z, H) and <= 0.4x eager QuickGELU's (x, Z, sigmoid, H), parameters excluded."""
    from clipfast.benchmarks.mlp import saved_activation_bytes

    x, w1, b1, w2, b2 = [t.requires_grad_() for t in mlp_inputs(197, 64, 256)]
    params = [w1, b1, w2, b2]

    def measure(fn):
        return saved_activation_bytes(fn, x, *params, exclude=params)

    fused = measure(fused_mlp("quick_gelu"))
    assert fused == measure(fused_mlp("gelu")) == x.nbytes + 197 * 256 * 4  # x and Z
    assert fused <= 0.6 * measure(lambda *a: F.linear(F.gelu(F.linear(*a[:3])), *a[3:]))
    assert fused <= 0.4 * measure(eager_mlp("quick_gelu"))
    with torch.no_grad():
        assert measure(fused_mlp("quick_gelu")) == 0


def test_poisoned_outputs_are_fully_written():
    assert runtime._POISON
    x, w1, b1, w2, b2 = mlp_inputs(130, 48, 136)  # ragged tiles in M, N and K
    assert torch.isfinite(clipfast.mlp(x, w1, b1, w2, b2)).all()


# ----------------------------------------------------------------------------------------------
# quick_gelu alone
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_quick_gelu_matches_float64(dtype):
    x = randn(3, 1001, device=DEVICE, outliers=3, outlier_scale=8.0)  # 3003 elements: a ragged last block
    assert_op_matches("quick_gelu", clipfast.quick_gelu, lambda x: eager_act(x, "quick_gelu"), [x], dtype)


def test_quick_gelu_non_contiguous_and_empty():
    x = randn(40, 30, device=DEVICE).t()
    assert_op_matches("quick_gelu strided", clipfast.quick_gelu, lambda x: eager_act(x, "quick_gelu"), [x],
                      torch.float32)
    e = torch.zeros(0, 5, device=DEVICE, requires_grad=True)
    clipfast.quick_gelu(e).sum().backward()
    assert e.grad.shape == (0, 5)


def test_quick_gelu_kernel_actually_runs(monkeypatch):
    from clipfast.kernels import mlp as kernel

    def boom(*args, **kwargs):
        raise RuntimeError("kernel launcher called")

    monkeypatch.setattr(kernel, "activation_fwd", boom)
    with pytest.raises(RuntimeError, match="kernel launcher called"):
        clipfast.quick_gelu(torch.randn(8, device=DEVICE))


def test_eager_reference_activations_match_torch():
    # the CPU fallback's activations (and thus the kernels' formulas, which the tests compare with
    # torch's) agree with torch for every activation
    z = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    for activation in ACTIVATIONS:
        torch.testing.assert_close(reference_activation(z, activation), eager_act(z, activation))


# ----------------------------------------------------------------------------------------------
# Module, compile, custom-op registration
# ----------------------------------------------------------------------------------------------

def openai_mlp(width, activation_module):
    return torch.nn.Sequential(OrderedDict([
        ("c_fc", torch.nn.Linear(width, 4 * width)), ("gelu", activation_module),
        ("c_proj", torch.nn.Linear(4 * width, width))])).to(DEVICE)


@pytest.mark.parametrize("activation,module", [("quick_gelu", clipfast.models.QuickGELU()),
                                               ("gelu", torch.nn.GELU()),
                                               ("gelu_tanh", torch.nn.GELU(approximate="tanh"))])
def test_module_is_drop_in_for_openai_sequential(activation, module):
    ref = openai_mlp(64, module)
    fast = clipfast.nn.MLP(64, activation=activation).to(DEVICE)
    assert isinstance(fast, torch.nn.Sequential)
    assert list(fast.state_dict()) == list(ref.state_dict())
    fast.load_state_dict(ref.state_dict())
    x = randn(2, 11, 64, device=DEVICE).requires_grad_()
    torch.testing.assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-5)
    r = randn(2, 11, 64, device=DEVICE)
    torch.testing.assert_close(fast(x, residual=r), ref(x) + r, atol=1e-5, rtol=1e-5)
    fast(x).sum().backward()
    g_fast = [p.grad.clone() for p in fast.parameters()]
    x.grad = None
    ref(x).sum().backward()
    for gf, p in zip(g_fast, ref.parameters()):
        torch.testing.assert_close(gf, p.grad, atol=1e-4, rtol=1e-4)


def test_compile_fullgraph_matches_eager():
    x, w1, b1, w2, b2 = [t.requires_grad_() for t in mlp_inputs(10, 32, 128)]

    def block(x):
        h = clipfast.mlp(x, w1, b1, w2, b2, residual=x)
        return clipfast.quick_gelu(h) * 2

    expected = block(x)
    expected.sum().backward()
    grads = [t.grad.clone() for t in (x, w1, b1, w2, b2)]
    for t in (x, w1, b1, w2, b2):
        t.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected)
    for t, g in zip((x, w1, b1, w2, b2), grads):
        torch.testing.assert_close(t.grad, g)


def test_custom_op_registration_is_valid():
    x, w1, b1, w2, b2 = mlp_inputs(4, 32, 128)
    r = torch.randn(4, 32, device=DEVICE)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.clipfast.mlp_fwd, (x, w1, b1, w2, b2, r, "gelu", True), test_utils=checks)
    torch.library.opcheck(torch.ops.clipfast.mlp_fwd, (x, w1, None, w2, None, None, "quick_gelu", False),
                          test_utils=checks)
    torch.library.opcheck(torch.ops.clipfast.activation_fwd, (x, "quick_gelu"), test_utils=checks)


# ----------------------------------------------------------------------------------------------
# GPU only: CLIP widths, bf16 included through DTYPES
# ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", [(197, 768), (257, 1024), (77, 512), (50, 1280), (3, 1664)])
def test_mlp_clip_widths_on_gpu(dtype, rows, width):
    inputs = mlp_inputs(rows, width, 4 * width, lead=(2,)) + [randn(2, rows, width, device=DEVICE)]
    assert_op_matches("mlp clip width", fused_mlp("quick_gelu", True), eager_mlp("quick_gelu", True), inputs, dtype)


# ----------------------------------------------------------------------------------------------
# Patch rules
# ----------------------------------------------------------------------------------------------

MLP_ONLY = dict(layer_norm=False, attention=False, patch_embed=False, residual=False, unpad_text=False, mlp=True)


class _Block(torch.nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return x + self.mlp(x)


def _check_patched_matches(block, x, atol=1e-5):
    import copy

    ref = copy.deepcopy(block)
    keys = list(block.state_dict())
    report = clipfast.patch(block, **MLP_ONLY)
    assert list(block.state_dict()) == keys
    xr = x.detach().clone().requires_grad_()
    xf = x.detach().clone().requires_grad_()
    out_ref, out = ref(xr), block(xf)
    torch.testing.assert_close(out, out_ref, atol=atol, rtol=atol)
    out_ref.square().sum().backward()
    out.square().sum().backward()
    torch.testing.assert_close(xf.grad, xr.grad, atol=10 * atol, rtol=10 * atol)
    for (name, p), (_, q) in zip(block.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=10 * atol, rtol=10 * atol, msg=name)
    return report


def test_patch_rule_fuses_openai_sequential_and_unpatch_restores():
    mlp = openai_mlp(64, clipfast.models.QuickGELU())
    block = _Block(mlp)
    report = _check_patched_matches(block, randn(2, 9, 64, device=DEVICE))
    assert report.counts() == {"mlp": 1}
    assert isinstance(block.mlp, torch.nn.Sequential) and block.mlp is not mlp
    assert block.mlp.c_fc.weight is mlp.c_fc.weight  # shares the parameters
    assert block.mlp._clipfast_mlp == ("c_fc", "c_proj", "quick_gelu")
    clipfast.unpatch(block)
    assert block.mlp is mlp


def test_patched_sequential_runs_the_fused_op(monkeypatch):
    import clipfast.nn.mlp as nn_mlp

    block = _Block(openai_mlp(32, torch.nn.GELU()))
    clipfast.patch(block, **MLP_ONLY)
    calls = []
    real = nn_mlp.mlp
    monkeypatch.setattr(nn_mlp, "mlp", lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    block(torch.randn(3, 32, device=DEVICE))
    assert calls == ["gelu"]


def test_patch_rule_open_clip_identity_ln_and_tanh_gelu():
    # open_clip's custom block: c_fc, gelu, ln (Identity without scale_fc), c_proj
    mlp = torch.nn.Sequential(OrderedDict([
        ("c_fc", torch.nn.Linear(48, 96)), ("gelu", torch.nn.GELU(approximate="tanh")), ("ln", torch.nn.Identity()),
        ("c_proj", torch.nn.Linear(96, 48))])).to(DEVICE)
    report = _check_patched_matches(_Block(mlp), randn(5, 48, device=DEVICE))
    assert report.counts() == {"mlp": 1}


class QuickGELUActivation(torch.nn.Module):  # named like transformers' class
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class FakeQuickGELU(torch.nn.Module):  # the name says QuickGELU, the behaviour does not
    def forward(self, x):
        return torch.relu(x)


class MyGELU(torch.nn.Module):
    def forward(self, x):
        return F.gelu(x)


@pytest.mark.parametrize("module,expected", [
    (torch.nn.GELU(), "gelu"), (torch.nn.GELU(approximate="tanh"), "gelu_tanh"),
    (clipfast.models.QuickGELU(), "quick_gelu"), (QuickGELUActivation(), "quick_gelu"), (MyGELU(), "gelu"),
    (F.gelu, "gelu"), (FakeQuickGELU(), None), (torch.nn.ReLU(), None), (torch.nn.SiLU(), None),
    (torch.nn.PReLU(), None)])
def test_activation_detection_by_type_confirmed_by_behaviour(module, expected):
    from clipfast.patch_rules.mlp import detect_activation

    assert detect_activation(module) == expected


def test_unknown_activation_and_hooked_linear_are_left_alone_and_reported():
    relu = _Block(openai_mlp(32, torch.nn.ReLU()))
    report = clipfast.patch(relu, **MLP_ONLY)
    assert report.counts() == {} and len(report.skipped) == 1
    assert "unknown activation ReLU" in report.skipped[0].reason and "unknown activation" in str(report)
    assert type(relu.mlp) is torch.nn.Sequential

    hooked = _Block(openai_mlp(32, torch.nn.GELU()))
    hooked.mlp.c_fc.register_forward_hook(lambda *args: None)
    report = clipfast.patch(hooked, **MLP_ONLY)
    assert report.counts() == {} and "hooks" in report.skipped[0].reason


def test_patch_rule_on_reference_clip_blocks():
    model = clipfast.models.create("tiny").to(DEVICE)
    image = torch.randn(2, 3, 32, 32, device=DEVICE)
    text = torch.randint(0, 101, (2, 13), device=DEVICE)
    with torch.no_grad():
        ref_image, ref_text = model.encode_image(image), model.encode_text(text)
    report = clipfast.patch(model, **MLP_ONLY)
    assert report.counts() == {"mlp": 4}  # two vision and two text blocks
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(image), ref_image, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.encode_text(text), ref_text, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("hidden_act,expected", [("quick_gelu", "quick_gelu"), ("gelu", "gelu"),
                                                 ("gelu_pytorch_tanh", "gelu_tanh"), ("relu", None)])
def test_patch_rule_hugging_face_clip_mlp(hidden_act, expected):
    transformers = pytest.importorskip("transformers")
    from transformers.models.clip.modeling_clip import CLIPMLP

    config = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_attention_heads=2,
                                           hidden_act=hidden_act)
    mlp = CLIPMLP(config).to(DEVICE)
    block = _Block(mlp)
    if expected is None:
        report = clipfast.patch(block, **MLP_ONLY)
        assert report.counts() == {} and "unknown activation" in report.skipped[0].reason
        return
    report = _check_patched_matches(block, randn(2, 7, 64, device=DEVICE))
    assert report.counts() == {"mlp": 1}
    assert isinstance(block.mlp, CLIPMLP) and block.mlp._clipfast_mlp[2] == expected
