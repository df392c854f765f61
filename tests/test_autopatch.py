"""``clipfast.autopatch()``: models built after the call are patched however they are built, open_clip's losses
are clipfast's, and ``undo()`` restores every library bit for bit (module attributes compared by identity).

The open_clip training program under ``clipfast run`` is ``tests/integrations/test_run_open_clip_train.py``;
the command line itself is ``tests/test_cli_run.py``.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import clipfast
from clipfast import autopatching
from clipfast.patching import is_fast

from .integrations.common import require
from .numerics import check

HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

OPEN_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 64, "heads": 4, "layers": 1},
}
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TEXT = dict(TOWER, max_position_embeddings=16, vocab_size=100, bos_token_id=1, eos_token_id=99, pad_token_id=0)
VISION = dict(TOWER, image_size=16, patch_size=8)


@pytest.fixture
def handle():
    notes = []
    h = clipfast.autopatch(on_note=notes.append)
    h.test_notes = notes
    yield h
    h.undo()


def _open_clip_dir(tmp_path):
    import json

    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPEN_CLIP_CFG}))
    return f"local-dir:{tmp_path}"


def _any_fast(model) -> bool:
    return any(is_fast(m) for m in model.modules())


def _snapshot():
    """Every module attribute (clipfast's own modules aside) and the hooks autopatch touches, by identity."""
    modules = {}
    for name, module in list(sys.modules.items()):
        if module is None or name == "clipfast" or name.startswith("clipfast."):
            continue
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict):
            modules[name] = dict(namespace)
    classes = {}
    if "transformers.modeling_utils" in sys.modules:
        cls = sys.modules["transformers.modeling_utils"].PreTrainedModel
        classes["PreTrainedModel"] = dict(cls.__dict__)
    return modules, classes, list(sys.meta_path)


def _is_replacement(value) -> bool:
    if type(value) is types.FunctionType:
        return value.__dict__.get("_clipfast_autopatch", False) is True
    return value is autopatching.ClipLoss or value is autopatching.SigLipLoss


_CODE = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type, types.ModuleType,
         functools.partial)


def _assert_restored(before, after):
    """Every function, class and module a module namespace held before is the very same object after (data
    attributes are left out: libraries fill their own caches while models are built)."""
    modules_before, classes_before, meta_before = before
    modules_after, classes_after, meta_after = after
    changed = [(m, k) for m, ns in modules_before.items() for k, v in ns.items()
               if issubclass(type(v), _CODE) and m in modules_after and modules_after[m].get(k, v) is not v]
    assert not changed, changed[:20]
    left = [(m, k) for m, ns in modules_after.items() for k, v in ns.items() if _is_replacement(v)]
    assert not left, left[:20]
    for name, attrs in classes_before.items():
        assert classes_after[name].keys() == attrs.keys()
        assert all(classes_after[name][k] is v for k, v in attrs.items()), name
    assert len(meta_after) == len(meta_before) and all(a is b for a, b in zip(meta_after, meta_before))


