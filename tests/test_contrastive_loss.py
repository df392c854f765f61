import math

import pytest
import torch
import torch.nn.functional as F

import clipfast
from clipfast.ops import contrastive_loss as ops

from .conftest import DEVICE, DTYPES, ON_GPU
from .numerics import assert_op_matches, randn

LOG_100 = math.log(100.0)  # the usual clamp of CLIP's logit_scale


# ----------------------------------------------------------------------------------------------
# open_clip's formulas (open_clip/loss.py), in the inputs' dtype with the cross-entropy in fp32
# (float64 for the reference), as open_clip runs them under autocast.
# ----------------------------------------------------------------------------------------------

def _acc(dtype):
    return torch.promote_types(dtype, torch.float32)


def eager_clip_loss(image, text, logit_scale, normalize=True):
    if normalize:
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    s = logit_scale.exp()
    logits_per_image = s * image @ text.T
    logits_per_text = s * text @ image.T
    labels = torch.arange(image.shape[0], device=image.device)
    acc = _acc(image.dtype)
    return (F.cross_entropy(logits_per_image.to(acc), labels) + F.cross_entropy(logits_per_text.to(acc), labels)) / 2


def _exact_cross_entropy(logits, labels):
    """Cross-entropy written so that float64 keeps the digits of a nearly one-hot softmax:
    ``softplus(logsumexp(negatives) - positive)``, whose gradient at the positive is ``-sum_neg / sum``
    rather than ``softmax - 1`` (which rounds to 0 once the negatives weigh less than 1e-16)."""
    if logits.shape[1] == 1:
        return F.cross_entropy(logits, labels)
    rows = torch.arange(logits.shape[0], device=logits.device)
    positive = logits[rows, labels]
    negatives = logits.index_put((rows, labels), torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))
    return F.softplus(torch.logsumexp(negatives, 1) - positive).mean()


def reference_clip_loss(image, text, logit_scale, normalize=True):
    """float64 reference: open_clip's formula with the exact cross-entropy."""
    if normalize:
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = logit_scale.exp() * image @ text.T
    labels = torch.arange(image.shape[0], device=image.device)
    return (_exact_cross_entropy(logits, labels) + _exact_cross_entropy(logits.T, labels)) / 2


def eager_siglip_loss(image, text, logit_scale, logit_bias, normalize=True, offset=0):
    if normalize:
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = (logit_scale.exp() * image @ text.T).to(_acc(image.dtype)) + logit_bias
    labels = -torch.ones_like(logits)
    n = image.shape[0]
    labels[torch.arange(n), torch.arange(n) + offset] = 1.0
    return -F.logsigmoid(labels * logits).sum() / n


def eager_cross_entropy(queries, keys, scale, offset, exact=False):
    logits = (scale * queries @ keys.T).to(_acc(queries.dtype))
    labels = torch.arange(queries.shape[0], device=queries.device) + offset
    return _exact_cross_entropy(logits, labels) if exact else F.cross_entropy(logits, labels)


def check(name, fused_fn, eager_fn, inputs, dtype, **kwargs):
    """The numerics standard with a floor of 128 fp32 ulps (8 for fp16/bf16): the losses and the
    gradients of the scale and bias are sums of N x M terms with cancellation, where eager fp32's own
    error swings by 100x from one draw to the next (measured over 40 draws of the rectangular SigLIP
    case: median relative error of the scale's gradient 1.1e-7 fused vs 1.5e-7 eager, worst 5.5e-6 vs
    3.6e-6); a lucky eager draw must not fail a fused result as accurate as the sum allows."""
    kwargs.setdefault("floor_ulps", 128.0 if dtype == torch.float32 else 8.0)
    assert_op_matches(name, fused_fn, eager_fn, inputs, dtype, **kwargs)


def features(n, d, normalize=True):
    """Random features with a few outlier channels; pre-normalized ones when the op does not normalize."""
    x = randn(n, d, device=DEVICE, outliers=min(2, d - 1), outlier_scale=5.0)
    return x if normalize else F.normalize(x, dim=-1)


def correlated(n, d, strength=1.0):
    """Image and text features whose pairs are similar (a trained model's): sharp softmax rows."""
    image = randn(n, d, device=DEVICE)
    text = image + strength * randn(n, d, device=DEVICE)
    return image, text


