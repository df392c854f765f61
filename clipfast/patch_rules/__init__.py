"""Patch rules, one module per kernel family (``layer_norm.py``, ``attention.py``, ...) and per
integrated codebase (``integrations_*.py``).

Every module in this package is imported (in name order) the first time ``clipfast.patch`` runs;
importing a module registers its rules with ``clipfast.patching.register_rule``. Adding a family means
adding a file here, nothing else. A rules module whose optional dependency is missing is skipped with a
warning instead of breaking ``patch`` for every model.
"""
import importlib
import pkgutil
import warnings

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    try:
        importlib.import_module(f"{__name__}.{_info.name}")
    except ImportError as _error:
        warnings.warn(f"clipfast: patch rules {_info.name!r} not loaded: {_error}", RuntimeWarning, stacklevel=2)
