"""The GPU check's child processes that run benchmark cases or clipfast commands, one process at a time per
lane of a step (the pytest shards load ``pytest_plugin`` instead):

    python -m clipfast.gpu_check.workers warm --step warm|warm_models --share I/N --records FILE
    python -m clipfast.gpu_check.workers bench --step STEP --records FILE
    python -m clipfast.gpu_check.workers model_warm --share 0/N --records FILE
    python -m clipfast.gpu_check.workers tune_kernels --records FILE

Each appends JSON lines to its records file, which the parent (``run.Run``) merges as they come: this
process's plan, each case's start (with this pid) before it runs, its results (``warm`` launches, benchmark
``row``s), a ``budget`` stop, and a ``cuda_error`` before it exits with ``child.EXIT_CUDA_ERROR``. The compile
and benchmark workers share one loop over their cases (``run_cases``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable

from .child import EXIT_CUDA_ERROR, append, crash_if_injected, device_error, is_cuda_error, listed, step_deadline
from .steps import plan


@contextlib.contextmanager
def compiling_every_config():
    """Within this block ``triton.runtime.autotuner.Autotuner.run`` compiles every pruned config at the
    actual arguments (a JIT launch in warmup mode: the same specialization and on-disk cache key as a real
    launch, nothing runs), then launches the first one so the results downstream stay defined. No
    benchmarking: that happens, from the warm cache, in the timed steps."""
    from triton.runtime.autotuner import Autotuner

    original = Autotuner.run

    def run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        try:
            configs = self.prune_configs(kwargs)
            for config in configs:
                if config.pre_hook is not None:
                    config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
                self.fn.run(*args, **{**kwargs, "warmup": True}, **config.all_kwargs())
        finally:
            self.nargs = None
        saved, self.configs = self.configs, configs[:1]
        try:
            return original(self, *args, **kwargs)
        finally:
            self.configs = saved

    Autotuner.run = run
    try:
        yield
    finally:
        Autotuner.run = original


# ------------------------------------------------------------------------------------------------
# One loop over a lane's cases (the compile and benchmark workers)
# ------------------------------------------------------------------------------------------------

def _label(case) -> str:
    return f"{getattr(case, 'module_family', case.family)}: {case.name}"


def _select(entries, records: str) -> list[tuple]:
    """``[(label, case, impls)]`` of ``entries`` that this process runs (``CLIPFAST_SUITE_ONLY_FILE``: the
    rerun of one case; ``CLIPFAST_SUITE_SKIP_FILE``: what a crashed process of this lane started), recorded
    as this process's plan; the step's budget starts now."""
    only, skip = listed("CLIPFAST_SUITE_ONLY_FILE"), listed("CLIPFAST_SUITE_SKIP_FILE") or set()
    chosen = [(_label(c), c, i) for c, i in entries]
    chosen = [e for e in chosen if (only is None or e[0] in only) and e[0] not in skip]
    step_deadline()
    append(records, {"kind": "ready", "pid": os.getpid(), "t": time.time()})
    append(records, {"kind": "plan", "pid": os.getpid(), "cases": [label for label, _, _ in chosen]})
    return chosen


def _start_case(records: str, step: str, label: str) -> None:
    """Record the case's start (a process that dies is pinned on it), then any injected crash."""
    append(records, {"kind": "start", "case": label, "pid": os.getpid(), "t": time.time()})
    crash_if_injected(f"{step}/{label}")


class _CudaError(Exception):
    pass


def _cuda_error_exit(records: str, label: str, error: str) -> int:
    """This process's CUDA context may be poisoned: record it and stop; the run reruns the case alone
    (CUDA_LAUNCH_BLOCKING=1) and continues the lane in a fresh process."""
    append(records, {"kind": "cuda_error", "case": label, "pid": os.getpid(), "error": error[:500]})
    return EXIT_CUDA_ERROR


# run_one(case, impls, emit, should_stop): runs one case's implementations, handing each result to emit
RunOne = Callable[[object, list, Callable[[dict], None], Callable[[], bool]], None]


