"""``clipfast.autopatch()`` through the loaders of OpenAI ``clip`` and Chinese-CLIP (``cn_clip``): a model they
build after the call is patched (and gives the unpatched model's features), one built before is not, and
``undo()`` gives the loaders back. No download: ``clip.load`` reads a local checkpoint file, cn_clip's
``create_model`` builds from its shipped configs without weights."""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

import clipfast
from clipfast.patching import is_fast

from ..numerics import check
from .common import float64_reference


def _any_fast(model) -> bool:
    return any(is_fast(m) for m in model.modules())


@pytest.mark.skipif(importlib.util.find_spec("clip") is None, reason="OpenAI's clip package is not installed")
def test_openai_clip_load_builds_a_patched_model(tmp_path):
    from clipfast.integrations.openai_clip import import_clip

    clip = import_clip()
    weights = clipfast.models.create("tiny").state_dict()  # OpenAI's checkpoint layout
    path = tmp_path / "tiny.pt"
    torch.save(weights, path)
    plain, _ = clip.load(str(path), device="cpu", jit=False)
    original_load = clip.load
    handle = clipfast.autopatch(on_note=lambda text: None)
    try:
        assert clip.load is not original_load
        model, preprocess = clip.load(str(path), device="cpu", jit=False)
    finally:
        handle.undo()
    assert clip.load is original_load and clip.clip.load is original_load
    assert _any_fast(model) and not _any_fast(plain)
    assert [p.source for p in handle.patched] == ["clip.load"]
    images = torch.randn(2, 3, 32, 32)
    text = torch.randint(1, 100, (2, 13))
    text[:, 6] = 100  # the end-of-text token (the largest id) pools each prompt
    reference = float64_reference(copy.deepcopy(plain))
    with torch.no_grad(), clipfast.dispatch("kernel"):
        for what, fast, eager, ref in (
                ("image", model.encode_image(images), plain.encode_image(images), reference.encode_image(images.double())),
                ("text", model.encode_text(text), plain.encode_text(text), reference.encode_text(text))):
            problem = check(f"{what} features", fast, eager, ref, torch.float32, reduction=128)
            assert problem is None, problem


@pytest.mark.skipif(importlib.util.find_spec("cn_clip") is None, reason="cn_clip is not installed")
def test_cn_clip_create_model_builds_a_patched_model():
    import cn_clip.clip as cn
    from cn_clip.clip import utils

    original = utils.create_model
    handle = clipfast.autopatch(on_note=lambda text: None)
    try:
        model = utils.create_model("RN50@RBT3-chinese")
    finally:
        handle.undo()
    assert utils.create_model is original and getattr(cn, "create_model", original) is original
    assert _any_fast(model) and [p.source for p in handle.patched] == ["cn_clip.clip.utils.create_model"]
    report = str(clipfast.patch(model))  # patching again changes nothing: it already is
    assert "swapped" in report
