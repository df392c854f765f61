"""Patch embedding rules: the start of ViT image towers -> ``clipfast.patch_embed`` (conv1 with its bias if it
has one, class token and positional embedding in one kernel, ln_pre fused behind it).

- reference model / OpenAI ``VisionTransformer``: the forward runs the fused embedding (with ln_pre), then
  continues exactly as the original (transformer sequence-first, ln_post on the class token, proj);
- open_clip ``VisionTransformer``: its ``_embeds`` step is replaced. Patch dropout sits between the
  positional embedding and ln_pre, so while it is active (training, prob > 0) only the embedding is fused
  and the original patch dropout and ln_pre run after it;
- Hugging Face ``CLIPVisionEmbeddings``: class token + position embedding (ln_pre lives elsewhere there);
  ``interpolate_pos_encoding=True`` runs the original forward.

Hugging Face SigLIP's and timm's embeddings (a conv with bias, no class token) and ChineseCLIP's and
Chinese-CLIP's have their rules in ``clipfast/integrations/`` (``hf/rules.py``, ``timm.py``, ``cn_clip.py``),
built from the helpers here.

The fast modules fall back to the original code, call by call, for what the kernel does not cover: CUDA
autocast (the conv would run in the autocast dtype), image sizes that are not multiples of the patch or
do not match the positional embedding (the original code then raises or handles them as it always did).
open_clip and transformers are recognized by class name, so this file imports neither.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from clipfast._validate import warn_once
from clipfast.dispatching import patch_embed
from clipfast.patch_rules.registry import PatchRule, Unsupported, clone_as, fast_subclass, is_fast, register_rule

from .layer_norm import INPUT_DTYPE_SUBCLASSES

OPENAI_STYLE = {"clipfast.models.model.VisionTransformer", "clip.model.VisionTransformer"}
OPEN_CLIP = "open_clip.transformer.VisionTransformer"
HF_EMBEDDINGS = "transformers.models.clip.modeling_clip.CLIPVisionEmbeddings"


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _original_class(module: nn.Module) -> type:
    """The class a fast subclass was made from (the class itself for an unpatched module)."""
    cls = type(module)
    while getattr(cls, "_clipfast_fast", False):
        cls = cls.__mro__[1]
    return cls


def _patch_size(conv: nn.Module) -> int:
    """The patch size of a patchify conv (with or without bias), or Unsupported for any other conv."""
    if type(conv) is not nn.Conv2d:
        raise Unsupported(f"patch conv is {type(conv).__name__}, not nn.Conv2d")
    p = conv.kernel_size[0]
    if (conv.kernel_size != (p, p) or conv.stride != (p, p) or conv.padding not in ((0, 0), "valid")
            or conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros"):
        raise Unsupported("patch conv is not kernel == stride, no padding, no groups")
    if conv._forward_hooks or conv._forward_pre_hooks:
        raise Unsupported("patch conv has forward hooks the fused embedding would bypass")
    return p


def _fusable_ln(ln: nn.Module, x: torch.Tensor) -> dict | None:
    """Keyword arguments that fuse ``ln`` into the embedding, or None to call ``ln`` itself: only 1-D
    LayerNorms whose semantics are the fused op's (fp32 statistics, input dtype out)."""
    if not isinstance(ln, nn.LayerNorm) or len(ln.normalized_shape) != 1:
        return None
    cls = _original_class(ln)
    if _qualname(cls) in INPUT_DTYPE_SUBCLASSES or cls.forward is nn.LayerNorm.forward:
        return {"ln_weight": ln.weight, "ln_bias": ln.bias, "ln_eps": ln.eps}
    return None


