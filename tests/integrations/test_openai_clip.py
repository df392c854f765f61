"""OpenAI CLIP (``clip-anytorch``): tiny random-init ViT and ModifiedResNet models built with
``clip.model.CLIP`` and ``build_model``, patched vs unpatched."""
import copy

import pytest
import torch
import torch.nn as nn

from clipfast.integrations.openai_clip import import_clip
from clipfast.patching import patch

from ..conftest import DEVICE
from ..numerics import check
from .common import check_patch, clip_tokens, float64_reference, paths_of, perturbed

try:
    clip = import_clip()
except ImportError as e:  # noqa: F841
    pytest.skip(f"OpenAI clip (clip-anytorch) is not installed ({e}); `pip install -e .[integrations]`",
                allow_module_level=True)

CONTEXT, VOCAB = 16, 100


def tiny_vit(text_width=32, text_heads=2):
    return clip.model.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                           context_length=CONTEXT, vocab_size=VOCAB, transformer_width=text_width,
                           transformer_heads=text_heads,
                           transformer_layers=2).eval()


def tiny_resnet():
    # width 16: AttentionPool2d over 2x2 + 1 tokens of 512 channels, 8 heads of 64
    return clip.model.CLIP(embed_dim=32, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=16,
                           vision_patch_size=None, context_length=CONTEXT, vocab_size=VOCAB, transformer_width=32,
                           transformer_heads=2, transformer_layers=1).eval()


def tokens(batch=3):
    return clip_tokens(VOCAB, CONTEXT, batch)


def run(model, image, text):
    image_features = model.encode_image(image)
    text_features = model.encode_text(text)
    i = image_features / image_features.norm(dim=-1, keepdim=True)
    t = text_features / text_features.norm(dim=-1, keepdim=True)
    return image_features, text_features, model.logit_scale.exp() * i @ t.t()


def expected_swaps(model):
    return {
        "layer_norm": paths_of(model, lambda m: isinstance(m, nn.LayerNorm)),
        "attention": paths_of(model, lambda m: isinstance(m, (nn.MultiheadAttention, clip.model.AttentionPool2d))),
        "mlp": {f"{p}.mlp" for p in paths_of(model, lambda m: isinstance(m, clip.model.ResidualAttentionBlock))},
    }


@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_openai_clip_patched_matches_unpatched(kind):
    build = (lambda: perturbed(tiny_vit())) if kind == "vit" else (lambda: perturbed(tiny_resnet()))
    size = 32 if kind == "vit" else 64
    image = torch.randn(2, 3, size, size, dtype=torch.float64)
    check_patch(build, run, [image, tokens()], expected=expected_swaps(build()))


def test_openai_build_model_from_state_dict():
    """``build_model(state_dict)`` (what ``clip.load`` does) gives a model that patches like a built one."""
    state = tiny_vit(text_width=64, text_heads=1).state_dict()  # build_model infers heads as width // 64
    model = clip.model.build_model(copy.deepcopy(state)).float().to(DEVICE)
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    report = patch(model)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    assert paths_of(model, lambda m: isinstance(m, nn.LayerNorm)) <= {s.path for s in report.swapped}
    image = torch.randn(2, 3, 32, 32, device=DEVICE)
    out = model(image, tokens().to(DEVICE))[0]
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_openai_convert_weights_after_patching():
    """``convert_weights`` finds modules by isinstance: after patching it must cast exactly what it casts in
    the unpatched model, and the fp16 model must still match."""
    base = perturbed(tiny_vit()).to(DEVICE)
    eager, fast = copy.deepcopy(base), copy.deepcopy(base)
    patch(fast)
    clip.model.convert_weights(eager)
    clip.model.convert_weights(fast)
    dtypes = {k: v.dtype for k, v in eager.state_dict().items()}
    assert {k: v.dtype for k, v in fast.state_dict().items()} == dtypes
    assert torch.float16 in dtypes.values() and torch.float32 in dtypes.values()

    ref = float64_reference(copy.deepcopy(eager))
    image = torch.randn(2, 3, 32, 32, device=DEVICE).half()
    text = tokens().to(DEVICE)
    with torch.no_grad():
        outs = [m.encode_image(image) for m in (fast, eager, ref)]  # encode_image casts to the model's dtype
        outs_text = [m.encode_text(text) for m in (fast, eager, ref)]
    problems = [check("image features", *outs, torch.float16), check("text features", *outs_text, torch.float16)]
    assert not [p for p in problems if p], problems
