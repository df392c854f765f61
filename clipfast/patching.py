"""Switching clipfast on in an existing model: ``clipfast.patch(model)`` / ``clipfast.unpatch(model)``.

Swaps are per instance and driven by a registry of rules (``clipfast.patch_rules.registry``). A rule
(``PatchRule``) belongs to a kernel family ("layer_norm", "attention", "mlp", "patch_embed", ...), has a
cheap ``match`` test on one module and a ``convert`` that builds the replacement. The families' rules live in
``clipfast/patch_rules/<family>.py``, each integrated library's in ``clipfast/integrations/``; they are
imported the first time ``patch`` runs.

What a replacement must be (``clone_as`` and ``fast_subclass`` make this the easy path):
- an instance of a subclass of the original's class, so ``isinstance`` checks elsewhere (OpenAI's
  ``convert_weights``, Hugging Face output hooks) keep working;
- sharing the original's ``Parameter`` and buffer objects (no copies: an optimizer built before patching
  keeps training the same tensors) and keeping its ``state_dict`` keys.

Nothing global changes: no class inside ``torch.nn`` or another library is reassigned. The original of
every swapped module is kept on its replacement, so ``unpatch`` puts the very same module objects back
(with whatever happened to the parameters, buffers and train/eval flag while patched).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from . import patch_rules
from .dispatching import FAMILY_OPS, describe
from .patch_rules.registry import CHANGED as _CHANGED
from .patch_rules.registry import ORIGINAL as _ORIGINAL
from .patch_rules.registry import RULES as _RULES
from .patch_rules.registry import (PatchRule, Unsupported, _rebuild_fast, clone_as, fast_subclass,  # noqa: F401
                                   is_fast, register_rule)

__all__ = ["PatchRule", "PatchReport", "Skipped", "Swapped", "Unsupported", "clone_as", "fast_subclass", "is_fast",
           "known_families", "patch", "register_rule", "registered_rules", "unpatch"]

#: Families every installation knows about; ``patch`` takes a keyword for each, and for any other family a
#: registered rule names: the dispatch layer's kernel families but the loss (open_clip's loss modules are
#: swapped by ``clipfast.autopatch(loss=True)``, not by ``patch``).
DEFAULT_FAMILIES = tuple(family for family in FAMILY_OPS if family != "loss")


def registered_rules(family: str | None = None) -> list[PatchRule]:
    """The registered rules (of one family), in the order ``patch`` tries them."""
    _load_rules()
    return [r for r in _RULES if family is None or r.family == family]


def known_families() -> list[str]:
    _load_rules()
    families = list(DEFAULT_FAMILIES)
    families += [r.family for r in _RULES if r.family not in families]
    return list(dict.fromkeys(families))


def _load_rules() -> None:
    patch_rules.load()  # imports every rules module, which registers its rules


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------

def _class_name(obj) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return cls.__qualname__


@dataclass
class Swapped:
    path: str              # module path in the model ("" is the model itself)
    original: str          # class name of the original module
    replacement: str       # class name of the replacement
    family: str
    rule: str
    already: bool = False  # swapped by an earlier ``patch`` call
    order: int = field(default=0, repr=False, compare=False)  # position in the walk


@dataclass
class Skipped:
    path: str
    original: str
    family: str
    rule: str
    reason: str
    order: int = field(default=0, repr=False, compare=False)


@dataclass
class PatchReport:
    """What ``patch`` did: ``swapped`` and ``skipped`` entries, and the state of every family
    (``"enabled"``, ``"disabled"`` or ``"no rules registered"``). ``str(report)`` is a table."""

    swapped: list[Swapped] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    families: dict[str, str] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.swapped:
            out[s.family] = out.get(s.family, 0) + 1
        return out

    def __str__(self) -> str:
        # in model order (the order ``patch`` visited the modules)
        entries = sorted(self.swapped + self.skipped, key=lambda e: e.order)
        rows = [(e.path or "(model)", e.original,
                 (e.replacement + (" (already patched)" if e.already else "")) if isinstance(e, Swapped)
                 else f"left alone: {e.reason}") for e in entries]
        header = ("module", "original", "replacement")
        widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(2)]
        lines = [f"clipfast.patch: {len(self.swapped)} module(s) swapped, {len(self.skipped)} left alone"]
        if rows:
            lines.append(f"  {header[0]:<{widths[0]}}  {header[1]:<{widths[1]}}  {header[2]}")
            lines.append(f"  {'-' * widths[0]}  {'-' * widths[1]}  {'-' * len(header[2])}")
            lines += [f"  {p:<{widths[0]}}  {o:<{widths[1]}}  {r}" for p, o, r in rows]
        counts = self.counts()
        fam = []
        for name, state in self.families.items():
            fam.append(f"{name}: {counts.get(name, 0)} swapped" if state == "enabled" else f"{name}: {state}")
            if counts.get(name):  # which implementation they run (dispatch mode / measured choice)
                fam[-1] += f" (runs {describe(name)})"
        lines.append("  families: " + "; ".join(fam))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"PatchReport(swapped={len(self.swapped)}, skipped={len(self.skipped)}, families={self.families})"


# ----------------------------------------------------------------------------------------------
# patch / unpatch
# ----------------------------------------------------------------------------------------------

def check_family_options(caller: str, options: dict) -> None:
    """A ``TypeError`` naming ``caller`` (e.g. ``"clipfast.patch()"``) for an unknown kernel family or a
    switch that is not a bool."""
    known = known_families()
    unknown = [k for k in options if k not in known]
    if unknown:
        raise TypeError(f"{caller} got unknown kernel family {', '.join(map(repr, unknown))}; "
                        f"known families: {', '.join(known)}")
    for k, v in options.items():
        if not isinstance(v, bool):
            raise TypeError(f"{caller}: `{k}` must be True or False, got {v!r}")


def _resolve_families(options: dict) -> tuple[list[PatchRule], dict[str, str]]:
    check_family_options("clipfast.patch()", options)
    known = known_families()
    families = {}
    for name in known:
        if not options.get(name, True):
            families[name] = "disabled"
        elif not any(r.family == name for r in _RULES):
            families[name] = "no rules registered"
        else:
            families[name] = "enabled"
    rules = [r for r in _RULES if families[r.family] == "enabled"]
    return rules, families


def _convert(module: nn.Module, rules: list[PatchRule]):
    """(replacement, rule) for the first matching rule that converts ``module``; otherwise
    (None, [(rule, reason)...]) for the matching rules that declined."""
    declined = []
    for rule in rules:
        if not rule.match(module):
            continue
        try:
            new = rule.convert(module)
        except Unsupported as e:
            declined.append((rule, str(e) or "unsupported configuration"))
            continue
        if not isinstance(new, type(module)):
            raise TypeError(f"patch rule {rule.name!r} returned {type(new).__name__}, which is not a subclass of "
                            f"{type(module).__name__}")
        return new, rule
    return None, declined


def _swap_root(model: nn.Module, new: nn.Module) -> None:
    """Make ``model`` itself the replacement (keeping the object the caller holds): its original state
    moves to a shell object of the original class kept on it for ``unpatch``."""
    shell = type(model).__new__(type(model))
    shell.__dict__ = model.__dict__
    model.__class__ = type(new)
    model.__dict__ = new.__dict__
    model.__dict__[_ORIGINAL] = shell


def _unswap_root(model: nn.Module) -> None:
    _release(model)
    shell = _restore(model)
    model.__class__ = type(shell)
    model.__dict__ = shell.__dict__


def patch(model: nn.Module, *, layer_norm: bool = True, attention: bool = True, mlp: bool = True,
          patch_embed: bool = True, **other_families: bool) -> PatchReport:
    """Swap clipfast modules into ``model`` in place and return a report of what was swapped and what
    was left alone (and why).

    Modules are visited top-down; the first matching rule of an enabled family that accepts a module
    replaces it, and the children of the replacement are visited too. Patching again changes nothing
    (already swapped modules stay as they are); to turn a family off, ``unpatch`` and patch again.
    Unknown family names raise ``TypeError``.

    A patched model pickles (``torch.save``) and deep-copies as a patched model; its ``state_dict`` is
    the unpatched model's."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"clipfast.patch: `model` must be a torch.nn.Module, got {type(model).__name__}")
    options = dict(layer_norm=layer_norm, attention=attention, mlp=mlp, patch_embed=patch_embed, **other_families)
    rules, families = _resolve_families(options)
    report = PatchReport(families=families)
    order = iter(range(1 << 62))

    seen: dict[int, nn.Module] = {}  # id of a visited module -> what it is now (shared modules swap once)

    def visit(module: nn.Module, path: str, parent: nn.Module | None, name: str | None) -> None:
        if id(module) in seen:
            if seen[id(module)] is not module:
                setattr(parent, name, seen[id(module)])
                undo.append(lambda p=parent, n=name, m=module: setattr(p, n, m))
            return
        seen[id(module)] = module
        if is_fast(module):
            original = module.__dict__.get(_ORIGINAL)
            if original is not None:
                report.swapped.append(Swapped(path, _class_name(original), _class_name(module),
                                              getattr(module, "_clipfast_family", "?"),
                                              getattr(module, "_clipfast_rule", "?"), already=True,
                                              order=next(order)))
        else:
            new, result = _convert(module, rules)
            if new is not None:
                rule = result
                new.__dict__["_clipfast_family"] = rule.family
                new.__dict__["_clipfast_rule"] = rule.name
                _record_changes(module, new)
                if parent is None:
                    _swap_root(module, new)
                    undo.append(lambda m=module: _unswap_root(m))
                else:
                    new.__dict__[_ORIGINAL] = module
                    setattr(parent, name, new)
                    undo.append(lambda p=parent, n=name, m=module: setattr(p, n, m))
                    seen[id(module)] = new
                    module = new
                report.swapped.append(Swapped(path, _class_name(module.__dict__[_ORIGINAL]), _class_name(module),
                                              rule.family, rule.name, order=next(order)))
            elif result:  # every matching rule declined: report their reasons
                rule = result[0][0]
                reason = "; ".join(dict.fromkeys(r for _, r in result))
                report.skipped.append(Skipped(path, _class_name(module), rule.family, rule.name, reason,
                                              order=next(order)))
        for child_name, child in list(module._modules.items()):
            if child is not None:
                visit(child, f"{path}.{child_name}" if path else child_name, module, child_name)

    undo: list[Callable[[], None]] = []
    try:
        visit(model, "", None, None)
    except BaseException:
        # a failing rule leaves the model as it was before this call
        for step in reversed(undo):
            step()
        raise
    return report


