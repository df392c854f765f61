"""Contrastive losses at large-batch CLIP training sizes: N = 4k..32k (64k where memory allows),
d = 512/768/1024, bf16 features, forward + backward time and peak memory.

``eager`` is the op's own eager reference (``clipfast.ops.contrastive_loss.reference_loss``: open_clip's
``ClipLoss`` / ``SigLipLoss`` formula, which materializes the N x N logits: products in the features' dtype,
the loss in fp32) on the
arguments open_clip passes: features normalized, ``logit_scale`` exponentiated. open_clip's own class, when
installed, is added as ``open_clip``; ``torch.compile`` of the eager reference is added by the harness.
"""
import torch
import torch.nn.functional as F

import clipfast
from clipfast.ops.contrastive_loss import CLIP, SIGLIP, reference_loss

from .harness import BenchCase

CLIP_SHAPES = [(n, d) for n in (4096, 16384, 32768) for d in (512, 768, 1024)]
SIGLIP_SHAPES = [(16384, 768)]
SMOKE_SHAPES = [(67, 64)]
# The local loss of one data-parallel rank (open_clip ``local_loss=True``): its N rows against the M
# gathered columns, one direction (the other is the same shape); rank 1, so the positives sit at N..2N.
LOCAL_SHAPES = [(n, m, d) for n, m in ((256, 32768), (512, 65536)) for d in (512, 768)]
LOCAL_SMOKE_SHAPES = [(5, 150, 64)]


def _big_memory_shapes() -> list:
    """64k pairs: the eager loss needs roughly 100 GB there; only where the GPU holds it."""
    if torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory > 120 * 2**30:
        return [(65536, 512)]
    return []


def eager_clip_loss(image, text, logit_scale):
    """open_clip ``ClipLoss`` on one GPU: both directions, nothing normalized here."""
    return reference_loss(image, text, logit_scale, None, CLIP, 0, True, False)


def eager_siglip_loss(image, text, logit_scale, logit_bias):
    """open_clip ``SigLipLoss`` on one GPU."""
    return reference_loss(image, text, logit_scale, logit_bias, SIGLIP, 0, False, False)


def eager_local_cross_entropy(queries, keys, logit_scale):
    """open_clip ``ClipLoss(local_loss=True)``, one direction: the rank's rows against all gathered columns
    (rank 1: the positives at N..2N)."""
    return reference_loss(queries, keys, logit_scale, None, CLIP, queries.shape[0], False, False)


def _make_local(n, m, d):
    def make(device, dtype):
        return {"queries": F.normalize(torch.randn(n, d, device=device), dim=-1).to(dtype).requires_grad_(),
                "keys": F.normalize(torch.randn(m, d, device=device), dim=-1).to(dtype).requires_grad_(),
                "logit_scale": torch.tensor(100.0, device=device, requires_grad=True)}
    return make


def _open_clip_impls(siglip: bool) -> dict:
    try:
        from open_clip.loss import ClipLoss, SigLipLoss
    except Exception:  # open_clip is optional
        return {}
    if siglip:
        fn = SigLipLoss()
        return {"open_clip": lambda image, text, logit_scale, logit_bias: fn(image, text, logit_scale, logit_bias)}
    fn = ClipLoss()
    return {"open_clip": lambda image, text, logit_scale: fn(image, text, logit_scale)}


def _make(n, d, siglip):
    def make(device, dtype):
        image = F.normalize(torch.randn(n, d, device=device), dim=-1).to(dtype).requires_grad_()
        text = F.normalize(torch.randn(n, d, device=device), dim=-1).to(dtype).requires_grad_()
        inputs = {"image": image, "text": text,
                  "logit_scale": torch.tensor(10.0 if siglip else 100.0, device=device, requires_grad=True)}
        if siglip:
            inputs["logit_bias"] = torch.tensor(-10.0, device=device, requires_grad=True)
        return inputs
    return make


def cases(smoke: bool):
    clip_module, siglip_module = clipfast.nn.ClipLoss(), clipfast.nn.SigLipLoss()
    dtype = torch.float32 if smoke else torch.bfloat16
    found = []
    # minimal matmul work: the logits (2 N^2 d) forward, the two feature gradients (4 N^2 d) backward
    flops = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}
    for n, d in SMOKE_SHAPES if smoke else CLIP_SHAPES + _big_memory_shapes():
        found.append(BenchCase(
            family="contrastive_loss", name=f"CLIP loss N={n} d={d}", dtype=dtype, make_inputs=_make(n, d, False),
            impls={"clipfast": lambda image, text, logit_scale: clip_module(image, text, logit_scale),
                   "eager": eager_clip_loss, **_open_clip_impls(False)},
            flops=lambda mode, n=n, d=d: flops[mode] * n * n * d, shape={"n": n, "d": d, "loss": "clip"},
        ))
    for n, d in SMOKE_SHAPES if smoke else SIGLIP_SHAPES:
        found.append(BenchCase(
            family="contrastive_loss", name=f"SigLIP loss N={n} d={d}", dtype=dtype, make_inputs=_make(n, d, True),
            impls={"clipfast": lambda image, text, logit_scale, logit_bias: siglip_module(image, text, logit_scale,
                                                                                          logit_bias),
                   "eager": eager_siglip_loss, **_open_clip_impls(True)},
            flops=lambda mode, n=n, d=d: flops[mode] * n * n * d, shape={"n": n, "d": d, "loss": "siglip"},
        ))
    for n, m, d in LOCAL_SMOKE_SHAPES if smoke else LOCAL_SHAPES:
        found.append(BenchCase(
            family="contrastive_loss", name=f"local CE N={n} M={m} d={d}", dtype=dtype, make_inputs=_make_local(n, m, d),
            impls={"clipfast": lambda queries, keys, logit_scale: clipfast.ops.contrastive_cross_entropy(
                       queries, keys, logit_scale, label_offset=queries.shape[0]),
                   "eager": eager_local_cross_entropy},
            flops=lambda mode, n=n, m=m, d=d: flops[mode] * n * m * d, shape={"n": n, "m": m, "d": d, "loss": "local"},
        ))
    return found
