"""Integrations with existing CLIP codebases.

- ``hf``: the ``"clipfast"`` attention implementation for Hugging Face transformers, registered on
  ``import clipfast`` (lazily: when transformers loads its attention registry).
- ``openai_clip``: importing OpenAI's ``clip`` package where ``pkg_resources`` is gone.

Module swaps for these codebases are patch rules (``clipfast/patch_rules/``): the family rules cover the
classes CLIP code shares (``nn.LayerNorm`` and its CLIP subclasses, ``nn.MultiheadAttention``, ...), and
``patch_rules/integrations_*.py`` the classes specific to one codebase.
"""
from . import hf, openai_clip

hf.install()

__all__ = ["hf", "openai_clip"]
