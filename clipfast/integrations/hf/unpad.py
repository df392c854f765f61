"""Unpadded Hugging Face text towers, which take a padding mask: ``CLIPModel`` and
``CLIPTextModelWithProjection`` (causal, pooled at the end-of-text token) and ``ChineseCLIPModel`` (post-LN
BERT, bidirectional, pooled at the first token, CLS; its packed tower is ``clipfast.unpad``'s, shared with
cn_clip's in ``clipfast/integrations/cn_clip.py``).

Why it is exact
---------------
In every layer a token's state depends only on the tokens it attends to (its keys) and on itself; the
token-wise ops (embeddings, LayerNorm, projections, MLP) mix nothing across positions. So the pooled
state depends on a set of tokens closed under "attends to", and computing that set alone gives the same
pooled features and the same gradients (tokens outside it get zero gradients either way):

- **HF CLIP** pools at ``p`` = the first ``eos_token_id`` in each row (``argmax`` of the ids when the
  config carries the old ``eos_token_id == 2``; position 0 when a row has no end-of-text token), exactly
  as ``CLIPTextModel`` picks it. Its attention is causal, and ``attention_mask`` (when given) removes the
  keys where it is 0. The closed set is ``{j <= p : attention_mask[j] == 1}``: right padding, left
  padding and holes alike. Without a mask it is ``0..p`` (the positions after the end-of-text token,
  padding or not, cannot reach it). The pooled token must itself be real (``attention_mask[p] == 1``).
- **ChineseCLIP** (BERT) pools at position 0 with a key-padding mask and no causality: the closed set is
  every real token (``attention_mask == 1``), with position 0 real. Token types and positions are gathered
  with the tokens, so each keeps its original position id. HF ChineseCLIP called without ``attention_mask``
  attends to every position: nothing is padding and the model runs as it is.

What runs
---------
The kept tokens are packed into one ``[total_tokens, width]`` tensor (``cu_seqlens`` marks the rows);
the model's own (possibly clipfast-patched) embedding, LayerNorm, output and MLP modules run on it, and
attention is ``clipfast.flash_attention_varlen`` (causal within each sequence for CLIP, bidirectional
for BERT) on the QKV projections. The pooled rows are the last (CLIP) or first (BERT) row of each sequence.

When the padded model runs instead (detected exactly, per call)
---------------------------------------------------------------
Only the pooled output is computed, so the unpadded path runs only where a caller asks for pooled
features: ``get_text_features`` and ``forward`` (whose results are ``text_embeds`` / logits;
``CLIPTextModelWithProjection.forward``'s ``text_embeds``). The bare text models (``CLIPTextModel``,
``ChineseCLIPTextModel``), whose main output is every position's state, are never changed. On the unpadded
path the output object has every field and key of the padded call's; its ``last_hidden_state``
(``text_model_output.last_hidden_state`` from ``forward``), the one field this path does not compute, is
computed by the padded text tower on first read (``_LastHiddenStateOnRead``: same inputs, grad mode and
autocast; refused once the weights changed in place), so a caller that reads it gets the padded model's
states and one that does not never pays for them. The padded model runs, with every field as without clipfast,
when the call asks for more than pooled features or the packed path cannot take it:
``output_hidden_states`` / ``output_attentions`` (passed, or set in the configs), ``return_dict=False``
(the positional tuple would shift), any other keyword argument, ``torch.compile`` tracing (the packed
length is data dependent; the padded graph has static shapes and no graph break), gradient checkpointing
or attention dropout in training, forward hooks on the modules the packed path does not call (FSDP2,
checkpoint wrappers, a user's; transformers' own output-capturing hooks are fine), masks other than 0/1,
a padded pooled token, inputs that are not [batch, length].

Nothing global
--------------
Importing this module changes nothing outside it. The output computing ``last_hidden_state`` on read is
built, from the start, as an instance of a subclass of the Hugging Face output class (no library object is
ever reclassed, no library class is changed): only a descriptor on the class can make an attribute read
compute, and on the Hugging Face class itself it would change every model's outputs (see
``_LastHiddenStateOnRead``). To notice a replaced weight between a call and the read, each tower's parameter
list is kept and listed again after any parameter registration, which torch reports through a process-wide
hook only: that hook is installed at the first unpadded call of a patched model and removed when the patched
models are unpatched (``_TowerParameters``).
"""
from __future__ import annotations

