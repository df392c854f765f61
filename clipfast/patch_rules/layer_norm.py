"""LayerNorm rule: ``torch.nn.LayerNorm`` and its known subclasses -> the fused LayerNorm kernel.

Two output conventions exist in CLIP code and the replacement keeps each module's own:
- plain ``nn.LayerNorm`` (Hugging Face, timm, ...): returns the input dtype, except under CUDA autocast,
  where torch runs layer_norm in fp32 and returns fp32;
- the fp32-computing subclasses (OpenAI / Chinese-CLIP ``LayerNorm``, open_clip ``LayerNorm`` and
  ``LayerNormFp32``, the reference model's ``LayerNorm``): compute in fp32, return the input dtype.
The fused op computes its statistics in fp32 for every input dtype, so both are the same kernel.

Left alone (and reported): subclasses whose ``forward`` is not one of the above (their semantics are
unknown), and rows wider than the kernel keeps in registers.

BERT's post-LN output blocks (``dense -> dropout -> LayerNorm(h + residual)``: Hugging Face BERT and
ChineseCLIP's text tower, Chinese-CLIP's BERT) run the residual add and the LayerNorm as one fused
``add_layer_norm``; they are recognised by module and class name, so no optional package is imported.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from clipfast.dispatching import add_layer_norm
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


# ----------------------------------------------------------------------------------------------
# BERT post-LN output: dense -> dropout -> LayerNorm(h + residual)
# ----------------------------------------------------------------------------------------------

#: (module, class name) of the BERT output blocks with exactly that forward
BERT_OUTPUT_CLASSES = {
    ("transformers.models.chinese_clip.modeling_chinese_clip", "ChineseCLIPTextSelfOutput"),
    ("transformers.models.chinese_clip.modeling_chinese_clip", "ChineseCLIPTextOutput"),
    ("transformers.models.bert.modeling_bert", "BertSelfOutput"),
    ("transformers.models.bert.modeling_bert", "BertOutput"),
    ("cn_clip.clip.modeling_bert", "BertSelfOutput"),
    ("cn_clip.clip.modeling_bert", "BertOutput"),
}


def _bert_output_forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
    x = self.dropout(self.dense(hidden_states))
    dtype = torch.promote_types(x.dtype, input_tensor.dtype)
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.float32  # CUDA autocast runs layer_norm in fp32 and returns fp32
    norm = self.LayerNorm
    _, y = add_layer_norm(x.to(dtype), input_tensor.to(dtype), norm.weight, norm.bias, norm.eps)
    return y


def _match_bert_output(module: nn.Module) -> bool:
    cls = type(module)
    return (cls.__module__, cls.__name__) in BERT_OUTPUT_CLASSES


def _convert_bert_output(module: nn.Module) -> nn.Module:
    norm = getattr(module, "LayerNorm", None)
    if type(norm) is not nn.LayerNorm or len(norm.normalized_shape) != 1:
        raise Unsupported("its LayerNorm is not a plain nn.LayerNorm over the last dimension")
    if norm.normalized_shape[0] > kernel.MAX_COLS:
        raise Unsupported(f"{norm.normalized_shape[0]} features > {kernel.MAX_COLS}")
    cls = type(module)
    return clone_as(module, fast_subclass(cls, _bert_output_forward, f"Fast{cls.__name__}"))


register_rule(PatchRule(family="layer_norm", name="BERT output dense + residual LayerNorm -> fused add + LayerNorm",
                        match=_match_bert_output, convert=_convert_bert_output))
