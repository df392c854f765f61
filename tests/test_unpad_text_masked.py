"""Unpadded text towers that take a padding mask (``clipfast/integrations/hf/unpad.py``,
``clipfast/integrations/cn_clip.py``, the packed BERT tower of ``clipfast/unpad.py``): Hugging Face CLIPModel
(causal, pooled at the end-of-text token, with and without ``attention_mask``), Hugging Face ChineseCLIPModel and
cn_clip (BERT, pooled at CLS). Patched (packed, real tokens only) vs the unpatched padded model, forward and every
parameter gradient against a float64 reference; calls that need more than pooled features run padded."""
import copy
import json
import pickle

import pytest
import torch

import clipfast
from clipfast import unpad
from clipfast.integrations.hf import unpad as hf_unpad

from .conftest import DEVICE
from .integrations.common import check_patch, perturbed

transformers = pytest.importorskip("transformers", reason="transformers is not installed; `pip install -e .[integrations]`")

VOCAB, EOS, CONTEXT = 100, 99, 16
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)  # head dim 16
VISION = dict(TOWER, num_hidden_layers=1, image_size=32, patch_size=16)


def clip_model(eos=EOS):
    config = transformers.CLIPConfig(
        text_config=dict(TOWER, vocab_size=VOCAB, max_position_embeddings=CONTEXT, eos_token_id=eos, bos_token_id=1,
                         pad_token_id=0),
        vision_config=VISION, projection_dim=16)
    return perturbed(transformers.CLIPModel(config)).eval()


def chinese_clip_model():
    config = transformers.ChineseCLIPConfig(
        text_config=dict(TOWER, vocab_size=VOCAB, max_position_embeddings=CONTEXT, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0),
        vision_config=VISION, projection_dim=16)
    return perturbed(transformers.ChineseCLIPModel(config)).eval()


BATCHES = {
    "mixed": [CONTEXT, 7, 1, 4],
    "all-full-length": [CONTEXT, CONTEXT],
    "one-long-many-short": [CONTEXT] + [3, 2, 4, 6, 2, 5, 3],
}


def clip_text(lengths, eos=EOS, left=False):
    """CLIP-style ids (end-of-text last, pad id 0 after it, or before the prompt with ``left``) and the mask."""
    ids = torch.randint(2, EOS - 1, (len(lengths), CONTEXT))
    mask = torch.zeros(len(lengths), CONTEXT, dtype=torch.long)
    for i, n in enumerate(lengths):
        prompt = torch.cat([ids[i, :n - 1], torch.tensor([eos])])
        ids[i] = 0
        where = slice(CONTEXT - n, CONTEXT) if left else slice(0, n)
        ids[i, where], mask[i, where] = prompt, 1
    return ids, mask


@pytest.fixture
def packed_calls(monkeypatch):
    """Counts the varlen attention calls of the packed path (proof it ran, not the padded model)."""
    calls = []
    varlen = unpad.flash_attention_varlen

    def counting(q, *args, **kwargs):
        calls.append((q.shape[0], kwargs["is_causal"]))
        return varlen(q, *args, **kwargs)

    monkeypatch.setattr(unpad, "flash_attention_varlen", counting)
    return calls


@pytest.fixture
def no_packing(monkeypatch):
    monkeypatch.setattr(unpad, "flash_attention_varlen", None)  # must not be reached


def text_features(model, ids, mask=None):
    return model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output


def text_features_no_mask(model, ids):
    return text_features(model, ids)


@pytest.mark.parametrize("batch", list(BATCHES))
def test_hf_clip_get_text_features_with_mask(batch, packed_calls):
    ids, mask = clip_text(BATCHES[batch])
    check_patch(clip_model, text_features, [ids, mask], expected={"unpad_text": {""}})
    tokens = sum(BATCHES[batch])
    assert packed_calls and {c for c in packed_calls} == {(tokens, True)}  # every layer: the real tokens only


@pytest.mark.parametrize("tower", ["clip", "chinese-clip"])
def test_hf_towers_fp16(tower, packed_calls):
    lengths = [CONTEXT, 7, 1, 4]
    if tower == "clip":
        ids, mask = clip_text(lengths)
        check_patch(clip_model, text_features, [ids, mask], dtype=torch.float16)
    else:
        ids, mask, _ = bert_text(lengths)
        check_patch(chinese_clip_model, text_features, [ids, mask], dtype=torch.float16)
    assert packed_calls


