"""``clipfast.autopatch()``: every CLIP-family model a program builds from the call on is patched as it is
built, and open_clip's contrastive losses become clipfast's; ``handle.undo()`` puts every library back.

How it hooks in, library by library:

- **Loader functions** (open_clip ``create_model`` / ``create_model_and_transforms`` /
  ``create_model_from_pretrained`` / ``load_openai_model``, OpenAI ``clip.load`` / ``clip.model.build_model``,
  cn_clip ``load_from_name`` / ``create_model``): a wrapper calls the library's own function and patches the
  model it returns (``clipfast.patch``, the families given to ``autopatch``). The wrapper takes the place of
  the original function object in every module namespace that holds it: the module that defines it, the
  package that re-exports it, and copies made with ``from open_clip import create_model_and_transforms`` in
  modules already imported (``open_clip_train.main``, user code). Modules imported later copy the wrapper from
  the library. Nested calls (``create_model_and_transforms`` calls ``create_model``) patch once, at the
  outermost call, after the library has finished with the model (weights loaded, device and dtype set).
- **Libraries imported after the call**: a finder on ``sys.meta_path``
  (``clipfast.integrations.import_hooks.AfterImport``) watches the few modules that define those functions
  and installs the wrappers right after such a module's code has run, before any other module can copy its
  names. The module keeps its own loader (``__loader__``, ``__spec__.loader``).
- **Hugging Face**: ``PreTrainedModel.post_init`` (the last step of every model's constructor, so
  ``Model(config)``, ``from_config`` / ``_from_config`` and ``from_pretrained`` alike) patches models whose
  class is, or derives from, one of transformers' CLIP / ChineseCLIP / CLIPSeg / SigLIP / SigLIP2 classes.
  ``from_pretrained`` loads the weights after the constructor, into the module tree as it then is: swapped
  modules share the parameter containers' contents with the originals and are where the loader puts the
  weights, so the loaded model is patched and holds the checkpoint's weights. A CLIP-family model built
  inside another CLIP-family model's constructor is patched with its parent; one built inside any other
  model (a VLM's vision tower) is patched on its own.
- **Losses** (``loss=True``): the names ``ClipLoss`` and ``SigLipLoss`` of ``open_clip.loss`` (and every
  copy, ``open_clip.factory``'s included, so ``create_loss`` builds them) are bound to subclasses of
  ``clipfast.nn.ClipLoss`` / ``SigLipLoss`` (same arguments and results). ``CoCaLoss`` and
  ``DistillClipLoss`` stay open_clip's (their base class was fixed when open_clip defined them); ``create_loss``
  says which one it built.

``undo()`` removes the finder and puts the original object back into every namespace that holds a
replacement (including modules imported while autopatch was on) and the original ``post_init`` onto
``PreTrainedModel``: every module attribute of the libraries is again the very object it was. Models
patched meanwhile stay patched (``clipfast.unpatch(model)`` restores one). A wrapper still referenced
somewhere after ``undo()`` (a local variable) calls the original and patches nothing.

What is not covered: models built by calling a library's model class directly (``open_clip.model.CLIP(...)``,
OpenAI ``clip.model.CLIP(...)``; patch those with ``clipfast.patch``), and references to the loader
functions kept outside module namespaces before the call (a ``functools.partial``, a registry dict).
"""
from __future__ import annotations

import functools
import sys
import threading
import types
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from . import nn as _cf_nn
from .integrations.import_hooks import AfterImport
from .patching import PatchReport, check_family_options

__all__ = ["AutopatchHandle", "autopatch", "active"]


# ----------------------------------------------------------------------------------------------
# What is hooked
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Target:
    module: str   # the module that defines the object
    name: str     # its attribute there
    kind: str     # "loader" | "create_loss" | "loss"
    label: str    # what reports call it


