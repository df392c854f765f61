"""What a kernel's behaviour depends on outside its arguments: the process's one-time warnings, the cache
folder (dispatch choices, kernel configs, kept autotune results) and the versions a timing depends on.

The bottom of the package: it imports nothing from clipfast, so every layer above can use it."""
from __future__ import annotations

import os
import warnings

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Warn the first time ``key`` is seen in this process (fallbacks must be visible, not noisy)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"clipfast: {message}", RuntimeWarning, stacklevel=3)


def cache_dir() -> str:
    """``CLIPFAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/clipfast``, else ``~/.cache/clipfast``."""
    explicit = os.environ.get("CLIPFAST_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "clipfast")


def clipfast_version() -> str:
    """The installed distribution's version (``clipfast.__version__``), read without importing the package
    above."""
    from importlib import metadata

    try:
        return metadata.version("clipfast")
    except metadata.PackageNotFoundError:
        return "unknown"


def versions() -> dict[str, str]:
    """The versions a measured choice depends on: a cache section names them, so an upgrade re-measures."""
    import torch
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "clipfast": clipfast_version()}