@pytest.mark.skipif(not (HAS_OPEN_CLIP and HAS_TRANSFORMERS), reason="needs open_clip and transformers")
def test_undo_restores_every_library_bit_for_bit(tmp_path):
    import open_clip
    import open_clip.factory
    import transformers
    import transformers.modeling_utils  # noqa: F401

    # a module that imported the names before autopatch (as open_clip_train.main does)
    user = types.ModuleType("clipfast_test_user_module")
    exec("from open_clip import create_model_and_transforms, create_loss, ClipLoss", user.__dict__)
    sys.modules[user.__name__] = user
    try:
        # built once before the snapshot, so the libraries' own lazy imports and caches are filled
        open_clip.create_model_and_transforms(_open_clip_dir(tmp_path))
        transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION))
        before = _snapshot()
        original = open_clip.factory.create_model_and_transforms
        h = clipfast.autopatch(on_note=lambda text: None)
        try:
            assert user.create_model_and_transforms is not original
            assert user.create_model_and_transforms.__wrapped__ is original
            assert open_clip.create_model_and_transforms is user.create_model_and_transforms
            assert user.ClipLoss is open_clip.loss.ClipLoss is autopatching.ClipLoss
            # a module imported while autopatch is on copies the wrappers; undo restores it too
            later = types.ModuleType("clipfast_test_later_module")
            exec("from open_clip import create_model\nfrom open_clip.loss import SigLipLoss as S",
                 later.__dict__)
            sys.modules[later.__name__] = later
            assert later.create_model.__wrapped__ is open_clip.factory.create_model.__wrapped__
            model, _, _ = user.create_model_and_transforms(_open_clip_dir(tmp_path))
            assert _any_fast(model)
            hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION))
            assert _any_fast(hf)
        finally:
            h.undo()
        after = _snapshot()
        _assert_restored(before, after)
        assert later.create_model is open_clip.factory.create_model and later.S is open_clip.loss.SigLipLoss
        assert not hasattr(open_clip.create_model, "__wrapped__")
        # off again: new models are plain; the patched ones stay patched until unpatched
        assert not _any_fast(open_clip.create_model(_open_clip_dir(tmp_path)))
        assert not _any_fast(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)))
        assert _any_fast(model)
        h.undo()  # twice is harmless
    finally:
        sys.modules.pop("clipfast_test_user_module", None)
        sys.modules.pop("clipfast_test_later_module", None)


IMPORTED_LATER = r'''
import sys, importlib.machinery
import clipfast
from clipfast.patching import is_fast
assert "open_clip" not in sys.modules and "transformers" not in sys.modules
meta = list(sys.meta_path)
h = clipfast.autopatch(on_note=lambda text: None)
import open_clip, open_clip.factory, open_clip.loss
from transformers import CLIPVisionConfig, CLIPVisionModel
assert open_clip.create_model.__wrapped__ is open_clip.factory.create_model.__wrapped__
assert open_clip.ClipLoss.__module__ == "clipfast.autopatching"
for name in ("open_clip.factory", "open_clip.loss", "transformers.modeling_utils"):
    module = sys.modules[name]  # the module keeps its own loader
    assert type(module.__loader__) is importlib.machinery.SourceFileLoader, (name, module.__loader__)
    assert module.__spec__.loader is module.__loader__
model = open_clip.create_model("local-dir:" + sys.argv[1])
assert any(is_fast(m) for m in model.modules())
hf = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=16, patch_size=8))
assert any(is_fast(m) for m in hf.modules())
h.undo()
from clipfast.integrations.import_hooks import AfterImport
assert not any(isinstance(f, AfterImport) for f in sys.meta_path)  # (the libraries may add finders of their own)
others = [f for f in meta if not type(f).__module__.startswith("clipfast")]  # clipfast.integrations.hf's leaves
assert [f for f in sys.meta_path if any(f is g for g in others)] == others
assert open_clip.create_model is open_clip.factory.create_model and not hasattr(open_clip.create_model, "__wrapped__")
assert open_clip.ClipLoss is open_clip.loss.ClipLoss and open_clip.ClipLoss.__module__ == "open_clip.loss"
from transformers.modeling_utils import PreTrainedModel
assert not hasattr(PreTrainedModel.post_init, "_clipfast_autopatch")
assert not any(is_fast(m) for m in open_clip.create_model("local-dir:" + sys.argv[1]).modules())
print("OK", len(h.patched))
'''


