"""MLP rules: a transformer MLP block (Linear -> activation -> Linear) -> one fused ``clipfast.mlp`` call.

- OpenAI CLIP, open_clip, Chinese-CLIP's vision tower and the reference model:
  ``mlp = nn.Sequential(OrderedDict(c_fc=Linear, gelu=<activation>, c_proj=Linear))``; open_clip's custom
  block may put ``ln`` between the activation and ``c_proj``: an ``nn.Identity`` there is accepted, a
  LayerNorm (``scale_fc``) is not.
- Hugging Face ``CLIPMLP`` and the copies of it in other models (CLIPSeg, SigLIP, AltCLIP, ...):
  ``fc1``, ``activation_fn``, ``fc2``, with a forward that is exactly ``fc2(activation_fn(fc1(x)))``. They are
  recognized by structure, so nothing is imported from transformers (without it the rule never matches).

The replacement is a subclass of the original class sharing its children, so ``state_dict`` keys and
``isinstance`` relations are unchanged. The activation is detected from the activation module's type
(never from a model name: open_clip uses QuickGELU only in its ``-quickgelu`` configs): QuickGELU classes,
``nn.GELU`` (erf or tanh) and GELU classes (e.g. transformers' ``GELUActivation``, ``NewGELUActivation``,
``GELUTanh``), each confirmed by evaluating the module on a probe. Anything else is left alone and
reported, as are Linear layers with a changed forward or with hooks (the fused call would bypass them).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from clipfast.nn.mlp import fc_act_fc_forward, sequential_mlp_forward
from clipfast.ops.mlp import reference_activation
from clipfast.patch_rules.registry import PatchRule, Unsupported, clone_as, fast_subclass, register_rule

# On the CPU explicitly: the rules are imported by the first ``clipfast.patch``, which may run under a
# default-device context such as ``with torch.device("meta")`` (deferred initialization, e.g. for FSDP2).
_PROBE = torch.linspace(-8.0, 8.0, 401, device="cpu")


def _behaves_like(fn, activation: str) -> bool:
    try:
        with torch.no_grad():
            out = fn(_PROBE.clone())
    except Exception:
        return False
    return (isinstance(out, torch.Tensor) and out.shape == _PROBE.shape
            and torch.allclose(out.float(), reference_activation(_PROBE.double(), activation).float(),
                               atol=1e-5, rtol=1e-5))


def detect_activation(fn) -> Optional[str]:
    """The ``clipfast.mlp`` activation name that ``fn`` (a module or function) computes, or None."""
    if isinstance(fn, nn.Module) and (len(fn._parameters) or len(fn._buffers) or fn._forward_hooks
                                      or fn._forward_pre_hooks):
        return None
    if type(fn) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(fn.approximate)
    name = (getattr(fn, "__name__", None) if not isinstance(fn, nn.Module) else None) or type(fn).__name__
    name = name.lower().replace("_", "")
    if "quickgelu" in name:
        candidates = ("quick_gelu",)
    elif "gelu" in name:
        candidates = ("gelu", "gelu_tanh")
    else:
        return None
    return next((c for c in candidates if _behaves_like(fn, c)), None)


def _plain_linear(module, role: str) -> nn.Linear:
    if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
        raise Unsupported(f"{role} is {type(module).__qualname__}, not a plain nn.Linear")
    if module._forward_hooks or module._forward_pre_hooks:
        raise Unsupported(f"{role} has forward hooks the fused MLP would bypass")
    return module


def _activation(fn, role: str) -> str:
    activation = detect_activation(fn)
    if activation is None:
        what = type(fn).__qualname__ if isinstance(fn, nn.Module) else getattr(fn, "__qualname__", repr(fn))
        raise Unsupported(f"unknown activation {what} (`{role}`)")
    return activation


# ----------------------------------------------------------------------------------------------
# OpenAI / open_clip: Sequential(c_fc, gelu, c_proj)
# ----------------------------------------------------------------------------------------------

def _sequential_layers(module: nn.Sequential) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module._modules.items() if m is not None and type(m) is not nn.Identity]


def _match_sequential(module: nn.Module) -> bool:
    if not isinstance(module, nn.Sequential) or type(module).forward is not nn.Sequential.forward:
        return False
    layers = _sequential_layers(module)
    return (len(layers) == 3 and isinstance(layers[0][1], nn.Linear) and isinstance(layers[2][1], nn.Linear)
            and layers[0][1].out_features == layers[2][1].in_features)


def _convert_sequential(module: nn.Module) -> nn.Module:
    (fc_name, fc), (act_name, act), (proj_name, proj) = _sequential_layers(module)
    _plain_linear(fc, fc_name)
    _plain_linear(proj, proj_name)
    activation = _activation(act, act_name)
    cls = type(module)
    new = clone_as(module, fast_subclass(cls, sequential_mlp_forward, f"Fused{cls.__name__}MLP"))
    new._clipfast_mlp = (fc_name, proj_name, activation)
    return new


register_rule(PatchRule(family="mlp", name="Sequential(Linear, activation, Linear) -> fused MLP",
                        match=_match_sequential, convert=_convert_sequential))


# ----------------------------------------------------------------------------------------------
# Hugging Face CLIPMLP and copies: fc1 -> activation_fn -> fc2
# ----------------------------------------------------------------------------------------------

_HF_FORWARD_NAMES = ("fc1", "activation_fn", "fc2")


def _match_hf(module: nn.Module) -> bool:
    cls = type(module)
    if not cls.__module__.startswith("transformers."):
        return False
    code = getattr(cls.forward, "__code__", None)
    return (code is not None and tuple(code.co_names) == _HF_FORWARD_NAMES
            and isinstance(getattr(module, "fc1", None), nn.Linear)
            and isinstance(getattr(module, "fc2", None), nn.Linear))


def _convert_hf(module: nn.Module) -> nn.Module:
    _plain_linear(module.fc1, "fc1")
    _plain_linear(module.fc2, "fc2")
    activation = _activation(module.activation_fn, "activation_fn")
    cls = type(module)
    new = clone_as(module, fast_subclass(cls, fc_act_fc_forward, f"Fused{cls.__name__}"))
    new._clipfast_mlp = ("fc1", "fc2", activation)
    return new


register_rule(PatchRule(family="mlp", name="transformers CLIPMLP (fc1, activation_fn, fc2) -> fused MLP",
                        match=_match_hf, convert=_convert_hf))
