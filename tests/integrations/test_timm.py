"""open_clip models with a timm ViT image tower (``open_clip.timm_model.TimmModel``, as in ``ViT-B-16-SigLIP``)
and open_clip's SigLIP text tower, on tiny random-init models: patched vs unpatched vs float64 (outputs and
every parameter gradient), ``state_dict`` unchanged, unpatch exact, the kernels launched."""
import contextlib
from unittest import mock

import pytest
import torch

import clipfast

from ..conftest import DEVICE
from .common import check_patch, require
from .kernel_launches import count_launches

timm = pytest.importorskip("timm", reason="timm is not installed; `pip install -e .[integrations]`")

WIDTH, VOCAB, CONTEXT = 32, 100, 12
# A tiny tower of the same timm architecture: head dim 16 (the kernels' smallest), 16 patches of 8 x 8
TINY_TOWER = dict(img_size=32, patch_size=8, embed_dim=WIDTH, depth=1, num_heads=2, mlp_ratio=2.0)


@contextlib.contextmanager
def tiny_timm_towers(**overrides):
    """open_clip's TimmModel builds its trunk with ``timm.create_model(name, ...)``; inside this context the
    named architecture is built at the tiny size (timm's model kwargs override the named defaults)."""
    create = timm.create_model

    def create_tiny(name, **kwargs):
        return create(name, **{**kwargs, **TINY_TOWER, **overrides})

    with mock.patch.object(timm, "create_model", create_tiny):
        yield


def siglip_text_cfg():
    # open_clip's SigLIP text tower: bidirectional (no causal mask), last-token pooling, projection bias
    return dict(context_length=CONTEXT, vocab_size=VOCAB, width=WIDTH, heads=2, layers=1, no_causal_mask=True,
                proj_bias=True, pool_type="last", norm_kwargs={"eps": 1e-6})


def build_siglip(timm_model="vit_base_patch16_siglip_224", **overrides):
    open_clip = require("open_clip")
    with tiny_timm_towers(**overrides):
        model = open_clip.CustomTextCLIP(
            embed_dim=WIDTH, init_logit_bias=-10.0, text_cfg=siglip_text_cfg(),
            vision_cfg=dict(timm_model_name=timm_model, timm_model_pretrained=False, timm_pool="map",
                            timm_proj="none", image_size=32))
    with torch.no_grad():  # open_clip and timm initialise some parameters to zero: make every one count
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def inputs():
    return [torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randint(1, VOCAB, (2, CONTEXT))]


def run(model, images, text):
    return model.encode_image(images), model.encode_text(text)


def expected_swaps(model):
    names = {"layer_norm": ("LayerNorm",), "attention": ("Attention", "AttentionPoolLatent", "MultiheadAttention"),
             "mlp": ("Mlp",), "patch_embed": ("PatchEmbed",)}
    return {family: {n for n, m in model.named_modules() if type(m).__name__ in classes}
            for family, classes in names.items()}


@pytest.mark.parametrize("variant", ["siglip", "qk_norm_gelu_tanh"])
def test_open_clip_timm_siglip_patched(variant):
    """ViT-B-16-SigLIP's architecture (no class token, MAP head, conv with bias) at a tiny size; the second
    variant adds timm's q/k LayerNorm on the head dim and a tanh-GELU MLP."""
    overrides = {} if variant == "siglip" else dict(qk_norm=True, act_layer="gelu_tanh")
    build = lambda: build_siglip(**overrides)  # noqa: E731
    model, report = check_patch(build, run, inputs(), expected=expected_swaps(build()))
    trunk = model.visual.trunk
    assert type(trunk.patch_embed).__name__ == "FastPatchEmbed"
    assert type(trunk.attn_pool).__name__ == "FastAttentionPoolLatent"
    activation = "gelu" if variant == "siglip" else "gelu_tanh"
    assert trunk.blocks[0].mlp._clipfast_activation == activation
    if variant != "siglip":
        assert type(trunk.blocks[0].attn.q_norm).__name__ == "FastLayerNorm"
    assert not report.skipped, str(report)


