"""Every path of the Hugging Face "clipfast" attention function computes what the model computes without
clipfast: the kernel, and each fallback (head dim outside the kernel's range -> sdpa, attention weights
requested -> the model's eager attention, attention dropout in training -> sdpa), for every mask form
transformers passes (none with ``is_causal``, the key-padding mask of ``clipfast_mask``, full boolean and
additive masks), in both modes (``attn_implementation="clipfast"`` and ``clipfast.patch`` on an sdpa or eager
model); attention weights also where the model does not pass ``output_attentions`` down (SigLIP)."""
import copy
import warnings

import pytest
import torch

import clipfast
from clipfast import _validate

from ..conftest import DEVICE

transformers = pytest.importorskip("transformers", reason="transformers is not installed; `pip install -e .[integrations]`")
hf = pytest.importorskip("clipfast.integrations.hf")
hf.register()

VOCAB, EOS = 100, 99
TINY_DROPOUT = 1e-7  # attention dropout that drops nothing in practice: training mode, the eval result


@pytest.fixture(autouse=True)
def _own_one_time_warnings():
    """The one-time warnings these tests trigger stay theirs: other tests expect to see them."""
    from clipfast import _validate as validate

    before = set(validate._warned)
    yield
    validate._warned.intersection_update(before)


def padded_ids(lengths=(12, 7, 4), length=12, left=False):
    ids = torch.randint(2, EOS - 1, (len(lengths), length))
    mask = torch.zeros(len(lengths), length, dtype=torch.long)
    for i, n in enumerate(lengths):
        real = slice(length - n, length) if left else slice(0, n)
        mask[i, real] = 1
        ids[i][mask[i] == 0] = 0
        ids[i, real.stop - 1] = EOS
    return ids.to(DEVICE), mask.to(DEVICE)


# ----------------------------------------------------------------------------------------------
# The attention function alone, against the mask semantics written out
# ----------------------------------------------------------------------------------------------

