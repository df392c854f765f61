"""The ``clipfast`` command line: ``verify``, ``bench``, ``tune``, ``aot`` and ``run``.

    clipfast verify [MODEL] [--tiny] [--dtype fp32|fp16|bf16] [--batch N] [--json PATH]
    clipfast bench [TARGET] [--dtype ...] [--json PATH] [--plot PATH] [--smoke]   (targets: bench --help)
    clipfast tune MODEL [--batch N] [--dtype ...] [--infer|--train] [--kernels] [--json PATH]
    clipfast warm MODEL [--train|--infer] [--batch N] [--dtype ...] [--arch 80 90] [--jobs N] [--plan-only]
    clipfast aot [--quick] [--arch 80 90] [--dtype fp16 bf16 fp32] [--filter FAMILY] [--json PATH]
    clipfast run [--interpret] [--families F,F] [--dispatch MODE] (-m MODULE | SCRIPT) [ARGS...]

Without a GPU the kernels run on CPU through the Triton interpreter. ``TRITON_INTERPRET`` must be set
before triton is imported, so the command re-executes itself with it set when needed (``verify`` and
``bench`` always on CPU, ``run`` with ``--interpret``). ``python -m clipfast`` is the same command.

``run`` is handed to ``clipfast.launcher`` before this parser sees its arguments (they are the program's).
"""
from __future__ import annotations

import argparse
import os
import sys


def _ensure_interpreter_without_gpu(argv: list[str]) -> None:
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    if os.environ.get("CLIPFAST_NO_REEXEC") == "1":
        return
    env = dict(os.environ, TRITON_INTERPRET="1", CLIPFAST_NO_REEXEC="1")
    os.execve(sys.executable, [sys.executable, "-m", "clipfast.cli", *argv], env)


def _parser() -> argparse.ArgumentParser:
    from .benchmarks.cli import targets_help

    p = argparse.ArgumentParser(prog="clipfast", description="Fused Triton kernels for CLIP models. Commands: "
                                "verify, bench, tune, warm, aot, run ('clipfast COMMAND --help' for each).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    v = sub.add_parser("verify", help="patch a model and report forward/backward errors module by module")
    v.add_argument("model", nargs="?", default=None,
                   help="reference model name (e.g. ViT-B-16, RN50, tiny), or open_clip:NAME, hf:clip, hf:siglip")
    v.add_argument("--tiny", action="store_true", help="a tiny configuration (the default on CPU)")
    v.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="compute dtype (default bf16 on GPU, fp32 on CPU)")
    v.add_argument("--batch", type=int, default=2)
    v.add_argument("--json", default=None, help="write the full report as JSON")
    v.add_argument("--no-progress", action="store_true")

    b = sub.add_parser("bench", help="time kernels and models against eager and torch.compile",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="targets:\n" + targets_help())
    b.add_argument("target", nargs="?", default="all", metavar="TARGET",
                   help="what to run (default: all); the targets are listed below")
    b.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None)
    b.add_argument("--json", default=None, help="results JSON path (default: bench/results/<gpu>-<date>/)")
    b.add_argument("--csv", default=None)
    b.add_argument("--plot", default=None, help="write PNG charts to this path")
    b.add_argument("--smoke", action="store_true", help="tiny shapes, no timings (the default without a GPU)")

    t = sub.add_parser("tune", help="time clipfast against PyTorch on every op and shape a model meets; write "
                                    "the dispatch cache")
    t.add_argument("model", help="model name, as for verify (e.g. ViT-B-16, tiny, open_clip:NAME, hf:clip)")
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="compute dtype (default bf16 on GPU, fp32 on CPU)")
    step = t.add_mutually_exclusive_group()
    step.add_argument("--infer", dest="train", action="store_false", help="forward under no_grad (default)")
    step.add_argument("--train", dest="train", action="store_true", help="forward, CLIP loss and backward")
    t.add_argument("--json", default=None, help="write the timings as JSON (with --kernels: the table entries)")
    t.add_argument("--kernels", action="store_true",
                   help="time every config each autotuned kernel of the step offers (CLIPFAST_AUTOTUNE=max, "
                        "results kept on disk) and write the user's config table; GPU only")
    t.add_argument("--cpu-timer", action="store_true",
                   help="without a GPU, time the CPU paths by the host clock (exercises the command)")

    a = sub.add_parser("aot", help="compile every kernel for sm_80/sm_90 without a GPU; registers, spills, MMA")
    a.add_argument("--quick", action="store_true",
                   help="only the cases marked quick (a few per kernel, what CI and the tests compile)")
    a.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=[80, 90],
                   help="GPU architectures to compile for: 80 (A100), 90 (H100/H200); default both")
    a.add_argument("--dtype", nargs="+", default=None, choices=["fp16", "bf16", "fp32"],
                   help="only the cases of these operand dtypes (fp32: the tiles offered to fp32 operands, exact "
                        "and TF32); default every case's own (fp16 and bf16, fp32 where a case has it)")
    a.add_argument("--filter", default=None, metavar="TEXT",
                   help="only the kernels whose name contains TEXT, or one family (e.g. attention)")
    a.add_argument("--json", default=None, metavar="PATH",
                   help="also write the rows (registers, spills, shared memory, MMA per case) as JSON")

    w = sub.add_parser("warm", help="precompile the kernels and configs a model's first step compiles, into "
                                    "Triton's cache (for the local GPU, or --arch without one)")
    from .warm import add_arguments

    add_arguments(w)

    # listed for --help; its arguments are parsed by clipfast.launcher (they belong to the program)
    sub.add_parser("run", help="run an unmodified program (SCRIPT or -m MODULE) with clipfast.autopatch() on; "
                               "patch reports and a summary of kernels launched and fallbacks at exit",
                   add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":  # everything after the program name is the program's
        from .launcher import main_run

        return main_run(argv[1:])
    args = _parser().parse_args(argv)  # bad arguments exit with status 2 and a usage message
    if args.command == "aot":
        from .aot import run

        return run(args.arch, args.quick, args.filter, args.json, dtypes=args.dtype)
    if args.batch < 1 if args.command in ("verify", "tune", "warm") else False:
        print(f"clipfast {args.command}: --batch must be at least 1", file=sys.stderr)
        return 2
    if args.command == "warm":  # no interpreter: it compiles for GPUs (planning runs in its own child)
        from .warm import main_warm

        return main_warm(args)
    if args.command == "tune" and args.kernels:
        from .tune_kernels import main_tune_kernels

        return main_tune_kernels(args)
    if args.command == "tune":  # no interpreter: a CPU has nothing to time
        from .tune import main_tune

        return main_tune(args)
    if args.command == "bench" and args.target == "overhead":  # host time of the eager-fallback path
        from .benchmarks.overhead import main_overhead

        return main_overhead(args)
    _ensure_interpreter_without_gpu(argv)
    if args.command == "verify":
        from .verify_models import main_verify

        return main_verify(args)
    from .benchmarks.cli import main_bench

    return main_bench(args)


if __name__ == "__main__":
    sys.exit(main())
