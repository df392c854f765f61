import pytest
import torch
import torch.nn.functional as F

import clipfast
from clipfast.kernels import patch_embed as patch_embed_kernel
from clipfast.kernels import runtime

from .conftest import DEVICE, DTYPES, ON_GPU
from .numerics import assert_op_matches, randn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# (height, width, patch): every CLIP patch size, square and non-square, one patch row/column
SIZES = [(28, 42, 14), (32, 32, 16), (64, 32, 32)] + ([(224, 224, 16), (336, 336, 14), (224, 160, 32)] if ON_GPU else [])
WIDTH = 48 if not ON_GPU else 768


def eager_patch_embed(pixels, weight, cls=None, pos=None, ln_w=None, ln_b=None, mean=None, std=None, eps=1e-5,
                      bias=None):
    """What CLIP code does: (normalize) -> conv1 (+ bias: SigLIP, timm) -> flatten -> cat class token -> + pos
    -> ln_pre in fp32."""
    p = weight.shape[-1]
    acc = torch.promote_types(weight.dtype, torch.float32)
    x = pixels
    if mean is not None:
        unit = 255.0 if pixels.dtype == torch.uint8 else 1.0
        m = torch.tensor(mean, dtype=acc, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=acc, device=x.device).view(1, -1, 1, 1)
        x = (x.to(acc) / unit - m) / s
    x = F.conv2d(x.to(weight.dtype), weight, bias, stride=p).flatten(2).transpose(1, 2)
    if cls is not None:
        x = torch.cat([cls.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device), x], 1)
    if pos is not None:
        x = x + pos.to(x.dtype)
    if ln_w is not None:
        x = F.layer_norm(x.to(acc), x.shape[-1:], ln_w.to(acc), ln_b.to(acc), eps).to(x.dtype)
    return x


def make_inputs(batch, height, width_px, patch, width=WIDTH, channels=3, cls=True, pos=True, ln=False):
    n_tokens = (height // patch) * (width_px // patch) + int(cls)
    inputs = [randn(batch, channels, height, width_px, device=DEVICE),
              randn(width, channels, patch, patch, device=DEVICE) / patch,  # conv1-like scale
              randn(width, device=DEVICE, outliers=2) if cls else None,
              0.5 * randn(n_tokens, width, device=DEVICE) if pos else None]
    if ln:
        inputs += [1 + 0.1 * torch.randn(width, device=DEVICE), 0.1 * torch.randn(width, device=DEVICE)]
    return inputs


def fused(pixels, weight, cls=None, pos=None, ln_w=None, ln_b=None):
    return clipfast.patch_embed(pixels, weight, cls, pos, ln_weight=ln_w, ln_bias=ln_b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}p{s[2]}")
def test_patch_embed_matches_float64(dtype, size):
    # class token + positional embedding: forward and the gradients of pixels, weight, class, pos
    assert_op_matches("patch_embed", fused, eager_patch_embed, make_inputs(2, *size), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["plain", "pos_only", "class_only", "ln_pre"])
def test_patch_embed_optional_parts(dtype, variant):
    cls, pos, ln = {"plain": (False, False, False), "pos_only": (False, True, False),
                    "class_only": (True, False, False), "ln_pre": (True, True, True)}[variant]
    size = (32, 48, 16) if variant != "ln_pre" else (28, 42, 14)
    inputs = make_inputs(3, *size, cls=cls, pos=pos, ln=ln)
    assert_op_matches(f"patch_embed {variant}", fused, eager_patch_embed, inputs, dtype)


# ---------------------------------------------------------------------------------------------
# Conv bias (SigLIP, timm PatchEmbed): no class token, bias on the patch rows only
# ---------------------------------------------------------------------------------------------

def fused_with_bias(pixels, weight, bias, cls=None, pos=None):
    return clipfast.patch_embed(pixels, weight, cls, pos, conv_bias=bias)


def eager_with_bias(pixels, weight, bias, cls=None, pos=None):
    return eager_patch_embed(pixels, weight, cls, pos, bias=bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["siglip", "bias_only", "class_token"])
def test_conv_bias_matches_float64(dtype, variant):
    # SigLIP: bias + pos, no class token; timm PatchEmbed: bias alone; a class token must not get the bias
    size = (32, 48, 16) if variant != "class_token" else (28, 42, 14)
    cls, pos = {"siglip": (False, True), "bias_only": (False, False), "class_token": (True, True)}[variant]
    pixels, weight, cls_t, pos_t = make_inputs(3, *size, cls=cls, pos=pos)
    bias = randn(WIDTH, device=DEVICE, outliers=2)
    assert_op_matches(f"patch_embed bias {variant}", fused_with_bias, eager_with_bias,
                      [pixels, weight, bias, cls_t, pos_t], dtype)


@pytest.mark.parametrize("frozen", ["weight", "bias", "both"])
def test_conv_bias_gradient_subsets(frozen):
    # a frozen conv weight with a trainable bias runs the weight kernel's bias sum alone, and vice versa
    pixels, weight, _, pos = make_inputs(2, 32, 32, 16, cls=False)
    bias = randn(WIDTH, device=DEVICE)
    weight.requires_grad_(frozen == "bias")
    bias.requires_grad_(frozen == "weight")
    pixels.requires_grad_()
    out = clipfast.patch_embed(pixels, weight, None, pos, conv_bias=bias)
    g = torch.randn_like(out)
    out.backward(g)
    ref = [t.detach().double().requires_grad_(t.requires_grad) for t in (pixels, weight, bias)]
    eager_patch_embed(ref[0], ref[1], None, pos.double(), bias=ref[2]).backward(g.double())
    for got, want in zip((pixels, weight, bias), ref):
        assert (got.grad is None) == (want.grad is None)
        if want.grad is not None:
            torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-4, rtol=1e-4)


