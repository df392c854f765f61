"""Reference OpenAI-style CLIP models (plain PyTorch): the eager baseline for clipfast's kernels.

``create(name)`` builds a randomly initialized model with OpenAI's dimensions; ``build_model(state_dict)``
builds one from an OpenAI checkpoint's ``state_dict``.
"""
from __future__ import annotations

from typing import Any

from .model import (CLIP, AttentionPool2d, Bottleneck, LayerNorm, ModifiedResNet, QuickGELU, ResidualAttentionBlock,
                    Transformer, VisionTransformer, build_model, convert_weights)

# CLIP constructor arguments of OpenAI's released models, and small configurations for tests.
CONFIGS: dict[str, dict[str, Any]] = {
    "RN50": dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64),
    "RN101": dict(embed_dim=512, image_resolution=224, vision_layers=(3, 4, 23, 3), vision_width=64),
    "RN50x4": dict(embed_dim=640, image_resolution=288, vision_layers=(4, 6, 10, 6), vision_width=80,
                   transformer_width=640, transformer_heads=10),
    "RN50x16": dict(embed_dim=768, image_resolution=384, vision_layers=(6, 8, 18, 8), vision_width=96,
                    transformer_width=768, transformer_heads=12),
    "RN50x64": dict(embed_dim=1024, image_resolution=448, vision_layers=(3, 15, 36, 10), vision_width=128,
                    transformer_width=1024, transformer_heads=16),
    "ViT-B-32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32),
    "ViT-B-16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16),
    "ViT-L-14": dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024, vision_patch_size=14,
                     transformer_width=768, transformer_heads=12),
    "ViT-L-14-336": dict(embed_dim=768, image_resolution=336, vision_layers=24, vision_width=1024,
                         vision_patch_size=14, transformer_width=768, transformer_heads=12),
    # Tests: a few interpreter-sized blocks with CLIP's head dim 64 and awkward token counts
    # (4 x 4 patches + class token = 17 image tokens, 13 text tokens).
    "tiny": dict(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=8,
                 context_length=13, vocab_size=101, transformer_width=128, transformer_heads=2, transformer_layers=2),
    "tiny-RN": dict(embed_dim=64, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=8,
                    context_length=13, vocab_size=101, transformer_width=128, transformer_heads=2,
                    transformer_layers=2),
}
_TEXT_DEFAULTS = dict(vision_patch_size=None, context_length=77, vocab_size=49408, transformer_width=512,
                      transformer_heads=8, transformer_layers=12)
# OpenAI's own spellings
_ALIASES = {"ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14", "ViT-L/14@336px": "ViT-L-14-336"}


def available_models() -> list[str]:
    """Names ``create`` accepts (OpenAI's spellings such as ``"ViT-B/32"`` work too)."""
    return list(CONFIGS)


def model_config(name: str) -> dict[str, Any]:
    """The full ``CLIP`` constructor arguments of a named model."""
    key = _ALIASES.get(name, name)
    if key not in CONFIGS:
        raise ValueError(f"clipfast.models: unknown model {name!r}; available: {', '.join(available_models())}")
    return {**_TEXT_DEFAULTS, **CONFIGS[key]}


def create(name: str, **overrides: Any) -> CLIP:
    """A randomly initialized reference CLIP with the dimensions of ``name`` (``available_models()``),
    fp32, in training mode. Keyword arguments override constructor arguments (e.g. ``context_length``).
    Build under ``torch.device("meta")`` to inspect a large model without allocating it."""
    config = model_config(name)
    unknown = set(overrides) - set(config)
    if unknown:
        raise TypeError(f"clipfast.models.create: unknown argument(s) {', '.join(sorted(unknown))}")
    return CLIP(**{**config, **overrides})


__all__ = ["CLIP", "AttentionPool2d", "Bottleneck", "LayerNorm", "ModifiedResNet", "QuickGELU",
           "ResidualAttentionBlock", "Transformer", "VisionTransformer", "available_models", "build_model",
           "convert_weights", "create", "model_config", "CONFIGS"]
