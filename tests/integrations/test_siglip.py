"""Hugging Face SigLIP and SigLIP 2 on tiny random-init models: ``clipfast.patch`` vs the unpatched model vs
float64 (outputs and every parameter gradient), ``state_dict`` unchanged, unpatch exact, the kernels
launched, and ``torch.compile(fullgraph=True)`` of a patched vision tower."""
import copy

import pytest
import torch
import torch.nn as nn

import clipfast

from ..conftest import DEVICE
from .common import check_patch, module_types, paths_of
from .common import perturbed as _perturbed
from .kernel_launches import count_launches

transformers = pytest.importorskip("transformers", reason="transformers is not installed; `pip install -e .[integrations]`")
siglip = pytest.importorskip("transformers.models.siglip.modeling_siglip")

VOCAB = 100
# head dim 16 (the kernels' smallest), 16 patches of 8 x 8
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
TEXT = dict(TOWER, vocab_size=VOCAB, max_position_embeddings=12, bos_token_id=1, eos_token_id=2, pad_token_id=0)
VISION = dict(TOWER, image_size=32, patch_size=8)


def siglip_config():
    return transformers.SiglipConfig(text_config=TEXT, vision_config=VISION)


def perturbed(model):
    return _perturbed(model).eval()


def text_inputs(batch=3, length=12):
    """Right-padded ids with their attention mask (SigLIP's text tower is bidirectional: a padding mask)."""
    ids = torch.randint(3, VOCAB, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    for i, n in enumerate([length, 7, 4][:batch]):
        ids[i, n:] = 0
        mask[i, n:] = 0
    return ids, mask


def pixels(batch=2, size=32):
    return torch.randn(batch, 3, size, size, dtype=torch.float64)


def run_siglip(model, pixel_values, ids, mask):
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values)
    return out.image_embeds, out.text_embeds, out.logits_per_image


def expected_swaps(model, attention_classes, mlp_classes, embeddings=True):
    return {"layer_norm": paths_of(model, lambda m: isinstance(m, nn.LayerNorm)),
            "attention": paths_of(model, lambda m: isinstance(m, (*attention_classes, nn.MultiheadAttention))),
            "mlp": paths_of(model, lambda m: isinstance(m, mlp_classes)),
            "patch_embed": paths_of(model, lambda m: isinstance(m, siglip.SiglipVisionEmbeddings)) if embeddings else set()}


def test_hf_siglip_model_patched():
    build = lambda: perturbed(transformers.SiglipModel(siglip_config()))  # noqa: E731
    ids, mask = text_inputs()
    model, report = check_patch(build, run_siglip, [pixels(), ids, mask],
                                expected=expected_swaps(build(), (siglip.SiglipAttention,), siglip.SiglipMLP))
    assert "vision_model.embeddings" in {s.path for s in report.swapped if s.family == "patch_embed"}, str(report)
    mlps = [m for m in model.modules() if isinstance(m, siglip.SiglipMLP)]
    assert len(mlps) == 3 and {m._clipfast_mlp[2] for m in mlps} == {"gelu_tanh"}  # gelu_pytorch_tanh
    assert model.config._attn_implementation == "sdpa"  # the model's own config is untouched


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_hf_siglip_single_tower_models_patched(tower):
    """SiglipVisionModel (with the attention-pooling head, training with gradient checkpointing) and
    SiglipTextModel (padded batch, bidirectional)."""
    if tower == "vision":
        def build():
            model = perturbed(transformers.SiglipVisionModel(siglip_config().vision_config)).train()
            model.gradient_checkpointing_enable()
            return model

        run = lambda m, px: (m(pixel_values=px).pooler_output, m(pixel_values=px).last_hidden_state)  # noqa: E731
        inputs = [pixels()]
    else:
        build = lambda: perturbed(transformers.SiglipTextModel(siglip_config().text_config))  # noqa: E731
        run = lambda m, ids, mask: (m(input_ids=ids, attention_mask=mask).pooler_output,)  # noqa: E731
        inputs = list(text_inputs())
    check_patch(build, run, inputs, expected=expected_swaps(build(), (siglip.SiglipAttention,), siglip.SiglipMLP,
                                                             embeddings=tower == "vision"))


@pytest.mark.parametrize("dtype", [torch.float16])
def test_hf_siglip_vision_model_half(dtype):
    build = lambda: perturbed(transformers.SiglipVisionModel(siglip_config().vision_config))  # noqa: E731
    check_patch(build, lambda m, px: (m(pixel_values=px).pooler_output,), [pixels()], dtype=dtype,
                expected=expected_swaps(build(), (siglip.SiglipAttention,), siglip.SiglipMLP))


def test_hf_siglip_kernels_launched(monkeypatch):
    """Every family's Triton kernel runs in a patched SiglipModel, forward and backward: 1-layer towers
    -> patch embedding once, attention 3x (2 towers + pooling head), the gelu_tanh MLP 3x, LayerNorm 7x."""
    model = perturbed(transformers.SiglipModel(siglip_config())).to(DEVICE)
    clipfast.patch(model)
    launches = count_launches(monkeypatch)
    ids, mask = (t.to(DEVICE) for t in text_inputs())
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels().float().to(DEVICE))
    (out.logits_per_image.sum() + out.image_embeds.sum()).backward()
    assert launches["patch_embed_fwd"] == launches["patch_embed_bwd"] == 1, launches
    assert launches["attention_fwd"] == launches["attention_bwd"] == 3, launches
    assert launches["mlp_fwd:gelu_tanh"] == launches["mlp_bwd"] == 3, launches
    assert launches["layer_norm_fwd"] == launches["layer_norm_bwd"] == 7, launches