def test_conv_bias_bad_input_and_eager_path(monkeypatch):
    pixels, weight, _, pos = make_inputs(1, 32, 32, 16, cls=False)
    with pytest.raises(ValueError, match="`conv_bias` must have shape \\(48,\\)"):
        clipfast.patch_embed(pixels, weight, conv_bias=torch.zeros(7, device=DEVICE))
    with pytest.raises(ValueError, match="`conv_bias` must have 1 dimensions"):
        clipfast.patch_embed(pixels, weight, conv_bias=torch.zeros(1, WIDTH, device=DEVICE))
    monkeypatch.setattr(runtime, "uses_triton", lambda t: False)
    assert_op_matches("patch_embed bias eager path", fused_with_bias, eager_with_bias,
                      [pixels, weight, randn(WIDTH, device=DEVICE), None, pos], torch.float32)


def test_strided_upstream_gradient_with_bias():
    # tokens consumed through a [T, B, width] transpose: the backward reads a strided dtokens in place
    pixels, weight, _, pos = [t if t is None else t.requires_grad_() for t in make_inputs(3, 28, 42, 14, cls=False)]
    bias = randn(WIDTH, device=DEVICE).requires_grad_()
    out = clipfast.patch_embed(pixels, weight, None, pos, conv_bias=bias).transpose(0, 1)
    g = torch.randn_like(out)
    out.backward(g)
    ref = [t.detach().double().requires_grad_() for t in (pixels, weight, pos, bias)]
    eager_patch_embed(ref[0], ref[1], None, ref[2], bias=ref[3]).transpose(0, 1).backward(g.double())
    for got, want in zip((pixels, weight, pos, bias), ref):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_uint8_pixels_with_mean_std(dtype):
    pixels = torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8, device=DEVICE)
    _, weight, cls, pos = make_inputs(2, 32, 48, 16)

    def fused_u8(pixels, weight, cls, pos):
        return clipfast.patch_embed(pixels, weight, cls, pos, mean=CLIP_MEAN, std=CLIP_STD)

    def eager_u8(pixels, weight, cls, pos):
        return eager_patch_embed(pixels, weight, cls, pos, mean=CLIP_MEAN, std=CLIP_STD)

    assert_op_matches("patch_embed uint8", fused_u8, eager_u8, [pixels, weight, cls, pos], dtype)
    # the same as normalizing the float image first
    as_float = (pixels.float() / 255 - torch.tensor(CLIP_MEAN, device=DEVICE).view(1, 3, 1, 1)) \
        / torch.tensor(CLIP_STD, device=DEVICE).view(1, 3, 1, 1)
    torch.testing.assert_close(fused_u8(pixels, weight, cls, pos), fused(as_float, weight, cls, pos),
                               atol=1e-4, rtol=1e-4)


