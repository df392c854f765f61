"""What a kernel's behaviour depends on outside its arguments: the process's one-time warnings, the cache
folder (dispatch choices, kernel configs, kept autotune results), the versions a timing depends on, and the
device a launch runs on (its compute capability and SM count, or those of the GPU that planning stands in for).

The bottom of the package: it imports nothing from clipfast, so every layer above can use it."""
from __future__ import annotations

import functools
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


# ---------------------------------------------------------------------------------------------
# Devices (``runtime`` re-exports ``capability`` and ``sm_count``: the kernels ask through it)
# ---------------------------------------------------------------------------------------------

# Streaming multiprocessors of the usual GPU of an architecture (planning on CPU: split-K and persistent
# grids depend on it). H100 SXM 132, A100 108.
TARGET_SM_COUNT = {80: 108, 86: 84, 89: 128, 90: 132}

# Planning (``clipfast warm``): the architecture (10 x major + minor) and SM count that non-CUDA tensors answer
# with, as a GPU of that architecture would; None outside planning.
_target: tuple[int, int] | None = None


def set_target(arch: int | None, sm_count: int | None = None) -> None:
    """Make ``capability`` / ``sm_count`` answer ``arch`` (and ``sm_count``, else the architecture's usual SM
    count) for non-CUDA tensors; CUDA tensors keep their real answers. ``arch`` None undoes it."""
    global _target
    _target = None if arch is None else (arch, sm_count or TARGET_SM_COUNT.get(arch, 132))


@functools.lru_cache(maxsize=None)
def _device_properties(index: int):
    import torch

    return torch.cuda.get_device_properties(index)


def capability(device) -> tuple[int, int]:
    """(major, minor) compute capability of ``device`` (a ``torch.device``); (0, 0) for a non-CUDA device,
    unless planning stands in for a GPU (``set_target``)."""
    if device.type != "cuda":
        return (_target[0] // 10, _target[0] % 10) if _target else (0, 0)
    import torch

    return torch.cuda.get_device_capability(device)


def sm_count(device) -> int:
    """Streaming multiprocessors on ``device`` (a small fixed number on CPU, to keep grids small, unless
    planning stands in for a GPU)."""
    if device.type != "cuda":
        return _target[1] if _target else 4
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_properties(index).multi_processor_count
