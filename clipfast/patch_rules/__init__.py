"""Patch rules: one module per kernel family here (``layer_norm.py``, ``attention.py``, ...), and the rules of
each integrated library in its home in ``clipfast/integrations/`` (``LIBRARIES``); all register into
``registry``.

``load()`` (run by ``clipfast.patch`` the first time it needs the rules) imports the family modules (every
module of this package, in name order) and then the libraries' modules; importing a module registers its
rules with ``registry.register_rule``. Rules are tried in that order (see ``registry.order_rules``), the
first matching rule that converts a module winning: the attention family first (its ``match`` sees every
module and recognises the causal masks blocks hold), then the other families, then the libraries' rules
(each matches only its own library's classes). Adding a family means adding a file here, nothing else. A
rules module whose optional dependency is missing is skipped with a warning instead of breaking ``patch``
for every model.
"""
import importlib
import pkgutil
import warnings

from . import registry

#: The integrated libraries' rules modules, after the families' (their order among themselves does not
#: matter: each matches its own library's classes only).
LIBRARIES = ("clipfast.integrations.cn_clip", "clipfast.integrations.hf.rules", "clipfast.integrations.open_clip",
             "clipfast.integrations.timm")

_loaded: list[str] = []


def rule_modules() -> list[str]:
    """Every rules module, in the order their rules are tried."""
    families = sorted(f"{__name__}.{info.name}" for info in pkgutil.iter_modules(__path__))
    families = [name for name in families if name != registry.__name__]
    return families + list(LIBRARIES)


def load() -> None:
    """Import every rules module (once) and put their rules in order."""
    if _loaded:
        return
    modules = rule_modules()
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as error:
            short = name.removeprefix("clipfast.integrations.").removeprefix(f"{__name__}.")
            warnings.warn(f"clipfast: patch rules {short!r} not loaded: {error}", RuntimeWarning, stacklevel=3)
    registry.order_rules(modules)
    _loaded[:] = modules