_LOADERS = (
    _Target("open_clip.factory", "create_model", "loader", "open_clip.create_model"),
    _Target("open_clip.factory", "create_model_and_transforms", "loader", "open_clip.create_model_and_transforms"),
    _Target("open_clip.factory", "create_model_from_pretrained", "loader", "open_clip.create_model_from_pretrained"),
    _Target("open_clip.openai", "load_openai_model", "loader", "open_clip.load_openai_model"),
    _Target("clip.clip", "load", "loader", "clip.load"),
    _Target("clip.model", "build_model", "loader", "clip.model.build_model"),
    _Target("cn_clip.clip.utils", "load_from_name", "loader", "cn_clip.clip.load_from_name"),
    _Target("cn_clip.clip.utils", "create_model", "loader", "cn_clip.clip.utils.create_model"),
)
_LOSSES = (
    _Target("open_clip.factory", "create_loss", "create_loss", "open_clip.create_loss"),
    _Target("open_clip.loss", "ClipLoss", "loss", "open_clip.loss.ClipLoss"),
    _Target("open_clip.loss", "SigLipLoss", "loss", "open_clip.loss.SigLipLoss"),
)
_HF_MODULE = "transformers.modeling_utils"
#: transformers' model packages whose models (and subclasses of them) are patched when built.
HF_FAMILIES = ("clip", "chinese_clip", "clipseg", "siglip", "siglip2")
_HF_PREFIXES = tuple(f"transformers.models.{name}." for name in HF_FAMILIES)


class ClipLoss(_cf_nn.ClipLoss):
    """What ``open_clip.loss.ClipLoss`` (and ``open_clip.ClipLoss``) names while ``clipfast.autopatch`` is on:
    ``clipfast.nn.ClipLoss``, the fused loss with open_clip's constructor, forward and results."""


class SigLipLoss(_cf_nn.SigLipLoss):
    """What ``open_clip.loss.SigLipLoss`` names while ``clipfast.autopatch`` is on: ``clipfast.nn.SigLipLoss``."""


_LOSS_CLASSES = {"ClipLoss": ClipLoss, "SigLipLoss": SigLipLoss}

_state = threading.local()  # depth: nesting of wrapped loader calls in this thread
_active: "AutopatchHandle | None" = None


def active() -> "AutopatchHandle | None":
    """The handle of the autopatch now on, or None."""
    return _active if _active is not None and _active.active else None


def _depth() -> int:
    return getattr(_state, "depth", 0)


# ----------------------------------------------------------------------------------------------
# The handle
# ----------------------------------------------------------------------------------------------

def _is_clipfast_module(name: str) -> bool:
    return name == "clipfast" or name.startswith("clipfast.")


@dataclass
class PatchedModel:
    """One model autopatch patched: where it was built and ``clipfast.patch``'s report."""

    source: str
    model_class: str
    report: PatchReport

    def __str__(self) -> str:
        return f"{self.source} -> {self.model_class}\n{self.report}"