@pytest.mark.skipif(not (HAS_OPEN_CLIP and HAS_TRANSFORMERS), reason="needs open_clip and transformers")
def test_libraries_imported_after_the_call_are_hooked_on_import(tmp_path):
    _open_clip_dir(tmp_path)
    proc = subprocess.run([sys.executable, "-c", IMPORTED_LATER, str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split()[-2:] == ["OK", "2"], proc.stdout


@pytest.mark.skipif(not HAS_OPEN_CLIP, reason="needs open_clip")
def test_open_clip_loaders_patch_once_and_models_built_before_are_left_alone(tmp_path, handle):
    import open_clip

    name = _open_clip_dir(tmp_path)
    handle.undo()
    before = open_clip.create_model(name)
    torch.save(before.state_dict(), tmp_path / "open_clip_pytorch_model.bin")  # the weights a "pretrained" load reads
    h = clipfast.autopatch(on_note=lambda text: None)
    try:
        reports = []
        h.on_patch = lambda model, report, what: reports.append(what)
        model, _, _ = open_clip.create_model_and_transforms(name)   # calls create_model inside: one patch
        assert _any_fast(model) and reports == ["CLIP from open_clip.create_model_and_transforms"]
        model, _ = open_clip.create_model_from_pretrained(name)
        assert _any_fast(model) and len(reports) == 2
        assert not _any_fast(before)
        assert [p.source for p in h.patched] == ["open_clip.create_model_and_transforms",
                                                 "open_clip.create_model_from_pretrained"]
    finally:
        h.undo()


@pytest.mark.skipif(not HAS_OPEN_CLIP, reason="needs open_clip")
def test_open_clip_losses_become_clipfasts_coca_and_distillation_kept(handle):
    import open_clip
    import open_clip.loss

    def loss_args(**kw):
        base = dict(distill=False, model="ViT-B-32", siglip=False, local_loss=False, gather_with_grad=False,
                    rank=0, world_size=1, horovod=False, coca_caption_loss_weight=2.0,
                    coca_contrastive_loss_weight=1.0, loss_dist_impl=None)
        return argparse.Namespace(**{**base, **kw})

    clip_loss = open_clip.create_loss(loss_args())
    assert type(clip_loss) is autopatching.ClipLoss and isinstance(clip_loss, clipfast.nn.ClipLoss)
    assert isinstance(open_clip.create_loss(loss_args(siglip=True)), clipfast.nn.SigLipLoss)
    assert isinstance(open_clip.ClipLoss(), clipfast.nn.ClipLoss)
    coca = open_clip.create_loss(loss_args(model="coca_ViT-B-32"))
    distill = open_clip.create_loss(loss_args(distill=True))
    assert type(coca).__module__ == type(distill).__module__ == "open_clip.loss"
    notes = " | ".join(handle.test_notes)
    assert "built ClipLoss: clipfast.nn.ClipLoss" in notes and "built SigLipLoss: clipfast.nn.SigLipLoss" in notes
    assert "built CoCaLoss: open_clip's own, kept" in notes and "built DistillClipLoss: open_clip's own, kept" in notes

    # same value as open_clip's own loss (the kernel runs through the interpreter on CPU)
    handle.undo()
    image, text = torch.nn.functional.normalize(torch.randn(2, 6, 16, dtype=torch.float64), dim=-1).float()
    scale = torch.tensor(10.0)
    ref = open_clip.loss.ClipLoss()(image.double(), text.double(), scale.double())
    eager = open_clip.loss.ClipLoss()(image, text, scale)
    problem = check("ClipLoss", clip_loss(image, text, scale), eager, ref, torch.float32)
    assert problem is None, problem


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
@pytest.mark.parametrize("name", ["CLIPModel", "CLIPVisionModel", "CLIPTextModel", "ChineseCLIPModel",
                                  "CLIPSegForImageSegmentation", "SiglipModel", "Siglip2Model"])
def test_hugging_face_constructors_and_from_config(name, handle):
    import transformers as T

    T.logging.set_verbosity_error()
    configs = {
        "CLIPModel": lambda: T.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16),
        "CLIPVisionModel": lambda: T.CLIPVisionConfig(**VISION),
        "CLIPTextModel": lambda: T.CLIPTextConfig(**TEXT),
        "ChineseCLIPModel": lambda: T.ChineseCLIPConfig(
            text_config=dict(TOWER, vocab_size=100, max_position_embeddings=16), vision_config=VISION,
            projection_dim=16),
        "CLIPSegForImageSegmentation": lambda: T.CLIPSegConfig(text_config=TEXT, vision_config=VISION,
                                                               projection_dim=16, extract_layers=[1], reduce_dim=16),
        "SiglipModel": lambda: T.SiglipConfig(text_config=TEXT, vision_config=VISION),
        "Siglip2Model": lambda: T.Siglip2Config(text_config=TEXT, vision_config=dict(TOWER, num_patches=4, patch_size=8)),
    }
    reports = []
    handle.on_patch = lambda model, report, what: reports.append(what)
    model = getattr(T, name)(configs[name]())
    assert _any_fast(model)
    assert reports == [f"{name} from transformers"]  # nested models (CLIPModel's towers) report with their parent
    if name in ("CLIPModel", "SiglipModel"):
        auto = T.AutoModel.from_config(configs[name]())
        assert type(auto).__name__ == name and _any_fast(auto) and len(reports) == 2


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
def test_hugging_face_from_pretrained_loads_weights_into_the_patched_model(tmp_path):
    import transformers as T

    T.logging.set_verbosity_error()
    config = T.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)
    saved = T.CLIPModel(config).eval()
    with torch.no_grad():  # weights no initializer would give, so a load that did not happen shows
        for p in saved.parameters():
            p.add_(0.05 * torch.randn_like(p))
    saved.save_pretrained(tmp_path)
    plain = T.CLIPModel.from_pretrained(tmp_path).eval()
    with clipfast.autopatch(on_note=lambda text: None) as h:
        fast = T.CLIPModel.from_pretrained(tmp_path).eval()
    assert [p.source for p in h.patched] == ["transformers"] and _any_fast(fast) and not _any_fast(plain)
    sd, ref_sd = fast.state_dict(), saved.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)

    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 16, 16, generator=g)
    ids = torch.randint(2, 98, (2, 16), generator=g)
    ids[:, -1] = 99
    reference = T.CLIPModel.from_pretrained(tmp_path, dtype=torch.float64).eval()
    with torch.no_grad():
        out_fast = fast(input_ids=ids, pixel_values=pixels)
        out_plain = plain(input_ids=ids, pixel_values=pixels)
        out_ref = reference(input_ids=ids, pixel_values=pixels.double())
    for key in ("image_embeds", "text_embeds"):
        problem = check(key, out_fast[key], out_plain[key], out_ref[key], torch.float32, factor=4.0, floor_ulps=64)
        assert problem is None, problem


def test_bad_arguments_and_one_at_a_time():
    with pytest.raises(TypeError, match="unknown kernel family 'atention'"):
        clipfast.autopatch(atention=False)
    with pytest.raises(TypeError, match="`loss` must be True or False"):
        clipfast.autopatch(loss="yes")
    first = clipfast.autopatch(attention=False, on_note=lambda text: None)
    second = clipfast.autopatch(on_note=lambda text: None)
    try:
        assert not first.active and second.active and autopatching.active() is second
        assert "undone" in repr(first) and "attention" in repr(first)
    finally:
        second.undo()
    assert autopatching.active() is None


def test_a_wrapper_kept_after_undo_patches_nothing(tmp_path):
    require("open_clip")
    import open_clip

    with clipfast.autopatch(on_note=lambda text: None):
        kept = open_clip.create_model
    assert kept.__wrapped__ is open_clip.create_model
    assert not _any_fast(kept(_open_clip_dir(tmp_path)))


def test_autopatch_in_api():
    assert "autopatch" in clipfast.__all__ and clipfast.autopatch is autopatching.autopatch
    assert textwrap.dedent(autopatching.__doc__).strip()
