"""Dispatch modes: ``"auto"`` (measured choice), ``"kernel"`` (clipfast's path), ``"torch"`` (PyTorch's).

Read from ``CLIPFAST_DISPATCH`` at import; ``set_dispatch(mode)`` and ``with dispatch(mode):`` change it."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

MODES = ("auto", "kernel", "torch")
KERNEL = "clipfast"  # the name of clipfast's own candidate in every op
ENV_MODE = "CLIPFAST_DISPATCH"


def _check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"clipfast dispatch mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    return mode


def _mode_from_env() -> str:
    value = os.environ.get(ENV_MODE, "auto").strip().lower() or "auto"
    try:
        return _check_mode(value)
    except ValueError as exc:
        raise ValueError(f"{ENV_MODE}: {exc}") from None


_mode: str = _mode_from_env()


def set_dispatch(mode: str) -> str:
    """Set the dispatch mode (``"auto"``, ``"kernel"`` or ``"torch"``) for the process; returns the previous."""
    global _mode
    previous, _mode = _mode, _check_mode(mode)
    return previous


def get_dispatch() -> str:
    return _mode


@contextlib.contextmanager
def dispatch(mode: str) -> Iterator[None]:
    """``with clipfast.dispatch("torch"): ...`` runs the block in ``mode`` and restores the previous one."""
    previous = set_dispatch(mode)
    try:
        yield
    finally:
        set_dispatch(previous)
