import pytest
import torch
import torch.nn.functional as F

import clipfast
from clipfast.kernels import layer_norm as kernel
from clipfast.kernels import runtime

from .conftest import DEVICE, DTYPES, ON_GPU, run_without_interpreter
from .numerics import assert_op_matches, randn

# awkward widths (non-powers of two, CLIP widths, the widest we keep in registers) and row counts
WIDTHS = [1, 7, 64, 768, 1280, 1664] + ([kernel.MAX_COLS] if ON_GPU else [])
ROWS = [1, 3, 77, 197]


def eager_layer_norm(x, w, b, eps=1e-5):
    """What eager CLIP code does: compute in fp32 (float64 for the reference), return the input dtype."""
    dtype = x.dtype
    acc = torch.promote_types(dtype, torch.float32)
    return F.layer_norm(x.to(acc), x.shape[-1:], w.to(acc) if w is not None else None,
                        b.to(acc) if b is not None else None, eps).to(dtype)


def eager_add_layer_norm(x, r, w, b, eps=1e-5):
    h = x + r
    return h, eager_layer_norm(h, w, b, eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_cols", WIDTHS)
def test_layer_norm_matches_float64(dtype, n_cols):
    n_rows = 37 if n_cols < 1024 else 5
    x = randn(n_rows, n_cols, device=DEVICE, outliers=min(2, n_cols - 1))
    w = 1 + 0.1 * torch.randn(n_cols, device=DEVICE)
    b = 0.1 * torch.randn(n_cols, device=DEVICE)
    assert_op_matches("layer_norm", clipfast.layer_norm, eager_layer_norm, [x, w, b], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_rows", ROWS)
def test_add_layer_norm_matches_float64(dtype, n_rows):
    n_cols = 768
    x = randn(n_rows, n_cols, device=DEVICE, outliers=2)
    r = randn(n_rows, n_cols, device=DEVICE)
    w = 1 + 0.1 * torch.randn(n_cols, device=DEVICE)
    b = 0.1 * torch.randn(n_cols, device=DEVICE)
    assert_op_matches("add_layer_norm", clipfast.add_layer_norm, eager_add_layer_norm, [x, r, w, b], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", ["none", "weight", "both"])
def test_layer_norm_optional_parameters(dtype, affine):
    x = randn(2, 9, 96, device=DEVICE)
    w = (1 + 0.1 * torch.randn(96, device=DEVICE)) if affine != "none" else None
    b = (0.1 * torch.randn(96, device=DEVICE)) if affine == "both" else None
    assert_op_matches("layer_norm", lambda x, w, b: clipfast.layer_norm(x, w, b),
                      eager_layer_norm, [x, w, b], dtype)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if ON_GPU else []))
def test_layer_norm_fp32_parameters_with_low_precision_activations(dtype):
    # what torch.autocast hands over: fp16/bf16 activations with fp32 parameters
    x = randn(50, 512, device=DEVICE, outliers=2).to(dtype)
    w = (1 + 0.1 * torch.randn(512, device=DEVICE)).requires_grad_()
    b = (0.1 * torch.randn(512, device=DEVICE)).requires_grad_()
    y = clipfast.layer_norm(x, w, b)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    ref_w = w.detach().double().requires_grad_()
    ref = F.layer_norm(x.double(), (512,), ref_w, b.detach().double())
    ref.sum().backward()
    torch.testing.assert_close(y.double(), ref, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(w.grad.double(), ref_w.grad, atol=1e-2, rtol=1e-3)


def test_layer_norm_non_contiguous_input():
    base = randn(16, 3, 128, device=DEVICE)
    x = base[:, 1, :]  # row stride 384
    w, b = torch.randn(128, device=DEVICE), torch.randn(128, device=DEVICE)
    assert_op_matches("layer_norm strided", clipfast.layer_norm, eager_layer_norm, [x, w, b], torch.float32)
    xt = randn(128, 16, device=DEVICE).t()  # column stride != 1: copied
    torch.testing.assert_close(clipfast.layer_norm(xt, w, b), eager_layer_norm(xt, w, b), atol=1e-5, rtol=1e-5)


def test_empty_batch_returns_empty():
    x = torch.randn(0, 64, device=DEVICE, requires_grad=True)
    w = torch.randn(64, device=DEVICE, requires_grad=True)
    y = clipfast.layer_norm(x, w, None)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert x.grad.shape == (0, 64) and torch.equal(w.grad, torch.zeros_like(w))
    h, y = clipfast.add_layer_norm(x, x.detach(), w, None)
    assert h.shape == y.shape == (0, 64)


def test_bad_input_errors():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(TypeError, match="`x`"):
        clipfast.layer_norm(x.long(), None, None)
    with pytest.raises(TypeError, match="`x` must be a torch.Tensor"):
        clipfast.layer_norm([1.0, 2.0], None, None)
    with pytest.raises(ValueError, match="`weight` must have shape \\(8,\\)"):
        clipfast.layer_norm(x, torch.ones(7, device=DEVICE), None)
    with pytest.raises(ValueError, match="`residual` must have shape"):
        clipfast.add_layer_norm(x, torch.randn(4, 9, device=DEVICE), None, None)
    with pytest.raises(TypeError, match="`residual` dtype"):
        clipfast.add_layer_norm(x, x.half(), None, None)
    with pytest.raises(ValueError, match="at least 1 dimension"):
        clipfast.layer_norm(torch.tensor(1.0, device=DEVICE), None, None)
    if ON_GPU:
        with pytest.raises(ValueError, match="one device"):
            clipfast.layer_norm(x, torch.ones(8), None)


def test_poisoned_outputs_are_fully_written():
    # the autouse fixture poisons outputs with NaN; a forward over a ragged tile must overwrite all of them
    assert runtime._POISON
    x = torch.randn(5, 33, device=DEVICE)
    assert torch.isfinite(clipfast.layer_norm(x, None, None)).all()


def test_module_is_drop_in():
    ref = torch.nn.LayerNorm(96)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    fast = clipfast.nn.LayerNorm(96).to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    ref = ref.to(DEVICE)
    assert isinstance(fast, torch.nn.LayerNorm)
    assert list(fast.state_dict()) == list(ref.state_dict())
    x = torch.randn(3, 5, 96, device=DEVICE)
    torch.testing.assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-5)
    # half input with fp32 parameters returns half, computing in fp32 (OpenAI CLIP's LayerNorm)
    assert fast(x.half()).dtype == torch.float16
    # several normalized dims
    ref2 = torch.nn.LayerNorm((5, 96)).to(DEVICE)
    fast2 = clipfast.nn.LayerNorm((5, 96)).to(DEVICE)
    fast2.load_state_dict(ref2.state_dict())
    torch.testing.assert_close(fast2(x), ref2(x), atol=1e-5, rtol=1e-5)


def test_compile_fullgraph_matches_eager():
    w = torch.randn(64, device=DEVICE, requires_grad=True)
    b = torch.randn(64, device=DEVICE, requires_grad=True)

    def block(x, r):
        h, y = clipfast.add_layer_norm(x, r, w, b)
        return h + clipfast.layer_norm(y * 2, w, b)

    x = torch.randn(10, 64, device=DEVICE, requires_grad=True)
    r = torch.randn(10, 64, device=DEVICE)
    expected = block(x, r)
    expected.sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = None
    w.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x, r)
    out.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(w.grad, gw)


