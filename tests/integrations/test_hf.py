"""Hugging Face transformers: ``attn_implementation="clipfast"`` and ``clipfast.patch`` on tiny random-init
CLIPModel, CLIPVisionModel, CLIPTextModel, ChineseCLIPModel and CLIPSegForImageSegmentation."""
import copy

import pytest
import torch
import torch.nn as nn

import clipfast

from ..conftest import DEVICE
from ..numerics import check
from .common import check_patch, float64_reference, grad_problems, paths_of
from .common import perturbed as _perturbed

transformers = pytest.importorskip("transformers", reason="transformers is not installed; `pip install -e .[integrations]`")

VOCAB, EOS = 100, 99
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def clip_config(attn="sdpa"):
    return transformers.CLIPConfig(
        text_config=dict(TOWER, vocab_size=VOCAB, max_position_embeddings=16, eos_token_id=EOS, bos_token_id=1,
                         pad_token_id=0),
        vision_config=dict(TOWER, image_size=32, patch_size=8), projection_dim=16, attn_implementation=attn)


def chinese_clip_config(attn="sdpa"):
    return transformers.ChineseCLIPConfig(
        text_config=dict(TOWER, vocab_size=VOCAB, max_position_embeddings=16, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0),
        vision_config=dict(TOWER, image_size=32, patch_size=8), projection_dim=16, attn_implementation=attn)


def perturbed(model):
    return _perturbed(model).eval()


