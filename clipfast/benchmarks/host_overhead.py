"""Host overhead per op call: the CPU time one call of each clipfast op costs at a tiny shape, against the
plain PyTorch call it replaces, launches queued without synchronizing (mode ``host``). At tiny shapes the
GPU finishes each kernel before the next launch, so the figure is what the host pays per call: argument
checks, custom-op dispatch, autograd bookkeeping and the Triton launcher.

Target (GUIDE §3): at most 2x the plain PyTorch call, and at most 20 µs on a GPU host.
"""
import torch
import torch.nn.functional as F

import clipfast

from .harness import BenchCase
from .mlp import _eager as _eager_mlp
from .mlp import _quick_gelu


def _tensors(device, dtype, **shapes):
    return {name: torch.randn(*shape, device=device, dtype=dtype, requires_grad=True) for name, shape in shapes.items()}


def _attention_inputs(device, dtype):
    return _tensors(device, dtype, q=(1, 2, 16, 64), k=(1, 2, 16, 64), v=(1, 2, 16, 64))


def _loss_inputs(device, dtype):
    inputs = {k: F.normalize(v.detach(), dim=-1).requires_grad_()
              for k, v in _tensors(device, dtype, image=(8, 64), text=(8, 64)).items()}
    inputs["logit_scale"] = torch.tensor(4.6, device=device, requires_grad=True)
    return inputs


def _eager_clip_loss(image, text, logit_scale):
    logits = logit_scale.exp() * image @ text.T
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.T.float(), labels)) / 2


OPS = {  # label -> (make_inputs, clipfast, plain PyTorch)
    "layer_norm 8x64": (lambda device, dtype: _tensors(device, dtype, x=(8, 64), weight=(64,), bias=(64,)),
                        lambda x, weight, bias: clipfast.layer_norm(x, weight, bias),
                        lambda x, weight, bias: F.layer_norm(x, (64,), weight, bias)),
    "quick_gelu 8x64": (lambda device, dtype: _tensors(device, dtype, x=(8, 64)), clipfast.quick_gelu, _quick_gelu),
    "mlp 8x64->256": (lambda device, dtype: _tensors(device, dtype, x=(8, 64), w1=(256, 64), b1=(256,), w2=(64, 256),
                                                     b2=(64,)),
                      lambda x, w1, b1, w2, b2: clipfast.mlp(x, w1, b1, w2, b2, "quick_gelu"), _eager_mlp),
    "flash_attention 1x2x16x64": (_attention_inputs, lambda q, k, v: clipfast.flash_attention(q, k, v),
                                  lambda q, k, v: F.scaled_dot_product_attention(q, k, v)),
    "clip_loss 8x64": (_loss_inputs, lambda image, text, logit_scale: clipfast.clip_loss(image, text, logit_scale),
                       _eager_clip_loss),
}


def cases(smoke: bool):
    # the same tiny shapes in the smoke pass: they are already cheap through the interpreter
    dtype = torch.float32 if smoke else torch.bfloat16
    return [BenchCase(family="host_overhead", name=label, dtype=dtype, make_inputs=make,
                      impls={"clipfast": fast, "eager": plain}, compile_impl=None, modes=("host",),
                      shape={"op": label.split()[0]})
            for label, (make, fast, plain) in OPS.items()]