def _fusable(x: torch.Tensor, conv: nn.Module, n_positions: int | None, class_token: bool = True) -> bool:
    """Whether the kernel takes ``x``: float [B, C, H, W] pixels outside autocast, H and W multiples of the
    patch, and (unless ``n_positions`` is None) one positional row per token."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    p = conv.kernel_size[0]
    h, w = x.shape[-2:]
    if h % p or w % p or h < p or w < p:
        return False
    return n_positions is None or (h // p) * (w // p) + int(class_token) == n_positions


def _embed(module: nn.Module, x: torch.Tensor, ln: nn.Module | None) -> torch.Tensor:
    """conv1 -> class token -> positional embedding (-> ln) for the OpenAI / open_clip attribute names."""
    ln_kwargs = _fusable_ln(ln, x) if ln is not None else None
    tokens = patch_embed(x, module.conv1.weight, module.class_embedding, module.positional_embedding,
                         conv_bias=module.conv1.bias, **(ln_kwargs or {}))
    return ln(tokens) if ln is not None and ln_kwargs is None else tokens


# ----------------------------------------------------------------------------------------------
# Reference model and OpenAI VisionTransformer
# ----------------------------------------------------------------------------------------------

def _openai_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not _fusable(x, self.conv1, self.positional_embedding.shape[0]):
        return _original_class(self).forward(self, x)
    x = _embed(self, x, self.ln_pre)
    x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # blocks run sequence-first
    x = self.ln_post(x[:, 0, :])
    if self.proj is not None:
        x = x @ self.proj
    return x


def _convert_openai(module: nn.Module) -> nn.Module:
    _patch_size(module.conv1)
    if module.positional_embedding.dim() != 2:
        raise Unsupported("positional_embedding is not [tokens, width]")
    return clone_as(module, fast_subclass(type(module), _openai_forward, f"Fast{type(module).__name__}"))


# ----------------------------------------------------------------------------------------------
# open_clip VisionTransformer (replaces the `_embeds` step; forward stays open_clip's)
# ----------------------------------------------------------------------------------------------

def _open_clip_embeds(self, x: torch.Tensor) -> torch.Tensor:
    if not _fusable(x, self.conv1, self.positional_embedding.shape[0]):
        return _original_class(self)._embeds(self, x)
    dropout = self.patch_dropout
    dropout_active = not isinstance(dropout, nn.Identity) and self.training and getattr(dropout, "prob", 1.0) > 0
    if dropout_active:  # fuse only up to the positional embedding
        return self.ln_pre(dropout(_embed(self, x, None)))
    return _embed(self, x, self.ln_pre)


def _convert_open_clip(module: nn.Module) -> nn.Module:
    cls = type(module)
    if not hasattr(cls, "_embeds"):
        raise Unsupported("this open_clip version has no VisionTransformer._embeds step (open_clip < 2.24)")
    for name in ("conv1", "class_embedding", "positional_embedding", "patch_dropout", "ln_pre"):
        if not hasattr(module, name):
            raise Unsupported(f"open_clip VisionTransformer without `{name}`")
    if getattr(module, "input_patchnorm", False):
        raise Unsupported("input_patchnorm replaces conv1")
    _patch_size(module.conv1)
    fast_cls = fast_subclass(cls, cls.forward, f"Fast{cls.__name__}")
    fast_cls._embeds = _open_clip_embeds  # our own cached class; open_clip's class is untouched
    return clone_as(module, fast_cls)


# ----------------------------------------------------------------------------------------------
# Hugging Face CLIPVisionEmbeddings
# ----------------------------------------------------------------------------------------------

def _hf_forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
    size_ok = isinstance(pixel_values, torch.Tensor) and tuple(pixel_values.shape[-2:]) == (self.image_size,) * 2
    if interpolate_pos_encoding or not size_ok or not positions_checked(self) or not _fusable(
            pixel_values, self.patch_embedding, self.num_positions):
        return _original_class(self).forward(self, pixel_values, interpolate_pos_encoding)
    return patch_embed(pixel_values, self.patch_embedding.weight, self.class_embedding,
                       self.position_embedding.weight, conv_bias=self.patch_embedding.bias)


# where ``position_ids`` are known to be 0..N-1 (True/False) on a patched HF embedding; absent until checked
_POSITIONS_OK = "_clipfast_positions_ok"


def _positions_are_arange(ids: torch.Tensor, n: int) -> bool:
    return torch.equal(ids.reshape(-1).cpu(), torch.arange(n))


def check_hf_embeddings(module: nn.Module) -> None:
    """Unsupported unless ``module`` is a HF vision embedding the fused op computes exactly: a patchify
    ``patch_embedding`` conv and ``position_ids`` 0..N-1 into ``position_embedding``. ``position_ids`` on the
    meta device (a model built by ``from_pretrained`` or under ``torch.device("meta")``, patched before its
    buffers hold values) are checked by the first forward instead (:func:`positions_checked`)."""
    _patch_size(module.patch_embedding)
    ids = getattr(module, "position_ids", None)
    if ids is None or (not ids.is_meta and not _positions_are_arange(ids, module.num_positions)):
        raise Unsupported("position_ids are not 0..N (custom position ids)")


def hf_embeddings_clone(module: nn.Module, forward) -> nn.Module:
    """``module`` (checked by :func:`check_hf_embeddings`) as an instance of its fast subclass running
    ``forward``; its ``position_ids`` are marked as checked unless they were still on the meta device."""
    new = clone_as(module, fast_subclass(type(module), forward, f"Fast{type(module).__name__}"))
    if not module.position_ids.is_meta:
        new.__dict__[_POSITIONS_OK] = True
    return new


def positions_checked(module: nn.Module) -> bool:
    """Whether a patched HF embedding's ``position_ids`` are 0..N-1: known at patching, or found out once
    here (the first forward after the buffers got their values; one device-to-host copy); custom ids run
    the original forward from then on, with a one-time warning."""
    ok = module.__dict__.get(_POSITIONS_OK)
    if ok is None:
        ok = _positions_are_arange(module.position_ids, module.num_positions)
        if not ok:
            warn_once("hf_custom_position_ids", f"{type(module).__name__}: position_ids are not 0..N (custom position "
                      "ids): the original embedding runs")
        module.__dict__[_POSITIONS_OK] = ok
    return ok


def _convert_hf(module: nn.Module) -> nn.Module:
    check_hf_embeddings(module)
    return hf_embeddings_clone(module, _hf_forward)


def _match_names(names):
    def match(module: nn.Module) -> bool:
        return not is_fast(module) and _qualname(type(module)) in names
    return match


register_rule(PatchRule(family="patch_embed", name="OpenAI VisionTransformer embedding -> fused patch embedding + ln_pre",
                        match=_match_names(OPENAI_STYLE), convert=_convert_openai))
register_rule(PatchRule(family="patch_embed", name="open_clip VisionTransformer embedding -> fused patch embedding + ln_pre",
                        match=_match_names({OPEN_CLIP}), convert=_convert_open_clip))
register_rule(PatchRule(family="patch_embed", name="HF CLIPVisionEmbeddings -> fused patch embedding",
                        match=_match_names({HF_EMBEDDINGS}), convert=_convert_hf))