@pytest.mark.parametrize("case", ["no-mask", "left-padding", "legacy-eos-2"])
def test_hf_clip_without_mask_left_padding_and_argmax_pooling(case, packed_calls):
    """Without a mask the tower attends causally to every position, padding included: the packed path keeps
    0..eot (exact: nothing after the end-of-text token reaches it). Left padding: the masked keys before the
    prompt are dropped, positions keep their ids. ``eos_token_id == 2``: pooled at the largest id."""
    lengths = [CONTEXT, 7, 1, 4]
    if case == "legacy-eos-2":
        ids, mask = clip_text(lengths, eos=EOS)  # EOS is the largest id: argmax finds it
        build, inputs, run = (lambda: clip_model(eos=2)), [ids, mask], text_features
    else:
        ids, mask = clip_text(lengths, left=case == "left-padding")
        build = clip_model
        inputs, run = ([ids], text_features_no_mask) if case == "no-mask" else ([ids, mask], text_features)
    check_patch(build, run, inputs, expected={"unpad_text": {""}})
    assert packed_calls and packed_calls[0] == (sum(lengths), True)


def test_hf_clip_forward_text_embeds_and_logits(packed_calls):
    """``CLIPModel.forward``: text_embeds and logits from the packed tower; its text output's
    ``last_hidden_state`` is the padded model's, computed when read."""
    ids, mask = clip_text([9, 1, CONTEXT])
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def run(model, pixels, ids, mask):
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        return out.text_embeds, out.logits_per_image, out.text_model_output.last_hidden_state

    check_patch(clip_model, run, [pixels, ids, mask], expected={"unpad_text": {""}})
    assert packed_calls


def test_hf_clip_text_model_with_projection(packed_calls):
    """``CLIPTextModelWithProjection``: text_embeds from the packed tower, ``last_hidden_state`` the padded
    model's when read; the bare ``CLIPTextModel`` (every position's states are its main output) is left padded."""
    ids, mask = clip_text([9, 1, CONTEXT])

    def build():
        return perturbed(transformers.CLIPTextModelWithProjection(clip_model().config.text_config)).eval()

    def run(model, ids, mask):
        out = model(input_ids=ids, attention_mask=mask)
        return out.text_embeds, out[1]  # positional, as without clipfast: (text_embeds, last_hidden_state)

    check_patch(build, run, [ids, mask], expected={"unpad_text": {""}})
    assert packed_calls
    report = clipfast.patch(transformers.CLIPTextModel(clip_model().config.text_config))
    assert not [s for s in report.swapped if s.family == "unpad_text"]


@pytest.fixture
def padded_runs(monkeypatch):
    """Counts the padded text-tower runs that compute ``last_hidden_state`` on read."""
    calls = []
    replay = hf_unpad._PaddedStates.__call__

    def counting(self):
        calls.append(self)
        return replay(self)

    monkeypatch.setattr(hf_unpad._PaddedStates, "__call__", counting)
    return calls


@pytest.mark.parametrize("tower", ["clip", "chinese-clip"])
def test_hf_last_hidden_state_is_the_padded_models_and_computed_only_when_read(tower, packed_calls, padded_runs):
    """The unpadded output holds every field of the padded call: ``last_hidden_state`` (every position,
    padding included) is computed by the padded tower on first read, forward and every parameter gradient
    against float64; pooled-only callers never run it. Key order, positions, copies and pickles are the Hugging
    Face output's."""
    if tower == "clip":
        build, (ids, mask), extra = clip_model, clip_text([9, 1, CONTEXT]), {}
    else:
        ids, mask, types = bert_text([9, 1, CONTEXT])
        build, extra = chinese_clip_model, {"token_type_ids": types.to(DEVICE)}

    def run(model, ids, mask):
        out = model.get_text_features(input_ids=ids, attention_mask=mask, **extra)
        return out.pooler_output, out.last_hidden_state

    check_patch(build, run, [ids, mask], expected={"unpad_text": {""}})
    assert packed_calls and padded_runs
    model = build().to(DEVICE)
    reference = model.get_text_features(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), **extra)
    clipfast.patch(model)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    padded_runs.clear()
    with torch.no_grad():
        out = model.get_text_features(input_ids=ids, attention_mask=mask, **extra)
    assert not padded_runs  # pooled features only so far
    assert isinstance(out, type(reference)) and list(out.keys()) == list(reference.keys())
    torch.testing.assert_close(out.pooler_output, reference.pooler_output, rtol=1e-4, atol=1e-5)
    states = out[0]  # positional access computes it too, in its place
    assert len(padded_runs) == 1 and out.last_hidden_state is states and len(out.to_tuple()) == 2
    assert not states.requires_grad  # replayed under the call's no_grad, though read outside it
    torch.testing.assert_close(states, reference.last_hidden_state, rtol=1e-4, atol=1e-5)
    for clone in (copy.deepcopy(out), pickle.loads(pickle.dumps(out))):
        assert type(clone) is type(reference) and list(clone.keys()) == list(reference.keys())
        torch.testing.assert_close(clone.last_hidden_state, states)
    assert len(padded_runs) == 1
    out = model.get_text_features(input_ids=ids, attention_mask=mask, **extra)
    with torch.no_grad():
        next(model.text_model.parameters()).add_(1)  # as an optimizer step does
    with pytest.raises(RuntimeError, match="changed in place"):  # no longer the states of that call
        out.last_hidden_state
    layer_norm = next(m for m in model.text_model.modules() if isinstance(m, torch.nn.LayerNorm))
    layer_norm.weight = torch.nn.Parameter(layer_norm.weight.detach() * 2)  # replaced before the call: fine
    out = model.get_text_features(input_ids=ids, attention_mask=mask, **extra)
    torch.testing.assert_close(out.last_hidden_state, model.text_model(input_ids=ids, attention_mask=mask, **extra)[0])
    out = model.get_text_features(input_ids=ids, attention_mask=mask, **extra)
    layer_norm.weight = torch.nn.Parameter(layer_norm.weight.detach() * 2)  # replaced after it: refused
    with pytest.raises(RuntimeError, match="replaced"):
        out.last_hidden_state