def run_cases(entries, records: str, step: str, smoke: bool, kind: str, run_one: RunOne,
              failure: Callable[[object], dict]) -> int:
    """A lane's cases in order, each recorded as started (with this pid) before ``run_one`` runs it. Each
    result ``run_one`` hands to ``emit`` is recorded at once as a ``kind`` record; a case that raises is
    recorded as ``failure(case)`` with the error. The lane stops at the step's deadline with a ``budget``
    record (``run_one`` stops starting work once ``should_stop()``; the rehearsal gets at least its first
    result, however slow the machine). After a case whose error reads as a CUDA error, or after which the
    device no longer synchronizes, the process records it and exits (``EXIT_CUDA_ERROR``): nothing later
    runs in a poisoned context."""
    done, cut = [], []
    past_deadline = lambda: time.time() > step_deadline() and not (smoke and not done)  # noqa: E731

    def should_stop() -> bool:
        if not cut and past_deadline():
            cut.append(True)
        return bool(cut)

    def emit(result: dict) -> None:
        done.append(True)
        append(records, {"kind": kind, **result, "pid": os.getpid()})
        if is_cuda_error(result.get("error")):
            raise _CudaError(result["error"])  # the case's other implementations would fail in this context too

    for label, case, impls in entries:
        if past_deadline():
            append(records, {"kind": "budget", "stopped_before": label})
            return 0
        error = None
        try:
            _start_case(records, step, label)
            run_one(case, impls, emit, should_stop)
        except _CudaError as exc:
            error = str(exc)
        except Exception as exc:  # an injected crash, the smoke pass's drift check, inputs that cannot be built
            text = f"{type(exc).__name__}: {exc}"[:300]
            append(records, {"kind": kind, **failure(case), "error": text, "pid": os.getpid()})
            error = text if is_cuda_error(text) else None
        sticky = None if error else device_error()
        error = error or (sticky and f"device unusable after this case: {sticky}")
        if error:
            return _cuda_error_exit(records, label, error)
        if cut:
            append(records, {"kind": "budget", "stopped_before": label})
            return 0
    return 0


def worker_warm(share: int, workers: int, records: str, step: str = "warm") -> int:
    """Run this worker's share of a plan once (``warm``: the kernel cases; ``warm_models``: the whole-model
    torch.compile cases), every mode of every implementation, compiling every autotuned config; each launch
    recorded with its seconds and error."""
    import torch

    from ..benchmarks.harness import implementations, timed_step

    smoke = not torch.cuda.is_available()
    device = torch.device("cuda" if not smoke else "cpu")
    entries = plan("headline_model_compiled" if step == "warm_models" else "warm", smoke)[share::workers]

    def run_one(case, impls, emit, should_stop):
        for impl, fn in implementations(case, smoke, impls).items():
            for mode in [m for m in case.modes if not (m == "bwd" and "fwd+bwd" in case.modes)]:
                if should_stop():
                    return
                t0, error = time.time(), None
                try:
                    setup, run = timed_step(fn, case.make_inputs(device, case.dtype), mode)
                    run(setup())
                    if not smoke:
                        torch.cuda.synchronize()
                except Exception as exc:  # reported; the timed step will report it again
                    error = f"{type(exc).__name__}: {exc}"[:300]
                emit({"family": case.family, "case": case.name, "impl": impl, "mode": mode,
                      "seconds": round(time.time() - t0, 2), "error": error})

    def failure(case):
        return {"family": case.family, "case": case.name, "impl": "-", "mode": "-", "seconds": 0}

    with compiling_every_config():
        return run_cases(_select(entries, records), records, step, smoke, "warm", run_one, failure)


def worker_bench(step: str, records: str) -> int:
    """The step's cases in order through the benchmark harness (``run_case``), each row recorded as soon as
    it is measured."""
    import torch

    from ..benchmarks.harness import run_case

    smoke = not torch.cuda.is_available()

    def run_one(case, impls, emit, should_stop):
        run_case(case, smoke=smoke, impls=impls, should_stop=should_stop, on_row=emit)

    def failure(case):  # the smoke pass's drift check, or a case that cannot build its inputs
        return {"family": case.family, "case": case.name, "impl": "clipfast", "mode": "-",
                "dtype": str(case.dtype).replace("torch.", ""), "shape": case.shape, "smoke": smoke}

    return run_cases(_select(plan(step, smoke), records), records, step, smoke, "row", run_one, failure)


# ------------------------------------------------------------------------------------------------
# clipfast commands for the headline model (warm, tune --kernels)
# ------------------------------------------------------------------------------------------------

