"""End-to-end benchmarks on other codebases' models: open_clip and Hugging Face ``CLIPModel`` at ViT-B/16
(batch 256) and ViT-L/14 (batch 128) in bf16, image encoding (inference) and a full training step
(forward, contrastive loss, backward), each as eager, ``torch.compile``, clipfast-patched and
clipfast-patched + ``torch.compile``.

eager is what users of each codebase run today: open_clip's own ``ClipLoss``, and transformers' default
``sdpa`` attention with ``CLIPModel(..., return_loss=True)``. The patched side is ``clipfast.patch(model)``
with ``clipfast.nn.ClipLoss`` / ``clipfast.clip_loss``. A codebase that is not installed has no cases.
"""
from __future__ import annotations

import importlib.util

import torch

import clipfast

from .harness import BenchCase, compiled

GPU_CONFIGS = [("ViT-B-16", 256), ("ViT-L-14", 128)]
SMOKE_CONFIGS = [("tiny", 2)]

# Hugging Face CLIPConfig arguments with OpenAI's dimensions (and a tiny one for the smoke pass)
HF_DIMS = {
    "ViT-B-16": dict(vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                 image_size=224, patch_size=16),
                     text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
                     projection_dim=512),
    "ViT-L-14": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                 image_size=224, patch_size=14),
                     text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
                     projection_dim=768),
    "tiny": dict(vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
                             image_size=32, patch_size=8),
                 text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1),
                 projection_dim=32),
}
TEXT_SHAPE = {"tiny": (16, 100)}  # context length, vocabulary (default: CLIP's 77, 49408)


def _open_clip_model(name: str):
    import open_clip

    if name == "tiny":
        return open_clip.create_model("ViT-B-32-quickgelu", pretrained=None, embed_dim=32,
                                      vision_cfg=dict(layers=1, width=64, head_width=64, image_size=32, patch_size=8),
                                      text_cfg=dict(context_length=16, vocab_size=100, width=64, heads=1, layers=1))
    return open_clip.create_model(name, pretrained=None)


def _hf_model(name: str):
    import transformers

    dims = HF_DIMS[name]
    context, vocab = TEXT_SHAPE.get(name, (77, 49408))
    config = transformers.CLIPConfig(
        text_config=dict(dims["text"], max_position_embeddings=context, vocab_size=vocab, eos_token_id=vocab - 1),
        vision_config=dims["vision"], projection_dim=dims["projection_dim"], attn_implementation="sdpa")
    return transformers.CLIPModel(config)


BUILDERS = {"open_clip": ("open_clip", _open_clip_model), "hf": ("transformers", _hf_model)}


class _Models:
    """The eager and patched model of one codebase and size, built once per (device, dtype) on first use
    (``build(name)`` instead of the codebase's builder when given)."""

    def __init__(self, codebase: str, name: str, build=None):
        self.build, self.name, self.cache = build or BUILDERS[codebase][1], name, {}

    @torch.compiler.disable  # built outside any compiled region: torch.compile traces only the step itself
    def get(self, which: str, device, dtype):
        key = (which, device, dtype)
        if key not in self.cache:
            torch.manual_seed(0)
            model = self.build(self.name).to(device=device, dtype=dtype)
            if which == "clipfast":
                clipfast.patch(model)
            self.cache[key] = model
        return self.cache[key]


def _inputs(name: str, batch: int, size: int):
    context, vocab = TEXT_SHAPE.get(name, (77, 49408))

    def make(device, dtype):
        images = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
        tokens = torch.randint(1, vocab - 1, (batch, context), device=device)
        tokens[:, -1] = vocab - 1  # EOT last (the highest id)
        return {"images": images, "tokens": tokens}
    return make


def _open_clip_fns(models):
    import open_clip

    losses = {"eager": open_clip.loss.ClipLoss(), "clipfast": clipfast.nn.ClipLoss()}

    def encode(which):
        def fn(images, tokens):
            return models.get(which, images.device, images.dtype).encode_image(images)
        return fn

    def train_step(which):
        def fn(images, tokens):
            model = models.get(which, images.device, images.dtype)
            image_features, text_features, logit_scale = model(images, tokens)[:3]
            return losses[which](image_features, text_features, logit_scale)
        return fn

    return encode, train_step


def hf_model_fns(models, image_features, clipfast_loss):
    """Encode and train-step functions of a Hugging Face dual-encoder: ``image_features(model, images)`` gives
    the image features, ``clipfast_loss(model, out)`` the patched model's loss from its outputs (the eager
    model computes its own with ``return_loss=True``). Shared by the CLIP and SigLIP families."""
    def encode(which):
        def fn(images, tokens):
            return image_features(models.get(which, images.device, images.dtype), images)
        return fn

    def train_step(which):
        def fn(images, tokens):
            model = models.get(which, images.device, images.dtype)
            if which == "eager":
                return model(input_ids=tokens, pixel_values=images, return_loss=True).loss
            return clipfast_loss(model, model(input_ids=tokens, pixel_values=images))
        return fn

    return encode, train_step


def _hf_fns(models):
    return hf_model_fns(
        models,
        lambda model, images: model.visual_projection(model.vision_model(pixel_values=images).pooler_output),
        lambda model, out: clipfast.clip_loss(out.image_embeds, out.text_embeds, model.logit_scale))


def cases(smoke: bool):
    found = []
    configs = SMOKE_CONFIGS if smoke else GPU_CONFIGS
    dtype = torch.float32 if smoke else torch.bfloat16
    for codebase, fns in (("open_clip", _open_clip_fns), ("hf", _hf_fns)):
        if importlib.util.find_spec(BUILDERS[codebase][0]) is None:
            continue
        for name, batch in configs:
            models = _Models(codebase, name)
            encode, train_step = fns(models)
            size = HF_DIMS[name]["vision"]["image_size"]
            for label, make_fn, modes in (("image encoding", encode, ("fwd",)),
                                          ("training step", train_step, ("fwd+bwd",))):
                impls = {"clipfast": make_fn("clipfast"), "eager": make_fn("eager")}
                if not smoke:
                    impls["clipfast+torch.compile"] = compiled(make_fn("clipfast"))
                found.append(BenchCase(family="integrations", name=f"{codebase} {name} {label} B={batch}",
                                       dtype=dtype, make_inputs=_inputs(name, batch, size), impls=impls,
                                       compile_impl="eager", modes=modes,
                                       shape={"codebase": codebase, "model": name, "batch": batch}))
    return found