def test_nothing_global_at_import_and_the_registration_hook_only_while_patched():
    """Importing clipfast (every rules module, the Hugging Face towers included) installs no global module
    hook. The parameter-registration hook that keeps the towers' parameter lists current is installed by the
    first unpadded call of a patched model and removed when the patched models are unpatched; an output read
    afterwards still computes its states. The output is built as clipfast's subclass of the Hugging Face
    class (nothing of the library is reclassed or changed)."""
    from .conftest import run_without_interpreter

    script = """
import torch
import torch.nn.modules.module as m

def hooks():
    return {k: list(v) for k, v in vars(m).items() if k.startswith("_global") and isinstance(v, dict)}

before = hooks()
import transformers
from transformers.modeling_outputs import BaseModelOutputWithPooling
import clipfast
from clipfast import patching
from clipfast.integrations.hf import unpad as hf_unpad
assert patching.registered_rules() and hooks() == before, "import"
config = transformers.CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=2, vocab_size=100, max_position_embeddings=16, eos_token_id=99),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    image_size=32, patch_size=16))
a, b = transformers.CLIPModel(config).eval(), transformers.CLIPModel(config).eval()
clipfast.patch(a), clipfast.patch(b)
assert hooks() == before, "patch"
ids = torch.randint(2, 98, (3, 16))
ids[:, 9] = 99
registration = len(before["_global_parameter_registration_hooks"])
out = a.get_text_features(input_ids=ids)
assert len(m._global_parameter_registration_hooks) == registration + 1, "call"
b.get_text_features(input_ids=ids)
assert len(m._global_parameter_registration_hooks) == registration + 1, "one hook"
clipfast.unpatch(a)
assert len(m._global_parameter_registration_hooks) == registration + 1, "b still patched"
clipfast.unpatch(b)
assert hooks() == before, "unpatch"
assert type(out).__mro__[2] is BaseModelOutputWithPooling and type(out).__module__ == hf_unpad.__name__
assert BaseModelOutputWithPooling.__dict__.get("last_hidden_state") is None
torch.testing.assert_close(out.last_hidden_state, a.text_model(input_ids=ids).last_hidden_state)
assert hooks() == before, "read"
print("ok")
"""
    assert "ok" in run_without_interpreter(script)


@pytest.mark.filterwarnings("ignore:clipfast")
def test_hf_last_hidden_state_replays_the_calls_autocast_whatever_the_readers(padded_runs):
    """Read under other autocast settings than the call's, the states are still the call's: those of the padded
    tower run under autocast for a call under autocast read outside it, without for a call outside autocast
    read inside it (bitwise: the same computation replayed)."""
    model = clip_model().to(DEVICE)
    clipfast.patch(model)
    ids, mask = (t.to(DEVICE) for t in clip_text([9, 1, CONTEXT]))
    device = torch.device(DEVICE).type

    def padded():
        return model.text_model(input_ids=ids, attention_mask=mask).last_hidden_state

    with torch.no_grad():
        with torch.autocast(device, dtype=torch.bfloat16):
            under, low = model.get_text_features(input_ids=ids, attention_mask=mask), padded()
        outside, full = model.get_text_features(input_ids=ids, attention_mask=mask), padded()
        assert (low - full).abs().max() > 1e-3  # the two are told apart
        assert torch.equal(under.last_hidden_state, low)
        with torch.autocast(device, dtype=torch.bfloat16):
            assert torch.equal(outside.last_hidden_state, full)
    assert len(padded_runs) == 2


