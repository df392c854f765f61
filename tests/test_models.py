"""The reference CLIP model (clipfast.models): OpenAI's dimensions and state_dict keys, the math of its
parts checked against independent formulations, checkpoint round trip, fp16 and autocast."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from clipfast import models

from .conftest import DEVICE, ON_GPU

# Parameter counts of OpenAI's released models (as published with open_clip's model table).
OPENAI_PARAMS = {
    "RN50": 102_007_137, "RN101": 119_688_033, "RN50x4": 178_300_601, "RN50x16": 290_979_217,
    "RN50x64": 623_258_305, "ViT-B-32": 151_277_313, "ViT-B-16": 149_620_737, "ViT-L-14": 427_616_513,
    "ViT-L-14-336": 427_944_193,
}


def tiny_batch(model, n=3, device=DEVICE):
    """Images and token ids (end-of-text = the largest id, at a different position in each text)."""
    res, ctx, vocab = model.visual.input_resolution, model.context_length, model.vocab_size
    images = torch.randn(n, 3, res, res, device=device)
    text = torch.randint(1, vocab - 1, (n, ctx), device=device)
    for i in range(n):
        eot = (5 + 3 * i) % ctx
        text[i, eot] = vocab - 1
        text[i, eot + 1:] = 0
    return images, text


@pytest.mark.parametrize("name", list(OPENAI_PARAMS))
def test_named_models_have_openai_dimensions(name):
    with torch.device("meta"):
        model = models.create(name)
    assert sum(p.numel() for p in model.parameters()) == OPENAI_PARAMS[name]
    assert model.context_length == 77 and model.vocab_size == 49408


def test_aliases_unknown_names_and_overrides():
    assert set(OPENAI_PARAMS) | {"tiny", "tiny-RN"} == set(models.available_models())
    assert models.model_config("ViT-L/14@336px") == models.model_config("ViT-L-14-336")
    with pytest.raises(ValueError, match="unknown model 'ViT-H-14'"):
        models.create("ViT-H-14")
    with pytest.raises(TypeError, match="unknown argument"):
        models.create("tiny", widht=3)
    assert models.create("tiny", context_length=20).positional_embedding.shape == (20, 128)


def test_state_dict_keys_are_openais():
    with torch.device("meta"):
        vit, rn = models.create("ViT-B-32"), models.create("RN50")
    text_keys = {"positional_embedding", "text_projection", "logit_scale", "token_embedding.weight",
                 "ln_final.weight", "ln_final.bias", "transformer.resblocks.11.attn.in_proj_weight",
                 "transformer.resblocks.0.attn.in_proj_bias", "transformer.resblocks.0.attn.out_proj.weight",
                 "transformer.resblocks.0.ln_1.weight", "transformer.resblocks.0.mlp.c_fc.weight",
                 "transformer.resblocks.0.mlp.c_proj.bias", "transformer.resblocks.0.ln_2.bias"}
    vit_keys = {"visual.class_embedding", "visual.positional_embedding", "visual.proj", "visual.conv1.weight",
                "visual.ln_pre.weight", "visual.ln_post.bias", "visual.transformer.resblocks.11.mlp.c_fc.bias",
                "visual.transformer.resblocks.0.attn.in_proj_weight"}
    rn_keys = {"visual.conv1.weight", "visual.bn1.running_mean", "visual.conv3.weight", "visual.bn3.weight",
               "visual.layer1.0.downsample.0.weight", "visual.layer1.0.downsample.1.running_var",
               "visual.layer4.2.bn3.bias", "visual.layer3.5.conv2.weight", "visual.attnpool.positional_embedding",
               "visual.attnpool.q_proj.weight", "visual.attnpool.k_proj.bias", "visual.attnpool.v_proj.weight",
               "visual.attnpool.c_proj.weight"}
    vsd, rsd = vit.state_dict(), rn.state_dict()
    assert text_keys | vit_keys <= set(vsd) and text_keys | rn_keys <= set(rsd)
    assert "visual.conv1.bias" not in vsd and "attn_mask" not in " ".join(vsd)
    assert vsd["visual.conv1.weight"].shape == (768, 3, 32, 32) and vsd["visual.proj"].shape == (768, 512)
    assert rsd["visual.attnpool.positional_embedding"].shape == (50, 2048)
    assert rsd["visual.layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert vsd["logit_scale"].shape == ()


def test_forward_shapes_and_logit_scale():
    model = models.create("tiny").to(DEVICE)
    images, text = tiny_batch(model)
    per_image, per_text = model(images, text)
    assert per_image.shape == (3, 3) and torch.equal(per_text, per_image.t())
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    img, txt = model.encode_image(images), model.encode_text(text)
    assert img.shape == txt.shape == (3, 64)
    expected = model.logit_scale.exp() * F.normalize(img) @ F.normalize(txt).t()
    torch.testing.assert_close(per_image, expected)


def test_text_tower_is_causal_and_pools_at_the_end_of_text_token():
    model = models.create("tiny").to(DEVICE).eval()
    _, text = tiny_batch(model)
    features = model.encode_text(text)
    changed = text.clone()
    changed[0, 6:] = 7  # after text 0's end-of-text token (position 5): must not matter
    assert torch.equal(model.encode_text(changed)[0], features[0])
    changed[0, 2] = 9   # before it: must matter
    assert not torch.allclose(model.encode_text(changed)[0], features[0])
    # the pooled token is the end-of-text token: its transformer output, ln_final'd and projected
    x = model.token_embedding(text) + model.positional_embedding
    mask = torch.full((13, 13), float("-inf"), device=DEVICE).triu(1)
    for block in model.transformer.resblocks:
        h = block.ln_1(x)
        x = x + F.scaled_dot_product_attention(*_heads(block.attn, h), attn_mask=mask).transpose(1, 2).reshape(
            x.shape) @ block.attn.out_proj.weight.t() + block.attn.out_proj.bias
        x = x + block.mlp(block.ln_2(x))
    pooled = model.ln_final(x)[torch.arange(3, device=DEVICE), text.argmax(-1)] @ model.text_projection
    torch.testing.assert_close(features, pooled, atol=1e-5, rtol=1e-4)


def _heads(attn, h):
    """q, k, v [N, heads, L, d] of a batch-first input through nn.MultiheadAttention's packed projection."""
    n, length, width = h.shape
    q, k, v = (h @ attn.in_proj_weight.t() + attn.in_proj_bias).chunk(3, dim=-1)
    return [t.view(n, length, attn.num_heads, width // attn.num_heads).transpose(1, 2) for t in (q, k, v)]


def test_vision_transformer_matches_unfolded_patches():
    model = models.create("tiny").to(DEVICE).eval()
    visual = model.visual
    images, _ = tiny_batch(model)
    patches = F.unfold(images, kernel_size=8, stride=8).transpose(1, 2)        # [N, 16, 3 * 8 * 8]
    tokens = patches @ visual.conv1.weight.reshape(128, -1).t()
    tokens = torch.cat([visual.class_embedding.expand(3, 1, 128), tokens], 1) + visual.positional_embedding
    x = visual.ln_pre(tokens).transpose(0, 1)
    x = visual.transformer(x).transpose(0, 1)
    expected = visual.ln_post(x[:, 0]) @ visual.proj
    torch.testing.assert_close(visual(images), expected, atol=1e-5, rtol=1e-4)


def test_attention_pool_matches_torch_multi_head_attention():
    pool = models.AttentionPool2d(spacial_dim=3, embed_dim=128, num_heads=2, output_dim=40).to(DEVICE)
    x = torch.randn(4, 128, 3, 3, device=DEVICE)
    seq = x.flatten(2).permute(2, 0, 1)
    seq = torch.cat([seq.mean(0, keepdim=True), seq]) + pool.positional_embedding[:, None]
    expected, _ = F.multi_head_attention_forward(
        query=seq[:1], key=seq, value=seq, embed_dim_to_check=128, num_heads=2, q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight, in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]), bias_k=None, bias_v=None,
        add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True, training=False, need_weights=False)
    torch.testing.assert_close(pool(x), expected[0], atol=1e-5, rtol=1e-4)


