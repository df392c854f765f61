"""Drop-in replacements for open_clip's ``ClipLoss`` and ``SigLipLoss`` running the fused losses.

Same constructor arguments, forward signature and results as open_clip (``open_clip/loss.py``),
including under ``torch.distributed``:

- ``logit_scale`` is the multiplier itself (open_clip exponentiates it in the model), unlike the
  functional ``clipfast.clip_loss`` which takes its log;
- features are expected normalized by the model, as in open_clip (nothing is normalized here);
- ``ClipLoss`` gathers features with an autograd-aware all_gather (gradients summed over ranks, as
  ``torch.distributed.nn.all_gather`` does) when ``gather_with_grad``, else with ``dist.all_gather``
  putting the local tensors back in place (gradients reach the local features only), as open_clip does. ``local_loss=True`` computes the rectangular
  loss of the local rows against all gathered columns (label offset ``rank * N``) without the
  (N x world_size * N) logits. Works with NCCL on GPUs and gloo on CPU.
- ``SigLipLoss`` computes the local images against the texts of all ranks (gathered with autograd-aware
  ``all_gather``), which equals open_clip's neighbour-exchange implementations: its loss is the sum over
  all text blocks divided by the local batch size, and text gradients flow back to their rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..dispatching import clip_loss_scaled, contrastive_cross_entropy, siglip_loss_scaled


class _AllGather(torch.autograd.Function):
    """All ranks' tensors concatenated along dim 0; the backward sums every rank's gradient of the
    result and hands each rank its own slice (what ``torch.distributed.nn.all_gather`` does)."""

    @staticmethod
    def forward(ctx, t):
        ctx.rank, ctx.world_size = dist.get_rank(), dist.get_world_size()
        parts = [torch.empty_like(t, memory_format=torch.contiguous_format) for _ in range(ctx.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        n = grad.shape[0] // ctx.world_size
        if dist.get_backend() == dist.Backend.NCCL:
            out = grad.new_empty((n, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad.contiguous())
            return out
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * n:(ctx.rank + 1) * n]


def _all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    return _AllGather.apply(t)


def _same_dtype(image_features, text_features):
    """Under autocast the two towers may hand over different float dtypes (eager matmuls would cast):
    compute in the wider one."""
    if image_features.dtype != text_features.dtype:
        dtype = torch.promote_types(image_features.dtype, text_features.dtype)
        return image_features.to(dtype), text_features.to(dtype)
    return image_features, text_features


def gather_features(image_features, text_features, local_loss=False, gather_with_grad=False, rank=0, world_size=1):
    """open_clip's ``gather_features`` (without horovod)."""
    if gather_with_grad:
        return _all_gather_with_grad(image_features), _all_gather_with_grad(text_features)
    gathered_image = [torch.zeros_like(image_features) for _ in range(world_size)]
    gathered_text = [torch.zeros_like(text_features) for _ in range(world_size)]
    dist.all_gather(gathered_image, image_features.contiguous())
    dist.all_gather(gathered_text, text_features.contiguous())
    if not local_loss:
        # the gathered copies carry no gradient: put the local tensors back so the local rows do
        gathered_image[rank] = image_features
        gathered_text[rank] = text_features
    return torch.cat(gathered_image, dim=0), torch.cat(gathered_text, dim=0)


class ClipLoss(torch.nn.Module):
    """open_clip's ``ClipLoss`` on the fused loss: ``(CE(s I T^T) + CE(s T I^T)) / 2`` over the batch
    (or, with ``local_loss``, over the local rows against all gathered columns)."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False):
        super().__init__()
        if use_horovod:
            raise ValueError("ClipLoss: horovod is not supported; use torch.distributed")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels  # labels are implicit in the kernel; kept for compatibility
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.prev_num_logits = 0
        self.labels = {}

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        image_features, text_features = _same_dtype(image_features, text_features)
        if self.world_size > 1:
            all_image, all_text = gather_features(image_features, text_features, self.local_loss,
                                                  self.gather_with_grad, self.rank, self.world_size)
            if self.local_loss:
                offset = self.rank * image_features.shape[0]
                loss = (contrastive_cross_entropy(image_features, all_text, logit_scale, offset)
                        + contrastive_cross_entropy(text_features, all_image, logit_scale, offset)) / 2
            else:
                loss = clip_loss_scaled(all_image, all_text, logit_scale)
        else:
            loss = clip_loss_scaled(image_features, text_features, logit_scale)
        if logit_bias is not None:
            # a bias shared by all logits cancels in the softmax: zero gradient, as in open_clip
            loss = loss + 0.0 * logit_bias.sum()
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(torch.nn.Module):
    """open_clip's ``SigLipLoss`` on the fused loss: ``-sum(logsigmoid(y * (s I T^T + b))) / N``."""

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: str | None = None,
                 bidir: bool = True, use_horovod: bool = False):
        super().__init__()
        if use_horovod:
            raise ValueError("SigLipLoss: horovod is not supported; use torch.distributed")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or ("bidir" if bidir else "shift")
        if self.dist_impl not in ("bidir", "shift", "reduce", "gather"):
            raise ValueError(f"SigLipLoss: unknown dist_impl {self.dist_impl!r}; expected bidir, shift, reduce or gather")
        self.bidir = bidir
        self.use_horovod = use_horovod
        self.prev_num_logits = 0
        self.labels = {}

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        image_features, text_features = _same_dtype(image_features, text_features)
        bias = logit_bias if logit_bias is not None else 0.0
        if self.world_size > 1:
            # every dist_impl of open_clip sums the same blocks: the local images against all texts
            all_text = _all_gather_with_grad(text_features)
            loss = siglip_loss_scaled(image_features, all_text, logit_scale, bias,
                                      label_offset=self.rank * image_features.shape[0])
        else:
            loss = siglip_loss_scaled(image_features, text_features, logit_scale, bias)
        return {"contrastive_loss": loss} if output_dict else loss