def test_float_pixels_with_mean_std_gradient():
    # normalization folded into the loads for float pixels too; the pixel gradient carries 1 / std
    mean, std = (0.5, 0.25, -0.125), (2.0, 0.5, 1.5)

    def fused_n(pixels, weight, cls, pos):
        return clipfast.patch_embed(pixels, weight, cls, pos, mean=mean, std=std)

    def eager_n(pixels, weight, cls, pos):
        return eager_patch_embed(pixels, weight, cls, pos, mean=mean, std=std)

    assert_op_matches("patch_embed normalized", fused_n, eager_n, make_inputs(2, 28, 28, 14), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if ON_GPU else []))
def test_fp32_embeddings_with_low_precision_weight(dtype):
    # fp32 class/pos/ln parameters next to a half conv weight; fp32 pixels are cast like conv1(x.type(w.dtype))
    pixels, weight, cls, pos, ln_w, ln_b = make_inputs(2, 32, 32, 16, ln=True)
    pixels.requires_grad_()
    for t in (cls, pos):
        t.requires_grad_()
    w = weight.to(dtype).requires_grad_()
    out = clipfast.patch_embed(pixels, w, cls, pos, ln_weight=ln_w, ln_bias=ln_b)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert pixels.grad.dtype == torch.float32 and cls.grad.dtype == torch.float32 and pos.grad.dtype == torch.float32
    ref_in = [t.detach().double().requires_grad_() for t in (pixels, w, cls, pos)]
    ref = eager_patch_embed(*ref_in, ln_w.double(), ln_b.double())
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=1e-2)
    for got, want in zip((pixels.grad, w.grad, cls.grad, pos.grad), ref_in):
        torch.testing.assert_close(got.double(), want.grad, atol=5e-2, rtol=1e-2)


def test_non_contiguous_pixels():
    _, weight, cls, pos = make_inputs(2, 32, 32, 16)
    channels_last = randn(2, 3, 32, 32, device=DEVICE).to(memory_format=torch.channels_last)
    sliced = randn(2, 5, 32, 40, device=DEVICE)[:, 1:4, :, 4:36]  # every stride unusual
    for pixels in (channels_last, sliced):
        assert not pixels.is_contiguous()
        assert_op_matches("patch_embed strided", fused, eager_patch_embed, [pixels, weight, cls, pos], torch.float32)


def test_expanded_upstream_gradient():
    # y.sum().backward() hands the backward a stride-0 gradient
    pixels, weight, cls, pos = [t.requires_grad_() for t in make_inputs(2, 28, 42, 14)]
    clipfast.patch_embed(pixels, weight, cls, pos).sum().backward()
    ref_in = [t.detach().double().requires_grad_() for t in (pixels, weight, cls, pos)]
    eager_patch_embed(*ref_in).sum().backward()
    for got, want in zip((pixels, weight, cls, pos), ref_in):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-4, rtol=1e-4)


def test_frozen_weight_saliency_gradient():
    # only the pixels require grad (saliency / adversarial use): no weight gradient is computed
    pixels, weight, cls, pos = make_inputs(2, 32, 32, 16)
    pixels.requires_grad_()
    out = clipfast.patch_embed(pixels, weight, cls, pos)
    g = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, pixels, g)
    ref = pixels.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(eager_patch_embed(ref, weight.double(), cls.double(), pos.double()), ref, g.double())
    torch.testing.assert_close(dx.double(), want, atol=1e-5, rtol=1e-5)


def test_empty_batch():
    pixels, weight, cls, pos = [t.requires_grad_() for t in make_inputs(0, 32, 32, 16)]
    out = clipfast.patch_embed(pixels, weight, cls, pos)
    assert out.shape == (0, 5, WIDTH)
    out.sum().backward()
    assert pixels.grad.shape == pixels.shape
    for t in (weight, cls, pos):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_bad_input_errors():
    pixels, weight, cls, pos = make_inputs(1, 32, 32, 16)
    with pytest.raises(ValueError, match="not a positive multiple of the patch size 16"):
        clipfast.patch_embed(randn(1, 3, 32, 40, device=DEVICE), weight)
    with pytest.raises(ValueError, match="has 4 channels but `conv_weight` expects 3"):
        clipfast.patch_embed(randn(1, 4, 32, 32, device=DEVICE), weight)
    with pytest.raises(ValueError, match="`pixels` must have 4 dimensions"):
        clipfast.patch_embed(randn(3, 32, 32, device=DEVICE), weight)
    with pytest.raises(ValueError, match="`positional_embedding` must have shape \\(5, 48\\)"):
        clipfast.patch_embed(pixels, weight, cls, pos[1:])
    with pytest.raises(ValueError, match="`class_embedding` must have shape"):
        clipfast.patch_embed(pixels, weight, cls[1:], pos)
    with pytest.raises(ValueError, match="square patch"):
        clipfast.patch_embed(pixels, weight[..., :8])
    with pytest.raises(ValueError, match="uint8 `pixels` need `mean` and `std`"):
        clipfast.patch_embed(pixels.to(torch.uint8), weight)
    with pytest.raises(ValueError, match="`mean` must have one value per channel"):
        clipfast.patch_embed(pixels, weight, mean=(0.5, 0.5), std=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="both `mean` and `std`"):
        clipfast.patch_embed(pixels, weight, mean=CLIP_MEAN)
    with pytest.raises(TypeError, match="`conv_weight` has dtype int64"):
        clipfast.patch_embed(pixels, weight.long())
    with pytest.raises(TypeError, match="`pixels` has dtype float64"):
        clipfast.patch_embed(pixels.double(), weight)