@dataclass
class AutopatchHandle:
    """Returned by ``clipfast.autopatch``: ``undo()`` restores the libraries; ``patched`` lists the models
    patched so far (source, class, report) and ``notes`` what was left as it was and why. Also a context
    manager (``with clipfast.autopatch(): ...`` undoes on exit)."""

    families: dict[str, bool]
    loss: bool
    on_patch: Callable | None = None
    on_note: Callable | None = None
    patched: list[PatchedModel] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    active: bool = False
    # id(original) -> (original, replacement); id(replacement) -> (replacement, original)
    _replacement: dict = field(default_factory=dict, repr=False)
    _original: dict = field(default_factory=dict, repr=False)
    _finder: AfterImport | None = field(default=None, repr=False)
    _hf: tuple | None = field(default=None, repr=False)  # (PreTrainedModel, original post_init)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    # -- install / undo ----------------------------------------------------------------------------

    def _targets(self) -> tuple[_Target, ...]:
        return _LOADERS + (_LOSSES if self.loss else ())

    def _install(self) -> None:
        self.active = True
        watched = {t.module for t in self._targets()} | {_HF_MODULE}
        self._finder = AfterImport(watched, self._on_import).install()
        for name in sorted(watched):
            module = sys.modules.get(name)
            if module is not None:
                self._hook_module(module)
        self._swap_everywhere(self._replacement)

    def _on_import(self, module: types.ModuleType) -> None:
        if not self.active:
            return
        try:
            self._hook_module(module)
        except Exception as exc:  # never break the program's import
            self._note(f"clipfast.autopatch: could not hook {module.__name__} ({type(exc).__name__}: {exc})")

    def _hook_module(self, module: types.ModuleType) -> None:
        with self._lock:
            if module.__name__ == _HF_MODULE:
                self._hook_hf(module)
                return
            for target in self._targets():
                if target.module != module.__name__:
                    continue
                current = module.__dict__.get(target.name)
                if current is None or id(current) in self._original:
                    continue  # absent in this version, or already ours
                replacement = self._make_replacement(target, current)
                if replacement is None:
                    continue
                self._replacement[id(current)] = (current, replacement)
                self._original[id(replacement)] = (replacement, current)
                module.__dict__[target.name] = replacement

    def _make_replacement(self, target: _Target, original):
        if target.kind == "loss":
            return _LOSS_CLASSES[target.name] if isinstance(original, type) else None
        if not callable(original) or isinstance(original, type):
            return None
        return self._wrap(original, target)

    def _swap_everywhere(self, mapping: dict) -> None:
        """In every module namespace (clipfast's own excepted), replace each object that is a key of
        ``mapping`` (by identity) with its counterpart."""
        if not mapping:
            return
        for name, module in list(sys.modules.items()):
            if _is_clipfast_module(name) or module is None:
                continue
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            try:
                items = list(namespace.items())
            except RuntimeError:  # changed size while another thread imports: take it again
                items = list(dict(namespace).items())
            for key, value in items:
                entry = mapping.get(id(value))
                if entry is not None and entry[0] is value:
                    namespace[key] = entry[1]

    def undo(self) -> None:
        """Restore every library as it was before ``autopatch`` (models already patched stay patched)."""
        global _active
        with self._lock:
            if not self.active:
                return
            self.active = False
            if self._finder is not None:
                self._finder.remove()
            self._finder = None
            self._swap_everywhere(self._original)
            if self._hf is not None:
                cls, original = self._hf
                cls.post_init = original
                self._hf = None
            self._replacement.clear()
            self._original.clear()
            if _active is self:
                _active = None

    def __enter__(self) -> "AutopatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "on" if self.active else "undone"
        off = [k for k, v in self.families.items() if not v]
        return (f"AutopatchHandle({state}, loss={self.loss}, families off: {off or 'none'}, "
                f"{len(self.patched)} model(s) patched)")

    # -- patching --------------------------------------------------------------------------------

    def _note(self, text: str) -> None:
        if text in self.notes:
            return
        self.notes.append(text)
        if self.on_note is not None:
            self.on_note(text)
        else:
            warnings.warn(text, UserWarning, stacklevel=4)

    def _patch_model(self, model, source: str, report: bool = True) -> None:
        import torch

        if isinstance(model, torch.jit.ScriptModule):
            self._note(f"clipfast.autopatch: {source} returned a TorchScript model, left as it is "
                       "(load it with jit=False to patch it)")
            return
        if not isinstance(model, nn.Module):
            return
        from .patching import patch

        model_class = type(model).__qualname__
        try:
            result = patch(model, **self.families)
        except Exception as exc:  # the program goes on with the unpatched model, and says so
            self._note(f"clipfast.autopatch: could not patch {type(model).__name__} from {source}, left as it is "
                       f"({type(exc).__name__}: {exc})")
            return
        self.patched.append(PatchedModel(source, model_class, result))
        if report and self.on_patch is not None:
            self.on_patch(model, result, f"{model_class} from {source}")

    def _patch_result(self, result, target: _Target) -> None:
        model = result
        if isinstance(result, (tuple, list)) and result:
            model = result[0]
        self._patch_model(model, target.label)

    def _wrap(self, original: Callable, target: _Target) -> Callable:
        handle = self

        if target.kind == "create_loss":
            @functools.wraps(original)
            def create_loss(*args, **kwargs):
                loss = original(*args, **kwargs)
                if handle.active:
                    handle._say_loss(loss)
                return loss

            create_loss._clipfast_autopatch = True
            return create_loss

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            if not handle.active:
                return original(*args, **kwargs)
            _state.depth = _depth() + 1
            try:
                result = original(*args, **kwargs)
            finally:
                _state.depth -= 1
            if _state.depth == 0:
                handle._patch_result(result, target)
            return result

        wrapper._clipfast_autopatch = True
        return wrapper

    def _say_loss(self, loss) -> None:
        name = type(loss).__name__
        if isinstance(loss, (ClipLoss, SigLipLoss)):
            self._note(f"clipfast.autopatch: open_clip.create_loss built {name}: clipfast.nn.{name} (fused loss)")
        elif type(loss).__module__.startswith("open_clip"):
            self._note(f"clipfast.autopatch: open_clip.create_loss built {name}: open_clip's own, kept "
                       "(clipfast fuses the CLIP and SigLIP losses only; a CoCa caption or distillation loss runs "
                       "as open_clip wrote it)")

    # -- Hugging Face ------------------------------------------------------------------------------

    def _hook_hf(self, module: types.ModuleType) -> None:
        cls = getattr(module, "PreTrainedModel", None)
        if cls is None or self._hf is not None or "post_init" not in cls.__dict__:
            return
        original = cls.__dict__["post_init"]
        handle = self

        @functools.wraps(original)
        def post_init(model, *args, **kwargs):
            result = original(model, *args, **kwargs)
            if handle.active and _depth() == 0 and _hf_clip_family(type(model)) and not _inside_hf_clip_init(model):
                handle._patch_model(model, "transformers")
            return result

        post_init._clipfast_autopatch = True
        self._hf = (cls, original)
        cls.post_init = post_init


