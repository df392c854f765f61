"""Hugging Face transformers (CLIP, ChineseCLIP, CLIPSeg, SigLIP / SigLIP 2): a ``"clipfast"`` attention
implementation (here), the patch rules for transformers' classes (``rules.py``) and the unpadded text towers
of CLIPModel, CLIPTextModelWithProjection and ChineseCLIPModel (``unpad.py``).

transformers (4.57+, 5.x) looks attention functions up by name in ``ALL_ATTENTION_FUNCTIONS`` and mask
builders in ``ALL_MASK_ATTENTION_FUNCTIONS``. After ``import clipfast``,

    model = CLIPModel(config)                       # or from_pretrained(...)
    model.set_attn_implementation("clipfast")       # or attn_implementation="clipfast" when loading

runs every CLIP / ChineseCLIP / CLIPSeg / SigLIP attention through ``clipfast.flash_attention``.

The function follows transformers' attention-interface contract:
``(module, query, key, value, attention_mask, scaling, dropout, **kwargs) -> (out [B, L, H, D], weights)``
with ``query`` [B, H, Lq, D]. Masks come from ``clipfast_mask``: for plain causal or bidirectional
attention over a padded batch it returns the key-padding mask alone ([B, 1, 1, Lk], boolean, True = takes
part; ``None`` without padding), which the kernel reads as one vector per key block and combines with
``is_causal`` itself; every other pattern is transformers' sdpa mask (a full boolean mask, which
already holds any causal structure). What the kernel does not take falls back, with a one-time
warning, and computes what the model computes without clipfast: attention weights requested
(``output_attentions`` passed down, or the request the model received, which SigLIP does not pass down) ->
the model's eager attention; dropout in training, soft-capping, position biases, paged caches, unsupported
head dims -> sdpa. The causality the kernel would add to a key-padding mask (or to no mask) is folded into
the mask a fallback gets, and boolean masks reach the eager attention as additive biases.

Registration is cheap and lazy: importing ``transformers.modeling_utils`` costs seconds, so clipfast does
not import it; if transformers is already loaded the function is registered now, otherwise an import hook
(``clipfast.integrations.import_hooks``) registers it the moment transformers loads its attention registry.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional

import torch

from clipfast._validate import host_sync_forbidden, warn_once
from clipfast.dispatching import flash_attention
from clipfast.integrations.import_hooks import AfterImport

NAME = "clipfast"

# kwargs of the attention interface that change the math in ways the kernel does not implement
_SDPA_ONLY_KWARGS = ("softcap", "position_bias", "sliding_window", "s_aux", "cache")


def _resolve_is_causal(module, attention_mask: Optional[torch.Tensor], query, kwargs) -> bool:
    """Whether the call needs causality that its mask does not hold.

    ``is_causal`` as transformers' sdpa resolves it (an explicit kwarg wins over the module flag), for more
    than one query, and only when the mask is absent or a key-padding mask (from ``clipfast_mask``): a full
    mask already holds any causal structure."""
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", False)
    return bool(is_causal) and query.shape[2] > 1 and (attention_mask is None
                                                      or _key_padding_only(attention_mask, query))


def _with_causal(attention_mask: Optional[torch.Tensor], query, key) -> torch.Tensor:
    """``attention_mask`` (None, boolean or additive) with the causal structure the kernel would add folded
    in (SDPA's convention: query i sees keys 0..i), in the mask's own form."""
    causal = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
    if attention_mask is None:
        return causal
    if attention_mask.dtype == torch.bool:
        return attention_mask & causal
    return torch.where(causal, attention_mask, torch.finfo(attention_mask.dtype).min)


def _additive(attention_mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A boolean mask (True = takes part) as the additive bias transformers' eager masks are (0 or the
    dtype's most negative value); additive masks and None pass through."""
    if attention_mask is None or attention_mask.dtype != torch.bool:
        return attention_mask
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return zero.masked_fill(~attention_mask, torch.finfo(dtype).min)


def _eager_fallback(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    """The model's own eager attention (it returns the weights), else the same math written out here.
    ``attention_mask`` holds every constraint (causality folded in by the caller), in either form."""
    attention_mask = _additive(attention_mask, query.dtype)
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is not None:
        return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _sdpa_fallback(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    """transformers' sdpa attention; ``kwargs["is_causal"]`` is the caller's resolved flag (sdpa honours it
    only without a mask, so the caller folds causality into any mask it passes)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("output_attentions", None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def clipfast_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                  mask_function=None, attention_mask: Optional[torch.Tensor] = None, local_size=None, **kwargs):
    """transformers mask builder (``AttentionMaskInterface``) for the clipfast attention function."""
    mu = _masking_utils()
    mask_function = mask_function or mu.causal_mask_function
    plain = (mask_function in (mu.causal_mask_function, mu.bidirectional_mask_function) and local_size is None
             and isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == kv_offset == 0
             and q_length == kv_length)
    if not plain:
        return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                            kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                            local_size=local_size, **kwargs)
    padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is None or (not host_sync_forbidden() and bool(padding.all())):
        return None
    return padding[:, None, None, :].bool()


def _key_padding_only(mask: Optional[torch.Tensor], query) -> bool:
    return mask is not None and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1 and query.shape[2] > 1


def _wants_weights(module, kwargs) -> bool:
    """Whether the caller asked for attention weights: ``output_attentions`` passed down to the attention
    function, else (transformers 5.x, where models such as SigLIP do not pass it down) the request the model
    received, seen in the output recorder its ``capture_outputs`` wrapper set for this forward; else the
    module's config."""
    if "output_attentions" in kwargs:
        return bool(kwargs["output_attentions"])
    recorder = _output_recorder()
    if recorder is not None:
        recording = recorder.get()
        return recording is not None and "attentions" in recording
    config = getattr(module, "config", None)
    return bool(getattr(config, "output_attentions", False))


def _mask_taken_by_kernel(mask: Optional[torch.Tensor], query, key) -> bool:
    if mask is None:
        return True
    if not (mask.dtype == torch.bool or mask.is_floating_point()) or mask.dim() > 4:
        return False
    target = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    return all(s == 1 or s == t for s, t in zip(shape, target))


def _fallback_reason(module, query, key, value, attention_mask, dropout, kwargs) -> Optional[str]:
    """Why the kernel cannot run this call (None when it can)."""
    if dropout and module.training:
        return "attention dropout in training"
    if any(kwargs.get(k) is not None for k in _SDPA_ONLY_KWARGS):
        return "soft-capping / position bias / sliding window / sink / paged cache"
    if not (16 <= query.shape[-1] <= 256) or value.shape[-1] != query.shape[-1]:
        return f"head dim {query.shape[-1]}"
    if not _mask_taken_by_kernel(attention_mask, query, key):
        return f"attention mask of shape {tuple(attention_mask.shape)} and dtype {attention_mask.dtype}"
    return None


def clipfast_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                               dropout: float = 0.0, **kwargs):
    """transformers attention function running ``clipfast.flash_attention``; returns ``(out [B, Lq, H, D], None)``
    (or the eager weights when they are requested).

    Every fallback computes what the model computes without clipfast: the causality the kernel would add to
    a key-padding mask (``clipfast_mask``) or to no mask is folded into the mask the fallback gets, and a
    boolean mask reaches the eager path as the additive bias it expects."""
    is_causal = _resolve_is_causal(module, attention_mask, query, kwargs)
    if _wants_weights(module, kwargs):
        warn_once("hf_output_attentions", "attention weights requested: this call runs the model's eager attention")
        mask = _with_causal(attention_mask, query, key) if is_causal else attention_mask
        return _eager_fallback(module, query, key, value, mask, scaling, dropout, **kwargs)
    reason = _fallback_reason(module, query, key, value, attention_mask, dropout, kwargs)
    if reason is not None:
        warn_once(f"hf_fallback:{reason}", f"transformers attention runs in sdpa: {reason}")
        mask = attention_mask
        if is_causal and attention_mask is not None:
            mask = _with_causal(attention_mask, query, key)
        kwargs["is_causal"] = is_causal and mask is None
        return _sdpa_fallback(module, query, key, value, mask, scaling, dropout, **kwargs)

    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: the kernel takes equal head counts
        from transformers.integrations.sdpa_attention import repeat_kv

        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = flash_attention(query, key, value, attn_mask=attention_mask, is_causal=is_causal, scale=scaling)
    return out.transpose(1, 2), None


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------

_REGISTRY_MODULES = ("transformers.modeling_utils", "transformers.masking_utils")

# transformers.masking_utils, resolved once when registering: the mask builder runs inside traced code,
# and torch 2.11's dynamo refuses an import of transformers' lazy modules there
_MASKING_UTILS = None


def _masking_utils():
    global _MASKING_UTILS
    if _MASKING_UTILS is None:
        _MASKING_UTILS = importlib.import_module(_REGISTRY_MODULES[1])
    return _MASKING_UTILS


# transformers 5.x's output recorder (a context variable its ``capture_outputs`` wrapper sets for each model
# forward: the outputs requested, e.g. "attentions"); resolved once at registration, False where absent
_OUTPUT_RECORDER = None


def _output_recorder():
    global _OUTPUT_RECORDER
    if _OUTPUT_RECORDER is None:
        _OUTPUT_RECORDER = False
        for name in ("transformers.utils.output_capturing", "transformers.utils.generic"):
            try:
                recorder = getattr(importlib.import_module(name), "_active_collector", None)
            except ImportError:
                continue
            if recorder is not None and hasattr(recorder, "get"):
                _OUTPUT_RECORDER = recorder
                break
    return _OUTPUT_RECORDER or None


def register() -> bool:
    """Register ``"clipfast"`` in transformers' attention and mask registries (idempotent). Returns whether
    transformers' registries were found."""
    try:
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface
    except ImportError:  # transformers absent or older than the attention interface
        return False
    _masking_utils()
    _output_recorder()
    AttentionInterface.register(NAME, clipfast_attention_forward)
    AttentionMaskInterface.register(NAME, clipfast_mask)
    return True


def _registry_loaded(module) -> None:
    _REGISTER_ON_IMPORT.remove()
    register()


# registers the function right after transformers.modeling_utils has loaded (installed by ``install``)
_REGISTER_ON_IMPORT = AfterImport({_REGISTRY_MODULES[0]}, _registry_loaded)


def install() -> None:
    """Register now when transformers' registry is loaded, else when it gets imported."""
    if _REGISTRY_MODULES[0] in sys.modules:
        register()
    else:
        _REGISTER_ON_IMPORT.install()