# ----------------------------------------------------------------------------------------------
# Against float64
# ----------------------------------------------------------------------------------------------

SIZES = [(1, 64), (2, 96), (7, 512), (33, 64), (130, 96)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", SIZES)
def test_clip_loss_matches_float64(dtype, n, d):
    image, text = features(n, d), features(n, d)
    scale = torch.tensor(LOG_100 if n % 2 else 0.0, device=DEVICE)  # s = 100 and s = 1
    check("clip_loss", clipfast.clip_loss, eager_clip_loss, [image, text, scale], dtype,
                      reference_fn=reference_clip_loss, param_dtype_inputs=[2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", [(2, 64), (33, 96), (130, 512)])
def test_clip_loss_without_normalization(dtype, n, d):
    image, text = features(n, d, normalize=False), features(n, d, normalize=False)
    scale = torch.tensor(math.log(20.0), device=DEVICE)
    check("clip_loss normalize=False", lambda i, t, s: clipfast.clip_loss(i, t, s, normalize=False),
                      lambda i, t, s: eager_clip_loss(i, t, s, normalize=False), [image, text, scale], dtype,
                      reference_fn=lambda i, t, s: reference_clip_loss(i, t, s, normalize=False), param_dtype_inputs=[2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_loss_sharp_softmax_at_scale_100(dtype):
    # correlated pairs at s = 100: every row's softmax is nearly one-hot, logits span +-100
    image, text = correlated(65, 64, strength=0.3)
    scale = torch.tensor(LOG_100, device=DEVICE)
    check("clip_loss sharp", clipfast.clip_loss, eager_clip_loss, [image, text, scale], dtype,
                      reference_fn=reference_clip_loss, param_dtype_inputs=[2])


def test_clip_loss_large_batch_small_dim():
    n, d = (1000, 64) if not ON_GPU else (4099, 1024)
    image, text = correlated(n, d)
    scale = torch.tensor(LOG_100, device=DEVICE)
    check("clip_loss large N", clipfast.clip_loss, eager_clip_loss, [image, text, scale], torch.float32,
                      reference_fn=reference_clip_loss, param_dtype_inputs=[2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", [(1, 64), (7, 96), (33, 512), (130, 64)])
def test_siglip_loss_matches_float64(dtype, n, d):
    image, text = features(n, d), features(n, d)
    scale = torch.tensor(math.log(10.0) if n % 2 else LOG_100, device=DEVICE)
    bias = torch.tensor(-10.0, device=DEVICE)
    check("siglip_loss", clipfast.siglip_loss, eager_siglip_loss, [image, text, scale, bias], dtype,
                      param_dtype_inputs=[2, 3])


@pytest.mark.parametrize("dtype", DTYPES)
def test_siglip_loss_rectangular_without_normalization(dtype):
    image, text = features(7, 96, normalize=False), features(33, 96, normalize=False)
    scale, bias = torch.tensor(math.log(10.0), device=DEVICE), torch.tensor(-5.0, device=DEVICE)
    check(
        "siglip_loss rectangular",
        lambda i, t, s, b: clipfast.siglip_loss(i, t, s, b, normalize=False, label_offset=14),
        lambda i, t, s, b: eager_siglip_loss(i, t, s, b, normalize=False, offset=14),
        [image, text, scale, bias], dtype, param_dtype_inputs=[2, 3])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m,offset", [(1, 2, 1), (7, 21, 14), (33, 130, 66)])
def test_rectangular_cross_entropy_with_label_offset(dtype, n, m, offset):
    # the local loss of one rank: its N rows against the M gathered columns, positives at rank * N
    queries, keys = features(n, 96, normalize=False), features(m, 96, normalize=False)
    scale = torch.tensor(10.0, device=DEVICE)
    check(
        "contrastive_cross_entropy",
        lambda q, k, s: ops.contrastive_cross_entropy(q, k, s, label_offset=offset),
        lambda q, k, s: eager_cross_entropy(q, k, s, offset), [queries, keys, scale], dtype,
        reference_fn=lambda q, k, s: eager_cross_entropy(q, k, s, offset, exact=True), param_dtype_inputs=[2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", ["cross_entropy", "siglip"])
@pytest.mark.parametrize("sms", [1, 4])
def test_column_split_gradient_for_rectangular_local_loss(monkeypatch, dtype, loss, sms):
    """Few rows against many columns (the local loss of one rank): the gradient grid splits the columns
    into fp32 partials (evenly, and with a short last split), summed in order by the feature-gradient
    kernel. Every gradient, the scale's and the bias's included, against float64."""
    from clipfast.kernels import contrastive_loss as kernel, runtime

    monkeypatch.setattr(runtime, "sm_count", lambda device: sms)
    splits = []
    grad_splits = kernel.grad_splits

    def spy(*args):
        splits.append(grad_splits(*args)[0])
        return grad_splits(*args)

    monkeypatch.setattr(kernel, "grad_splits", spy)
    n, m, offset, d = 5, 300, 150, 96
    queries, keys = features(n, d, normalize=False), features(m, d, normalize=False)
    scale = torch.tensor(10.0, device=DEVICE)
    if loss == "siglip":
        bias = torch.tensor(-5.0, device=DEVICE)
        check("siglip_loss column split",
              lambda i, t, s, b: clipfast.siglip_loss(i, t, s, b, label_offset=offset),
              lambda i, t, s, b: eager_siglip_loss(i, t, s, b, offset=offset),
              [queries, keys, scale.log(), bias], dtype, param_dtype_inputs=[2, 3])
    else:
        check("contrastive_cross_entropy column split",
              lambda q, k, s: ops.contrastive_cross_entropy(q, k, s, label_offset=offset),
              lambda q, k, s: eager_cross_entropy(q, k, s, offset), [queries, keys, scale], dtype,
              reference_fn=lambda q, k, s: eager_cross_entropy(q, k, s, offset, exact=True), param_dtype_inputs=[2])
    if not ON_GPU:  # interpreter tiles: 5 column blocks of 64 for one row block
        assert max(splits) == (5 if sms == 4 else 2)


def test_zero_norm_features_give_finite_loss_and_gradients():
    # F.normalize semantics: x / max(||x||, 1e-12); a zero row has zero logits and a gradient scaled by 1/eps
    image, text = features(9, 64), features(9, 64)
    image[3] = 0.0
    text[5] = 0.0
    scale = torch.tensor(LOG_100, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (image, text, scale)]
    loss = clipfast.clip_loss(*leaves)
    loss.backward()
    ref_leaves = [t.double().requires_grad_() for t in (image, text, scale)]
    ref = eager_clip_loss(*ref_leaves)
    ref.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(t.grad).all() for t in leaves)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, rtol=1e-4, atol=1e-5 * float(ref_leaf.grad.abs().max()))


def test_non_contiguous_features():
    base_i, base_t = randn(33, 3, 96, device=DEVICE), randn(96, 33, device=DEVICE)
    image, text = base_i[:, 1, :], base_t.t()  # row stride 288; column stride 33 (copied)
    scale = torch.tensor(2.0, device=DEVICE)
    check("clip_loss strided", clipfast.clip_loss, eager_clip_loss, [image, text, scale], torch.float32,
                      reference_fn=reference_clip_loss, param_dtype_inputs=[2])


def test_logit_scale_as_number_and_one_element_tensor():
    image, text = features(5, 64), features(5, 64)
    expected = eager_clip_loss(image, text, torch.tensor(2.5, device=DEVICE))
    for scale in (2.5, torch.tensor([2.5], device=DEVICE), torch.tensor(2.5, device=DEVICE, dtype=torch.float16)):
        torch.testing.assert_close(clipfast.clip_loss(image, text, scale), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Memory: O(N * d), never O(N^2)
# ----------------------------------------------------------------------------------------------

def _largest_allocation(fn) -> int:
    """Bytes of the largest single allocation made while running ``fn`` (CUDA: peak growth instead)."""
    if ON_GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # ops that allocate without calling other ops: one allocation each (an op's total counts its children's)
    sizes = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0 and not e.cpu_children]
    return max(sizes, default=0)


def test_loss_memory_is_linear_in_batch():
    if ON_GPU:  # peak growth: operands, fp32 gradient accumulators, feature gradients, partial statistics
        n, d = 32768, 256
        bound = 16 * n * d * 4
    else:  # the largest single allocation (the profiler sees every one)
        n, d = 768, 16
        bound = 2 * n * d * 4
    image = randn(n, d, device=DEVICE).requires_grad_()
    text = randn(n, d, device=DEVICE).requires_grad_()
    scale = torch.tensor(LOG_100, device=DEVICE, requires_grad=True)
    n_squared_bytes = n * n * 4
    assert bound < n_squared_bytes / 4  # the sizes tell O(N * d) from O(N^2) apart

    def run(loss_fn):
        def step():
            loss_fn(image, text, scale).backward()
        return step

    eager_bytes = _largest_allocation(run(eager_clip_loss))
    fused_bytes = _largest_allocation(run(clipfast.clip_loss))
    assert eager_bytes >= n_squared_bytes  # the measurement sees N^2 when it is there
    assert fused_bytes < bound, (fused_bytes, bound)


# ----------------------------------------------------------------------------------------------
# Errors, registration, modules
# ----------------------------------------------------------------------------------------------

def test_bad_input_errors():
    image, text = torch.randn(4, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE)
    scale = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(TypeError, match="`image_features`"):
        clipfast.clip_loss(image.long(), text, scale)
    with pytest.raises(TypeError, match="dtype"):
        clipfast.clip_loss(image, text.half(), scale)
    with pytest.raises(ValueError, match="same feature dimension"):
        clipfast.clip_loss(image, torch.randn(4, 9, device=DEVICE), scale)
    with pytest.raises(ValueError, match="same number of rows"):
        clipfast.clip_loss(image, torch.randn(5, 8, device=DEVICE), scale)
    with pytest.raises(ValueError, match="2 dimensions"):
        clipfast.clip_loss(image[0], text[0], scale)
    with pytest.raises(ValueError, match="at least one pair"):
        clipfast.clip_loss(image[:0], text[:0], scale)
    with pytest.raises(ValueError, match="`logit_scale` must be a number or a one-element tensor"):
        clipfast.clip_loss(image, text, torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="`label_offset`"):
        clipfast.siglip_loss(image, text, scale, scale, label_offset=1)
    with pytest.raises(TypeError, match="`logit_bias`"):
        clipfast.siglip_loss(image, text, scale, None)


def test_interpreter_or_gpu_runs_the_triton_kernel(monkeypatch):
    from clipfast.kernels import contrastive_loss as kernel

    def boom(*args, **kwargs):
        raise RuntimeError("kernel launcher called")

    monkeypatch.setattr(kernel, "contrastive_fwd", boom)
    with pytest.raises(RuntimeError, match="kernel launcher called"):
        clipfast.clip_loss(torch.randn(3, 16, device=DEVICE), torch.randn(3, 16, device=DEVICE), 1.0)


def test_compile_fullgraph_matches_eager():
    scale = torch.tensor(LOG_100, device=DEVICE, requires_grad=True)
    bias = torch.tensor(-5.0, device=DEVICE, requires_grad=True)

    def losses(image, text):
        return clipfast.clip_loss(image, text, scale) + clipfast.siglip_loss(image * 2, text, scale, bias)

    image = torch.randn(9, 64, device=DEVICE, requires_grad=True)
    text = torch.randn(9, 64, device=DEVICE, requires_grad=True)
    expected = losses(image, text)
    expected.backward()
    grads = [t.grad.clone() for t in (image, text, scale, bias)]
    for t in (image, text, scale, bias):
        t.grad = None
    torch._dynamo.reset()
    out = torch.compile(losses, fullgraph=True, backend="aot_eager")(image, text)
    out.backward()
    torch.testing.assert_close(out, expected)
    for t, g in zip((image, text, scale, bias), grads):
        torch.testing.assert_close(t.grad, g)


@pytest.mark.parametrize("path", ["kernel", "eager"])
def test_custom_op_registration_is_valid(monkeypatch, path):
    if path == "eager":  # CPU without the interpreter: the outputs keep the shapes the fake declares
        monkeypatch.setattr(ops, "_use_kernel", lambda x: False)
    image, text = torch.randn(5, 32, device=DEVICE), torch.randn(7, 32, device=DEVICE)
    scale, bias = torch.tensor(3.0, device=DEVICE), torch.tensor(-2.0, device=DEVICE)
    for args in ((image, text[:5], scale, None, ops.CLIP, 0, True, True),
                 (image, text, scale, None, ops.CLIP, 2, False, False),
                 (image, text, scale, bias, ops.SIGLIP, 1, False, True)):
        torch.library.opcheck(torch.ops.clipfast.contrastive_loss_fwd, args, test_utils=("test_schema", "test_faketensor"))


def test_clip_loss_module_matches_open_clip_formulas():
    # open_clip's ClipLoss takes the exponentiated logit_scale and normalized features
    image, text = F.normalize(features(17, 64), dim=-1), F.normalize(features(17, 64), dim=-1)
    scale = torch.tensor(42.0, device=DEVICE)
    loss_fn = clipfast.nn.ClipLoss()
    assert isinstance(loss_fn, torch.nn.Module)
    check("ClipLoss", lambda i, t, s: loss_fn(i, t, s),
                      lambda i, t, s: eager_clip_loss(i, t, s.log(), normalize=False), [image, text, scale],
                      torch.float32, reference_fn=lambda i, t, s: reference_clip_loss(i, t, s.log(), normalize=False),
                      param_dtype_inputs=[2])
    bias = torch.tensor(3.0, device=DEVICE, requires_grad=True)
    out = loss_fn(image, text, scale, logit_bias=bias, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    out["contrastive_loss"].backward()
    assert bias.grad is not None and float(bias.grad) == 0.0  # a shared bias cancels in the softmax


def test_modules_take_mixed_feature_dtypes():
    # autocast can hand over fp32 image features with fp16 text features; eager open_clip casts
    image, text = F.normalize(features(9, 64), dim=-1), F.normalize(features(9, 64), dim=-1)
    scale = torch.tensor(20.0, device=DEVICE)
    expected = clipfast.nn.ClipLoss()(image, text.half().float(), scale)
    torch.testing.assert_close(clipfast.nn.ClipLoss()(image, text.half(), scale), expected)
    expected = clipfast.nn.SigLipLoss()(image, text.half().float(), scale, -5.0)
    torch.testing.assert_close(clipfast.nn.SigLipLoss()(image, text.half(), scale, -5.0), expected)


def test_siglip_loss_module_matches_open_clip_formulas():
    image, text = F.normalize(features(17, 64), dim=-1), F.normalize(features(17, 64), dim=-1)
    scale, bias = torch.tensor(10.0, device=DEVICE), torch.tensor(-10.0, device=DEVICE)
    loss_fn = clipfast.nn.SigLipLoss()
    check("SigLipLoss", lambda i, t, s, b: loss_fn(i, t, s, b),
                      lambda i, t, s, b: eager_siglip_loss(i, t, s.log(), b, normalize=False),
                      [image, text, scale, bias], torch.float32, param_dtype_inputs=[2, 3])
    assert set(loss_fn(image, text, scale, bias, output_dict=True)) == {"contrastive_loss"}


def test_modules_match_open_clip_when_installed():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    image, text = F.normalize(features(11, 64), dim=-1), F.normalize(features(11, 64), dim=-1)
    scale, bias = torch.tensor(30.0, device=DEVICE), torch.tensor(-8.0, device=DEVICE)
    torch.testing.assert_close(clipfast.nn.ClipLoss()(image, text, scale), open_clip_loss.ClipLoss()(image, text, scale),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(clipfast.nn.SigLipLoss()(image, text, scale, bias),
                               open_clip_loss.SigLipLoss()(image, text, scale, bias), rtol=1e-5, atol=1e-5)


def test_too_wide_features_fall_back_to_eager_with_a_warning():
    from clipfast.kernels import contrastive_loss as kernel

    image, text = randn(3, kernel.MAX_DIM + 8, device=DEVICE), randn(3, kernel.MAX_DIM + 8, device=DEVICE)
    scale = torch.tensor(2.0, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (image, text, scale)]
    with pytest.warns(RuntimeWarning, match="eager"):
        loss = clipfast.clip_loss(*leaves)
    loss.backward()
    ref_leaves = [t.clone().requires_grad_() for t in (image, text, scale)]
    expected = eager_clip_loss(*ref_leaves)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for leaf, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss", ["clip", "siglip_rectangular", "cross_entropy_rectangular"])
def test_eager_path_matches_float64(monkeypatch, loss):
    # the path of CPU tensors without the interpreter: same op, forward and written-out backward in PyTorch
    monkeypatch.setattr(ops, "_use_kernel", lambda x: False)
    image, text = features(6, 48), features(6 if loss == "clip" else 18, 48)
    scale, bias = torch.tensor(2.0, device=DEVICE), torch.tensor(-3.0, device=DEVICE)
    fused, reference = {
        "clip": (lambda i, t, s, b: clipfast.clip_loss(i, t, s), lambda i, t, s, b: reference_clip_loss(i, t, s)),
        "siglip_rectangular": (lambda i, t, s, b: clipfast.siglip_loss(i, t, s, b, label_offset=6),
                               lambda i, t, s, b: eager_siglip_loss(i, t, s, b, offset=6)),
        "cross_entropy_rectangular": (
            lambda i, t, s, b: ops.contrastive_cross_entropy(i, t, s.exp(), label_offset=12, normalize=True),
            lambda i, t, s, b: eager_cross_entropy(F.normalize(i, dim=-1), F.normalize(t, dim=-1), s.exp(), 12)),
    }[loss]
    leaves = [t.clone().requires_grad_() for t in (image, text, scale, bias)]
    out = fused(*leaves)
    out.backward()
    ref_leaves = [t.double().requires_grad_() for t in (image, text, scale, bias)]
    ref = reference(*ref_leaves)
    ref.backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    for leaf, ref_leaf in zip(leaves[:3], ref_leaves[:3]):
        torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, rtol=1e-4, atol=1e-6)
    if loss == "siglip_rectangular":
        torch.testing.assert_close(leaves[3].grad.double(), ref_leaves[3].grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Gradient tiles: feature-chunk widths and the GEMM passes they cost
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_d", [256, 512])
@pytest.mark.parametrize("loss", ["clip", "siglip_rectangular", "cross_entropy_rectangular"])
def test_each_gradient_chunk_width_matches_float64(dtype, block_d, loss):
    """The backward on each shipped feature-chunk width (the GPU tiles, run by the interpreter): one
    chunk of 512 or two of 256 at d = 512; a masked chunk at d = 80; at d = 640 a 512-wide launch and a
    second one from feature 512 (or three 256-wide chunks). Every gradient against float64."""
    scale, bias = torch.tensor(math.log(20.0), device=DEVICE), torch.tensor(-4.0, device=DEVICE)
    if loss == "clip":
        image, text = features(33, 512), features(33, 512)
        check(f"clip_loss chunk {block_d}",
              lambda i, t, s: ops.kernel_loss(i, t, s.exp(), None, ops.CLIP, 0, True, True, block_d),
              eager_clip_loss, [image, text, scale], dtype, reference_fn=reference_clip_loss, param_dtype_inputs=[2])
    elif loss == "siglip_rectangular":
        image, text = features(9, 80), features(70, 80)
        check(f"siglip_loss chunk {block_d}",
              lambda i, t, s, b: ops.kernel_loss(i, t, s.exp(), b, ops.SIGLIP, 37, False, True, block_d),
              lambda i, t, s, b: eager_siglip_loss(i, t, s, b, offset=37), [image, text, scale, bias], dtype,
              param_dtype_inputs=[2, 3])
    else:
        queries, keys = features(9, 640, normalize=False), features(70, 640, normalize=False)
        check(f"contrastive_cross_entropy chunk {block_d}",
              lambda q, k, s: ops.kernel_loss(q, k, s, None, ops.CLIP, 61, False, False, block_d),
              lambda q, k, s: eager_cross_entropy(q, k, s, 61), [queries, keys, scale.exp()], dtype,
              reference_fn=lambda q, k, s: eager_cross_entropy(q, k, s, 61, exact=True), param_dtype_inputs=[2])


def _enumerated_passes(n_a, n_b, d, plan, cols_per_split):
    """The same count as ``gemm_passes``, launch by launch, program by program, tile by tile."""
    macs = 0
    for i, (d_start, cfg) in enumerate(plan):
        d_end = d if i + 1 == len(plan) else plan[i + 1][0]
        depth = -(-d // cfg.block_k) * cfg.block_k
        for _ in range(0, n_a, cfg.block_m):
            for _ in range(d_start, d_end, cfg.param("BLOCK_D")):
                for begin in range(0, n_b, cols_per_split):
                    for _ in range(begin, min(begin + cols_per_split, n_b), cfg.block_n):
                        macs += cfg.block_m * cfg.block_n * (depth + cfg.param("BLOCK_D"))
    return macs / (n_a * n_b * d)


@pytest.mark.parametrize("block_d", [256, 512])
@pytest.mark.parametrize("n_a,n_b,d,sms", [(1000, 1000, 768, 132), (256, 4099, 80, 8), (77, 3000, 1040, 132)])
def test_gemm_pass_count_follows_the_launch_grid(block_d, n_a, n_b, d, sms):
    from clipfast.kernels import contrastive_loss as kernel

    plan = kernel.grad_plan(torch.float16, d, True, block_d)
    n_s, cols_per_split = kernel.split_columns(n_a, n_b, d, plan, sms)
    assert cols_per_split % max(c.block_n for _, c in plan) == 0 and (n_s - 1) * cols_per_split < n_b
    assert kernel.gemm_passes(n_a, n_b, d, plan, cols_per_split) == pytest.approx(
        _enumerated_passes(n_a, n_b, d, plan, cols_per_split))


@pytest.mark.parametrize("d", [512, 768, 1024])
@pytest.mark.parametrize("n_a,n_b", [(32768, 32768), (256, 32768)])
def test_wider_chunks_cut_the_backward_gemm_passes(d, n_a, n_b):
    """Each side recomputes the full-depth logit tile once per feature chunk and multiplies G by every
    chunk once: 2 x (chunks x d + sum of chunk widths) / d passes for both sides (H100: 132 SMs)."""
    from clipfast.kernels import contrastive_loss as kernel

    def expected(chunks):
        return 2 * (len(chunks) * d + sum(chunks)) / d

    before = kernel.backward_gemm_passes(n_a, n_b, d, 132, block_d=256)
    after = kernel.backward_gemm_passes(n_a, n_b, d, 132)
    assert before == pytest.approx(expected([256] * (d // 256)))
    assert after == pytest.approx(expected([512] * (d // 512) + ([d % 512] if d % 512 else []))) and after < before
    # the 512-wide tile spills without 16-aligned rows: those take 256-wide chunks
    assert [cfg.param("BLOCK_D") for _, cfg in kernel.grad_plan(torch.float16, d, False, 512)] == [256]


def test_chunk256_dispatch_candidate_runs_the_256_wide_backward(monkeypatch):
    from clipfast.dispatching import specs as dispatch_specs
    from clipfast.kernels import contrastive_loss as kernel

    seen = []
    grad = kernel.contrastive_grad

    def spy(*args):
        seen.append(args[-1])
        return grad(*args)

    monkeypatch.setattr(kernel, "contrastive_grad", spy)
    candidate = dispatch_specs.specs()["clip_loss"].by_name["clipfast_chunk256"]
    assert candidate.cuda_only
    image = features(9, 64).requires_grad_()
    text = features(9, 64).requires_grad_()
    scale = torch.tensor(20.0, device=DEVICE)
    loss = candidate.fn(image, text, scale, None, ops.CLIP, 0, True, True)
    loss.backward()
    torch.testing.assert_close(loss, eager_clip_loss(image, text, scale.log()).float(), rtol=1e-5, atol=1e-5)
    assert seen == [256, 256]


def test_tiles_fit_the_shared_memory_per_block(monkeypatch):
    # every forward and gradient tile a GPU runs (fp16/bf16: the chunk widths grad_plan picks for the
    # architecture; fp32) fits the shared memory per block of every architecture from sm_80 on by its
    # estimate, which `clipfast aot` checks is an upper bound; the 512-wide chunk (its fp32 accumulator staged
    # through 128 KB of shared memory on sm_90 and newer) is not planned where it does not fit (sm_120)
    from clipfast.kernels import contrastive_loss as kernel
    from clipfast.kernels import runtime

    monkeypatch.setattr(runtime, "INTERPRET", False)  # the GPU's tiles, not the interpreter's
    for arch, limit in runtime.MAX_SHARED_PER_BLOCK.items():
        if arch < 80:
            continue
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for d in (80, 512, 768, 784, 1024):
                chosen = [("fwd", kernel.tiles(dtype, d)["fwd"])]
                for block_d in (0, 256, 512):
                    chosen += [("grad", t) for _, t in kernel.grad_plan(dtype, d, True, block_d, arch)]
                for kind, tile in chosen:
                    assert kernel.shared_estimate(kind, tile, dtype, arch) <= limit, (dtype, d, kind, tile, arch)
    widths = {arch: {t.param("BLOCK_D") for _, t in kernel.grad_plan(torch.float16, 1024, True, 0, arch)}
              for arch in (80, 86, 90, 120)}
    assert widths == {80: {512}, 86: {512}, 90: {512}, 120: {256}}, widths
