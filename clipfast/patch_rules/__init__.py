"""Patch rules, one module per kernel family (``layer_norm.py``, ``attention.py``, ...).

Every module in this package is imported the first time ``clipfast.patch`` runs; importing a module
registers its rules with ``clipfast.patching.register_rule``. Adding a family means adding a file here,
nothing else.
"""
import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_info.name}")
