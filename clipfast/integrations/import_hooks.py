"""Running code right after a module is imported: one ``sys.meta_path`` finder that finds nothing itself.

``AfterImport(names, after)``, once installed, answers the import system for a watched module name by asking
the finders after it for the spec, and wraps the spec's loader so that ``after(module)`` runs as soon as the
module's code has run, before any other module can use it or copy its names. The module keeps its own loader
(``__loader__``, ``__spec__.loader``: ``importlib.resources``, ``inspect`` and pickle read them). Several
finders may watch the same module (each asks the others, itself excepted, for the spec): each ``after`` runs.

Used by ``clipfast.integrations.hf`` (register the attention function when transformers loads its attention
registry) and ``clipfast.autopatch`` (wrap the model loaders of libraries imported after the call).
"""
from __future__ import annotations

import importlib.abc
import sys
import threading
import types
from typing import Callable, Iterable

__all__ = ["AfterImport"]


class AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``after(module)`` right after the code of each module named in ``names`` has run."""

    def __init__(self, names: Iterable[str], after: Callable[[types.ModuleType], None]):
        self.names = frozenset(names)
        self.after = after
        self._busy = threading.local()

    def install(self) -> "AfterImport":
        """Put this finder first on ``sys.meta_path`` (once)."""
        if not self.installed:
            sys.meta_path.insert(0, self)
        return self

    def remove(self) -> None:
        """Take this finder off ``sys.meta_path`` (modules already being imported still run ``after``)."""
        sys.meta_path[:] = [finder for finder in sys.meta_path if finder is not self]

    @property
    def installed(self) -> bool:
        return any(finder is self for finder in sys.meta_path)

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.names or getattr(self._busy, "name", None) == fullname:
            return None
        self._busy.name = fullname  # the finders asked below may ask this one again (another AfterImport)
        try:
            spec = None
            for finder in list(sys.meta_path):
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._busy.name = None
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader, self.after)
        return spec


class _Loader(importlib.abc.Loader):
    """The spec's own loader, then ``after(module)``."""

    def __init__(self, loader, after):
        self._loader = loader
        self._after = after

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        # the module keeps its own loader (importlib.resources, inspect and pickle read it)
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._after(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)
