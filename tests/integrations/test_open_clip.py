"""open_clip 3.x: tiny random-init models from ``create_model`` (ViT with QuickGELU and GELU, LayerScale,
gradient checkpointing, fp16 with ``LayerNormFp32``, RN50), patched vs unpatched."""
import pytest
import torch
import torch.nn as nn

import clipfast

from ..conftest import DEVICE
from .common import check_patch, clip_tokens, paths_of

open_clip = pytest.importorskip("open_clip", reason="open_clip is not installed; `pip install -e .[integrations]`")

CONTEXT, VOCAB = 16, 100
TEXT = dict(context_length=CONTEXT, vocab_size=VOCAB, width=32, heads=2, layers=2)


def create(name, precision="fp32", ls_init_value=None, grad_checkpointing=False, **block):
    """``block``: options of both towers' blocks (block_type, qk_norm, scale_heads, scaled_cosine_attn, ...)."""
    if name.startswith("RN"):
        vision = dict(layers=[1, 1, 1, 1], width=16, image_size=64, patch_size=None)
    else:
        vision = dict(layers=2, width=64, head_width=32, image_size=32, patch_size=8, ls_init_value=ls_init_value,
                      **block)
    model = open_clip.create_model(name, pretrained=None, precision=precision, embed_dim=32, vision_cfg=vision,
                                   text_cfg=dict(TEXT, ls_init_value=ls_init_value, **block))
    with torch.no_grad():  # move every parameter off its init (LayerNorm (1, 0), zero biases) a little
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p).to(p.dtype))
    model.set_grad_checkpointing(grad_checkpointing)
    return model.eval()


def tokens(batch=3):
    return clip_tokens(VOCAB, CONTEXT, batch)


def run(model, image, text):
    image_features, text_features, logit_scale = model(image, text)[:3]  # features are normalized
    return image_features, text_features, logit_scale * image_features @ text_features.t()


def expected_swaps(model):
    return {
        "layer_norm": paths_of(model, lambda m: isinstance(m, nn.LayerNorm)),
        "attention": paths_of(model, lambda m: isinstance(m, (nn.MultiheadAttention, open_clip.transformer.Attention,
                                                             open_clip.modified_resnet.AttentionPool2d))),
        "mlp": {f"{p}.mlp" for p in paths_of(model, lambda m: isinstance(m, open_clip.transformer.ResidualAttentionBlock))},
    }


CASES = {
    "vit-quickgelu": dict(name="ViT-B-32-quickgelu"),
    "vit-gelu-layerscale-checkpointing": dict(name="ViT-B-32", ls_init_value=0.1, grad_checkpointing=True),
    # open_clip's own Attention class: QK-norm (LayerNormFp32 on q and k), per-head output scale
    "vit-custom-attention": dict(name="ViT-B-32", block_type="custom", qk_norm=True, scale_heads=True),
    "rn50": dict(name="RN50"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_open_clip_patched_matches_unpatched(case):
    kwargs = CASES[case]
    build = lambda: create(**kwargs)  # noqa: E731
    size = 64 if kwargs["name"].startswith("RN") else 32
    image = torch.randn(2, 3, size, size, dtype=torch.float64)
    model, report = check_patch(build, run, [image, tokens()], expected=expected_swaps(build()))
    if kwargs.get("grad_checkpointing"):
        assert model.transformer.grad_checkpointing and model.visual.transformer.grad_checkpointing
    if kwargs.get("block_type") == "custom":
        assert {s.original for s in report.swapped if s.family == "attention"} == {"Attention"}, str(report)


def test_open_clip_scaled_cosine_attention_left_alone():
    model = create("ViT-B-32", block_type="custom", scaled_cosine_attn=True)
    report = clipfast.patch(model)
    reasons = {s.reason for s in report.skipped if s.family == "attention"}
    assert any("scaled-cosine" in r for r in reasons), str(report)


def test_open_clip_fp16_with_layer_norm_fp32():
    """precision="fp16": fp16 weights, LayerNormFp32 with fp32 parameters (open_clip's own conversion)."""
    build = lambda: create("ViT-B-32-quickgelu", precision="fp16").float()  # noqa: E731
    model = create("ViT-B-32-quickgelu", precision="fp16")
    assert any(type(m) is open_clip.transformer.LayerNormFp32 for m in model.modules())
    image = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    cast = lambda m, dt: open_clip.model.convert_weights_to_lp(m, dt)  # noqa: E731
    check_patch(build, run, [image, tokens()], dtype=torch.float16, cast=cast, expected=expected_swaps(model))


def test_open_clip_loss_replaceable():
    """clipfast.nn.ClipLoss / SigLipLoss take open_clip's constructor and forward arguments and give the same
    loss and gradients."""
    if not hasattr(clipfast.nn, "ClipLoss"):
        pytest.fail("clipfast.nn.ClipLoss is missing")
    image = torch.randn(12, 32, device=DEVICE, dtype=torch.float64)
    text = torch.randn(12, 32, device=DEVICE, dtype=torch.float64)
    scale = torch.tensor(2.3, device=DEVICE, dtype=torch.float64)
    bias = torch.tensor(-1.5, device=DEVICE, dtype=torch.float64)
    pairs = [(open_clip.loss.ClipLoss(), clipfast.nn.ClipLoss(), (image, text, scale)),
             (open_clip.loss.SigLipLoss(), clipfast.nn.SigLipLoss(), (image, text, scale, bias))]
    for theirs, ours, args in pairs:
        # open_clip's losses take normalized features and the scale itself (not its log)
        leaves_a = [a.clone().float().requires_grad_() for a in args]
        leaves_b = [a.clone().float().requires_grad_() for a in args]
        feats_a = [leaves_a[0] / leaves_a[0].norm(dim=-1, keepdim=True), leaves_a[1] / leaves_a[1].norm(dim=-1, keepdim=True)]
        feats_b = [leaves_b[0] / leaves_b[0].norm(dim=-1, keepdim=True), leaves_b[1] / leaves_b[1].norm(dim=-1, keepdim=True)]
        a = theirs(*feats_a, *leaves_a[2:])
        b = ours(*feats_b, *leaves_b[2:])
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-5, atol=1e-5)
        a.backward()
        b.backward()
        for x, y in zip(leaves_a, leaves_b):
            torch.testing.assert_close(y.grad, x.grad, rtol=1e-4, atol=1e-6)
        da = theirs(*feats_a, *leaves_a[2:], output_dict=True)
        db = ours(*feats_b, *leaves_b[2:], output_dict=True)
        assert set(da) == set(db)