def text_inputs(batch=3, length=12):
    ids = torch.randint(2, EOS - 1, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    for i, n in enumerate([length, 7, 4][:batch]):  # right padding, EOS last
        ids[i, n - 1] = EOS
        ids[i, n:] = 0
        mask[i, n:] = 0
    return ids, mask


def run_clip(model, pixels, ids, mask):
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    return out.image_embeds, out.text_embeds, out.logits_per_image


def expected_swaps(model, attention_cls, mlp_cls=()):
    return {"layer_norm": paths_of(model, lambda m: isinstance(m, nn.LayerNorm)),
            "attention": paths_of(model, lambda m: isinstance(m, attention_cls)),
            "mlp": paths_of(model, lambda m: isinstance(m, mlp_cls)) if mlp_cls else set()}


@pytest.fixture
def flash_calls(monkeypatch):
    """Counts the attention function's calls of clipfast's flash attention (proof the kernel ran, not a fallback)."""
    from clipfast.integrations import hf

    calls = []
    flash = hf.flash_attention

    def counting(*args, **kwargs):
        mask = kwargs.get("attn_mask")
        calls.append((kwargs.get("is_causal"), None if mask is None else tuple(mask.shape)))
        return flash(*args, **kwargs)

    monkeypatch.setattr(hf, "flash_attention", counting)
    return calls


def test_hf_clip_attn_implementation_clipfast(flash_calls):
    """``attn_implementation="clipfast"`` (no patching) matches the float64 eager model: outputs and every
    parameter gradient; causal text with right padding, bidirectional vision."""
    base = perturbed(transformers.CLIPModel(clip_config("eager"))).to(DEVICE)
    ref = float64_reference(copy.deepcopy(base))
    eager = copy.deepcopy(base)
    fast = transformers.CLIPModel._from_config(clip_config(), attn_implementation="clipfast").to(DEVICE).eval()
    fast.load_state_dict(base.state_dict())
    assert fast.config._attn_implementation == "clipfast"
    pixels = torch.randn(2, 3, 32, 32, device=DEVICE)
    ids, mask = (t.to(DEVICE) for t in text_inputs())
    outs = [run_clip(m, pixels.to(dt), ids, mask) for m, dt in ((fast, torch.float32), (eager, torch.float32),
                                                               (ref, torch.float64))]
    # 2 vision layers, then 2 text layers: causal in the kernel, plus the key-padding mask [B, 1, 1, L]
    assert flash_calls == [(False, None), (False, None), (True, (3, 1, 1, 12)), (True, (3, 1, 1, 12))]
    problems = [check(f"output {i}", f, e, r, torch.float32, 4.0, 64.0) for i, (f, e, r) in enumerate(zip(*outs))]
    grads = [torch.randn_like(o) for o in outs[2]]
    for o in outs:
        torch.autograd.backward(o, [g.to(x.dtype) for g, x in zip(grads, o)])
    problems += grad_problems(fast, eager, ref, torch.float32, 4.0, 64.0)
    assert not [p for p in problems if p], "\n".join(p for p in problems if p)


def test_hf_causal_text_without_padding_runs_is_causal(flash_calls):
    model = transformers.CLIPTextModel._from_config(clip_config().text_config, attn_implementation="clipfast").to(DEVICE)
    ids = torch.randint(2, EOS, (2, 9), device=DEVICE)
    model(input_ids=ids)
    assert flash_calls == [(True, None), (True, None)]  # no mask built: the kernel's causal path


def test_hf_output_attentions_and_hidden_states():
    """Requested attention weights come from the eager path; hidden states are captured as without clipfast."""
    base = perturbed(transformers.CLIPVisionModel(clip_config("eager").vision_config)).to(DEVICE)
    fast = copy.deepcopy(base)
    fast.set_attn_implementation("clipfast")
    pixels = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        a = base(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
        b = fast(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    assert len(b.attentions) == len(a.attentions) == 2 and len(b.hidden_states) == len(a.hidden_states) == 3
    for x, y in zip(a.attentions + a.hidden_states, b.attentions + b.hidden_states):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)


def test_hf_clip_model_patched():
    build = lambda: perturbed(transformers.CLIPModel(clip_config()))  # noqa: E731
    ids, mask = text_inputs()
    model, report = check_patch(build, run_clip, [torch.randn(2, 3, 32, 32, dtype=torch.float64), ids, mask],
                                expected=expected_swaps(build(), transformers.models.clip.modeling_clip.CLIPAttention,
                                                        transformers.models.clip.modeling_clip.CLIPMLP))
    assert model.config._attn_implementation == "sdpa"  # the model's own config is untouched
    attention = [m for m in model.modules() if isinstance(m, transformers.models.clip.modeling_clip.CLIPAttention)]
    if report.families["attention"] == "enabled":
        assert {m.config._attn_implementation for m in attention} == {"clipfast"}


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_hf_single_tower_models_patched(tower):
    """CLIPVisionModelWithProjection (training, gradient checkpointing) and CLIPTextModel (padded batch)."""
    if tower == "vision":
        def build():  # training mode with gradient checkpointing (CLIP has no dropout by default)
            model = perturbed(transformers.CLIPVisionModelWithProjection(clip_config().vision_config)).train()
            model.gradient_checkpointing_enable()
            return model

        run = lambda m, px: (m(pixel_values=px).image_embeds,)  # noqa: E731
        inputs = [torch.randn(2, 3, 32, 32, dtype=torch.float64)]
    else:
        build = lambda: perturbed(transformers.CLIPTextModel(clip_config().text_config))  # noqa: E731
        run = lambda m, ids, mask: (m(input_ids=ids, attention_mask=mask).pooler_output,)  # noqa: E731
        inputs = list(text_inputs())
    mod = transformers.models.clip.modeling_clip
    check_patch(build, run, inputs, expected=expected_swaps(build(), mod.CLIPAttention, mod.CLIPMLP))


def test_hf_chinese_clip_patched():
    """ChineseCLIP: CLIP vision tower, post-LN BERT text tower (bidirectional padding mask, erf GELU)."""
    mod = transformers.models.chinese_clip.modeling_chinese_clip
    build = lambda: perturbed(transformers.ChineseCLIPModel(chinese_clip_config()))  # noqa: E731
    ids, mask = text_inputs()

    def run(model, pixels, ids, mask):
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        return out.image_embeds, out.text_embeds, out.logits_per_image

    # fp32 floor of 512 ulps of each tensor's scale (the default is 64): the gradient of `logit_scale` is a
    # sum of a few products g_ij * logit_ij of magnitude ~10 that cancels to 0.2..11 depending on the draw,
    # so its rounding error follows the terms, not the result. Measured over 10 draws (CLIPFAST_TEST_SEED
    # 0..9, torch 2.14 / triton 3.8 / transformers 5.24): eager's own error 3.9e-8..5.5e-6 (0.3..38 ulps
    # of the result), clipfast's 1.2e-7..4.1e-6, their ratio 0.04..5.1; the smallest result 0.21. The floor
    # lets an error as large as eager's own pass at the smallest result: 5.5e-6 / (0.21 * 2**-24) = 440
    # ulps. A wrong kernel is still off by 1e-3 and more.
    _, report = check_patch(build, run, [torch.randn(2, 3, 32, 32, dtype=torch.float64), ids, mask],
                            expected=expected_swaps(build(), (mod.ChineseCLIPTextSelfAttention, mod.ChineseCLIPVisionAttention),
                                                    mod.ChineseCLIPVisionMLP), floor_ulps=512.0)
    assert "vision_model.embeddings" in {s.path for s in report.swapped if s.family == "patch_embed"}, str(report)
    fused_outputs = {s.path for s in report.swapped if s.original in ("ChineseCLIPTextSelfOutput", "ChineseCLIPTextOutput")}
    assert len(fused_outputs) == 4  # 2 layers x (attention output, feed-forward output)


def test_hf_clipseg_patched():
    mod = transformers.models.clipseg.modeling_clipseg
    config = transformers.CLIPSegConfig(
        text_config=dict(TOWER, vocab_size=VOCAB, max_position_embeddings=16, eos_token_id=EOS, bos_token_id=1,
                         pad_token_id=0),
        vision_config=dict(TOWER, num_hidden_layers=3, image_size=32, patch_size=8), projection_dim=16,
        extract_layers=[1, 2], reduce_dim=16, decoder_num_attention_heads=2, decoder_intermediate_size=32)
    build = lambda: perturbed(transformers.CLIPSegForImageSegmentation(config))  # noqa: E731
    ids, mask = text_inputs(batch=2)

    def run(model, pixels, ids, mask):
        return (model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits,)

    expected = expected_swaps(build(), mod.CLIPSegAttention, mod.CLIPSegMLP)
    # the decoder's MLPs use ReLU, which the fused MLP does not implement: only the CLIP towers' MLPs swap
    expected["mlp"] = {p for p in expected["mlp"] if p.startswith("clip.")}
    # Parameter gradients are compared in the CLIP towers, where the kernels run. The decoder runs no clipfast
    # kernel (ReLU MLPs left alone, head dim 8 attention sent to sdpa); its gradients only amplify the
    # towers' rounding: in fp32, eager itself is ~300 ulps off there, and the patched/eager error ratio
    # scatters widely from one random draw to the next. The decoder's output, the logits, is still compared.
    _, report = check_patch(build, run, [torch.randn(2, 3, 32, 32, dtype=torch.float64), ids, mask], expected=expected,
                            grad_filter=lambda name: name.startswith("clip."))
    assert {s.path for s in report.skipped if s.family == "mlp"} >= {"decoder.layers.0.mlp", "decoder.layers.1.mlp"}


def test_hf_florence2_davit_vision_tower_patched():
    """Florence-2's DaViT vision tower: its LayerNorms (and MLPs where the MLP family takes them) swap."""
    mod = pytest.importorskip("transformers.models.florence2.modeling_florence2",
                              reason="this transformers version has no Florence-2")
    config = transformers.Florence2VisionConfig(
        depths=(1, 1), patch_size=(7, 3), patch_stride=(4, 2), patch_padding=(3, 1), patch_prenorm=(False, True),
        embed_dim=(32, 64), num_heads=(2, 4), num_groups=(2, 4), window_size=2, drop_path_rate=0.0, projection_dim=32)
    build = lambda: perturbed(mod.Florence2VisionBackbone(config))  # noqa: E731

    def run(model, pixels):
        out = model(pixels)
        return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0],)

    _, report = check_patch(build, run, [torch.randn(1, 3, 16, 16, dtype=torch.float64)],
                            expected=expected_swaps(build(), (), mod.Florence2VisionMLP))
    assert report.counts().get("layer_norm", 0) >= 4