def test_interpreter_or_gpu_runs_the_triton_kernels(monkeypatch):
    # guards against the suite silently testing the eager fallback instead of the kernels
    from clipfast.kernels import patch_embed as kernel

    def boom(*args, **kwargs):
        raise RuntimeError("kernel launcher called")

    pixels, weight, cls, pos = make_inputs(1, 32, 32, 16)
    monkeypatch.setattr(kernel, "patch_embed_bwd", boom)
    out = clipfast.patch_embed(pixels, weight.requires_grad_(), cls, pos)
    with pytest.raises(RuntimeError, match="kernel launcher called"):
        out.sum().backward()
    monkeypatch.setattr(kernel, "patch_embed_fwd", boom)
    with pytest.raises(RuntimeError, match="kernel launcher called"):
        clipfast.patch_embed(pixels, weight, cls, pos)


@pytest.mark.parametrize("normalized", [False, True])
def test_eager_fallback_matches_float64(monkeypatch, normalized):
    # CPU without the interpreter runs the eager reference of both custom ops (a patched model on a laptop)
    monkeypatch.setattr(runtime, "uses_triton", lambda t: False)
    kwargs = {"mean": (0.5, 0.25, -0.125), "std": (2.0, 0.5, 1.5)} if normalized else {}

    def fused_eager(pixels, weight, cls, pos, ln_w, ln_b):
        return clipfast.patch_embed(pixels, weight, cls, pos, ln_weight=ln_w, ln_bias=ln_b, **kwargs)

    def eager(pixels, weight, cls, pos, ln_w, ln_b):
        return eager_patch_embed(pixels, weight, cls, pos, ln_w, ln_b, **kwargs)

    assert_op_matches("patch_embed eager path", fused_eager, eager, make_inputs(2, 28, 42, 14, ln=True), torch.float32)


def test_vector_width_checks():
    # the alignment the kernels may assume is derived from the actual strides and addresses
    from clipfast.kernels.patch_embed import _vec

    x = torch.zeros(2, 3, 32, 32, dtype=torch.float16)
    assert _vec(x, x.stride()[:3], 16, x.stride(3)) == 8
    assert _vec(x, x.stride()[:3], 14, x.stride(3)) == 2
    assert _vec(x[..., 1:], x.stride()[:3], 16, 1) == 1  # misaligned base address
    cl = x.to(memory_format=torch.channels_last)
    assert _vec(cl, cl.stride()[:3], 16, cl.stride(3)) == 1  # width stride != 1
    y = torch.zeros(3, 3, 30, 30, dtype=torch.float32)
    assert _vec(y, y.stride()[:3], 16, 1) == 2  # row stride 30


def test_compile_fullgraph_matches_eager():
    pixels, weight, cls, pos, ln_w, ln_b = make_inputs(2, 32, 32, 16, ln=True)
    leaves = [t.requires_grad_() for t in (pixels, weight, cls, pos)]

    def embed(pixels, weight, cls, pos):
        return clipfast.patch_embed(pixels, weight, cls, pos, ln_weight=ln_w, ln_bias=ln_b) * 2

    expected = embed(*leaves)
    expected.sum().backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    torch._dynamo.reset()
    out = torch.compile(embed, fullgraph=True, backend="aot_eager")(*leaves)
    out.sum().backward()
    torch.testing.assert_close(out, expected)
    for t, g in zip(leaves, grads):
        torch.testing.assert_close(t.grad, g)


