"""Model-level benchmarks: image-encoding throughput (inference) and a full training step (forward,
contrastive loss, backward) of the reference CLIP, eager vs torch.compile vs clipfast-patched vs
clipfast-patched + torch.compile. The eager step's loss is the CLIP loss's eager reference
(``clipfast.ops.contrastive_loss.reference_loss``), the patched step's ``clipfast.clip_loss``."""
from __future__ import annotations

import torch

import clipfast
from clipfast.ops.contrastive_loss import CLIP, reference_loss

from .harness import BenchCase, compiled

GPU_CONFIGS = [("ViT-B-16", 256), ("ViT-L-14", 128)]
SMOKE_CONFIGS = [("tiny", 2)]


def _eager_loss(image_features, text_features, logit_scale):
    return reference_loss(image_features, text_features, logit_scale.exp().float(), None, CLIP, 0, True, True)


def _fast_loss(image_features, text_features, logit_scale):
    return clipfast.clip_loss(image_features, text_features, logit_scale)


class _Models:
    """Builds the eager and patched models once per (device, dtype), on first use."""

    def __init__(self, name: str):
        self.name, self.cache = name, {}

    @torch.compiler.disable  # built outside any compiled region: torch.compile traces only the step itself
    def get(self, which: str, device, dtype):
        key = (which, device, dtype)
        if key not in self.cache:
            torch.manual_seed(0)
            model = clipfast.models.create(self.name).to(device=device, dtype=dtype)
            if which == "clipfast":
                clipfast.patch(model)
            self.cache[key] = model
        return self.cache[key]


def _inputs(model_name: str, batch: int):
    def make(device, dtype):
        if model_name == "tiny":
            probe = clipfast.models.create(model_name)
            size, context, vocab = probe.visual.input_resolution, probe.context_length, probe.vocab_size
        else:  # OpenAI's dimensions
            size, context, vocab = (336 if model_name.endswith("336") else 224), 77, 49408
        images = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
        tokens = torch.randint(1, vocab - 1, (batch, context), device=device)
        tokens[:, -1] = vocab - 1
        return {"images": images, "tokens": tokens}
    return make


def cases(smoke: bool):
    found = []
    configs = SMOKE_CONFIGS if smoke else GPU_CONFIGS
    dtype = torch.float32 if smoke else torch.bfloat16
    for name, batch in configs:
        models = _Models(name)

        def encode(which, compile=False, models=models):
            def fn(images, tokens):
                model = models.get(which, images.device, images.dtype)
                return model.encode_image(images)
            return compiled(fn) if compile else fn

        def train_step(which, compile=False, models=models):
            loss_fn = _fast_loss if which == "clipfast" else _eager_loss

            def fn(images, tokens):
                model = models.get(which, images.device, images.dtype)
                return loss_fn(model.encode_image(images), model.encode_text(tokens), model.logit_scale)
            return compiled(fn) if compile else fn

        for label, make_fn, modes in (("image encoding", encode, ("fwd",)), ("training step", train_step, ("fwd+bwd",))):
            impls = {"clipfast": make_fn("clipfast"), "eager": make_fn("eager")}
            if not smoke:
                impls["clipfast+torch.compile"] = make_fn("clipfast", compile=True)
            found.append(BenchCase(family="model", name=f"{name} {label} B={batch}", dtype=dtype,
                                   make_inputs=_inputs(name, batch), impls=impls, compile_impl="eager",
                                   modes=modes, shape={"model": name, "batch": batch}))
    return found
