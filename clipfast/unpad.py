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

Towers that take a padding mask (Hugging Face CLIP / ChineseCLIP in ``clipfast/integrations/hf/unpad.py``,
cn_clip in ``clipfast/integrations/cn_clip.py``) use the packing helpers, the hook test, the packed post-LN
BERT tower (bidirectional, pooled at the first token: HF ChineseCLIP's and cn_clip's text towers) and the
patched classes here. Nothing here imports an integrated library: towers are recognised by class name.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validate import host_sync_forbidden
from .dispatching import flash_attention_varlen
from .nn.attention import is_causal_mask

# The text towers this applies to, by class (module.qualname): nothing optional is imported.
REFERENCE, OPENAI, OPEN_CLIP = "clipfast.models.model.CLIP", "clip.model.CLIP", "open_clip.model.CLIP"
TEXT_TOWERS = (REFERENCE, OPENAI, OPEN_CLIP)


def tower_name(model) -> str:
    """module.qualname of the model's class (of the class it patches, for a patched model); ``model`` may
    be the class itself."""
    cls = model if isinstance(model, type) else type(model)
    cls = getattr(cls, "_clipfast_unpadded_base", cls)
    return f"{cls.__module__}.{cls.__qualname__}"


def unpadded_base(model: nn.Module) -> type:
    """The class an unpadded model's class was made from (its methods are the padded originals)."""
    return type(model)._clipfast_unpadded_base


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


def gather_ids(ids: Optional[torch.Tensor], default: torch.Tensor, like: torch.Tensor, keep) -> torch.Tensor:
    """``ids`` (or ``default``, [1, L]) broadcast to ``like`` [B, L], at the kept tokens."""
    return (default if ids is None else ids).expand_as(like)[keep]


def real_pooled_tokens(attention_mask: torch.Tensor, pooled_at: torch.Tensor) -> bool:
    """A 0/1 mask whose pooled tokens are real (one host sync)."""
    binary = ((attention_mask == 0) | (attention_mask == 1)).all()
    return bool(binary & attention_mask.gather(1, pooled_at[:, None]).bool().all())


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

def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens, max_len: int, is_causal: bool,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Self-attention within each packed sequence: q, k, v [T, H, D] -> [T, H, D] (every unpadded tower's)."""
    return flash_attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, is_causal=is_causal, scale=scale)


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
    o = packed_attention(q, k, v, cu_seqlens, max_len, is_causal=True)
    return F.linear(o.reshape(t, w), attn.out_proj.weight, attn.out_proj.bias)


def _packed_block(block: nn.Module, x: torch.Tensor, cu_seqlens, max_len: int) -> torch.Tensor:
    ls_1, ls_2 = getattr(block, "ls_1", nn.Identity()), getattr(block, "ls_2", nn.Identity())
    x = x + ls_1(_packed_attention(block.attn, block.ln_1(x), cu_seqlens, max_len))
    return x + ls_2(block.mlp(block.ln_2(x)))


def bypassed(model: nn.Module, layers, parts) -> list:
    """The modules whose forward a packed tower does not call (their hooks would not run): ``model``, its
    ``layers`` and the ``parts`` (functions of a layer) of each."""
    return [model, *[m for layer in layers for m in (layer, *(p(layer) for p in parts))]]


def packable_call(modules, training_blockers: bool) -> bool:
    """Whether a packed tower may run this call: no host sync forbidden, nothing in training that the packed
    path does not reproduce (``training_blockers``), no hooks on the ``modules`` it bypasses."""
    return not host_sync_forbidden() and not training_blockers and not any(_hooked(m) for m in modules)


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
# Post-LN BERT towers (bidirectional, pooled at the first token): Hugging Face ChineseCLIP, cn_clip
# ----------------------------------------------------------------------------------------------
# Exact for the same reason: with a key-padding mask and no causality the first token's state depends on
# the real tokens only, so packing them (each with its own position id and token type) changes nothing.

def _heads(linear: nn.Module, x: torch.Tensor, heads: int) -> torch.Tensor:
    return linear(x).view(x.shape[0], heads, -1)


def _bert_layer(layer: nn.Module, x: torch.Tensor, cu_seqlens, max_len: int) -> torch.Tensor:
    """A post-LN BERT layer (HF ChineseCLIP's or cn_clip's: ``attention.self`` / ``attention.output`` /
    ``intermediate`` / ``output``) on packed rows [T, W], bidirectional within each sequence."""
    sa = layer.attention.self
    q, k, v = (_heads(p, x, sa.num_attention_heads) for p in (sa.query, sa.key, sa.value))
    o = packed_attention(q, k, v, cu_seqlens, max_len, is_causal=False, scale=1.0 / math.sqrt(sa.attention_head_size))
    x = layer.attention.output(o.reshape(x.shape[0], -1), x)  # dense, dropout, LayerNorm(. + x)
    return layer.output(layer.intermediate(x), x)


