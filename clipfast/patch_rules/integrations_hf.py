"""Hugging Face transformers rules.

attention: every attention module whose ``forward`` dispatches through transformers' attention interface
(``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``: CLIP, ChineseCLIP vision and BERT text towers,
CLIPSeg, SigLIP, ...) gets its own shallow copy of its config with ``_attn_implementation = "clipfast"``,
so it runs ``clipfast.flash_attention`` (see ``clipfast.integrations.hf``) while the rest of the model,
including mask building, keeps its configuration. The forward is the original one.

patch_embed: ChineseCLIP's vision embeddings (the same forward as CLIP's) take ``patch_embed.py``'s
rule for ``CLIPVisionEmbeddings``.

layer_norm: BERT's post-LN output blocks (``dense -> dropout -> LayerNorm(h + residual)``, ChineseCLIP's
text tower) run the residual add and the LayerNorm as one fused ``add_layer_norm``.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from clipfast.integrations import hf
from clipfast.ops import add_layer_norm
from clipfast.patch_rules.registry import PatchRule, Unsupported, clone_as, fast_subclass, register_rule

from . import patch_embed

# mask formats the clipfast function takes: the ones the sdpa and eager mask builders produce
_MASK_COMPATIBLE = (None, "eager", "sdpa", hf.NAME)


def _dispatches_attention_interface(module: nn.Module) -> bool:
    cls = type(module)
    if not cls.__module__.startswith("transformers.") or not hasattr(getattr(module, "config", None), "_attn_implementation"):
        return False
    code = getattr(cls.forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def _convert_attention(module: nn.Module) -> nn.Module:
    current = module.config._attn_implementation
    if current == hf.NAME:
        raise Unsupported('already runs attn_implementation="clipfast"')
    if current not in _MASK_COMPATIBLE:
        raise Unsupported(f"the model builds its masks for attn_implementation={current!r}")
    if not hf.register():
        raise Unsupported("this transformers version has no attention interface")
    cls = type(module)
    new = clone_as(module, fast_subclass(cls, cls.forward, f"Fast{cls.__name__}"))
    config = copy.copy(module.config)  # the copy is this module's alone; the model's config is untouched
    config._attn_implementation = hf.NAME
    new.config = config
    return new


register_rule(PatchRule(family="attention", name="transformers attention -> clipfast attention function",
                        match=_dispatches_attention_interface, convert=_convert_attention))


# ----------------------------------------------------------------------------------------------
# Vision embeddings with CLIPVisionEmbeddings' forward
# ----------------------------------------------------------------------------------------------

CLIP_LIKE_EMBEDDINGS = {("transformers.models.chinese_clip.modeling_chinese_clip", "ChineseCLIPVisionEmbeddings")}


def _match_embeddings(module: nn.Module) -> bool:
    cls = type(module)
    return (cls.__module__, cls.__name__) in CLIP_LIKE_EMBEDDINGS


register_rule(PatchRule(family="patch_embed", name="ChineseCLIP vision embeddings -> fused patch embedding",
                        match=_match_embeddings, convert=patch_embed._convert_hf))


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
    from clipfast.kernels import layer_norm as kernel

    if norm.normalized_shape[0] > kernel.MAX_COLS:
        raise Unsupported(f"{norm.normalized_shape[0]} features > {kernel.MAX_COLS}")
    cls = type(module)
    return clone_as(module, fast_subclass(cls, _bert_output_forward, f"Fast{cls.__name__}"))


register_rule(PatchRule(family="layer_norm", name="BERT output dense + residual LayerNorm -> fused add + LayerNorm",
                        match=_match_bert_output, convert=_convert_bert_output))