def test_modified_resnet_shapes_and_zero_initialized_residual_branches():
    model = models.create("tiny-RN").to(DEVICE)
    visual = model.visual
    assert all(block.bn3.weight.abs().sum() == 0 for layer in (visual.layer1, visual.layer4) for block in layer)
    assert visual.layer2[0].downsample is not None and isinstance(visual.layer2[0].avgpool, torch.nn.AvgPool2d)
    images, text = tiny_batch(model)
    assert visual(images).shape == (3, 64) and model(images, text)[0].shape == (3, 3)
    # a strided block downsamples by 2 and expands channels by 4
    block = visual.layer2[0]
    assert block(torch.randn(2, 32, 8, 8, device=DEVICE)).shape == (2, 64, 4, 4)


@pytest.mark.parametrize("name", ["tiny", "tiny-RN"])
def test_build_model_round_trip_reproduces_outputs(name):
    model = models.create(name).to(DEVICE)
    with torch.no_grad():  # non-trivial BatchNorm statistics and residual branches
        for key, t in model.state_dict().items():
            if "running_var" in key:
                t.uniform_(0.5, 2.0)
            elif "running_mean" in key or "bn3.weight" in key:
                t.normal_(0, 0.1)
    model.eval()
    images, text = tiny_batch(model)
    rebuilt = models.build_model(copy.deepcopy(model.state_dict())).to(DEVICE)
    assert not rebuilt.training and rebuilt.dtype == torch.float32
    assert list(rebuilt.state_dict()) == list(model.state_dict())
    for a, b in zip(rebuilt(images, text), model(images, text)):
        exact = dict(atol=1e-6, rtol=1e-5) if ON_GPU else dict(atol=0, rtol=0)  # GPU kernels may be picked anew
        torch.testing.assert_close(a, b, **exact)