def test_hf_registration_is_lazy_and_happens_on_import():
    """``import clipfast`` does not load transformers' modeling code (seconds of import time); the attention
    implementation is registered the moment transformers loads it, whichever is imported first."""
    import subprocess
    import sys

    script = (
        "import sys, clipfast\n"
        "assert 'transformers.modeling_utils' not in sys.modules\n"
        "from transformers import CLIPModel\n"
        "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS\n"
        "from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS\n"
        "assert 'clipfast' in ALL_ATTENTION_FUNCTIONS and 'clipfast' in ALL_MASK_ATTENTION_FUNCTIONS\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]

    # transformers' registry already loaded (this process): install() registers at once
    from clipfast.integrations import hf
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface._global_mapping.pop(hf.NAME, None)
    hf.install()
    assert AttentionInterface._global_mapping.get(hf.NAME) is hf.clipfast_attention_forward


def test_hf_clipfast_model_traces_with_fullgraph():
    """A CLIPModel with attn_implementation="clipfast", patched, traces with torch.compile(fullgraph=True):
    mask builder, attention function and swapped modules cause no graph break."""
    model = perturbed(transformers.CLIPModel(clip_config("clipfast"))).to(DEVICE)
    clipfast.patch(model)
    ids, mask = (t.to(DEVICE) for t in text_inputs())
    pixels = torch.randn(2, 3, 32, 32, device=DEVICE)

    def logits(ids, mask, pixels):
        return model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits_per_image

    expected = logits(ids, mask, pixels)
    compiled = torch.compile(logits, fullgraph=True, backend="eager" if not torch.cuda.is_available() else "inductor")
    torch.testing.assert_close(compiled(ids, mask, pixels), expected, rtol=1e-4, atol=1e-5)