def test_hf_siglip_unpatch_restores_modules():
    model = perturbed(transformers.SiglipModel(siglip_config()))
    types, state = module_types(model), {k: v.data_ptr() for k, v in model.state_dict().items()}
    clipfast.patch(model)
    assert module_types(model) != types
    clipfast.unpatch(model)
    assert module_types(model) == types
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == state


def test_hf_siglip_unpatch_restores_configs():
    """After unpatch every module holds the very config object it had before (the attention modules'
    ``_attn_implementation`` included)."""
    model = perturbed(transformers.SiglipModel(siglip_config()))
    configs = {name: (m.config, m.config._attn_implementation) for name, m in model.named_modules()
               if hasattr(m, "config")}
    clipfast.patch(model)
    clipfast.unpatch(model)
    after = {name: (m.config, m.config._attn_implementation) for name, m in model.named_modules() if hasattr(m, "config")}
    assert after.keys() == configs.keys()
    for name, (config, implementation) in configs.items():
        assert after[name][0] is config and after[name][1] == implementation, name


def test_hf_siglip_embeddings_fallbacks():
    """interpolate_pos_encoding and other image sizes run the original forward; the fused path matches it."""
    model = perturbed(transformers.SiglipVisionModel(siglip_config().vision_config))
    embeddings = next(m for m in model.modules() if isinstance(m, siglip.SiglipVisionEmbeddings))
    reference = copy.deepcopy(embeddings)
    model = nn.Sequential(embeddings)
    clipfast.patch(model)
    fast = model[0]
    assert type(fast).__name__ == "FastSiglipVisionEmbeddings"
    x = pixels(size=32).float()
    torch.testing.assert_close(fast(x), reference(x), atol=1e-5, rtol=1e-5)
    big = pixels(size=48).float()
    torch.testing.assert_close(fast(big, interpolate_pos_encoding=True), reference(big, interpolate_pos_encoding=True))


def test_hf_siglip_vision_compile_fullgraph():
    """torch.compile(fullgraph=True) of a patched SiglipVisionModel traces every clipfast op (no graph break)
    and matches the patched model run eagerly, forward and gradients."""
    model = perturbed(transformers.SiglipVisionModel(siglip_config().vision_config)).to(DEVICE)
    clipfast.patch(model)
    x = pixels().float().to(DEVICE)

    def run(m):  # m is the model or its compiled wrapper: the parameters are the model's
        model.zero_grad(set_to_none=True)
        out = m(pixel_values=x).pooler_output
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    expected, grads = run(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out, compiled_grads = run(compiled)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(compiled_grads[name], g, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------
# SigLIP 2 (NaFlex): patchified pixels with a padding mask; the embedding's Linear runs as it is
# ----------------------------------------------------------------------------------------------

def _siglip2_inputs(batch=2, max_patches=16, patch=8):
    shapes = torch.tensor([[4, 4], [3, 3]][:batch])
    mask = torch.zeros(batch, max_patches, dtype=torch.long)
    for i, (h, w) in enumerate(shapes.tolist()):
        mask[i, :h * w] = 1
    return torch.randn(batch, max_patches, 3 * patch * patch, dtype=torch.float64), mask, shapes


def test_hf_siglip2_model_patched():
    siglip2 = pytest.importorskip("transformers.models.siglip2.modeling_siglip2",
                                  reason="this transformers version has no SigLIP 2")
    config = transformers.Siglip2Config(text_config=TEXT, vision_config=dict(TOWER, num_patches=16, patch_size=8))
    build = lambda: perturbed(transformers.Siglip2Model(config))  # noqa: E731
    ids, mask = text_inputs()
    pixel_values, pixel_mask, shapes = _siglip2_inputs()

    def run(model, pixel_values, pixel_mask, shapes, ids, mask):
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, pixel_attention_mask=pixel_mask,
                    spatial_shapes=shapes)
        return out.image_embeds, out.text_embeds, out.logits_per_image

    expected = expected_swaps(build(), (siglip2.Siglip2Attention,), siglip2.Siglip2MLP, embeddings=False)
    _, report = check_patch(build, run, [pixel_values, pixel_mask, shapes, ids, mask], expected=expected)
    assert not {s.path for s in report.swapped if s.family == "patch_embed"}  # NaFlex embedding as it was


def test_verify_hf_siglip():
    """``clipfast verify hf:siglip``: the tiny SiglipModel passes the numerics standard, every module swapped."""
    from clipfast.verify import verify
    from clipfast.verify_models import resolve

    spec = resolve("hf:siglip", tiny=True)
    result = verify(spec.name, spec.build, spec.make_inputs, spec.forward, torch.float32, DEVICE, progress=None)
    assert result.passed, "\n".join(str(r) for r in result.rows if not r.passed)
