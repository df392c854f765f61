"""Text towers that compute only real tokens: unpadded (packed) ``encode_text`` for CLIP text towers pooled at
the end-of-text token.

Why it is exact
---------------
OpenAI CLIP, open_clip and the reference model run a causal transformer over the padded context (77
tokens) and keep one feature per prompt: the one at the end-of-text token (EOT, the largest token id, or
open_clip's ``eos`` id). Under a causal mask position i sees only positions <= i, so nothing after a
prompt's EOT can reach its pooled feature: ``encode_text`` computed on each prompt's first ``eot + 1``
tokens gives the same features and the same gradients (padding positions get zero gradients either way).

What runs
---------
- **Unpadded (varlen)**: the prompts' real tokens are packed into one ``[total_tokens, width]`` tensor
  (``cu_seqlens`` marks where each prompt starts). The token-wise ops (embedding lookup and positions,
  LayerNorms, QKV and out projections, MLP, layer scales) run on the packed rows through the model's own
  (possibly clipfast-patched) modules; attention runs ``clipfast.flash_attention_varlen`` (causal within
  each prompt); ``ln_final`` and the projection run on the EOT rows only. Cost: the real tokens instead of
  ``batch * 77`` (see ``clipfast bench text``).
- **Truncated** (the cheap fallback, for open_clip blocks whose attention is not an ``nn.MultiheadAttention``):
  the model's own transformer on ``tokens[:, :max_eot + 1]`` with the causal mask cut to that size.
- **Padded** (the original ``encode_text``) while ``torch.compile`` traces (the packed length is data
  dependent; the padded graph has static shapes and no graph break) and for pooling types other than the
  EOT (``first``/``last``/``none``).

Only ``encode_text`` changes: code that needs every position (``forward_intermediates``, the transformer
called directly) keeps the padded computation. ``clipfast.patch(model, unpad_text=False)`` keeps it too.

Towers that take a padding mask (Hugging Face CLIP / ChineseCLIP, cn_clip's BERT) are in
``clipfast/unpad_masked.py``; they share the packing helpers, hook test and patched classes here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validate import host_sync_forbidden
from .nn.attention import is_causal_mask
from .ops.attention_varlen import flash_attention_varlen

# The text towers this applies to, by class (module.qualname): nothing optional is imported.
REFERENCE, OPENAI, OPEN_CLIP = "clipfast.models.model.CLIP", "clip.model.CLIP", "open_clip.model.CLIP"
TEXT_TOWERS = (REFERENCE, OPENAI, OPEN_CLIP)


def tower_name(model) -> str:
    """module.qualname of the model's class (of the class it patches, for a patched model); ``model`` may
    be the class itself."""
    cls = model if isinstance(model, type) else type(model)
    cls = getattr(cls, "_clipfast_unpadded_base", cls)
    return f"{cls.__module__}.{cls.__qualname__}"


# ----------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------

def eot_positions(model: nn.Module, text: torch.Tensor) -> Optional[torch.Tensor]:
    """Index of each prompt's pooled (end-of-text) token, or None when the tower is not pooled at it."""
    pool = getattr(model, "text_pool_type", "argmax")
    if pool == "argmax":
        return text.argmax(dim=-1)
    eos = getattr(model, "text_eos_id", None)
    if pool == "eos" and eos is not None:
        return (text == eos).int().argmax(dim=-1)
    return None


def packed_offsets(keep: torch.Tensor):
    """int32 ``cu_seqlens`` [B + 1] and the longest sequence (one host sync, for the shapes) of the packed
    tokens ``x[keep]`` of a boolean [B, L] selection; row-major boolean indexing keeps each row's order."""
    lengths = keep.sum(1)
    return F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32), int(lengths.max())


def pack(text: torch.Tensor, lengths: torch.Tensor):
    """Real tokens of ``text`` [B, L] (the first ``lengths[b]`` of row b) as flat ids and positions [T],
    int32 ``cu_seqlens`` [B + 1] and the longest length (one host sync, for the shapes)."""
    positions = torch.arange(text.shape[1], device=text.device)
    keep = positions[None, :] < lengths[:, None]
    return (text[keep], positions.expand_as(text)[keep], *packed_offsets(keep))