def _hf_clip_family(cls: type) -> bool:
    return any(c.__module__.startswith(_HF_PREFIXES) for c in cls.__mro__)


def _inside_hf_clip_init(model) -> bool:
    """Whether ``model`` is being built inside the constructor of another CLIP-family model (which patches
    its whole tree, this model's modules included, when its own constructor ends)."""
    frame = sys._getframe(2)
    for _ in range(64):
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == "__init__" and code.co_argcount and code.co_varnames[0] == "self":
            owner = frame.f_locals.get("self")
            if owner is not None and owner is not model and isinstance(owner, nn.Module) \
                    and _hf_clip_family(type(owner)):
                return True
        frame = frame.f_back
    return False


# ----------------------------------------------------------------------------------------------
# The public call
# ----------------------------------------------------------------------------------------------

def autopatch(loss: bool = True, *, on_patch: Callable | None = None, on_note: Callable | None = None,
              **families: bool) -> AutopatchHandle:
    """From now on, patch every CLIP-family model the installed libraries build, as it is built.

    Covered: open_clip (``create_model``, ``create_model_and_transforms``, ``create_model_from_pretrained``,
    ``load_openai_model``, also where a module imported those names before this call), OpenAI ``clip.load``,
    cn_clip's ``load_from_name`` / ``create_model``, and Hugging Face CLIP / ChineseCLIP / CLIPSeg / SigLIP /
    SigLIP2 models however they are made (``from_pretrained``, ``from_config``, the constructor). With
    ``loss=True`` open_clip's ``ClipLoss`` / ``SigLipLoss`` (so ``create_loss``) are clipfast's fused losses;
    CoCa and distillation losses stay open_clip's, and ``create_loss`` says so. Models built before the call
    are not touched. Libraries not imported yet are hooked when they are imported.

    ``families``: the kernel families, as for ``clipfast.patch`` (e.g. ``attention=False``).
    ``on_patch(model, report, what)``: called after each model is patched (e.g. to print the report);
    ``what`` says which class and from where, e.g. ``"CLIP from open_clip.create_model_and_transforms"``.
    ``on_note(text)``: called with what was left as it was and why (default: a ``UserWarning``).

    Returns a handle: ``handle.undo()`` restores the libraries exactly (see ``clipfast/autopatching.py``).
    One autopatch is on at a time: calling again first undoes the earlier one."""
    global _active
    if not isinstance(loss, bool):
        raise TypeError(f"clipfast.autopatch(): `loss` must be True or False, got {loss!r}")
    check_family_options("clipfast.autopatch()", families)
    if _active is not None:
        _active.undo()
    handle = AutopatchHandle(families=dict(families), loss=loss, on_patch=on_patch, on_note=on_note)
    handle._install()
    _active = handle
    return handle