def test_custom_op_registration_is_valid():
    x = torch.randn(4, 32, device=DEVICE)
    w = torch.randn(32, device=DEVICE)
    torch.library.opcheck(torch.ops.clipfast.layer_norm_fwd, (x, None, w, None, 1e-5),
                          test_utils=("test_schema", "test_faketensor"))


def test_interpreter_or_gpu_runs_the_triton_kernel(monkeypatch):
    # guards against the suite silently testing the eager fallback instead of the kernels
    from clipfast.kernels import layer_norm as kernel

    def boom(*args, **kwargs):
        raise RuntimeError("kernel launcher called")

    monkeypatch.setattr(kernel, "layer_norm_fwd", boom)
    with pytest.raises(RuntimeError, match="kernel launcher called"):
        clipfast.layer_norm(torch.randn(2, 8, device=DEVICE), None, None)


def test_too_wide_rows_fall_back_with_a_warning():
    from clipfast.kernels import layer_norm as kernel

    x = torch.randn(2, kernel.MAX_COLS + 8, device=DEVICE)
    with pytest.warns(RuntimeWarning, match="eager"):
        y = clipfast.layer_norm(x, None, None)
    torch.testing.assert_close(y, F.layer_norm(x, x.shape[-1:]), atol=1e-5, rtol=1e-5)


def test_under_autocast_takes_what_eager_code_gets():
    # autocast hands a LayerNorm the low-precision output of a matmul and its fp32 parameters
    device_type = "cuda" if ON_GPU else "cpu"
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    lin = torch.nn.Linear(64, 64).to(DEVICE)
    ln = clipfast.nn.LayerNorm(64).to(DEVICE)
    x = torch.randn(9, 64, device=DEVICE)
    with torch.autocast(device_type, dtype=dtype):
        h = lin(x)
        y = ln(h)
    assert h.dtype == dtype and y.dtype == dtype
    y.float().sum().backward()
    assert ln.weight.grad is not None and ln.weight.grad.dtype == torch.float32
    ref = F.layer_norm(h.double(), (64,), ln.weight.double(), ln.bias.double())
    torch.testing.assert_close(y.double(), ref, atol=4e-2, rtol=1e-2)


# ----------------------------------------------------------------------------------------------
# Backward: grid sizes, parameter gradients, 64-bit offsets
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_rows,n_cols,programs", [(45, 100, 1), (45, 100, 7), (9, 33, 64), (130, 768, 3)])
def test_backward_any_number_of_programs(monkeypatch, dtype, n_rows, n_cols, programs):
    """The persistent backward: every row covered and every partial row reduced, whether one program
    walks all rows, several walk uneven runs (the last one short), or there are more programs than tiles."""
    monkeypatch.setattr(kernel, "bwd_programs", lambda n_rows, n_cols, block_m, device: min(programs, n_rows))
    x = randn(n_rows, n_cols, device=DEVICE, outliers=2)
    r = randn(n_rows, n_cols, device=DEVICE)
    w = 1 + 0.1 * torch.randn(n_cols, device=DEVICE)
    b = 0.1 * torch.randn(n_cols, device=DEVICE)
    assert_op_matches("add_layer_norm programs", clipfast.add_layer_norm, eager_add_layer_norm, [x, r, w, b], dtype)


