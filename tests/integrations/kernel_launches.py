"""Counting kernel launches: proof that a patched model ran clipfast's Triton kernels, not a fallback.

``count_launches(monkeypatch)`` wraps the launchers of ``clipfast.kernels`` (the functions the custom ops
call when a kernel runs, on a GPU or through the interpreter) and returns a ``Counter`` of launcher names,
with the activation appended for the MLP (``"mlp_fwd:gelu_tanh"``).
"""
from __future__ import annotations

from collections import Counter

LAUNCHERS = {
    "layer_norm": ("layer_norm_fwd", "layer_norm_bwd"),
    "attention": ("attention_fwd", "attention_bwd"),
    "mlp": ("mlp_fwd", "mlp_bwd"),
    "patch_embed": ("patch_embed_fwd", "patch_embed_bwd"),
}


def count_launches(monkeypatch) -> Counter:
    import importlib

    counts: Counter = Counter()
    for family, names in LAUNCHERS.items():
        module = importlib.import_module(f"clipfast.kernels.{family}")
        for name in names:
            launcher = getattr(module, name)

            def counting(*args, _launcher=launcher, _name=name, **kwargs):
                activation = kwargs.get("activation", args[6] if _name == "mlp_fwd" and len(args) > 6 else None)
                counts[f"{_name}:{activation}" if _name == "mlp_fwd" else _name] += 1
                return _launcher(*args, **kwargs)

            monkeypatch.setattr(module, name, counting)
    return counts