def test_open_clip_timm_vit_with_class_token_patched():
    """A timm ViT with a class token and average-free token pooling (vit_tiny_patch16_224's architecture)."""
    open_clip = require("open_clip")

    def build():
        with tiny_timm_towers():
            model = open_clip.CLIP(embed_dim=16, text_cfg=dict(context_length=CONTEXT, vocab_size=VOCAB, width=WIDTH,
                                                                 heads=2, layers=1),
                                   vision_cfg=dict(timm_model_name="vit_tiny_patch16_224", timm_model_pretrained=False,
                                                   timm_pool="token", timm_proj="linear", image_size=32))
        return model.eval()

    check_patch(build, run, inputs(), expected=expected_swaps(build()))


def test_open_clip_timm_kernels_launched(monkeypatch):
    """Forward and backward of a patched SigLIP-style model launch every family's kernel: the patch
    embedding once, attention 3x (vision block, MAP head, text block), the MLP 3x, LayerNorm 7x."""
    model = build_siglip().to(DEVICE)
    clipfast.patch(model)
    launches = count_launches(monkeypatch)
    images, text = inputs()
    image_features, text_features = run(model, images.float().to(DEVICE), text.to(DEVICE))
    loss = clipfast.nn.SigLipLoss()(image_features, text_features, model.logit_scale.exp(), model.logit_bias)
    loss.backward()
    assert launches["patch_embed_fwd"] == launches["patch_embed_bwd"] == 1, launches
    assert launches["attention_fwd"] == launches["attention_bwd"] == 3, launches
    assert launches["mlp_fwd:gelu"] == launches["mlp_bwd"] == 3, launches
    assert launches["layer_norm_fwd"] == launches["layer_norm_bwd"] == 7, launches


def test_siglip_loss_matches_open_clip():
    """clipfast.nn.SigLipLoss on a SigLIP model's features: the same loss and gradients as open_clip's."""
    open_clip_loss = require("open_clip.loss")
    model = build_siglip().to(DEVICE)
    images, text = inputs()
    with torch.no_grad():
        image_features, text_features = run(model, images.float().to(DEVICE), text.to(DEVICE))
    results = []
    for loss_fn in (clipfast.nn.SigLipLoss(), open_clip_loss.SigLipLoss()):
        leaves = [t.clone().requires_grad_() for t in (image_features, text_features)]
        loss = loss_fn(*leaves, model.logit_scale.exp().detach(), model.logit_bias.detach())
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_timm_fallbacks_run_the_original_forward():
    """Sizes timm rejects still raise; attention dropout in training runs timm's own forward."""
    model = build_siglip()
    clipfast.patch(model)
    with pytest.raises(AssertionError):  # strict_img_size: timm's own check
        model.encode_image(torch.randn(1, 3, 48, 48))
    attn = model.visual.trunk.blocks[0].attn
    attn.attn_drop.p = 0.5
    attn.train()
    x = torch.randn(2, 5, WIDTH)
    torch.manual_seed(0)
    out = attn(x)
    torch.manual_seed(0)
    assert torch.equal(out, type(attn).__mro__[1].forward(attn, x))


def test_verify_open_clip_siglip():
    """``clipfast verify open_clip:ViT-B-16-SigLIP``: built from open_clip's configuration (tiny on CPU)."""
    require("open_clip")
    from clipfast.verify import verify
    from clipfast.verify_models import resolve

    spec = resolve("open_clip:ViT-B-16-SigLIP", tiny=True)
    assert "(tiny)" in spec.name
    result = verify(spec.name, spec.build, spec.make_inputs, spec.forward, torch.float32, DEVICE, progress=None)
    assert result.passed, "\n".join(str(r) for r in result.rows if not r.passed)