# ----------------------------------------------------------------------------------------------
# Blocks on packed tokens
# ----------------------------------------------------------------------------------------------

def _hooked(module: nn.Module) -> bool:
    """Whether ``module`` has forward hooks (FSDP2's parameter all-gather, composable checkpointing, a
    user's): they run only when the module itself is called, which the packed path does not do. Hooks
    marked ``observes_only`` (``clipfast verify``'s output capture) change nothing and do not count."""
    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    return any(not (getattr(h, "observes_only", False) or _hf_output_capture(h)) for h in hooks)


def _hf_output_capture(hook) -> bool:
    """transformers 5.x's output-capturing hook (records hidden states / attentions only while a forward
    asked for them; the unpadded paths never run when one does)."""
    return (getattr(hook, "__name__", "") == "output_capturing_hook"
            and getattr(hook, "__module__", "").startswith("transformers."))


def packable_block(block: nn.Module) -> bool:
    """A pre-LN block ``x + ls_1(attn(ln_1(x))); x + ls_2(mlp(ln_2(x)))`` with a self-attention
    ``nn.MultiheadAttention`` (packed QKV in-projection, no extra key/value rows) and no forward hooks of
    its own (the packed path runs its submodules, not the block)."""
    attn = getattr(block, "attn", None)
    return (not _hooked(block) and all(hasattr(block, n) for n in ("ln_1", "ln_2", "mlp"))
            and isinstance(attn, nn.MultiheadAttention)
            and attn._qkv_same_embed_dim and attn.bias_k is None and not attn.add_zero_attn
            and not hasattr(block, "ln_1_kv") and attn.head_dim <= 256)


def _packed_attention(attn: nn.MultiheadAttention, x: torch.Tensor, cu_seqlens, max_len: int) -> torch.Tensor:
    """Causal self-attention of every packed prompt: [T, W] -> [T, W]."""
    t, w = x.shape
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(t, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.unbind(1)  # strided views, read in place by the kernel
    o = flash_attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, is_causal=True)
    return F.linear(o.reshape(t, w), attn.out_proj.weight, attn.out_proj.bias)


def _packed_block(block: nn.Module, x: torch.Tensor, cu_seqlens, max_len: int) -> torch.Tensor:
    ls_1, ls_2 = getattr(block, "ls_1", nn.Identity()), getattr(block, "ls_2", nn.Identity())
    x = x + ls_1(_packed_attention(block.attn, block.ln_1(x), cu_seqlens, max_len))
    return x + ls_2(block.mlp(block.ln_2(x)))


def _blocks(model: nn.Module):
    return list(model.transformer.resblocks)


# ----------------------------------------------------------------------------------------------
# encode_text
# ----------------------------------------------------------------------------------------------

def _cast_dtype(model: nn.Module) -> torch.dtype:
    get = getattr(model.transformer, "get_cast_dtype", None)
    return get() if get is not None else model.dtype


