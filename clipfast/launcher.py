"""``clipfast run``: run an unmodified Python program with ``clipfast.autopatch()`` on, like ``python -m``.

    clipfast run [--interpret] [--families F,F] [--no-FAMILY] [--dispatch MODE] [--no-loss] [--quiet]
                 (-m MODULE | SCRIPT) [ARGS...]

The program runs in this process (``runpy``: ``__name__ == "__main__"``, ``sys.argv`` = program and ARGS,
``sys.path[0]`` the script's folder for a SCRIPT), so it works wherever ``python -m`` does, under
``torchrun`` too::

    torchrun --nproc-per-node 2 -m clipfast.cli run -m open_clip_train.main ...

Each model's patch report is printed once, by rank 0 (``RANK``, else ``torch.distributed``), to stderr;
at exit every rank prints one line: kernels launched per family and every fallback taken with its reason.
``--interpret`` sets ``TRITON_INTERPRET=1`` before Triton is imported: ``clipfast`` itself imports Triton,
so the command starts itself again with it set (same process id, same arguments).
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys

DISPATCH_MODES = ("auto", "kernel", "torch")
_VALUE_OPTIONS = {"--families", "--dispatch"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clipfast run",
        description="Run an unmodified Python program (a script or -m MODULE, as `python` would) with "
                    "clipfast.autopatch() on: every CLIP-family model it builds is patched, open_clip's "
                    "ClipLoss/SigLipLoss are clipfast's. Prints each model's patch report (rank 0) and, at "
                    "exit, one line per rank: kernels launched per family and every fallback taken.",
        epilog="Under torchrun: torchrun --nproc-per-node 2 -m clipfast.cli run -m open_clip_train.main ARGS. "
               "clipfast's options come before -m / SCRIPT; everything after belongs to the program.")
    p.add_argument("--interpret", action="store_true",
                   help="run the kernels through the Triton interpreter (TRITON_INTERPRET=1, set before Triton "
                        "is imported): for CPU tensors, which otherwise run clipfast's eager reference")
    p.add_argument("--families", default=None, metavar="F,F",
                   help="comma-separated kernel families to switch on (default: all); the others stay off")
    p.add_argument("--dispatch", choices=DISPATCH_MODES, default=None,
                   help="dispatch mode (as CLIPFAST_DISPATCH): auto (measured choice on CUDA), kernel (always "
                        "clipfast's kernels), torch (always PyTorch)")
    p.add_argument("--no-loss", dest="loss", action="store_false",
                   help="leave open_clip's ClipLoss/SigLipLoss as they are")
    p.add_argument("--quiet", action="store_true", help="no patch reports (the exit summary still prints)")
    p.add_argument("-m", dest="module", metavar="MODULE", default=None,
                   help="run library module MODULE as a script (as python -m); the rest are its arguments")
    p.add_argument("program", nargs="?", metavar="SCRIPT", help="the program's path (unless -m)")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="the program's arguments")
    return p


def split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(clipfast's options, the program and its arguments): the program starts at ``-m`` or at the first
    argument that is not one of clipfast's options."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-m" or a.startswith("-m") and not a.startswith("--"):
            return argv[:i], argv[i:]
        if a == "--":
            return argv[:i], argv[i + 1:]
        if not a.startswith("-"):
            return argv[:i], argv[i:]
        i += 2 if a in _VALUE_OPTIONS else 1
    return argv, []


def _families(spec: str | None, parser_: argparse.ArgumentParser) -> dict[str, bool]:
    if spec is None:
        return {}
    from .patching import known_families

    known = known_families()
    wanted = [f.strip() for f in spec.split(",") if f.strip()]
    unknown = [f for f in wanted if f not in known]
    if unknown:
        parser_.error(f"unknown kernel family {', '.join(unknown)}; known: {', '.join(known)}")
    return {f: f in wanted for f in known}


def _reexec_with_interpreter(argv: list[str]) -> None:
    """Start this command again with TRITON_INTERPRET=1 in the environment (Triton reads it on import),
    keeping the interpreter's own options (``-u``, ``-X ...``, ``-W ...``)."""
    import subprocess

    from ._cli_guard import interpreter_options

    env = dict(os.environ, TRITON_INTERPRET="1")
    flags, runs = interpreter_options(list(getattr(sys, "orig_argv", None) or []))
    if not runs or runs[0] != "-m":  # the console script: the flags Python can tell
        flags = subprocess._args_from_interpreter_flags()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *flags, "-m", "clipfast.cli", "run", *argv], env)


def rank() -> int:
    value = os.environ.get("RANK")
    if value is not None and value.strip().lstrip("-").isdigit():
        return int(value)
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:
        pass
    return 0


def _say(text: str) -> None:
    """One write per line (text and newline together): the ranks of a torchrun job share stderr, and a line
    written in two pieces can be split by another rank's."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def main_run(argv: list[str]) -> int:
    p = parser()
    own, program = split(list(argv))
    args = p.parse_args(own)  # -h / bad options exit here
    if not program:
        p.error("nothing to run: give -m MODULE or SCRIPT")
    if program[0] == "-m" and len(program) < 2:
        p.error("-m needs a module name")
    if args.interpret and os.environ.get("TRITON_INTERPRET") != "1":
        _reexec_with_interpreter(list(argv))  # does not return
    if args.dispatch:
        os.environ["CLIPFAST_DISPATCH"] = args.dispatch  # processes the program starts inherit it
    families = _families(args.families, p)

    import clipfast
    from .monitor import Monitor

    if args.dispatch:
        clipfast.set_dispatch(args.dispatch)
    seen: set[str] = set()

    def on_patch(model, report, what):
        if args.quiet or rank() != 0:
            return
        text = str(report)
        if text in seen:
            _say(f"[clipfast] patched {what}: as the model above ({len(report.swapped)} module(s) swapped)")
            return
        seen.add(text)
        _say(f"[clipfast] patched {what}\n{text}")

    def on_note(text):
        if rank() == 0:
            _say(f"[clipfast] {text}")

    monitor = Monitor().start()
    handle = clipfast.autopatch(loss=args.loss, on_patch=on_patch, on_note=on_note, **families)
    code = 0
    try:
        if program[0].startswith("-m"):
            module = program[0][2:] or program[1]
            rest = program[1:] if program[0] != "-m" else program[2:]
            sys.argv = [module, *rest]  # argv[0] becomes the module's path, as with python -m
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            script = program[0]
            sys.argv = [script, *program[1:]]
            sys.path[0] = os.path.dirname(os.path.abspath(script))
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        raise
    except BaseException:
        code = "an exception"
        raise
    finally:
        status = "" if code in (0, None) else f" (exit: {code})"
        patched = len(handle.patched)
        _say(f"[clipfast] rank {rank()}{status}: {patched} model(s) patched; {monitor.summary()}")
    return 0