import collections
import contextvars
import sys
import weakref
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn as nn

from clipfast import unpad
from clipfast._validate import host_sync_forbidden

HF_CLIP = "transformers.models.clip.modeling_clip.CLIPModel"
HF_CLIP_TEXT = "transformers.models.clip.modeling_clip.CLIPTextModelWithProjection"
HF_CHINESE_CLIP = "transformers.models.chinese_clip.modeling_chinese_clip.ChineseCLIPModel"

# set while a patched forward needs the padded text tower (return_dict=False), read by get_text_features
_PADDED = contextvars.ContextVar("clipfast_unpad_padded", default=False)

_base = unpad.unpadded_base


# ----------------------------------------------------------------------------------------------
# CLIPEncoderLayer on packed tokens
# ----------------------------------------------------------------------------------------------

def _heads(linear: nn.Module, x: torch.Tensor, heads: int) -> torch.Tensor:
    return linear(x).view(x.shape[0], heads, -1)


def _clip_layer(layer: nn.Module, x: torch.Tensor, cu_seqlens, max_len: int) -> torch.Tensor:
    """HF ``CLIPEncoderLayer`` (pre-LN, causal) on packed rows [T, W]."""
    attn, h = layer.self_attn, layer.layer_norm1(x)
    q, k, v = (_heads(p, h, attn.num_heads) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    o = unpad.packed_attention(q, k, v, cu_seqlens, max_len, is_causal=True, scale=attn.scale)
    x = x + attn.out_proj(o.reshape(x.shape))
    return x + layer.mlp(layer.layer_norm2(x))


# ----------------------------------------------------------------------------------------------
# When the packed path may run
# ----------------------------------------------------------------------------------------------

def _hf_pooled_only(model: nn.Module, text_model: nn.Module, input_ids, attention_mask, kwargs) -> bool:
    """Whether an HF ``get_text_features`` call asks for the pooled features only (see the module docstring)."""
    if host_sync_forbidden() or _PADDED.get() or any(k != "return_dict" for k in kwargs):
        return False
    return_dict = kwargs.get("return_dict")
    if not (model.config.return_dict if return_dict is None else return_dict):
        return False
    if any(getattr(c, f"output_{what}", False) for c in (model.config, text_model.config)
           for what in ("hidden_states", "attentions")):
        return False
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] == 0:
        return False
    return attention_mask is None or (isinstance(attention_mask, torch.Tensor)
                                      and attention_mask.shape == input_ids.shape
                                      and (attention_mask.dtype == torch.bool or not attention_mask.is_floating_point()))


# ----------------------------------------------------------------------------------------------
# Hugging Face CLIPModel
# ----------------------------------------------------------------------------------------------