_CONTAINERS = ("_parameters", "_buffers", "_modules")


def _record_changes(original: nn.Module, new: nn.Module) -> None:
    """Remember which of ``original``'s attributes the rule gave ``new`` other values (by identity; the
    containers ``clone_as`` copies count only when their contents differ), so that ``unpatch`` restores
    them rather than carrying the rule's values back."""
    changed = {}
    for key, value in new.__dict__.items():
        if key in _CONTAINERS or key not in original.__dict__:
            continue
        if not _same_contents(value, original.__dict__[key]):
            changed[key] = value
    new.__dict__[_CHANGED] = changed


def _same_contents(value, before) -> bool:
    """``value is before``, or ``value`` is ``clone_as``'s copy of the dict/set ``before`` holding the very
    same objects (compared by identity: values may be tensors, whose ``==`` is elementwise)."""
    if value is before:
        return True
    if type(value) is not type(before) or not isinstance(value, (dict, set)) or len(value) != len(before):
        return False
    if isinstance(value, set):
        return {id(v) for v in value} == {id(v) for v in before}
    return all(k in before and value[k] is before[k] for k in value)


def _restore(fast: nn.Module) -> nn.Module:
    """The original of ``fast``, brought up to date with what changed while patched: the current
    parameter/buffer/submodule objects (``.to()``, ``.half()`` may have replaced buffers) and the
    values of the original's plain attributes (``training``, ...). Attributes the rule itself changed
    (a config copy, ...) get their original values back, unless they were reassigned while patched."""
    original = fast.__dict__[_ORIGINAL]
    changed = fast.__dict__.get(_CHANGED, {})
    for key, value in list(original.__dict__.items()):
        if key not in fast.__dict__:
            continue
        current = fast.__dict__[key]
        if key in changed and current is changed[key]:
            continue
        if key in _CONTAINERS:
            original.__dict__[key] = type(value)((k, current.get(k, v)) for k, v in value.items())
        else:
            original.__dict__[key] = current
    return original


def _release(fast: nn.Module) -> None:
    """Let a replacement give up what it set up while patched: its class's ``_clipfast_release(self)``, if any
    (e.g. the unpadded Hugging Face towers' parameter-registration hook), runs before the original is back."""
    release = getattr(type(fast), "_clipfast_release", None)
    if release is not None:
        release(fast)


def unpatch(model: nn.Module) -> nn.Module:
    """Put back every module ``patch`` swapped in ``model`` (the very same objects). Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"clipfast.unpatch: `model` must be a torch.nn.Module, got {type(model).__name__}")

    def visit(module: nn.Module) -> None:
        # children first, so a restored parent gets back the original children
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            visit(child)
            if _ORIGINAL in child.__dict__:
                _release(child)
                module._modules[child_name] = _restore(child)

    visit(model)
    if _ORIGINAL in model.__dict__:
        _unswap_root(model)
    return model