def reference_attention(q, k, v, mask, causal, scale):
    """float64 softmax(q k^T * scale + bias) v with every constraint as an additive bias."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    if causal:
        lq, lk = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    weights = scores.softmax(-1)
    return (weights @ v).transpose(1, 2), weights


def mask_forms(batch, length, lengths):
    """(name, mask, causal structure the call adds) for every form the attention function receives."""
    keep = torch.arange(length, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]
    causal = torch.ones(length, length, dtype=torch.bool, device=DEVICE).tril()
    full_bool = (keep[:, None, None, :] & causal)
    additive = torch.zeros(full_bool.shape, device=DEVICE).masked_fill(~full_bool, torch.finfo(torch.float32).min)
    return [
        ("none, is_causal", None, True),                                  # sdpa / clipfast, no padding
        ("key padding [B,1,1,L] bool, is_causal", keep[:, None, None, :], True),   # clipfast_mask
        ("full bool [B,1,L,L]", full_bool, False),                        # sdpa mask (holds causality)
        ("full additive [B,1,L,L]", additive, False),                     # eager mask
        ("key padding bool, bidirectional", keep[:, None, None, :], False),
    ]


@pytest.mark.parametrize("path", ["kernel", "output_attentions", "dropout_in_training", "head_dim"])
def test_attention_function_every_path_every_mask_form(path):
    lengths, length, heads = (9, 5, 2), 9, 2
    head_dim = 8 if path == "head_dim" else 16
    config = transformers.CLIPTextConfig(hidden_size=heads * head_dim, num_attention_heads=heads,
                                         attention_dropout=TINY_DROPOUT)
    module = transformers.models.clip.modeling_clip.CLIPAttention(config).to(DEVICE)
    module.train(path == "dropout_in_training")
    q, k, v = (torch.randn(len(lengths), heads, length, head_dim, device=DEVICE) for _ in range(3))
    scale = head_dim ** -0.5
    for name, mask, causal in mask_forms(len(lengths), length, lengths):
        kwargs = dict(is_causal=True) if causal or mask is not None and mask.shape[2] > 1 else dict(is_causal=False)
        if path == "output_attentions":
            kwargs["output_attentions"] = True
        out, weights = hf.clipfast_attention_forward(module, q, k, v, mask, scaling=scale,
                                                     dropout=TINY_DROPOUT if module.training else 0.0, **kwargs)
        expected, expected_weights = reference_attention(q, k, v, mask, causal, scale)
        rows = torch.tensor([[i < n for i in range(length)] for n in lengths], device=DEVICE)[:, :, None, None]
        err = float(((out.double() - expected).abs() * rows).max())  # padded query rows are not compared
        assert err < 1e-5, f"{path}, {name}: max error {err}"
        if path == "output_attentions":
            assert weights is not None, name
            torch.testing.assert_close(weights.double() * rows.transpose(1, 2), expected_weights * rows.transpose(1, 2),
                                       rtol=0, atol=1e-6, msg=f"{name}: attention weights")
        else:
            assert weights is None


def test_boolean_mask_reaches_eager_attention_as_an_additive_bias():
    mask = torch.tensor([[True, False, True]])
    bias = hf._additive(mask, torch.float16)
    assert bias.dtype == torch.float16 and bias.tolist() == [[0.0, torch.finfo(torch.float16).min, 0.0]]
    additive = torch.randn(1, 3)
    assert hf._additive(additive, torch.float32) is additive and hf._additive(None, torch.float32) is None


# ----------------------------------------------------------------------------------------------
# Whole models, both modes, against the model without clipfast
# ----------------------------------------------------------------------------------------------

def text_config(head_dim, attn="eager", dropout=0.0):
    return transformers.CLIPTextConfig(hidden_size=2 * head_dim, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, vocab_size=VOCAB, max_position_embeddings=16,
                                       eos_token_id=EOS, bos_token_id=1, pad_token_id=0, attention_dropout=dropout,
                                       attn_implementation=attn)


def with_clipfast(model, mode):
    """``model`` (a copy) with clipfast on: ``"clipfast"`` sets the attention implementation, ``"patch-sdpa"``
    / ``"patch-eager"`` patch the attention of the model running that implementation (the other families
    are tested elsewhere; leaving them out keeps these tests fast)."""
    model = copy.deepcopy(model)
    if mode == "clipfast":
        model.set_attn_implementation("clipfast")
    else:
        model.set_attn_implementation(mode.split("-")[1])
        clipfast.patch(model, layer_norm=False, mlp=False, patch_embed=False)
    return model


def assert_same_on_real_tokens(out, ref, mask, what):
    keep = mask.bool()[..., None]
    err = float(torch.where(keep, (out - ref).abs(), 0).max())
    assert err < 1e-5, f"{what}: max error {err} on real tokens"


@pytest.mark.parametrize("mode", ["clipfast", "patch-sdpa", "patch-eager"])
@pytest.mark.parametrize("head_dim", [8, 16])
def test_causal_padded_text_every_fallback_matches_the_model(mode, head_dim):
    """CLIP's causal text tower with right and left padding (and none): the kernel (head dim 16), the sdpa
    fallback (head dim 8), attention weights requested and dropout in training all match eager."""
    base = transformers.CLIPTextModel(text_config(head_dim)).to(DEVICE).eval()
    fast = with_clipfast(base, mode)
    dropping = with_clipfast(transformers.CLIPTextModel(text_config(head_dim, dropout=TINY_DROPOUT)), mode)
    dropping.load_state_dict(base.state_dict())
    dropping.to(DEVICE).train()
    for ids, mask in (padded_ids(), padded_ids(left=True), padded_ids(lengths=(12, 12))):
        with torch.no_grad():
            ref = base(input_ids=ids, attention_mask=mask, output_attentions=True)
            out = fast(input_ids=ids, attention_mask=mask)
            assert_same_on_real_tokens(out.last_hidden_state, ref.last_hidden_state, mask, f"{mode}, hidden states")
            out = fast(input_ids=ids, attention_mask=mask, output_attentions=True)
            assert_same_on_real_tokens(out.last_hidden_state, ref.last_hidden_state, mask, f"{mode}, with weights")
            assert len(out.attentions) == 2
            rows = mask.bool()[:, None, :, None]
            for a, r in zip(out.attentions, ref.attentions):
                torch.testing.assert_close(torch.where(rows, a, 0), torch.where(rows, r, 0), rtol=0, atol=1e-6)
            out = dropping(input_ids=ids, attention_mask=mask)
            assert_same_on_real_tokens(out.last_hidden_state, ref.last_hidden_state, mask, f"{mode}, dropout")


@pytest.mark.parametrize("mode", ["clipfast", "patch-sdpa"])
def test_chinese_clip_text_output_attentions_with_padding(mode):
    """ChineseCLIP's bidirectional BERT text tower: weights requested with a padded batch (a boolean sdpa mask
    reaches the eager attention, which adds masks)."""
    config = transformers.ChineseCLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=2, vocab_size=VOCAB, max_position_embeddings=16,
                                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base = transformers.ChineseCLIPTextModel(config, add_pooling_layer=False).to(DEVICE).eval()
    base.set_attn_implementation("eager")
    fast = with_clipfast(base, mode)
    ids, mask = padded_ids()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask, output_attentions=True)
        out = fast(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert_same_on_real_tokens(out.last_hidden_state, ref.last_hidden_state, mask, mode)
    for a, r in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["clipfast", "patch-sdpa"])
@pytest.mark.parametrize("tower", ["vision", "text"])
def test_siglip_returns_attention_weights(mode, tower):
    """SigLIP does not pass ``output_attentions`` to the attention function: the request is read where the
    model receives it."""
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    if tower == "vision":
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**common, image_size=16, patch_size=8))
        inputs = dict(pixel_values=torch.randn(2, 3, 16, 16, device=DEVICE))
    else:
        model = transformers.SiglipTextModel(transformers.SiglipTextConfig(**common, vocab_size=VOCAB,
                                                                          max_position_embeddings=16))
        inputs = dict(input_ids=torch.randint(0, VOCAB, (2, 9), device=DEVICE))
    base = model.to(DEVICE).eval()
    base.set_attn_implementation("eager")
    fast = with_clipfast(base, mode)
    with torch.no_grad():
        ref = base(**inputs, output_attentions=True)
        out = fast(**inputs, output_attentions=True)
        plain = fast(**inputs)
    assert out.attentions is not None and len(out.attentions) == len(ref.attentions) == 2
    for a, r in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert plain.attentions is None  # not requested: the kernel ran, no weights


# ----------------------------------------------------------------------------------------------
# dtypes the interpreter computes wrongly
# ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(DEVICE.type != "cpu", reason="the interpreter runs on CPU tensors")
def test_bf16_under_the_interpreter_runs_eager_with_a_warning():
    from clipfast.kernels import runtime

    if not runtime.INTERPRET:
        pytest.skip("the Triton interpreter is off")
    _validate._warned.discard("interpreter_torch.bfloat16")
    q, k, v = (torch.randn(2, 2, 9, 16, dtype=torch.bfloat16) for _ in range(3))
    with pytest.warns(RuntimeWarning, match="interpreter computes torch.bfloat16 wrongly"):
        out = clipfast.flash_attention(q, k, v, is_causal=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        x = torch.randn(5, 32, dtype=torch.bfloat16)
        y = clipfast.layer_norm(x, None, None)
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    bf16_eps = torch.finfo(torch.bfloat16).eps
    assert float((out.float() - expected).abs().max()) < 4 * bf16_eps * float(expected.abs().max())
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (32,)), rtol=0, atol=0)
    assert runtime.uses_triton(q.float()) and not runtime.uses_triton(q)


# ----------------------------------------------------------------------------------------------
# Whole models with attn_implementation="clipfast" against the same model in eager (HF's own
# eager-vs-sdpa scenario: padded text, with and without attention weights)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["clip", "chinese_clip", "clipseg", "siglip"])
def test_whole_model_clipfast_matches_eager_with_padding_and_weights(family):
    from .test_unpatch import hf_model, hf_text_inputs, run_hf

    base = hf_model(family, "eager").to(DEVICE).eval()
    fast = copy.deepcopy(base)
    fast.set_attn_implementation("clipfast")
    ids, mask = (t.to(DEVICE) for t in hf_text_inputs())
    pixels = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        for i, (g, e) in enumerate(zip(run_hf(fast, pixels, ids, mask), run_hf(base, pixels, ids, mask))):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=f"{family}, output {i}")
        towers = [getattr(m, "text_model", None) or m.clip.text_model for m in (base, fast)]
        ref, out = (t(input_ids=ids, attention_mask=mask, output_attentions=True) for t in towers)
    assert_same_on_real_tokens(out.last_hidden_state, ref.last_hidden_state, mask, f"{family} text, with weights")
    assert out.attentions is not None and len(out.attentions) == len(ref.attentions) == 2
    rows = mask.bool()[:, None, :, None]
    for a, r in zip(out.attentions, ref.attentions):
        torch.testing.assert_close(torch.where(rows, a, 0), torch.where(rows, r, 0), rtol=0, atol=1e-6)
