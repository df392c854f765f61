"""OpenAI CLIP (PyPI ``clip-anytorch``, module ``clip``).

Its model classes (seq-first ``nn.MultiheadAttention``, the fp32 ``LayerNorm`` subclass, QuickGELU MLP,
``AttentionPool2d``) are the ones clipfast's reference model mirrors, so the family rules patch them
directly. The one thing needed here is importing it: ``clip/clip.py`` does ``from pkg_resources import
packaging`` (only to compare torch versions), and current setuptools no longer ships ``pkg_resources``.
"""
from __future__ import annotations

import importlib
import sys
import types


def import_clip() -> types.ModuleType:
    """``import clip``, also where ``pkg_resources`` is gone: a stand-in exposing ``packaging`` is visible only
    while ``clip`` imports, so nothing else ever sees a fake ``pkg_resources``."""
    if "clip" in sys.modules:
        return sys.modules["clip"]
    try:
        import pkg_resources  # noqa: F401
        return importlib.import_module("clip")
    except ImportError:
        pass
    import packaging.version

    shim = types.ModuleType("pkg_resources")
    shim.packaging = packaging
    sys.modules["pkg_resources"] = shim
    try:
        return importlib.import_module("clip")
    finally:
        if sys.modules.get("pkg_resources") is shim:
            del sys.modules["pkg_resources"]
