"""``clipfast.unpatch`` is exact for every supported model family: after patch, a forward pass and unpatch,
the model equals a deep copy taken before patching -- the same module classes at the same paths, the same
attributes (configs included: ``_attn_implementation`` comes back), the same number of hooks, an equal
``state_dict``, and bitwise equal outputs."""
import copy
import types

import pytest
import torch
import torch.nn as nn

from clipfast.patching import patch, unpatch

from ..conftest import DEVICE
from .common import clip_tokens, perturbed, require

VOCAB, CONTEXT = 100, 16
CONTAINERS = ("_parameters", "_buffers", "_modules")


@pytest.fixture(autouse=True)
def _own_one_time_warnings():
    """The one-time warnings these tests trigger stay theirs: other tests expect to see them."""
    from clipfast import _validate as validate

    before = set(validate._warned)
    yield
    validate._warned.intersection_update(before)


def same(a, b, depth=0) -> bool:
    """Value equality that sees through deep copies (tensors bitwise, configs and plain objects by their
    attributes); submodules are compared path by path by the caller."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, nn.Module):
        return True
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y, depth + 1) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k], depth + 1) for k in a)
    if isinstance(a, types.MethodType):
        return a.__func__ is b.__func__
    try:
        if a == b:
            return True
    except Exception:  # noqa: BLE001  (objects whose == does not answer a bool)
        pass
    return hasattr(a, "__dict__") and depth < 6 and same(vars(a), vars(b), depth + 1)


def assert_restored(model: nn.Module, snapshot: nn.Module) -> None:
    modules = dict(model.named_modules(remove_duplicate=False))
    expected = dict(snapshot.named_modules(remove_duplicate=False))
    assert list(modules) == list(expected), "module paths differ"
    for path, module in modules.items():
        before = expected[path]
        where = path or "(model)"
        assert type(module) is type(before), f"{where}: {type(module).__name__} != {type(before).__name__}"
        assert set(module.__dict__) == set(before.__dict__), \
            f"{where}: attributes differ: {sorted(set(module.__dict__) ^ set(before.__dict__))}"
        for key, value in module.__dict__.items():
            if key in CONTAINERS:
                assert list(value) == list(before.__dict__[key]), f"{where}.{key}"
            elif "hook" in key and isinstance(value, dict):
                assert len(value) == len(before.__dict__[key]), f"{where}.{key}: {len(value)} hooks"
            else:
                assert same(value, before.__dict__[key]), f"{where}.{key}: {value!r} != {before.__dict__[key]!r}"
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            assert config._attn_implementation == before.config._attn_implementation, where
    state, state_before = model.state_dict(), snapshot.state_dict()
    assert list(state) == list(state_before)
    for key, value in state.items():
        assert same(value, state_before[key]), f"state_dict[{key!r}]"


def check_unpatch_exact(model: nn.Module, run, *inputs, target=None):
    """Patch ``target`` (default the model; a submodule patches as its own root), run, unpatch: the model
    equals its copy from before patching, outputs bitwise. Twice, so a second patch/unpatch is exact too."""
    model = model.to(DEVICE).eval()
    inputs = [t.to(DEVICE) for t in inputs]
    with torch.no_grad():  # what a first forward sets up (transformers' output hooks) is in the snapshot too
        run(model, *inputs)
    snapshot = copy.deepcopy(model)
    target = target or (lambda m: m)
    for round in range(2):
        report = patch(target(model))
        assert report.swapped, str(report)
        if round == 0:  # a forward while patched (whatever it sets up lazily must not survive unpatch)
            with torch.no_grad():
                run(model, *inputs)
        unpatch(target(model))
        assert_restored(model, snapshot)
    with torch.no_grad():
        outs, expected = run(model, *inputs), run(snapshot, *inputs)
    for i, (o, e) in enumerate(zip(outs, expected)):
        assert torch.equal(o, e), f"output {i}: max difference {float((o - e).abs().max())}"


# ----------------------------------------------------------------------------------------------
# Reference model, OpenAI clip, open_clip, Chinese-CLIP
# ----------------------------------------------------------------------------------------------

def run_clip(model, image, text):
    return model.encode_image(image), model.encode_text(text)


@pytest.mark.parametrize("name", ["tiny", "tiny-RN"])
def test_reference_model(name):
    from clipfast import models

    model = perturbed(models.create(name))
    size = model.visual.input_resolution
    check_unpatch_exact(model, run_clip, torch.randn(1, 3, size, size),
                        clip_tokens(model.vocab_size, model.context_length, batch=2))


def test_reference_vision_tower_patched_as_root():
    from clipfast import models

    model = perturbed(models.create("tiny"))
    check_unpatch_exact(model, lambda m, x: (m.visual(x),), torch.randn(1, 3, 32, 32), target=lambda m: m.visual)


def test_openai_clip():
    from clipfast.integrations.openai_clip import import_clip

    try:
        clip = import_clip()
    except ImportError as e:
        pytest.skip(f"OpenAI clip is not installed ({e})")
    model = perturbed(clip.model.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                                      vision_patch_size=8, context_length=CONTEXT, vocab_size=VOCAB,
                                      transformer_width=32, transformer_heads=2, transformer_layers=2))
    check_unpatch_exact(model, run_clip, torch.randn(1, 3, 32, 32), clip_tokens(VOCAB, CONTEXT, batch=2))


@pytest.mark.parametrize("block_type", ["default", "custom"])
def test_open_clip(block_type):
    open_clip = require("open_clip")
    block = {} if block_type == "default" else dict(block_type="custom", qk_norm=True)
    model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None, embed_dim=32,
                                   vision_cfg=dict(layers=2, width=64, head_width=32, image_size=32, patch_size=8,
                                                   **block),
                                   text_cfg=dict(context_length=CONTEXT, vocab_size=VOCAB, width=32, heads=2, layers=2,
                                                 **block))
    check_unpatch_exact(perturbed(model), run_clip, torch.randn(1, 3, 32, 32), clip_tokens(VOCAB, CONTEXT, batch=2))


def test_cn_clip():
    cn_model = require("cn_clip.clip.model")
    model = cn_model.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                          vocab_size=VOCAB, text_attention_probs_dropout_prob=0.0, text_hidden_act="gelu",
                          text_hidden_dropout_prob=0.0, text_hidden_size=32, text_initializer_range=0.02,
                          text_intermediate_size=64, text_max_position_embeddings=16, text_num_attention_heads=2,
                          text_num_hidden_layers=2, text_type_vocab_size=2)
    ids = torch.randint(1, VOCAB, (2, 12))
    ids[1, 7:] = 0
    check_unpatch_exact(perturbed(model), run_clip, torch.randn(1, 3, 32, 32), ids)


# ----------------------------------------------------------------------------------------------
# Hugging Face: CLIP, ChineseCLIP, CLIPSeg, SigLIP (sdpa and eager models)
# ----------------------------------------------------------------------------------------------

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TEXT = dict(TOWER, vocab_size=VOCAB, max_position_embeddings=16)
CLIP_TEXT = dict(TEXT, eos_token_id=VOCAB - 1, bos_token_id=1, pad_token_id=0)
VISION = dict(TOWER, image_size=32, patch_size=8)


def hf_text_inputs():
    ids = clip_tokens(VOCAB, 12, batch=2)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # the second text is padded
    return ids, mask


def hf_model(family: str, attn: str):
    transformers = require("transformers")
    if family == "clip":
        config = transformers.CLIPConfig(text_config=CLIP_TEXT, vision_config=VISION, projection_dim=16)
        model = transformers.CLIPModel(config)
    elif family == "chinese_clip":
        config = transformers.ChineseCLIPConfig(text_config=dict(TEXT, hidden_dropout_prob=0.0,
                                                                 attention_probs_dropout_prob=0.0),
                                                vision_config=VISION, projection_dim=16)
        model = transformers.ChineseCLIPModel(config)
    elif family == "clipseg":
        config = transformers.CLIPSegConfig(text_config=CLIP_TEXT, vision_config=dict(VISION, num_hidden_layers=3),
                                            projection_dim=16, extract_layers=[1, 2], reduce_dim=16,
                                            decoder_num_attention_heads=2, decoder_intermediate_size=32)
        model = transformers.CLIPSegForImageSegmentation(config)
    else:
        config = transformers.SiglipConfig(text_config=TEXT, vision_config=VISION)
        model = transformers.SiglipModel(config)
    model.set_attn_implementation(attn)
    return perturbed(model)


def run_hf(model, pixels, ids, mask):
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    return (out.logits,) if hasattr(out, "logits") else (out.logits_per_image, out.text_embeds, out.image_embeds)


@pytest.mark.parametrize("family, attn", [("clip", "sdpa"), ("clip", "eager"), ("chinese_clip", "sdpa"),
                                          ("clipseg", "sdpa"), ("siglip", "sdpa")])
def test_hugging_face(family, attn):
    model = hf_model(family, attn)
    ids, mask = hf_text_inputs()
    check_unpatch_exact(model, run_hf, torch.randn(2, 3, 32, 32), ids, mask)