def test_hf_clip_calls_that_need_every_position_run_padded(no_packing):
    """Hidden states or attentions requested (argument or config), return_dict=False (positional tuples), a
    padded pooled token or a mask other than 0/1: the padded model, every field as without clipfast."""
    model = clip_model().to(DEVICE)
    fast = copy.deepcopy(model)
    clipfast.patch(fast)
    ids, mask = (t.to(DEVICE) for t in clip_text([9, 1, CONTEXT]))
    pixels = torch.randn(2, 3, 32, 32, device=DEVICE)

    def same(a, b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    with torch.no_grad():
        a = fast.get_text_features(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        b = model.get_text_features(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        same(a.last_hidden_state, b.last_hidden_state)
        assert len(a.hidden_states) == len(b.hidden_states) == 3
        a = fast.get_text_features(input_ids=ids, attention_mask=mask, return_dict=False)
        b = model.get_text_features(input_ids=ids, attention_mask=mask, return_dict=False)
        assert isinstance(a, tuple) and len(a) == len(b) == 2
        same(a[0], b[0])
        a = fast(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_dict=False)
        b = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_dict=False)
        same(a[4][0], b[4][0])  # text_model_output: (last_hidden_state, pooler_output)
        padded_eot = mask.clone()
        padded_eot[1, 0] = 0  # the pooled token of a one-token prompt is padding
        same(text_features(fast, ids, padded_eot), text_features(model, ids, padded_eot))
        fast.text_model.config.output_hidden_states = True
        a = fast.get_text_features(input_ids=ids, attention_mask=mask)
        assert a.last_hidden_state is not None and len(a.hidden_states) == 3


def test_hf_clip_training_with_gradient_checkpointing_runs_padded(no_packing):
    model = clip_model().train().to(DEVICE)
    clipfast.patch(model)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    ids, mask = (t.to(DEVICE) for t in clip_text([9, 3]))
    text_features(model, ids, mask).sum().backward()


def test_hf_clip_patched_model_deep_copies_saves_and_unpatches(tmp_path):
    model = clip_model().to(DEVICE)
    ids, mask = (t.to(DEVICE) for t in clip_text([5, 12]))
    expected = text_features(model, ids, mask)
    clipfast.patch(model)
    clone = copy.deepcopy(model)
    assert type(clone).__qualname__ == "UnpaddedCLIPModel"
    torch.testing.assert_close(text_features(clone, ids, mask), expected, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path)  # records the architecture by class name: the original's
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["CLIPModel"]
    clipfast.unpatch(model)
    assert type(model) is transformers.CLIPModel


def test_hf_clip_torch_compile_runs_the_padded_graph_without_graph_breaks():
    model = clip_model().to(DEVICE)
    ids, mask = (t.to(DEVICE) for t in clip_text([5, 12, 1]))
    expected = text_features(model, ids, mask)
    clipfast.patch(model, layer_norm=False, mlp=False, patch_embed=False)
    torch._dynamo.reset()
    compiled = torch.compile(lambda i, m: text_features(model, i, m), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(ids, mask), expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# BERT towers
# ----------------------------------------------------------------------------------------------

def bert_text(lengths):
    """BERT-style ids: [CLS]-like first token, real tokens, pad id 0 after them; the mask; token types with a
    second segment in the longest prompt."""
    ids = torch.randint(1, VOCAB, (len(lengths), CONTEXT))
    mask = torch.zeros(len(lengths), CONTEXT, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, n:], mask[i, :n] = 0, 1
    types = torch.zeros_like(ids)
    types[0, CONTEXT // 2:] = 1
    return ids, mask, types


@pytest.mark.parametrize("batch", ["mixed", "one-long-many-short"])
def test_hf_chinese_clip_get_text_features(batch, packed_calls):
    ids, mask, types = bert_text(BATCHES[batch])

    def run(model, ids, mask, types):
        return model.get_text_features(input_ids=ids, attention_mask=mask, token_type_ids=types).pooler_output

    check_patch(chinese_clip_model, run, [ids, mask, types], expected={"unpad_text": {""}})
    assert packed_calls and set(packed_calls) == {(sum(BATCHES[batch]), False)}


def test_hf_chinese_clip_without_mask_runs_padded(no_packing):
    """Without attention_mask every position is attended to: nothing is padding, the model runs as it is."""
    model = chinese_clip_model().to(DEVICE)
    fast = copy.deepcopy(model)
    clipfast.patch(fast)
    ids = bert_text([9, 3])[0].to(DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(text_features(fast, ids), text_features(model, ids), rtol=1e-4, atol=1e-5)


def cn_clip_model():
    cn_model = pytest.importorskip("cn_clip.clip.model", reason="cn_clip is not installed")
    return perturbed(cn_model.CLIP(
        embed_dim=16, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16, vocab_size=VOCAB,
        text_attention_probs_dropout_prob=0.0, text_hidden_act="gelu", text_hidden_dropout_prob=0.0,
        text_hidden_size=32, text_initializer_range=0.02, text_intermediate_size=64,
        text_max_position_embeddings=CONTEXT, text_num_attention_heads=2, text_num_hidden_layers=2,
        text_type_vocab_size=2)).eval()


def encode_text(model, text):
    return model.encode_text(text)


@pytest.mark.parametrize("batch", ["mixed", "all-full-length"])
def test_cn_clip_encode_text(batch, packed_calls):
    ids = bert_text(BATCHES[batch])[0]  # cn_clip masks its [PAD] id (0) itself
    check_patch(cn_clip_model, encode_text, [ids], expected={"unpad_text": {""}})
    assert packed_calls and set(packed_calls) == {(sum(BATCHES[batch]), False)}


def test_cn_clip_torch_compile_and_padded_cls_fallback(no_packing):
    model = cn_clip_model().to(DEVICE)
    ids = bert_text([5, 12, 1])[0].to(DEVICE)
    expected = model.encode_text(ids)
    clipfast.patch(model, layer_norm=False, mlp=False, patch_embed=False)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: model.encode_text(t), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(ids), expected, rtol=1e-4, atol=1e-5)
    ids[2, 0] = 0  # a prompt whose first token is [PAD]: runs padded, as the original computes it
    clipfast.unpatch(model)
    expected = model.encode_text(ids)
    clipfast.patch(model)
    torch.testing.assert_close(model.encode_text(ids), expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# clipfast bench text / clipfast verify on the Hugging Face tower
# ----------------------------------------------------------------------------------------------

def test_bench_text_times_the_hf_tower_and_counts_its_tokens(packed_calls):
    from clipfast.benchmarks import text as bench

    lengths = [5, 1, 12, 3]
    times = bench.tower_times("hf-clip", lengths, device=DEVICE, dtype=torch.float32, repeats=1,
                              hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              max_position_embeddings=16, vocab_size=VOCAB, eos_token_id=VOCAB - 1)
    assert set(times) == {f"{v} {m}" for v in ("eager padded", "clipfast padded", "clipfast unpadded")
                          for m in ("fwd", "fwd+bwd")} and all(t > 0 for t in times.values())
    assert packed_calls and {n for n, _ in packed_calls} == {sum(lengths)}  # only the unpadded variant packs
    r = bench.report(batch=8, tower="hf-clip", time_on_gpu=False)
    assert r["dims"] == bench.tower_dims("ViT-B-16") and r["mixes"] == bench.report(batch=8, time_on_gpu=False)["mixes"]
    with pytest.raises(ValueError, match="tower"):
        bench.report(tower="siglip")


def test_verify_covers_the_unpadded_hf_text_tower():
    """``clipfast verify hf:clip``'s spec (text with a tokenizer's attention_mask) on a small CLIPModel: passes,
    and its text tower's swapped modules ran on packed tokens."""
    from clipfast import verify_models
    from clipfast.verify import verify

    config = clip_model().config
    spec = verify_models._hf_spec("CLIPModel", config, padding_mask=True)
    result = verify(spec.name, lambda: transformers.CLIPModel(config), spec.make_inputs, spec.forward, torch.float32,
                    torch.device(DEVICE), batch=3, progress=None)
    assert result.passed, [r.name for r in result.rows if not r.passed]
    assert "text_model.final_layer_norm" in result.ran_unpadded
    assert {p.split(".")[0] for p in result.ran_unpadded} == {"text_model"}
