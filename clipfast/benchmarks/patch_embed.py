"""Patch embedding + class token + positional embedding + ln_pre (the start of every CLIP image tower):
ViT-B/16 and ViT-L/14 at batch 256, against the op's eager reference (``clipfast.ops.patch_embed.
reference_patch_embed``: conv2d -> flatten -> cat -> add -> LayerNorm) and torch.compile of it. The pixels do
not require grad (training); the uint8 case feeds raw uint8 images with CLIP's mean/std folded in (the op's own
folding, ``patch_embed_args``), against the reference's normalize -> the same chain."""
import torch

import clipfast
from clipfast.ops.patch_embed import patch_embed_args, reference_patch_embed

from .harness import BenchCase

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SHAPES = {  # label -> (batch, image size, patch, width)
    "ViT-B/16 B=256 224px w768": (256, 224, 16, 768),
    "ViT-L/14 B=256 224px w1024": (256, 224, 14, 1024),
}
SMOKE_SHAPES = {"smoke B=2 32px p16 w64": (2, 32, 16, 64)}


LN_EPS = 1e-5  # the op's default, which the clipfast calls below use


def _eager(pixels, weight, cls, pos, ln_weight, ln_bias):
    return reference_patch_embed(pixels, weight, None, cls, pos, None, None, ln_weight, ln_bias, LN_EPS)


def _eager_uint8(pixels, weight, cls, pos, ln_weight, ln_bias, scale, shift):
    """``scale``/``shift``: CLIP's mean/std folded as the op folds them (made with the inputs, not timed)."""
    return reference_patch_embed(pixels, weight, None, cls, pos, scale, shift, ln_weight, ln_bias, LN_EPS)


def _fused(pixels, weight, cls, pos, ln_weight, ln_bias):
    return clipfast.patch_embed(pixels, weight, cls, pos, ln_weight=ln_weight, ln_bias=ln_bias)


def _fused_uint8(pixels, weight, cls, pos, ln_weight, ln_bias, scale, shift):
    return clipfast.patch_embed(pixels, weight, cls, pos, mean=CLIP_MEAN, std=CLIP_STD,
                                ln_weight=ln_weight, ln_bias=ln_bias)


def cases(smoke: bool):
    found = []
    for label, (batch, image, patch, width) in (SMOKE_SHAPES if smoke else SHAPES).items():
        dtype = torch.float32 if smoke else torch.bfloat16
        n_tokens = (image // patch) ** 2 + 1
        rows, K = batch * (n_tokens - 1), 3 * patch * patch
        for uint8 in (False, True):
            def make(device, dtype, batch=batch, image=image, patch=patch, width=width, n_tokens=n_tokens, uint8=uint8):
                if uint8:
                    pixels = torch.randint(0, 256, (batch, 3, image, image), dtype=torch.uint8, device=device)
                else:
                    pixels = torch.randn(batch, 3, image, image, device=device, dtype=dtype)
                param = lambda *shape, scale=0.02: (scale * torch.randn(*shape, device=device, dtype=dtype)).requires_grad_()  # noqa: E731
                inputs = {"pixels": pixels, "weight": param(width, 3, patch, patch), "cls": param(width),
                          "pos": param(n_tokens, width), "ln_weight": param(width, scale=1.0), "ln_bias": param(width)}
                if uint8:
                    folded = patch_embed_args(pixels, inputs["weight"], mean=CLIP_MEAN, std=CLIP_STD)
                    inputs["scale"], inputs["shift"] = folded[5:7]
                return inputs

            size = torch.finfo(dtype).bits // 8
            pixel_bytes = batch * 3 * image * image * (1 if uint8 else size)
            token_bytes = batch * n_tokens * width * size
            # fwd: read the pixels, write the tokens; bwd: read dtokens and the pixels again (weight gradient)
            traffic = {"fwd": pixel_bytes + token_bytes, "bwd": pixel_bytes + token_bytes}
            traffic["fwd+bwd"] = traffic["fwd"] + traffic["bwd"]
            gemm = 2.0 * rows * K * width
            found.append(BenchCase(
                family="patch_embed", name=f"{label}{' uint8' if uint8 else ''} +cls+pos+ln_pre", dtype=dtype,
                make_inputs=make,
                impls={"clipfast": _fused_uint8 if uint8 else _fused, "eager": _eager_uint8 if uint8 else _eager},
                flops=lambda mode, gemm=gemm: {"fwd": gemm, "bwd": gemm, "fwd+bwd": 2 * gemm}[mode],
                bytes=lambda mode, traffic=traffic: traffic[mode],
                shape={"batch": batch, "image": image, "patch": patch, "width": width, "uint8": uint8},
            ))
    return found
