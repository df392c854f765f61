"""Chinese-CLIP (``cn_clip``): a tiny random-init ViT + BERT model, patched vs unpatched, and in fp16 after
its own ``convert_weights``."""
import pytest
import torch
import torch.nn as nn

from .common import check_patch, paths_of

cn_model = pytest.importorskip("cn_clip.clip.model", reason="cn_clip is not installed; `pip install -e .[integrations]`")

VOCAB, LENGTH = 100, 12


def tiny():
    model = cn_model.CLIP(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
                          vocab_size=VOCAB, text_attention_probs_dropout_prob=0.0, text_hidden_act="gelu",
                          text_hidden_dropout_prob=0.0, text_hidden_size=32, text_initializer_range=0.02,
                          text_intermediate_size=64, text_max_position_embeddings=16, text_num_attention_heads=2,
                          text_num_hidden_layers=2, text_type_vocab_size=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def tokens(batch=3):
    ids = torch.randint(1, VOCAB, (batch, LENGTH))
    for i, n in enumerate([LENGTH, 7, 3][:batch]):
        ids[i, n:] = 0  # [PAD] is id 0: padded keys are masked with -10000
    return ids


def run(model, image, text):
    image_features, text_features, scale = model(image, text)
    return image_features, text_features, scale * image_features @ text_features.t()


def expected_swaps(model):
    bert = "cn_clip.clip.modeling_bert"
    return {"layer_norm": paths_of(model, lambda m: isinstance(m, nn.LayerNorm)),
            "patch_embed": {"visual"},
            "attention": paths_of(model, lambda m: isinstance(m, nn.MultiheadAttention)
                                  or (type(m).__module__, type(m).__name__) == (bert, "BertSelfAttention"))}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cn_clip_patched_matches_unpatched(dtype):
    image = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    def cast(model, dt):  # fp16: Chinese-CLIP's own conversion (the BERT entirely in fp16)
        if dt == torch.float16:
            cn_model.convert_weights(model)
        return model

    _, report = check_patch(tiny, run, [image, tokens()], dtype=dtype, cast=cast, expected=expected_swaps(tiny()))
    originals = {s.original for s in report.swapped}
    assert {"BertSelfAttention", "BertSelfOutput", "BertOutput"} <= originals, str(report)
