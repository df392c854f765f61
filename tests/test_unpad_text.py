"""Unpadded text towers (``clipfast.patch(model, unpad_text=True)``, the default): patched ``encode_text``
computing only real tokens vs the unpatched padded model, forward and every parameter gradient against a
float64 reference, for the reference model, OpenAI clip and open_clip."""
import copy

import pytest
import torch

import clipfast
from clipfast import models, unpad

from .conftest import DEVICE
from .integrations.common import check_patch, perturbed

CONTEXT, VOCAB = 77, 50
TINY = dict(embed_dim=16, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
            context_length=CONTEXT, vocab_size=VOCAB, transformer_width=32, transformer_heads=2, transformer_layers=2)


def prompts(lengths):
    """Token ids with the end-of-text token (the largest id) at ``length - 1``, zeros after it."""
    text = torch.randint(1, VOCAB - 1, (len(lengths), CONTEXT))
    for i, n in enumerate(lengths):
        text[i, n - 1] = VOCAB - 1
        text[i, n:] = 0
    return text


BATCHES = {
    "mixed": [9, 1, 77, 5, 13],
    "all-77": [77, 77],
    "one-long-many-short": [77] + [3, 2, 4, 6, 2, 5, 3],
}


def perturbed_eval(model):
    return perturbed(model).eval()


def reference_model():
    return perturbed_eval(models.CLIP(**TINY))


def openai_model():
    from clipfast.integrations.openai_clip import import_clip

    try:
        clip = import_clip()
    except ImportError as e:
        pytest.skip(f"OpenAI clip is not installed ({e})")
    return perturbed_eval(clip.model.CLIP(**TINY))


def open_clip_model(**text):
    open_clip = pytest.importorskip("open_clip")
    return perturbed_eval(open_clip.create_model(
        "ViT-B-32-quickgelu", pretrained=None, embed_dim=16,
        vision_cfg=dict(layers=1, width=32, head_width=16, image_size=32, patch_size=16),
        text_cfg=dict(context_length=CONTEXT, vocab_size=VOCAB, width=32, heads=2, layers=2, **text)))


BUILDERS = {"reference": reference_model, "openai": openai_model, "open_clip": open_clip_model}


def encode_text(model, text):
    return model.encode_text(text)


@pytest.mark.parametrize("codebase,batch", [("reference", "mixed"), ("reference", "all-77"),
                                            ("reference", "one-long-many-short"), ("openai", "mixed"),
                                            ("open_clip", "one-long-many-short")])
def test_unpadded_encode_text_matches_float64(codebase, batch, monkeypatch):
    calls = []
    packed = unpad._unpadded_features
    monkeypatch.setattr(unpad, "_unpadded_features", lambda *a: calls.append(1) or packed(*a))
    model, report = check_patch(BUILDERS[codebase], encode_text, [prompts(BATCHES[batch]).to(DEVICE)],
                                expected={"unpad_text": {""}})
    assert calls, "the unpadded path did not run"
    assert type(model).__name__.startswith("Unpadded")


def test_open_clip_fp16():
    # (the reference and OpenAI LayerNorms compute in fp32 and need fp32 LayerNorm parameters on CPU)
    check_patch(open_clip_model, encode_text, [prompts([9, 77, 1]).to(DEVICE)], dtype=torch.float16)


def test_open_clip_truncates_when_blocks_checkpoint(monkeypatch):
    calls = []
    truncated = unpad._truncated_features
    monkeypatch.setattr(unpad, "_truncated_features", lambda *a: calls.append(a[1].shape) or truncated(*a))

    def build():
        model = open_clip_model(ls_init_value=0.1)
        model.set_grad_checkpointing(True)
        return model

    check_patch(build, encode_text, [prompts([9, 1, 12]).to(DEVICE)])
    assert calls


def test_open_clip_eos_pooling_and_normalize():
    model = open_clip_model(pool_type="eos", eos_id=VOCAB - 1)
    text = prompts([9, 1, 12]).to(DEVICE)
    text[0, 3] = VOCAB - 2  # a larger id before the eos: eos pooling, not argmax
    fast = copy.deepcopy(model)
    clipfast.patch(fast)
    assert type(fast).__name__ == "UnpaddedCLIP"
    torch.testing.assert_close(fast.encode_text(text, normalize=True), model.encode_text(text, normalize=True))


