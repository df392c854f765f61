"""The contrastive loss as one data-parallel rank computes it: its 256 local pairs against the 32k gathered
features of all ranks (open_clip ``ClipLoss(local_loss=True, gather_with_grad=True)``), both directions.

``clipfast`` is ``clipfast.contrastive_cross_entropy`` per direction; ``eager`` is the op's eager reference
per direction (``clipfast.ops.contrastive_loss.reference_loss``: open_clip's ``logit_scale * local @
gathered.T`` in the features' dtype then cross-entropy in fp32 against ``arange(n) + rank * n``), which
materializes the [256, 32k] logits. Rows are reported under the ``contrastive_loss`` family.
"""
import torch
import torch.nn.functional as F

import clipfast
from clipfast.ops.contrastive_loss import CLIP, reference_loss

from .harness import BenchCase

SHAPES = [(256, 32768, 512), (256, 32768, 768)]  # local rows, gathered rows, feature dim
SMOKE_SHAPES = [(16, 64, 32)]
RANK = 2  # the rank whose pairs are local: its positives sit at offset RANK * local rows


def eager_local_loss(image, text, all_image, all_text, logit_scale, offset):
    return (reference_loss(image, all_text, logit_scale, None, CLIP, offset, False, False)
            + reference_loss(text, all_image, logit_scale, None, CLIP, offset, False, False)) / 2


def clipfast_local_loss(image, text, all_image, all_text, logit_scale, offset):
    return (clipfast.ops.contrastive_cross_entropy(image, all_text, logit_scale, label_offset=offset)
            + clipfast.ops.contrastive_cross_entropy(text, all_image, logit_scale, label_offset=offset)) / 2


def _make(n, m, d):
    def make(device, dtype):
        feats = {k: F.normalize(torch.randn(m, d, device=device), dim=-1).to(dtype).requires_grad_()
                 for k in ("all_image", "all_text")}
        # the local features: the rank's slice of the gathered ones, as leaves of their own
        local = {k: feats[f"all_{k}"][RANK * n:(RANK + 1) * n].detach().clone().requires_grad_()
                 for k in ("image", "text")}
        return {**local, **feats, "logit_scale": torch.tensor(100.0, device=device, requires_grad=True),
                "offset": RANK * n}
    return make


def cases(smoke: bool):
    dtype = torch.float32 if smoke else torch.bfloat16
    flops = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}  # per direction: logits, then the two feature gradients
    return [BenchCase(family="contrastive_loss", name=f"local loss N={n} M={m} d={d}", dtype=dtype,
                      make_inputs=_make(n, m, d), impls={"clipfast": clipfast_local_loss, "eager": eager_local_loss},
                      flops=lambda mode, n=n, m=m, d=d: 2 * flops[mode] * n * m * d,
                      shape={"n": n, "m": m, "d": d, "loss": "clip local"})
            for n, m, d in (SMOKE_SHAPES if smoke else SHAPES)]