def test_build_model_from_an_fp16_checkpoint_converts_weights():
    model = models.convert_weights(models.create("tiny"))
    sd = model.state_dict()
    sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(13), vocab_size=torch.tensor(101))
    rebuilt = models.build_model(sd)
    assert rebuilt.dtype == torch.float16 and rebuilt.visual.proj.dtype == torch.float16
    assert rebuilt.ln_final.weight.dtype == torch.float32 and rebuilt.positional_embedding.dtype == torch.float32
    assert rebuilt.transformer.resblocks[0].attn.in_proj_weight.dtype == torch.float16


@pytest.mark.parametrize("name", ["tiny", "tiny-RN"])
def test_fp16_convert_weights_and_autocast_stay_close_to_fp32(name):
    model = models.create(name).to(DEVICE).eval()
    images, text = tiny_batch(model)
    expected = model(images, text)[0]
    half = models.convert_weights(copy.deepcopy(model))
    out = half(images, text)[0]
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
    low = torch.float16 if ON_GPU else torch.bfloat16
    with torch.autocast(DEVICE.type, dtype=low):
        out = model(images, text)[0]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


def test_layer_norm_computes_in_fp32_and_returns_the_input_dtype():
    ln = models.LayerNorm(64)
    x = torch.randn(5, 64) * 300 + 1000  # fp16 statistics would lose this
    out = ln(x.half())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), F.layer_norm(x.half().float(), (64,)), atol=2e-3, rtol=2e-3)
    assert ln.double()(x.double()).dtype == torch.float64


def test_quick_gelu():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    torch.testing.assert_close(models.QuickGELU()(x), x / (1 + torch.exp(-1.702 * x)))


def _openai_clip_model():
    """OpenAI's ``clip/model.py`` loaded on its own: the package's ``__init__`` imports ``pkg_resources``,
    which current setuptools no longer has, and the model file needs none of it."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("clip")
    path = os.path.join(os.path.dirname(spec.origin), "model.py") if spec and spec.origin else None
    if path is None or not os.path.exists(path):
        pytest.skip("OpenAI's clip package is not installed")
    module_spec = importlib.util.spec_from_file_location("_openai_clip_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "build_model"):
        pytest.skip(f"{path} is not OpenAI's CLIP model file")
    return module


@pytest.mark.parametrize("name", ["tiny", "tiny-RN"])
def test_matches_openai_clip_when_installed(name):
    """With OpenAI's package installed: same modules, keys and outputs for the same weights, both ways."""
    openai = _openai_clip_model()
    config = models.model_config(name)
    theirs = openai.CLIP(**config).eval()
    ours = models.build_model(copy.deepcopy(theirs.state_dict()))
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    images, text = tiny_batch(ours, device="cpu")
    for a, b in zip(ours(images, text), theirs(images, text)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    openai.convert_weights(theirs)  # OpenAI's released checkpoints are fp16
    rebuilt = models.build_model(copy.deepcopy(theirs.state_dict()))
    reference = openai.build_model(theirs.state_dict())
    assert [p.dtype for p in rebuilt.parameters()] == [p.dtype for p in reference.parameters()]


def test_open_clip_loads_our_state_dict_and_agrees():
    """open_clip's loader for OpenAI checkpoints takes the reference model's state_dict as one."""
    open_clip_model = pytest.importorskip("open_clip.model")
    ours = models.create("tiny").eval()
    theirs = open_clip_model.build_model_from_openai_state_dict(copy.deepcopy(ours.state_dict()),
                                                                 cast_dtype=torch.float32).float().eval()
    ours.load_state_dict(theirs.state_dict())  # same keys both ways; takes over open_clip's fp16 rounding
    images, text = tiny_batch(ours, device="cpu")
    torch.testing.assert_close(theirs.encode_image(images), ours.encode_image(images), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs.encode_text(text), ours.encode_text(text), atol=1e-5, rtol=1e-5)