def test_backward_programs_by_width_and_arch(monkeypatch):
    monkeypatch.setattr(runtime, "sm_count", lambda device: 132)
    programs = {}
    for major in (8, 9):
        monkeypatch.setattr(runtime, "capability", lambda device, major=major: (major, 0))
        programs[major] = [kernel.bwd_programs(10**6, n, 1, DEVICE) for n in (768, 2048, 8192)]
    assert programs[9] == [8 * 132, 4 * 132, 2 * 132]  # more programs per SM at narrow widths on Hopper
    assert programs[8] == [4 * 132, 2 * 132, 132]
    assert kernel.bwd_programs(5, 768, 2, DEVICE) == 3  # never more programs than row tiles


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float16])
def test_parameter_gradients_come_back_in_the_parameters_dtypes(param_dtype):
    x = randn(21, 96, device=DEVICE).half().requires_grad_()
    w = (1 + 0.1 * torch.randn(96, device=DEVICE)).to(param_dtype).requires_grad_()
    b = (0.1 * torch.randn(96, device=DEVICE)).to(param_dtype).requires_grad_()
    clipfast.layer_norm(x, w, b).float().sum().backward()
    assert w.grad.dtype == b.grad.dtype == param_dtype
    assert torch.isfinite(w.grad).all() and torch.isfinite(b.grad).all()
    # dB is the column sum of dy = 1, exactly the row count
    assert torch.equal(b.grad.float(), torch.full((96,), 21.0, device=DEVICE))


def _free_memory_bytes() -> int:
    if ON_GPU:
        return torch.cuda.mem_get_info()[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0


@pytest.mark.skipif(_free_memory_bytes() < 12 * 2**30, reason="needs ~12 GiB free memory (a 4 GiB storage)")
def test_rows_past_2_31_elements_use_64_bit_offsets():
    """x and residual as views with a row stride just over 2**30 into one fp16 storage of ~2**31 elements
    (4 GiB, mostly never touched): row 2 starts past 2**31 elements, where int32 offsets wrap. Forward and
    every gradient against float64 (the backward reads the saved input with the same stride)."""
    stride, n_rows, n_cols = 2**30 + 256, 3, 64
    storage = torch.empty((n_rows - 1) * stride + 2 * n_cols, dtype=torch.float16, device=DEVICE)
    x = storage.as_strided((n_rows, n_cols), (stride, 1))
    r = storage.as_strided((n_rows, n_cols), (stride, 1), storage_offset=n_cols)
    x.copy_(randn(n_rows, n_cols, device=DEVICE))
    r.copy_(randn(n_rows, n_cols, device=DEVICE))
    assert x.stride(0) * (n_rows - 1) > 2**31
    w = 1 + 0.1 * torch.randn(n_cols, device=DEVICE)
    b = 0.1 * torch.randn(n_cols, device=DEVICE)
    assert_op_matches("layer_norm 64-bit offsets", clipfast.layer_norm, eager_layer_norm, [x, w, b], torch.float16)
    assert_op_matches("add_layer_norm 64-bit offsets", clipfast.add_layer_norm, eager_add_layer_norm,
                      [x, r, w, b], torch.float16)


@pytest.mark.skipif(ON_GPU, reason="the eager reference runs on CPU without the interpreter")
def test_eager_path_returns_the_contiguous_rows_its_fake_declares():
    """A permuted input (a sequence-first text tower's first block) on the eager path: outputs and the input
    gradient are contiguous like the kernels' and the fake's, so compiled graphs (and views) read them right."""
    script = """
import torch, torch.nn.functional as F, clipfast
x = torch.randn(7, 3, 64).transpose(0, 1).requires_grad_()
r = torch.randn(7, 3, 64).transpose(0, 1)
w, b = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
def f(x, r, w, b):
    h, y = clipfast.add_layer_norm(x, r, w, b)
    return (h.view(-1, 64) + y.view(-1, 64)).sum(0) + clipfast.layer_norm(x, w, b).view(-1, 64).sum(0)
def ref(x, r, w, b):
    h = x + r
    ln = lambda t: F.layer_norm(t, (64,), w, b)
    return (h + ln(h)).reshape(-1, 64).sum(0) + ln(x).reshape(-1, 64).sum(0)
for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
    out, expected = fn(x, r, w, b), ref(x, r, w, b)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)  # two fp32 LayerNorms
    for g, e in zip(torch.autograd.grad(out.square().sum(), (x, w, b)),
                    torch.autograd.grad(expected.square().sum(), (x, w, b))):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
print("ok")
"""
    assert "ok" in run_without_interpreter(script)