def test_custom_op_registration_is_valid():
    pixels, weight, cls, pos = make_inputs(1, 32, 32, 16)
    scale = torch.rand(3, device=DEVICE) + 0.5
    shift = torch.randn(3, device=DEVICE)
    bias = torch.randn(WIDTH, device=DEVICE)
    for b in (None, bias):
        torch.library.opcheck(torch.ops.clipfast.patch_embed_fwd, (pixels, weight, b, cls, pos, scale, shift),
                              test_utils=("test_schema", "test_faketensor"))
    dtokens = torch.randn(1, 5, WIDTH, device=DEVICE)
    for need_bias in (False, True):
        torch.library.opcheck(torch.ops.clipfast.patch_embed_bwd,
                              (dtokens, pixels, weight, None, None, True, True, True, need_bias, 5),
                              test_utils=("test_schema", "test_faketensor"))
    # channels_last pixels that require grad: the fake's strides are the real results' (contiguous)
    last = pixels.to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.clipfast.patch_embed_bwd, (dtokens, last, weight, None, None, True, True, True,
                                                               True, 5), test_utils=("test_schema", "test_faketensor"))


def test_poisoned_outputs_are_fully_written():
    assert runtime._POISON
    pixels, weight, cls, pos = make_inputs(3, 28, 42, 14)
    assert torch.isfinite(clipfast.patch_embed(pixels, weight, cls, pos)).all()


# ---------------------------------------------------------------------------------------------
# Patch rules
# ---------------------------------------------------------------------------------------------

def _compare_patched(model, make_input, params, call=None, atol=1e-4, **families):
    """Patched vs unpatched outputs and parameter gradients on the same input (fp32)."""
    import copy

    call = call or (lambda m, x: m(x))
    reference = copy.deepcopy(model)
    report = clipfast.patch(model, **families)
    x = make_input()
    out, ref = call(model, x), call(reference, x)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-4)
    for name in params:
        got, want = model.get_parameter(name).grad, reference.get_parameter(name).grad
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-4, msg=lambda m: f"grad of {name}: {m}")
    return report


def test_rule_reference_vision_transformer():
    from clipfast.models.model import VisionTransformer

    model = clipfast.models.create("tiny").to(DEVICE)
    visual = model.visual
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = ["visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
              "visual.ln_pre.weight", "visual.ln_pre.bias"]
    report = _compare_patched(model, lambda: randn(2, 3, 32, 32, device=DEVICE), params,
                              call=lambda m, x: m.encode_image(x), layer_norm=True, attention=False, mlp=False)
    assert "patch_embed" in str(report)
    assert isinstance(model.visual, VisionTransformer) and type(model.visual) is not VisionTransformer
    assert model.visual.conv1.weight is visual.conv1.weight  # parameters shared, not copied
    assert set(model.state_dict()) == set(state)
    # an image size the positional embedding does not fit falls back to the original code (which raises)
    with pytest.raises(RuntimeError):
        model.encode_image(randn(1, 3, 40, 40, device=DEVICE))
    clipfast.unpatch(model)
    assert type(model.visual) is VisionTransformer


def test_rule_open_clip_vision_transformer():
    transformer = pytest.importorskip("open_clip.transformer")
    vit = transformer.VisionTransformer(image_size=32, patch_size=16, width=64, layers=1, heads=2, mlp_ratio=2.0,
                                        output_dim=32).to(DEVICE).eval()
    params = ["conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight"]
    _compare_patched(vit, lambda: randn(2, 3, 32, 32, device=DEVICE), params,
                     layer_norm=False, attention=False, mlp=False)
    assert type(vit).__name__.startswith("Fast") and isinstance(vit, transformer.VisionTransformer)

    # active patch dropout in training: only the embedding is fused, dropout and ln_pre run after it
    vit = transformer.VisionTransformer(image_size=32, patch_size=16, width=64, layers=1, heads=2, mlp_ratio=2.0,
                                        output_dim=32, patch_dropout=0.5).to(DEVICE).train()
    import copy

    reference = copy.deepcopy(vit)
    clipfast.patch(vit, layer_norm=False, attention=False, mlp=False)
    x = randn(2, 3, 32, 32, device=DEVICE)
    torch.manual_seed(0)
    out = vit(x)
    torch.manual_seed(0)
    torch.testing.assert_close(out, reference(x), atol=1e-4, rtol=1e-4)