def _project(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def _unpadded_features(model: nn.Module, text: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    ids, positions, cu_seqlens, max_len = pack(text, eot + 1)
    dtype = _cast_dtype(model)
    x = model.token_embedding(ids).to(dtype) + model.positional_embedding.to(dtype)[positions]
    for block in _blocks(model):
        x = _packed_block(block, x, cu_seqlens, max_len)
    return model.ln_final(x[cu_seqlens[1:].long() - 1])  # LayerNorm is per token: only the EOT rows


def _truncated_features(model: nn.Module, text: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """open_clip's own transformer on the first ``max(eot) + 1`` tokens (causal mask cut to that size)."""
    n = int(eot.max()) + 1
    dtype = _cast_dtype(model)
    x = model.token_embedding(text[:, :n]).to(dtype) + model.positional_embedding[:n].to(dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    return model.ln_final(x[torch.arange(x.shape[0], device=x.device), eot])


def text_mode(model: nn.Module, check_masks: bool = True) -> Optional[str]:
    """How this tower's ``encode_text`` can skip padding: "unpadded", "truncated", or None (it cannot),
    from its structure. The causal masks are checked when patching (``check_masks``); the rest per call."""
    name = tower_name(model)
    if name not in TEXT_TOWERS or not hasattr(model, "transformer") or not hasattr(model, "token_embedding"):
        return None
    if getattr(model, "text_pool_type", "argmax") not in ("argmax", "eos"):
        return None
    if name == OPEN_CLIP:
        mask = getattr(model, "attn_mask", None)
        if mask is None or (check_masks and not _is_causal_mask(mask)):
            return None
        if getattr(model.transformer, "grad_checkpointing", False):
            return "truncated"
    elif check_masks and not all(_is_causal_mask(getattr(b, "attn_mask", None)) for b in _blocks(model)):
        return None
    packable = not _hooked(model.transformer) and all(packable_block(b) for b in _blocks(model))
    return "unpadded" if packable else "truncated" if name == OPEN_CLIP else None


def _is_causal_mask(mask) -> bool:
    # the attention modules' own check (a meta mask has no values: the tower keeps its padding; patch after
    # materializing a deferred-initialization model to unpad it)
    return isinstance(mask, torch.Tensor) and is_causal_mask(mask)


def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``encode_text`` computing only each prompt's tokens up to its EOT (see the module docstring); the
    original (padded) ``encode_text`` where that is not possible. ``normalize`` is open_clip's argument."""
    original = super(type(self), self).encode_text
    kwargs = {"normalize": normalize} if tower_name(self) == OPEN_CLIP else {}
    if normalize and not kwargs:
        raise TypeError(f"{type(self).__name__}.encode_text() got an unexpected keyword argument 'normalize'")
    if host_sync_forbidden() or text.dim() != 2 or text.shape[0] == 0:
        return original(text, **kwargs)
    mode = text_mode(self, check_masks=False)
    eot = eot_positions(self, text) if mode else None
    if eot is None:
        return original(text, **kwargs)
    features = (_unpadded_features if mode == "unpadded" else _truncated_features)(self, text, eot)
    x = _project(self, features)
    return F.normalize(x, dim=-1) if normalize else x


# ----------------------------------------------------------------------------------------------
# The patched class
# ----------------------------------------------------------------------------------------------

_CLASSES: dict[type, type] = {}


def _methods(cls: type) -> dict:
    """The methods the unpadded subclass of ``cls`` overrides: ``encode_text`` here, the masked towers'
    (Hugging Face CLIP / ChineseCLIP, cn_clip) from ``clipfast.unpad_masked``."""
    if tower_name(cls) in TEXT_TOWERS:
        return {"encode_text": encode_text}
    from . import unpad_masked

    return unpad_masked.METHODS[tower_name(cls)]


def unpadded_class(cls: type) -> type:
    """The subclass of a CLIP class whose text encoding skips padding (one per class, cached); pickles
    and deep-copies by reference to this module."""
    new = _CLASSES.get(cls)
    if new is None:
        methods = _methods(cls)
        # a transformers model keeps its class's __name__: save_pretrained records it as the architecture
        name = cls.__name__ if cls.__module__.startswith("transformers.") else f"Unpadded{cls.__name__}"
        new = type(name, (cls,), {
            **methods, "__module__": __name__, "__qualname__": f"Unpadded{cls.__name__}",
            "__doc__": f"{cls.__name__} whose {', '.join(methods)} compute(s) only real tokens (clipfast.unpad).",
            "_clipfast_fast": True, "_clipfast_unpadded_base": cls, "__reduce_ex__": _reduce,
        })
        _CLASSES[cls] = new
    return new


def _reduce(self, protocol):
    getstate = getattr(self, "__getstate__", None)
    return _rebuild, (type(self)._clipfast_unpadded_base,), getstate() if getstate is not None else self.__dict__


def _rebuild(cls: type) -> nn.Module:
    new = unpadded_class(cls)
    return new.__new__(new)
