"""Integrations with existing CLIP codebases: everything about one library in one home.

- ``hf/``: Hugging Face transformers. The ``"clipfast"`` attention implementation (``hf/__init__.py``,
  registered on ``import clipfast``, lazily: when transformers loads its attention registry), the rules for
  transformers' classes (``hf/rules.py``: attention modules, ChineseCLIP and SigLIP embeddings, SigLIP's
  pooling heads) and the unpadded text towers of CLIP / ChineseCLIP (``hf/unpad.py``).
- ``open_clip``: the rule for open_clip's own ``Attention`` class.
- ``openai_clip``: importing OpenAI's ``clip`` package where ``pkg_resources`` is gone.
- ``cn_clip``: Chinese-CLIP's rules (BERT self-attention, ``VisualTransformer``) and unpadded ``encode_text``.
- ``timm``: the rules for timm's ViT modules (open_clip's timm towers).

The family rules (``clipfast/patch_rules/``) cover the classes CLIP code shares (``nn.LayerNorm`` and its
CLIP subclasses, ``nn.MultiheadAttention``, ...), recognising library classes by name where the code is
shared; ``clipfast.patch_rules.load()`` imports the rules modules here with them. Nothing here imports an
integrated library at import time.
"""
from . import hf, openai_clip

hf.install()

__all__ = ["hf", "openai_clip"]
