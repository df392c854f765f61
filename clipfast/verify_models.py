"""Models ``clipfast verify`` can build (random init, no downloads) and how to feed them.

- reference names (``ViT-B-16``, ``RN50``, ``tiny``, ...): ``clipfast.models.create``;
- ``open_clip:NAME``: ``open_clip.create_model(NAME)`` when open_clip is installed; a SigLIP-style model
  with a timm image tower (``open_clip:ViT-B-16-SigLIP``, ``open_clip:ViT-SO400M-14-SigLIP-384``) is built
  from its configuration, at a tiny size with ``--tiny`` (the same timm architecture, fewer and narrower
  layers, 32 x 32 images);
- ``hf:clip`` / ``hf:siglip``: a Hugging Face ``CLIPModel`` / ``SiglipModel`` from a config when
  transformers is installed.

On CPU (the Triton interpreter) full-size models take far too long, so ``--tiny`` is implied for
reference models and a small configuration is used.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch

from .verify import DTYPES, format_table, verify, write_json


@dataclass
class ModelSpec:
    name: str
    build: Callable[[], torch.nn.Module]
    make_inputs: Callable[[int, torch.device], tuple]
    forward: Callable[[torch.nn.Module, tuple], dict]


def _clip_inputs(image_size: int, context_length: int, vocab_size: int):
    def make(batch, device):
        g = torch.Generator().manual_seed(1)
        images = torch.randn(batch, 3, image_size, image_size, generator=g).to(device)
        lengths = torch.randint(2, context_length, (batch,), generator=g)
        tokens = torch.randint(1, vocab_size - 1, (batch, context_length), generator=g)
        for i, n in enumerate(lengths.tolist()):  # end-of-text (the largest id) ends each caption; zeros after
            tokens[i, n] = vocab_size - 1
            tokens[i, n + 1:] = 0
        return images, tokens.to(device)
    return make


def _openai_style_forward(model, inputs):
    images, tokens = inputs
    image_features = model.encode_image(images)
    text_features = model.encode_text(tokens)
    logits_per_image, _ = model(images, tokens)
    return {"image_features": image_features, "text_features": text_features, "logits_per_image": logits_per_image}


def reference_spec(name: str) -> ModelSpec:
    from . import models

    def build():
        return models.create(name)

    probe = build()
    visual = probe.visual
    image_size = getattr(visual, "input_resolution", 224)
    spec = ModelSpec(f"reference {name}", build,
                     _clip_inputs(image_size, probe.context_length, probe.vocab_size), _openai_style_forward)
    return spec


def open_clip_spec(name: str, tiny: bool = False) -> ModelSpec:
    try:
        import open_clip
    except ImportError as exc:
        raise SystemExit(f"clipfast verify: open_clip is not installed ({exc}); pip install 'clipfast[integrations]'")
    config = open_clip.get_model_config(name)
    if config is None and not name.startswith(("hf-hub:", "local-dir:")):
        raise SystemExit(f"clipfast verify: open_clip has no model {name!r}"
                         f"{_close_matches(name, open_clip.list_models())}; open_clip.list_models() lists "
                         f"its {len(open_clip.list_models())} names")
    if config and config.get("vision_cfg", {}).get("timm_model_name"):
        return open_clip_timm_spec(name, config, tiny)

    def build():
        return open_clip.create_model(name, pretrained=None)

    try:
        probe = build()
    except Exception as exc:  # a schema name (hf-hub:, local-dir:) open_clip could not resolve
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SystemExit(f"clipfast verify: open_clip could not build {name!r}: {message[:300]}") from None
    size = probe.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return ModelSpec(f"open_clip {name}", build, _clip_inputs(size, probe.context_length, probe.vocab_size),
                     _openai_style_forward)


def _siglip_forward(model, inputs):
    """open_clip SigLIP models: features and the sigmoid-loss logits ``s * I @ T.T + b``."""
    images, tokens = inputs
    image_features = model.encode_image(images, normalize=True)
    text_features = model.encode_text(tokens, normalize=True)
    logits = model.logit_scale.exp() * image_features @ text_features.T + model.logit_bias
    return {"image_features": image_features, "text_features": text_features, "logits_per_image": logits}


#: a tiny tower of the same timm architecture (head dim 16, 16 patches) and a tiny text tower, for CPU
_TINY_TIMM = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0)
_TINY_TEXT = dict(context_length=16, vocab_size=100, width=64, heads=4, layers=2)


def open_clip_timm_spec(name: str, config: dict, tiny: bool) -> ModelSpec:
    """An open_clip model with a timm image tower (SigLIP), built from its configuration."""
    import open_clip
    import timm

    custom_text = config.get("custom_text", False) or "hf_model_name" in config["text_cfg"]
    config = {k: v for k, v in config.items() if k != "custom_text"}
    vision, text = dict(config["vision_cfg"]), dict(config["text_cfg"])
    overrides = {}
    if tiny:
        vision["image_size"] = _TINY_TIMM["img_size"]
        text.update(_TINY_TEXT)
        text.pop("mlp_ratio", None)
        config["embed_dim"] = _TINY_TIMM["embed_dim"]
        overrides = _TINY_TIMM
    config.update(vision_cfg=vision, text_cfg=text)
    model_cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP

    def build():
        create = timm.create_model
        timm.create_model = lambda model_name, **kw: create(model_name, **{**kw, **overrides})
        try:  # open_clip's TimmModel calls timm.create_model(name, ...): the tiny sizes override the named ones
            return model_cls(**config)
        finally:
            timm.create_model = create

    return ModelSpec(f"open_clip {name}" + (" (tiny)" if tiny else ""), build,
                     _clip_inputs(vision["image_size"], text["context_length"], text["vocab_size"]),
                     _siglip_forward if "init_logit_bias" in config else _openai_style_forward)


_TINY_HF_TOWER = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
_TINY_HF_TEXT = dict(_TINY_HF_TOWER, max_position_embeddings=16, vocab_size=100)
_TINY_HF_VISION = dict(_TINY_HF_TOWER, image_size=32, patch_size=8)


def _hf_spec(model_name: str, config, padding_mask: bool = False) -> ModelSpec:
    """A Hugging Face dual-encoder (``CLIPModel``, ``SiglipModel``) built from ``config``; with
    ``padding_mask``, the text goes in with the ``attention_mask`` a tokenizer returns (0 after the
    end-of-text token), which the patched CLIPModel's text tower skips (``unpad_text``)."""
    import transformers

    model_cls = getattr(transformers, model_name)
    make = _clip_inputs(config.vision_config.image_size, config.text_config.max_position_embeddings,
                        config.text_config.vocab_size)

    def forward(model, inputs):
        images, tokens = inputs
        mask = (tokens != 0).long() if padding_mask else None  # real ids are >= 1, padding is 0
        out = model(input_ids=tokens, pixel_values=images, attention_mask=mask)
        return {"image_embeds": out.image_embeds, "text_embeds": out.text_embeds, "logits_per_image": out.logits_per_image}

    return ModelSpec(f"hf {model_name}", lambda: model_cls(config), make, forward)


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"clipfast verify: transformers is not installed ({exc}); pip install 'clipfast[integrations]'")