def hf_eot_positions(text_model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The position ``CLIPTextModel`` pools at, by its own rule (same expressions)."""
    ids = input_ids.to(torch.int)
    if text_model.eos_token_id == 2:
        return ids.argmax(dim=-1)
    return (ids == text_model.eos_token_id).int().argmax(dim=-1)


def hf_clip_pooled(text_model: nn.Module, input_ids, attention_mask=None, position_ids=None):
    """``CLIPTextModel(...).pooler_output`` from the real tokens only, or None where the packed path cannot
    take this call (a padded pooled token, a mask other than 0/1, hooks, checkpointing, dropout)."""
    layers = list(text_model.encoder.layers)
    dropout = text_model.training and (text_model.config.attention_dropout > 0
                                       or any(getattr(m, "gradient_checkpointing", False) for m in layers))
    bypassed = unpad.bypassed(text_model, layers, (lambda l: l.self_attn,))
    bypassed += [text_model.encoder, text_model.embeddings]
    if not unpad.packable_call(bypassed, dropout):
        return None
    length = input_ids.shape[1]
    eot = hf_eot_positions(text_model, input_ids)
    keep = torch.arange(length, device=input_ids.device)[None, :] <= eot[:, None]
    if attention_mask is not None:
        if not unpad.real_pooled_tokens(attention_mask, eot):
            return None
        keep = keep & attention_mask.bool()
    cu_seqlens, max_len = unpad.packed_offsets(keep)
    emb = text_model.embeddings
    positions = unpad.gather_ids(position_ids, emb.position_ids[:, :length], input_ids, keep)
    x = emb.token_embedding(input_ids[keep]) + emb.position_embedding(positions)
    for layer in layers:
        x = _clip_layer(layer, x, cu_seqlens, max_len)
    return text_model.final_layer_norm(x[cu_seqlens[1:].long() - 1])  # per token: only the pooled rows


# ----------------------------------------------------------------------------------------------
# Outputs: the padded call's fields, last_hidden_state computed by the padded tower on first read
# ----------------------------------------------------------------------------------------------

class _NotComputed:
    def __repr__(self) -> str:
        return "<computed on first read>"


_NOT_COMPUTED = _NotComputed()


class _TowerParameters:
    """Each text tower's parameters, listed at its first unpadded call and again after any module registers a
    parameter (a replaced weight, ``load_state_dict(assign=True)``): walking the modules costs ~10x the rest of
    a call's host work. torch tells of registrations only through a process-wide hook, so that hook is
    installed while lists are kept: from the first unpadded call of a patched model until the patched models
    are unpatched (``release``), never at import. A tower collected while patched drops out with it."""

    def __init__(self):
        self._lists: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
        self._registrations = 0
        self._hook = None

    def get(self, tower: nn.Module) -> tuple:
        if self._hook is None:
            self._hook = torch.nn.modules.module.register_module_parameter_registration_hook(self._count)
            self._lists.clear()  # listed while no hook counted: listed again
        cached = self._lists.get(tower)
        if cached is None or cached[0] != self._registrations:
            cached = self._lists[tower] = (self._registrations, tuple(tower.parameters()))
        return cached[1]

    def release(self, tower: nn.Module) -> None:
        """Forget ``tower``; the hook goes with the last tower (not from inside a registration: torch iterates
        its hooks then)."""
        self._lists.pop(tower, None)
        if not self._lists and self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _count(self, module, name, param):
        self._registrations += 1


_TOWER_PARAMETERS = _TowerParameters()


def _release(self) -> None:
    """Called by ``clipfast.unpatch`` on a patched model (the unpadded class's ``_clipfast_release``)."""
    _TOWER_PARAMETERS.release(self.text_model)


def _same_objects(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


class _PaddedStates:
    """The padded text tower's call, replayed on the first read of ``last_hidden_state``: the same inputs,
    grad / inference mode and autocast as the original call. Refused (``RuntimeError``) once the tower's
    parameters or the inputs were changed in place since the call (an optimizer step), since the states
    would no longer be the ones that call computed."""

    def __init__(self, tower: nn.Module, **inputs):
        self.tower, self.inputs = tower, inputs
        self.params = _TOWER_PARAMETERS.get(tower)
        device = inputs["input_ids"].device.type
        try:  # (device type, dtype or None when off): replayed as it was, whatever the reader's context
            self.autocast = (device, torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
        except RuntimeError:  # a device type without autocast
            self.autocast = None
        self.grad, self.inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        self.version = self._version()

    def _version(self) -> int:  # counters only grow: a changed sum is a change (inference tensors have none)
        inputs = sum(v._version for v in self.inputs.values() if isinstance(v, torch.Tensor) and not v.is_inference())
        try:
            return inputs + sum(p._version for p in self.params)
        except RuntimeError:  # parameters created under inference mode
            return inputs + sum(p._version for p in self.params if not p.is_inference())

    def __call__(self) -> torch.Tensor:
        # the parameters listed afresh (once per read): the model may have been unpatched meanwhile
        if self._version() != self.version or not _same_objects(tuple(self.tower.parameters()), self.params):
            raise RuntimeError(
                "last_hidden_state of this unpadded text output is computed on first read, and the text tower's "
                "parameters or inputs were changed in place (or replaced) since the call; read it before updating "
                "them, or patch with clipfast.patch(model, unpad_text=False)")
        autocast = nullcontext()
        if self.autocast is not None:
            device, dtype = self.autocast
            autocast = torch.autocast(device, dtype=dtype, enabled=dtype is not None)
        with torch.inference_mode(self.inference), torch.set_grad_enabled(self.grad), autocast:
            return self.tower(**self.inputs, return_dict=True).last_hidden_state


class _LastHiddenStateOnRead:
    """Mixin for a Hugging Face output computed from the pooled rows only. It holds every field the padded
    call returns (same keys, same order, so positional and dict access agree with it); ``last_hidden_state``,
    the one field the packed path does not compute, is computed by ``_PaddedStates`` on its first read:
    attribute, key, index, ``to_tuple``, ``values`` / ``items``, comparison, copy and pickling alike (copies
    are the plain Hugging Face class). Callers that read pooled features only never pay for it.

    Why a subclass: a ``ModelOutput`` keeps each field twice, as an instance attribute (the dataclass field)
    and as a dict entry (``__getitem__``, ``to_tuple``, ``values``... read that one), and nothing on an
    instance can make an attribute read compute: that takes a descriptor on the class, and on the Hugging
    Face class itself it would change every model's outputs in the process. So the output is built as an
    instance of this subclass from the start (``_with_states_on_read``): no object or class of the library is
    changed, and ``isinstance`` checks against the Hugging Face class hold."""

    @property
    def last_hidden_state(self):
        value = self.__dict__.get("last_hidden_state")
        states = self.__dict__.get("_clipfast_padded_states")
        if value is _NOT_COMPUTED and states is not None:  # (none yet while the constructor runs)
            value = states()
            self.__dict__["last_hidden_state"] = value
            collections.OrderedDict.__setitem__(self, "last_hidden_state", value)
        return value

    @last_hidden_state.setter
    def last_hidden_state(self, value):
        self.__dict__["last_hidden_state"] = value

    def __reduce__(self):  # copies and pickles: the Hugging Face class itself, every field computed
        self.last_hidden_state
        _, args, state, *rest = super().__reduce__()
        state = {k: v for k, v in (state or {}).items() if k != "_clipfast_padded_states"} or None
        return (type(self).__mro__[2], args, state, *rest)


def _computing_first(name: str):
    def method(self, *args, **kwargs):
        self.last_hidden_state
        return getattr(super(_LastHiddenStateOnRead, self), name)(*args, **kwargs)

    method.__name__ = name
    return method


# every dict-level read of the values (the dict entry holds the placeholder until computed)
for _name in ("__getitem__", "get", "items", "values", "to_tuple", "copy", "popitem", "__eq__", "__ne__", "__repr__",
              "__or__", "__ror__"):
    setattr(_LastHiddenStateOnRead, _name, _computing_first(_name))

_ON_READ_CLASSES: dict = {}


def _with_states_on_read(output_cls: type, padded_states: _PaddedStates, **fields):
    """An ``output_cls`` holding ``fields``, whose ``last_hidden_state`` is ``padded_states()`` on first read:
    an instance of ``output_cls``'s on-read subclass (see ``_LastHiddenStateOnRead``)."""
    cls = _ON_READ_CLASSES.get(output_cls)
    if cls is None:
        # its own name (transformers registers every output class as a pytree node under module.name; sharing
        # the Hugging Face class's would take it over); printed under the Hugging Face class's qualname
        cls = _ON_READ_CLASSES[output_cls] = type(f"{output_cls.__name__}StatesOnRead",
                                                  (_LastHiddenStateOnRead, output_cls),
                                                  {"__module__": __name__, "__qualname__": output_cls.__qualname__})
    output = cls(last_hidden_state=_NOT_COMPUTED, **fields)  # the key in its place (first or second)
    output.__dict__["_clipfast_padded_states"] = padded_states
    return output


def _pooled_output(pooled: torch.Tensor, padded_states: _PaddedStates):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return _with_states_on_read(BaseModelOutputWithPooling, padded_states, pooler_output=pooled)


def hf_clip_get_text_features(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
    """``CLIPModel.get_text_features`` computing only real tokens when only pooled features are asked for
    (``last_hidden_state`` then computed on first read); the original otherwise."""
    if _hf_pooled_only(self, self.text_model, input_ids, attention_mask, kwargs):
        pooled = hf_clip_pooled(self.text_model, input_ids, attention_mask, position_ids)
        if pooled is not None:
            states = _PaddedStates(self.text_model, input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids)
            return _pooled_output(self.text_projection(pooled), states)
    return _base(self).get_text_features(self, input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                         **kwargs)


def hf_clip_text_with_projection_forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
    """``CLIPTextModelWithProjection.forward`` computing only real tokens when only ``text_embeds`` is asked for
    (``last_hidden_state`` then computed on first read); the original otherwise."""
    if input_ids is not None and _hf_pooled_only(self, self.text_model, input_ids, attention_mask, kwargs):
        pooled = hf_clip_pooled(self.text_model, input_ids, attention_mask, position_ids)
        if pooled is not None:
            output_cls = sys.modules[_base(self).__module__].CLIPTextModelOutput
            states = _PaddedStates(self.text_model, input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids)
            return _with_states_on_read(output_cls, states, text_embeds=self.text_projection(pooled))
    return _base(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               **kwargs)


# ----------------------------------------------------------------------------------------------
# ChineseCLIPModel (the packed BERT tower of clipfast.unpad)
# ----------------------------------------------------------------------------------------------

def hf_chinese_clip_get_text_features(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                                      **kwargs):
    """``ChineseCLIPModel.get_text_features`` computing only real tokens when only pooled features are asked
    for and an ``attention_mask`` marks padding (``last_hidden_state`` then computed on first read); the original
    otherwise."""
    if (attention_mask is not None and _hf_pooled_only(self, self.text_model, input_ids, attention_mask, kwargs)
            and unpad.bert_packable(self.text_model)
            and unpad.real_pooled_tokens(attention_mask, torch.zeros_like(input_ids[:, 0]))):
        cls = unpad.bert_cls(self.text_model, input_ids, attention_mask.bool(), token_type_ids, position_ids)
        states = _PaddedStates(self.text_model, input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids, position_ids=position_ids)
        return _pooled_output(self.text_projection(cls), states)
    return _base(self).get_text_features(self, input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                         position_ids=position_ids, **kwargs)


def hf_forward(self, *args, **kwargs):
    """The original ``forward``; with ``return_dict=False`` (the tuples are positional) its text tower runs padded."""
    return_dict = kwargs.get("return_dict")
    if host_sync_forbidden() or (self.config.return_dict if return_dict is None else return_dict):
        return _base(self).forward(self, *args, **kwargs)
    token = _PADDED.set(True)
    try:
        return _base(self).forward(self, *args, **kwargs)
    finally:
        _PADDED.reset(token)


METHODS = {
    HF_CLIP: {"get_text_features": hf_clip_get_text_features, "forward": hf_forward, "_clipfast_release": _release},
    HF_CLIP_TEXT: {"forward": hf_clip_text_with_projection_forward, "_clipfast_release": _release},
    HF_CHINESE_CLIP: {"get_text_features": hf_chinese_clip_get_text_features, "forward": hf_forward,
                      "_clipfast_release": _release},
}


# ----------------------------------------------------------------------------------------------
# Structure (checked when patching)
# ----------------------------------------------------------------------------------------------

def unsupported_reason(model: nn.Module) -> Optional[str]:
    """Why this tower's text encoding cannot skip padding (None when it can), from its structure."""
    try:
        if unpad.tower_name(model) in (HF_CLIP, HF_CLIP_TEXT):
            attn = model.text_model.encoder.layers[0].self_attn
            for layer in model.text_model.encoder.layers:
                if not all(hasattr(layer, n) for n in ("layer_norm1", "layer_norm2", "mlp", "self_attn")):
                    return "text encoder layers are not CLIPEncoderLayer-shaped"
            return unpad.head_dim_reason(attn.head_dim)
        return unpad.bert_structure_reason(model.text_model) or unpad.bert_head_dim_reason(model.text_model)
    except (AttributeError, IndexError, TypeError) as e:
        return f"unexpected text tower structure ({e})"