def bert_packable(bert: nn.Module) -> bool:
    """Whether the packed BERT tower may run this call (see ``packable_call``)."""
    layers = list(bert.encoder.layer)
    config = getattr(bert, "config", None)
    checkpointing = (getattr(bert.encoder, "grad_checkpointing", False)
                     or getattr(bert.encoder, "gradient_checkpointing", False))
    checkpointing = checkpointing or any(getattr(m, "gradient_checkpointing", False) for m in layers)
    dropout = bert.training and (checkpointing or getattr(config, "attention_probs_dropout_prob", 0) > 0)
    return packable_call(bypassed(bert, layers, (lambda l: l.attention, lambda l: l.attention.self)) + [bert.encoder],
                         dropout)


def bert_cls(bert: nn.Module, input_ids, keep, token_type_ids=None, position_ids=None) -> torch.Tensor:
    """The last layer's first-token (CLS) state of every row, computed on the ``keep`` tokens [B, L] only
    (position 0 of every row kept). Token types default to 0 and positions to 0..L-1, as both BERTs do."""
    cu_seqlens, max_len = packed_offsets(keep)
    length = input_ids.shape[1]
    positions = gather_ids(position_ids, torch.arange(length, device=input_ids.device)[None], input_ids, keep)
    types = gather_ids(token_type_ids, torch.zeros_like(input_ids[:1]), input_ids, keep)
    x = bert.embeddings(input_ids=input_ids[keep][None], token_type_ids=types[None], position_ids=positions[None])[0]
    for layer in bert.encoder.layer:
        x = _bert_layer(layer, x, cu_seqlens, max_len)
    return x[cu_seqlens[:-1].long()]


def head_dim_reason(dim: int) -> Optional[str]:
    """Why the varlen kernel cannot take this head dim (None when it can)."""
    return None if 16 <= dim <= 256 else f"head dim {dim} outside 16..256"


def bert_structure_reason(bert: nn.Module) -> Optional[str]:
    """Why the packed BERT tower cannot run ``bert``'s layers (None when it can), from their structure."""
    for layer in bert.encoder.layer:
        sa = layer.attention.self
        if not all(hasattr(sa, n) for n in ("query", "key", "value", "attention_head_size")):
            return "BERT self-attention without query/key/value projections (e.g. cn_clip's FlashMHA)"
        for n in ("output", "intermediate"):
            if not hasattr(layer, n) or not hasattr(layer.attention, "output"):
                return "BERT layers are not attention/intermediate/output-shaped"
    return None


def bert_head_dim_reason(bert: nn.Module) -> Optional[str]:
    return head_dim_reason(bert.encoder.layer[0].attention.self.attention_head_size)


# ----------------------------------------------------------------------------------------------
# The patched class
# ----------------------------------------------------------------------------------------------

#: The methods the unpadded subclass of a causal tower's class overrides.
CAUSAL_METHODS = {"encode_text": encode_text}

_CLASSES: dict[type, type] = {}


def unpadded_class(cls: type, methods: dict[str, Callable]) -> type:
    """The subclass of a CLIP class overriding ``methods`` (its text encoding skipping padding; one per class,
    cached); pickles and deep-copies by reference to this module and to the methods' module. A method named
    ``_clipfast_release`` is called by ``clipfast.unpatch`` before the original class is put back."""
    new = _CLASSES.get(cls)
    if new is None:
        # a transformers model keeps its class's __name__: save_pretrained records it as the architecture
        name = cls.__name__ if cls.__module__.startswith("transformers.") else f"Unpadded{cls.__name__}"
        public = [m for m in methods if not m.startswith("_")]
        new = type(name, (cls,), {
            **methods, "__module__": __name__, "__qualname__": f"Unpadded{cls.__name__}",
            "__doc__": f"{cls.__name__} whose {', '.join(public)} compute(s) only real tokens (clipfast.unpad).",
            "_clipfast_fast": True, "_clipfast_unpadded_base": cls, "_clipfast_unpadded_methods": dict(methods),
            "__reduce_ex__": _reduce,
        })
        _CLASSES[cls] = new
    return new


def _reduce(self, protocol):
    getstate = getattr(self, "__getstate__", None)
    cls = type(self)
    return (_rebuild, (cls._clipfast_unpadded_base, cls._clipfast_unpadded_methods),
            getstate() if getstate is not None else self.__dict__)


def _rebuild(cls: type, methods: Optional[dict[str, Callable]] = None) -> nn.Module:
    if methods is None:  # pickled before the methods were recorded: only the causal towers' were here then
        if tower_name(cls) not in TEXT_TOWERS:
            raise TypeError(f"an unpadded {cls.__name__} pickled by an earlier clipfast: unpatch it before saving")
        methods = CAUSAL_METHODS
    new = unpadded_class(cls, methods)
    return new.__new__(new)
