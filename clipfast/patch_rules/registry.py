"""The patch-rule registry, and the tools rules build their replacements with.

A rule (``PatchRule``) belongs to a kernel family ("layer_norm", "attention", "mlp", "patch_embed", ...), has
a cheap ``match`` test on one module and a ``convert`` that builds the replacement. Rules modules (the
families' in ``clipfast/patch_rules/``, the integrated libraries' in ``clipfast/integrations/``) register
theirs here when imported; ``clipfast.patching`` reads them from here. This module imports nothing else of
clipfast, so whoever registers or reads rules depends on it and on nothing above it.

What a replacement must be (``clone_as`` and ``fast_subclass`` make this the easy path):
- an instance of a subclass of the original's class, so ``isinstance`` checks elsewhere (OpenAI's
  ``convert_weights``, Hugging Face output hooks) keep working;
- sharing the original's ``Parameter`` and buffer objects (no copies: an optimizer built before patching
  keeps training the same tensors) and keeping its ``state_dict`` keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch.nn as nn

__all__ = ["PatchRule", "Unsupported", "clone_as", "fast_subclass", "is_fast", "order_rules", "register_rule"]

# The attribute (in the replacement's __dict__, not a submodule) holding the module it replaced.
ORIGINAL = "_clipfast_original"
# The attribute (in the replacement's __dict__) holding {name: value} of the attributes the rule set to
# values of its own (e.g. a config copy with another attention implementation), as the rule left them.
CHANGED = "_clipfast_changed"


class Unsupported(Exception):
    """Raised by a rule's ``convert`` to leave a module alone; the message is the reason the report shows."""


@dataclass(frozen=True)
class PatchRule:
    """One way of swapping a fast module in.

    family: the option users enable or disable (a keyword of ``patch``).
    name: what the report shows, e.g. ``"OpenAI ResidualAttentionBlock.mlp -> fused MLP"``.
    match: cheap type/structural test on one module.
    convert: returns the replacement (see the module docstring) or raises ``Unsupported(reason)``.
    """

    family: str
    name: str
    match: Callable[[nn.Module], bool]
    convert: Callable[[nn.Module], nn.Module]


#: Every registered rule, in the order ``patch`` tries them (the first matching rule that converts wins).
RULES: list[PatchRule] = []


def register_rule(rule: PatchRule) -> PatchRule:
    """Add ``rule`` to the registry (after the rules already there: the first matching rule wins).
    Registering a rule with the family and name of one already registered replaces it in place, so
    re-importing a rules module does not duplicate its rules."""
    if not isinstance(rule, PatchRule):
        raise TypeError(f"register_rule: expected a PatchRule, got {type(rule).__name__}")
    if not rule.family.isidentifier():
        raise ValueError(f"register_rule: family {rule.family!r} must be a valid keyword name")
    for i, existing in enumerate(RULES):
        if (existing.family, existing.name) == (rule.family, rule.name):
            RULES[i] = rule
            return rule
    RULES.append(rule)
    return rule


def order_rules(modules: Sequence[str]) -> None:
    """Put the rules in the order of ``modules``, by the module that defines each rule's ``match`` (in
    registration order within one module), whichever module was imported first; rules of any other module
    keep their registration order after those."""
    rank = {name: i for i, name in enumerate(modules)}
    RULES.sort(key=lambda rule: rank.get(getattr(rule.match, "__module__", None), len(rank)))


# ----------------------------------------------------------------------------------------------
# Building replacements
# ----------------------------------------------------------------------------------------------

def clone_as(module: nn.Module, cls: type) -> nn.Module:
    """A new instance of ``cls`` (a subclass of ``type(module)``) sharing ``module``'s parameters,
    buffers, submodules and attributes.

    The containers (``_parameters``, ``_buffers``, ``_modules``, ...) are fresh dicts holding the same
    objects, so swapping a child of the clone leaves the original's children untouched. Hook
    dictionaries are shared, so removing a hook through its handle works on both."""
    if not (isinstance(cls, type) and issubclass(cls, type(module))):
        raise TypeError(f"clone_as: {getattr(cls, '__name__', cls)!r} is not a subclass of {type(module).__name__}")
    new = cls.__new__(cls)
    state = {}
    for key, value in module.__dict__.items():
        if key in (ORIGINAL, CHANGED):
            continue
        if isinstance(value, (dict, set)) and "hook" not in key:
            value = type(value)(value)
        state[key] = value
    new.__dict__.update(state)
    return new


_SUBCLASSES: dict[tuple, type] = {}


def fast_subclass(original_cls: type, forward: Callable, name: str) -> type:
    """The subclass of ``original_cls`` whose ``forward`` is ``forward`` (cached: one class per
    original class, forward and name). Its instances are recognized as already patched."""
    key = (original_cls, forward, name)
    cls = _SUBCLASSES.get(key)
    if cls is None:
        cls = type(name, (original_cls,), {
            "forward": forward,
            "__module__": getattr(forward, "__module__", __name__),
            "__qualname__": name,
            "__doc__": f"{original_cls.__name__} with its forward running clipfast kernels "
                       f"(made by clipfast.patching.fast_subclass).",
            "_clipfast_fast": True,
            "_clipfast_key": key,
            "__reduce_ex__": _reduce_fast,
        })
        _SUBCLASSES[key] = cls
    return cls


def _reduce_fast(self, protocol):
    # the class is made at run time, so pickle (torch.save) and deepcopy rebuild it from its key; the
    # forward must then be importable (a module-level function), as for any pickled reference
    getstate = getattr(self, "__getstate__", None)  # object.__getstate__ is Python 3.11+
    return _rebuild_fast, type(self)._clipfast_key, getstate() if getstate is not None else self.__dict__


def _rebuild_fast(original_cls: type, forward: Callable, name: str) -> nn.Module:
    cls = fast_subclass(original_cls, forward, name)
    return cls.__new__(cls)


def is_fast(module: nn.Module) -> bool:
    """Whether ``module`` is a clipfast replacement (swapped in by ``patch`` or built by ``fast_subclass``)."""
    return ORIGINAL in module.__dict__ or bool(getattr(type(module), "_clipfast_fast", False))