def hf_clip_spec(tiny: bool) -> ModelSpec:
    _require_transformers()
    from transformers import CLIPConfig

    # the end-of-text id is the largest id, as in the real vocabulary (49407 of 49408): the pooled token
    text = dict(_TINY_HF_TEXT, eos_token_id=_TINY_HF_TEXT["vocab_size"] - 1, bos_token_id=1, pad_token_id=0) if tiny else {}
    config = CLIPConfig(text_config=text, vision_config=_TINY_HF_VISION if tiny else {},
                        projection_dim=32 if tiny else 512)
    spec = _hf_spec("CLIPModel", config, padding_mask=True)
    spec.name += " (tiny)" if tiny else ""
    return spec


def hf_siglip_spec(tiny: bool) -> ModelSpec:
    _require_transformers()
    from transformers import SiglipConfig

    text = dict(_TINY_HF_TEXT, bos_token_id=1, eos_token_id=2, pad_token_id=0) if tiny else {}
    config = SiglipConfig(text_config=text, vision_config=_TINY_HF_VISION if tiny else {})
    spec = _hf_spec("SiglipModel", config)
    spec.name += " (tiny)" if tiny else ""
    return spec


def _close_matches(name: str, names) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


HF_MODELS = ("hf:clip", "hf:siglip")


def resolve(model: str | None, tiny: bool) -> ModelSpec:
    model = model or ("tiny" if tiny else "ViT-B-16")
    if model.startswith("open_clip:"):
        return open_clip_spec(model.split(":", 1)[1], tiny)
    if model in ("hf:clip", "hf"):
        return hf_clip_spec(tiny)
    if model == "hf:siglip":
        return hf_siglip_spec(tiny)
    if model.startswith("hf:"):
        raise SystemExit(f"clipfast verify: unknown Hugging Face model {model!r}{_close_matches(model, HF_MODELS)}; "
                         f"choose {' or '.join(HF_MODELS)} (built from a config, nothing downloaded)")
    from . import models

    if model not in models.available_models():
        raise SystemExit(f"clipfast verify: unknown model {model!r}{_close_matches(model, models.available_models())}; "
                         f"choose from {', '.join(models.available_models())}, open_clip:NAME, hf:clip or hf:siglip")
    if tiny and model != "tiny":
        print(f"clipfast verify: using the tiny reference configuration instead of {model}", file=sys.stderr)
        model = "tiny"
    return reference_spec(model)


def main_verify(args) -> int:
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    tiny = args.tiny or not on_gpu
    spec = resolve(args.model, tiny)  # a bad name is one line, before anything else is said
    if not on_gpu:
        print("clipfast verify: no GPU found: the Triton kernels run through the interpreter on CPU, "
              "on a tiny configuration", file=sys.stderr)
    dtype_name = args.dtype or ("bf16" if on_gpu else "fp32")
    dtype = DTYPES[dtype_name]
    if dtype == torch.bfloat16 and not on_gpu:
        print("clipfast verify: bf16 cannot be checked in the Triton interpreter (it computes bf16 wrongly); "
              "use --dtype fp32 or fp16 on CPU", file=sys.stderr)
        return 2
    result = verify(spec.name, spec.build, spec.make_inputs, spec.forward, dtype, device, batch=args.batch,
                    progress=None if args.no_progress else sys.stderr)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0 if result.passed else 1
