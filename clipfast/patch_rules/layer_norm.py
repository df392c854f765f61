"""LayerNorm rule: ``torch.nn.LayerNorm`` and its known subclasses -> the fused LayerNorm kernel.

Two output conventions exist in CLIP code and the replacement keeps each module's own:
- plain ``nn.LayerNorm`` (Hugging Face, timm, ...): returns the input dtype, except under CUDA autocast,
  where torch runs layer_norm in fp32 and returns fp32;
- the fp32-computing subclasses (OpenAI / Chinese-CLIP ``LayerNorm``, open_clip ``LayerNorm`` and
  ``LayerNormFp32``, the reference model's ``LayerNorm``): compute in fp32, return the input dtype.
The fused op computes its statistics in fp32 for every input dtype, so both are the same kernel.

Left alone (and reported): subclasses whose ``forward`` is not one of the above (their semantics are
unknown), and rows wider than the kernel keeps in registers.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from clipfast.kernels import layer_norm as kernel
from clipfast.nn import LayerNorm as FastLayerNorm
from clipfast.patch_rules.registry import PatchRule, Unsupported, clone_as, fast_subclass, register_rule

#: Subclasses of nn.LayerNorm (by ``module.qualname``) that compute in fp32 and return the input dtype.
INPUT_DTYPE_SUBCLASSES = {
    "clipfast.models.model.LayerNorm",
    "clip.model.LayerNorm",
    "cn_clip.clip.model.LayerNorm",
    "open_clip.transformer.LayerNorm",
    "open_clip.transformer.LayerNormFp32",
}


def _forward_input_dtype(self, x: torch.Tensor) -> torch.Tensor:
    return FastLayerNorm.forward(self, x)


def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        x = x.float()  # CUDA autocast runs layer_norm in fp32 and returns fp32
    return FastLayerNorm.forward(self, x)


def _match(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) and not isinstance(module, FastLayerNorm)


def _convert(module: nn.Module) -> nn.Module:
    cls = type(module)
    if f"{cls.__module__}.{cls.__qualname__}" in INPUT_DTYPE_SUBCLASSES:
        forward = _forward_input_dtype
    elif cls.forward is nn.LayerNorm.forward:
        forward = _forward_torch
    else:
        raise Unsupported(f"{cls.__module__}.{cls.__qualname__} overrides forward with unknown semantics")
    n = math.prod(module.normalized_shape)
    if n > kernel.MAX_COLS:
        raise Unsupported(f"{n} features > {kernel.MAX_COLS}, wider than the kernel keeps in registers")
    return clone_as(module, fast_subclass(cls, forward, f"Fast{cls.__name__}"))


register_rule(PatchRule(family="layer_norm", name="LayerNorm -> fused LayerNorm", match=_match, convert=_convert))
