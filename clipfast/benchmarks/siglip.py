"""SigLIP model benchmarks: Hugging Face ``SiglipModel`` at the dimensions of ``siglip-base-patch16-224``
(ViT-B/16, 224 px, 196 patches, batch 256) and ``siglip-so400m-patch14-384`` (SO400M/14, 384 px, 729
patches, batch 64), bf16, random weights: image encoding (inference: the vision tower with its
attention-pooling head) and a full training step (both towers, sigmoid loss, backward).

eager is what transformers users run today: the default ``sdpa`` attention and
``SiglipModel(..., return_loss=True)``. The patched side is ``clipfast.patch(model)`` (LayerNorm, attention,
gelu_tanh MLP, patch embedding with conv bias, pooling head) with ``clipfast.siglip_loss``. Without
transformers there are no cases; the smoke pass (CPU, interpreter) runs a tiny model.
"""
from __future__ import annotations

import importlib.util

import torch

import clipfast

from .harness import BenchCase
from .integrations import _Models, hf_model_fns

TEXT = dict(max_position_embeddings=64, vocab_size=32000)
DIMS = {
    "SigLIP ViT-B-16-224": dict(
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=224, patch_size=16),
        text=dict(TEXT, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)),
    "SigLIP SO400M-14-384": dict(
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=384, patch_size=14),
        text=dict(TEXT, hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16)),
    "tiny": dict(
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                    image_size=32, patch_size=8),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  max_position_embeddings=16, vocab_size=100)),
}
GPU_CONFIGS = [("SigLIP ViT-B-16-224", 256), ("SigLIP SO400M-14-384", 64)]
SMOKE_CONFIGS = [("tiny", 2)]


def _model(name: str):
    import transformers

    dims = DIMS[name]
    text = dict(dims["text"], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = transformers.SiglipConfig(text_config=text, vision_config=dims["vision"], attn_implementation="sdpa")
    return transformers.SiglipModel(config)


def _inputs(name: str, batch: int):
    dims = DIMS[name]
    size, context, vocab = dims["vision"]["image_size"], dims["text"]["max_position_embeddings"], dims["text"]["vocab_size"]

    def make(device, dtype):
        images = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
        tokens = torch.randint(3, vocab, (batch, context), device=device)  # SigLIP pads to the full length
        return {"images": images, "tokens": tokens}
    return make


def _fns(models: _Models):
    return hf_model_fns(
        models,
        lambda model, images: model.vision_model(pixel_values=images).pooler_output,  # SigLIP's image features
        lambda model, out: clipfast.siglip_loss(out.image_embeds, out.text_embeds, model.logit_scale,  # embeds
                                                model.logit_bias, normalize=False))  # already L2-normalized


def cases(smoke: bool):
    if importlib.util.find_spec("transformers") is None:
        return []
    found = []
    dtype = torch.float32 if smoke else torch.bfloat16
    for name, batch in SMOKE_CONFIGS if smoke else GPU_CONFIGS:
        encode, train_step = _fns(_Models("hf", name, build=_model))
        for label, make_fn, modes in (("image encoding", encode, ("fwd",)), ("training step", train_step, ("fwd+bwd",))):
            impls = {"clipfast": make_fn("clipfast"), "eager": make_fn("eager")}
            if not smoke:
                impls["clipfast+torch.compile"] = torch.compile(make_fn("clipfast"))
            found.append(BenchCase(family="siglip", name=f"{name} {label} B={batch}", dtype=dtype,
                                   make_inputs=_inputs(name, batch), impls=impls, compile_impl="eager", modes=modes,
                                   shape={"codebase": "hf", "model": name, "batch": batch}))
    return found
