"""Unpadded text rules (family ``unpad_text``): CLIP models whose text tower is pooled at one token get a
text encoding that computes only real tokens.

- The reference model, OpenAI ``clip`` and open_clip ``CLIP`` (causal, pooled at the end-of-text token):
  ``encode_text`` (``clipfast/unpad.py``).
- Hugging Face ``CLIPModel`` / ``ChineseCLIPModel`` (``get_text_features`` and ``forward``) and Chinese-CLIP
  ``CLIP`` (``encode_text``), whose towers take a padding mask (``clipfast/unpad_masked.py``).

Models are recognised by class name, so no optional package is imported. The model itself is the swapped
module: its class becomes a subclass overriding those methods only. ``clipfast.patch(model,
unpad_text=False)`` keeps the padded computation.
"""
from __future__ import annotations

import torch.nn as nn

from clipfast import unpad, unpad_masked
from clipfast.patch_rules.registry import PatchRule, Unsupported, clone_as, register_rule


def _match(module: nn.Module) -> bool:
    return unpad.tower_name(module) in unpad.TEXT_TOWERS and not hasattr(type(module), "_clipfast_unpadded_base")


def _convert(module: nn.Module) -> nn.Module:
    mode = unpad.text_mode(module)
    if mode is None:
        raise Unsupported("text tower is not causal and pooled at the end-of-text token")
    return clone_as(module, unpad.unpadded_class(type(module)))


register_rule(PatchRule(family="unpad_text", name="CLIP.encode_text -> unpadded text tower (real tokens only)",
                        match=_match, convert=_convert))


def _match_masked(module: nn.Module) -> bool:
    return unpad.tower_name(module) in unpad_masked.TOWERS and not hasattr(type(module), "_clipfast_unpadded_base")


def _convert_masked(module: nn.Module) -> nn.Module:
    reason = unpad_masked.unsupported_reason(module)
    if reason is not None:
        raise Unsupported(reason)
    return clone_as(module, unpad.unpadded_class(type(module)))


register_rule(PatchRule(family="unpad_text",
                        name="HF CLIP / ChineseCLIP get_text_features, cn_clip encode_text -> unpadded text tower",
                        match=_match_masked, convert=_convert_masked))
