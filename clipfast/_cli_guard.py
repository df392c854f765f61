"""The command line's first check, run by ``clipfast/__init__.py`` before anything heavy is imported.

``python -m clipfast.cli`` (and the ``clipfast`` console script) import the ``clipfast`` package before the
command line code runs, and importing the package reads ``CLIPFAST_DISPATCH`` (a bad value raises there,
as it should for a library import). Invoked as the command line, a bad value is one clean line and exit
status 2 instead of a traceback. Nothing here imports torch.
"""
from __future__ import annotations

import os
import sys

ENV_MODE = "CLIPFAST_DISPATCH"
MODES = ("auto", "kernel", "torch")  # clipfast.dispatching.MODES (tests/test_autopatch.py checks they agree)
_CLI_MODULES = ("clipfast.cli", "clipfast")
_OPTIONS_WITH_VALUE = ("-X", "-W", "-Q")


def interpreter_options(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """Split a Python command line (``sys.orig_argv``) into the interpreter's options and what runs:
    ``["-m", MODULE, ...]``, ``[SCRIPT, ...]``, or None for ``-c`` / an interactive interpreter."""
    i = 1
    while i < len(argv):
        a = argv[i]
        if a == "-m" or (a.startswith("-m") and not a.startswith("--")):
            return argv[1:i], argv[i:]
        if a == "-c" or a.startswith("-c") and not a.startswith("--") or a == "-":
            return argv[1:i], None
        if a in _OPTIONS_WITH_VALUE:
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        return argv[1:i], argv[i:]
    return argv[1:], None


def invoked_as_cli() -> bool:
    """Whether this process is the ``clipfast`` command (``python -m clipfast.cli``, ``python -m clipfast``
    or the console script), judged from the interpreter's own command line."""
    _, runs = interpreter_options(list(getattr(sys, "orig_argv", None) or []))
    if not runs:
        return False
    if runs[0] == "-m":
        return len(runs) > 1 and runs[1] in _CLI_MODULES
    if runs[0].startswith("-m"):
        return runs[0][2:] in _CLI_MODULES
    name = os.path.basename(runs[0])
    return name in ("clipfast", "clipfast.exe", "clipfast-script.py")


def bad_dispatch_env() -> str | None:
    """The one-line message for a bad ``CLIPFAST_DISPATCH`` (None when it is unset or valid)."""
    raw = os.environ.get(ENV_MODE)
    if raw is None:
        return None
    value = raw.strip().lower() or "auto"
    if value in MODES:
        return None
    return (f"clipfast: {ENV_MODE}={raw!r} is not a dispatch mode; use one of {', '.join(MODES)} "
            f"(or unset it)")


def check_cli_environment() -> None:
    if not invoked_as_cli():
        return
    message = bad_dispatch_env()
    if message:
        print(message, file=sys.stderr)
        raise SystemExit(2)