def test_rule_hf_clip_vision_embeddings():
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=16)
    model = transformers.CLIPVisionModel(config).to(DEVICE).eval()
    # the embeddings' path differs between transformers versions
    prefix = next(name for name, m in model.named_modules() if type(m).__name__ == "CLIPVisionEmbeddings")
    params = [f"{prefix}.patch_embedding.weight", f"{prefix}.class_embedding", f"{prefix}.position_embedding.weight"]
    report = _compare_patched(model, lambda: randn(2, 3, 32, 32, device=DEVICE), params,
                              call=lambda m, x: m(pixel_values=x).last_hidden_state,
                              layer_norm=False, attention=False, mlp=False)
    assert "CLIPVisionEmbeddings" in str(report)
    embeddings = model.get_submodule(prefix)
    assert type(embeddings).__name__ == "FastCLIPVisionEmbeddings"
    # interpolate_pos_encoding runs the original forward
    x = randn(1, 3, 48, 48, device=DEVICE)
    out = embeddings(x, interpolate_pos_encoding=True)
    assert out.shape == (1, 10, 64)


GEMM_KERNELS = ("_patch_embed_fwd_kernel", "_patch_embed_dweight_kernel", "_patch_embed_dpixels_kernel")
GEMM_LABELS = dict(zip(GEMM_KERNELS, ("fwd", "dweight", "dpixels")))


@pytest.mark.parametrize("arch", sorted(runtime.MAX_SHARED_PER_BLOCK))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_offered_configs_fit_the_shared_memory_per_block(arch, dtype):
    """Every config the pruning gives each GEMM kernel for ``dtype`` operands on ``arch`` fits the
    architecture's shared memory per block by its estimate (which `clipfast aot` checks is an upper bound),
    something is always offered, and exact fp32 gets its own (spill-free) configs."""
    limit = runtime.MAX_SHARED_PER_BLOCK[arch]
    for name, label in GEMM_LABELS.items():
        configs = getattr(patch_embed_kernel, name).shipped_configs
        kept = patch_embed_kernel.offered(label, configs, dtype, arch)
        assert kept, (name, arch, dtype)
        assert all(patch_embed_kernel.shared_estimate(label, c, dtype) <= limit for c in kept), (name, arch, dtype)
        table = patch_embed_kernel.TABLES[label]
        fp32_own = {t.key for t in table.shipped() if t.dtypes == ("fp32",)}
        if arch >= 80:  # (before: a fallback to the smallest config of all)
            assert ({table.tile_of(c).key for c in kept} <= fp32_own) == (dtype == torch.float32)
    # measured (triton 3.8): the forward's 64x256x64 3-stage tile takes 245,760 B in fp32 on sm_90 (over 232,448)
    wide = next(c for c in patch_embed_kernel.FWD_CONFIGS if c.kwargs["BLOCK_N"] == 256)
    assert patch_embed_kernel.shared_estimate("fwd", wide, torch.float32) >= 245760
    assert "shared memory" in patch_embed_kernel.why_not_offered("fwd", wide, torch.float16, 86)
    prune, configs = patch_embed_kernel._pruner("fwd", "W"), patch_embed_kernel.FWD_CONFIGS
    table = patch_embed_kernel.TABLES["fwd"]
    assert prune(configs, {"W": torch.empty(0)}) == [c for c in configs if table.tile_of(c).dtypes == ("fp32",)]
    assert prune(configs, {"W": torch.empty(0, dtype=torch.float16)}) == configs[:3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name,index", [(name, i) for name in GEMM_KERNELS
                                        for i in range(len(getattr(patch_embed_kernel, name).shipped_configs))])
def test_every_shipped_config_runs_in_the_interpreter(name, index, dtype):
    # the interpreter runs each kernel's first config only; every one is forced here once, forward and
    # backward (the other two kernels run their first config). On a GPU a config the offer rules never run
    # there in this dtype (``why_not_offered``: another dtype's, or over the shared memory per block) is skipped
    tuned = getattr(patch_embed_kernel, name)
    if ON_GPU:
        label = GEMM_LABELS[name]
        arch = runtime.device_arch(DEVICE)
        reason = patch_embed_kernel.why_not_offered(label, tuned.shipped_configs[index], dtype, arch)
        if reason:
            pytest.skip(f"patch_embed {label} config {index} is not offered to {dtype} on sm_{arch}: {reason}")
    with runtime.forced_config(tuned, tuned.shipped_configs[index]):
        assert_op_matches("patch_embed", fused, eager_patch_embed, make_inputs(2, 32, 48, 16), dtype)