def test_open_clip_non_causal_or_first_token_pooling_is_left_alone():
    report = clipfast.patch(open_clip_model(no_causal_mask=True))
    assert not [s for s in report.swapped if s.family == "unpad_text"]
    assert [s for s in report.skipped if s.family == "unpad_text"]
    report = clipfast.patch(open_clip_model(pool_type="last"))
    assert not [s for s in report.swapped if s.family == "unpad_text"]


def test_unpad_text_false_keeps_the_padded_computation(monkeypatch):
    model = reference_model()
    report = clipfast.patch(model, unpad_text=False)
    assert report.families["unpad_text"] == "disabled" and type(model) is models.CLIP
    monkeypatch.setattr(unpad, "flash_attention_varlen", None)  # must not be reached
    model.encode_text(prompts([3, 5]).to(DEVICE))


def test_blocks_with_forward_hooks_run_themselves(monkeypatch):
    """Hooks on a block (FSDP2's all-gather, checkpointing, a user's) run only when the block is called: the
    packed path, which calls its submodules, steps aside for the padded computation."""
    model, text = reference_model(), prompts([3, 5]).to(DEVICE)
    expected = model.encode_text(text)
    clipfast.patch(model)
    calls = []
    model.transformer.resblocks[1].register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    monkeypatch.setattr(unpad, "flash_attention_varlen", None)  # must not be reached
    torch.testing.assert_close(model.encode_text(text), expected, rtol=1e-4, atol=1e-5)
    assert calls


def test_unpatch_restores_and_patched_model_pickles():
    model = reference_model()
    text = prompts([4, 20]).to(DEVICE)
    expected = model.encode_text(text)
    clipfast.patch(model)
    clone = copy.deepcopy(model)
    assert type(clone).__name__ == "UnpaddedCLIP"
    torch.testing.assert_close(clone.encode_text(text), expected)
    clipfast.unpatch(model)
    assert type(model) is models.CLIP


def test_torch_compile_runs_the_padded_graph_without_graph_breaks():
    model = reference_model()
    text = prompts([4, 20, 77]).to(DEVICE)
    expected = model.encode_text(text)
    clipfast.patch(model, layer_norm=False, mlp=False, patch_embed=False)
    torch._dynamo.reset()
    compiled = torch.compile(model.encode_text, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(text), expected)


def test_pack_offsets_and_positions():
    text = prompts([3, 1, 5])
    ids, positions, cu, longest = unpad.pack(text, text.argmax(-1) + 1)
    assert cu.tolist() == [0, 3, 4, 9] and cu.dtype == torch.int32 and longest == 5
    assert positions.tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4]
    assert torch.equal(ids, torch.cat([text[0, :3], text[1, :1], text[2, :5]]))


def test_bench_text_counts_match_the_flop_counter_and_the_packed_tokens():
    from torch.utils.flop_counter import FlopCounterMode

    from clipfast.benchmarks import text as bench

    model = reference_model()
    lengths = [9, 1, 77, 5]
    text = prompts(lengths)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.encode_text(text)  # padded (unpatched): torch's counter sees the linear layers, not attention
    dims = dict(width=32, layers=2, embed=16, context=CONTEXT)
    attention = dims["layers"] * sum(2 * 32 * n * (n + 1) for n in [CONTEXT] * len(lengths))
    assert counter.get_total_flops() == bench.text_tower_flops([CONTEXT] * len(lengths), **dims) - attention
    counts = bench.count(lengths, dims)
    assert counts["unpadded"]["tokens"] == sum(lengths) == unpad.pack(text, text.argmax(-1) + 1)[0].numel()
    assert counts["truncated"]["tokens"] == 77 * 4 and counts["padded"]["tokens"] == 77 * 4
    assert bench.count([CONTEXT] * 3, dims)["unpadded"]["padded_over_this_flops"] == 1.0
    assert sum(bench.sample_lengths(bench.IMAGENET_PROMPT_LENGTHS, 64)) < 64 * 23
