"""Unpadded text rule (family ``unpad_text``): CLIP models whose text tower is pooled at one token get a
text encoding that computes only real tokens.

Here: the reference model, OpenAI ``clip`` and open_clip ``CLIP`` (causal, pooled at the end-of-text token):
``encode_text`` (``clipfast/unpad.py``). The towers that take a padding mask have their rules with their
library: Hugging Face ``CLIPModel`` / ``CLIPTextModelWithProjection`` / ``ChineseCLIPModel``
(``clipfast/integrations/hf/rules.py``) and Chinese-CLIP ``CLIP`` (``clipfast/integrations/cn_clip.py``).

Models are recognised by class name, so no optional package is imported. The model itself is the swapped
module: its class becomes a subclass overriding those methods only. ``clipfast.patch(model,
unpad_text=False)`` keeps the padded computation.
"""
from __future__ import annotations

import torch.nn as nn

from clipfast import unpad
from clipfast.patch_rules.registry import PatchRule, Unsupported, clone_as, register_rule


def _match(module: nn.Module) -> bool:
    return unpad.tower_name(module) in unpad.TEXT_TOWERS and not hasattr(type(module), "_clipfast_unpadded_base")


def _convert(module: nn.Module) -> nn.Module:
    mode = unpad.text_mode(module)
    if mode is None:
        raise Unsupported("text tower is not causal and pooled at the end-of-text token")
    return clone_as(module, unpad.unpadded_class(type(module), unpad.CAUSAL_METHODS))


register_rule(PatchRule(family="unpad_text", name="CLIP.encode_text -> unpadded text tower (real tokens only)",
                        match=_match, convert=_convert))