# The headline model's first training step, precompiled by `clipfast warm` (the model and batch the
# headline_model step times; the rehearsal plans the tiny model for sm_90 without compiling).
MODEL_WARM = ("ViT-B-16", 256, "bf16")
MODEL_WARM_REHEARSAL = ("tiny", 2, "fp16")


def _clipfast(args: list[str], env: dict):
    """``python -m clipfast.cli ARGS`` within what is left of the step's budget: ``(process, error)``; the
    error is the last line of stderr of a failed command, and the process None if it ran out of time."""
    try:
        proc = subprocess.run([sys.executable, "-m", "clipfast.cli", *args], env=env, capture_output=True, text=True,
                              timeout=max(10.0, step_deadline() - time.time()))
    except subprocess.TimeoutExpired:
        return None, "stopped at the step's time budget"
    error = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["exit " + str(proc.returncode)])[-1]
    return proc, error


def worker_model_warm(records: str, jobs: int) -> int:
    """``clipfast warm`` for the headline model's training step: its distinct compiles, in parallel over
    ``jobs`` processes, into Triton's cache before anything is timed; recorded with the number of compiles,
    the summed compile seconds and the wall time (the cold-start figures of this GPU)."""
    import torch

    smoke = not torch.cuda.is_available()
    model, batch, dtype = MODEL_WARM_REHEARSAL if smoke else MODEL_WARM
    label = f"clipfast warm {model} train B={batch} {dtype}"
    _start_case(records, "warm", label)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "warm.json")
        args = ["warm", model, "--train", "--batch", str(batch), "--dtype", dtype, "--jobs", str(max(1, jobs)),
                "--json", out] + (["--arch", "90", "--plan-only"] if smoke else [])
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # warm compiles for the GPU
        t0 = time.time()
        _, error = _clipfast(args, env)
        report = json.load(open(out)) if os.path.exists(out) else {}
    entry = {"kind": "warm", "family": "model", "case": label, "impl": "clipfast warm", "mode": "fwd+bwd",
             "seconds": round(time.time() - t0, 2), "error": error, "pid": os.getpid()}
    for arch, figures in report.get("archs", {}).items():
        entry.update({"arch": arch, **{k: figures.get(k) for k in ("launches", "distinct_compiles", "per_family",
                                                                     "compile_seconds", "wall_seconds", "jobs")}})
    append(records, entry)
    return 0


def worker_tune_kernels(records: str) -> int:
    """``clipfast tune --kernels`` for the headline model's training step: every offered config of every
    kernel it launches timed on this GPU; the winners, in the shipped tables' format, go into
    ``results.json`` (``autotune_table``) for the next commit to ship under ``kernels/configs/``."""
    import torch

    smoke = not torch.cuda.is_available()
    model, batch, dtype = MODEL_WARM_REHEARSAL if smoke else MODEL_WARM
    _start_case(records, "tune_kernels", f"clipfast tune --kernels {model}")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "table.json")
        args = ["tune", "--kernels", model, "--train", "--batch", str(batch), "--dtype", dtype, "--json", out]
        env = dict(os.environ, CLIPFAST_CACHE_DIR=os.path.join(tmp, "cache"))  # the user's own table untouched
        t0 = time.time()
        proc, error = _clipfast(args, env)
        note = (proc.stdout.strip().splitlines() or [""])[0] if smoke and proc is not None else None
        table = json.load(open(out)) if os.path.exists(out) else None
    append(records, {"kind": "autotune_table", "model": model, "batch": batch, "dtype": dtype, "table": table,
                     "seconds": round(time.time() - t0, 1), "error": error, "note": note, "pid": os.getpid()})
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m clipfast.gpu_check.workers",
                                description="A child process of the GPU check (started by clipfast.gpu_check.run).")
    p.add_argument("kind", choices=["warm", "model_warm", "tune_kernels", "bench"])
    p.add_argument("--share", default="0/1", help="this worker's share I/N of the plan")
    p.add_argument("--step", default=None, help="the step whose plan it runs")
    p.add_argument("--records", required=True, help="the JSON-lines file its records go to")
    args = p.parse_args(argv)
    share, workers = (int(v) for v in args.share.split("/"))
    if args.kind == "warm":
        return worker_warm(share, workers, args.records, args.step or "warm")
    if args.kind == "model_warm":
        return worker_model_warm(args.records, workers)
    if args.kind == "tune_kernels":
        return worker_tune_kernels(args.records)
    return worker_bench(args.step, args.records)


if __name__ == "__main__":
    sys.exit(main())
