"""The GPU check: one command that answers where clipfast stands on a GPU within a short lease.

    python -m clipfast.benchmarks.suite OUT [--budget-s S]     # what bench/gpu_suite.sh runs

First the preflight (``preflight.py``: C compiler, ``Python.h``, GPU visible to nvidia-smi and torch
alike, libcuda, one tiny Triton kernel launched and checked): a failure stops the run, its one-line reason
in ``results.json`` (``stopped``) and ``summary.md``, exit code 3. Then the steps, in priority order, each
in its own processes with its own time budget (a share of the whole); every result is appended to ``OUT``
as soon as it exists, so a run stopped at any point returns all it finished:

1. ``warm``: ``clipfast warm`` compiles the headline model's first training step (ViT-B-16, B=256, bf16:
   the distinct compiles its launches need, in parallel over N processes; the rehearsal only plans the tiny
   model for sm_90), recorded with the compile count and seconds. Beside it, N worker processes (one per
   core, at most 16) each run their share of the benchmark cases
   the timed steps use, once per mode, with every autotuned kernel compiling *all* its pruned shipped
   configs at the case's real arguments (``compiling_every_config``: the JIT function is launched with
   each config's meta-parameters in warmup mode, i.e. compiled without running, then the first one runs),
   so Triton's on-disk cache holds every binary the timed steps will load, specialized exactly as they
   will launch it. torch.compile of the kernel-level cases is run too (inductor's on-disk caches).
   Whole-model cases are left out: their kernels run at the same shapes as the kernel cases. Beside this
   step and the next, ``warm_models`` runs the two whole-model torch.compiles of step 3 once (two
   processes), so the timed step loads them from inductor's caches; it is stopped before any timing.
2. ``correctness``: ``pytest -m "gpu or gpu_suite"`` split over N parallel processes (each compiles its
   own kernels), the bf16 tests first in every shard (``correctness_plan``): every family forward and
   backward in bf16/fp16 against float64 at CLIP shapes, every shipped tile forced, the large-tensor cases.
   No ``-x``; a test does not start after the budget.
3. ``headline_kernels``, ``headline_model``, ``headline_model_compiled``: the headline timings
   (``HEADLINE``), the whole-model torch.compile cases (two compiles) in a step of their own.
   ``tune_kernels``: ``clipfast tune --kernels`` on the headline model's training step times every offered
   config of its kernels; the winners, in the shipped tables' format, are ``autotune_table`` in
   ``results.json`` (copy its ``table`` to ``kernels/configs/sm<arch>.json`` to ship it).
4. ``rest_tests``: the rest of the test suite, in parallel; ``rest_bench``: every remaining benchmark
   case and implementation, as long as time is left.

Crashes: each step runs in lanes (a worker, or a pytest shard), one process at a time, each case's start
recorded with its pid. A process whose case raises a CUDA error (or after which the device no longer
synchronizes) records it and exits; any other abnormal exit is pinned on the case it had started last.
The lane then reruns that case alone with ``CUDA_LAUNCH_BLOCKING=1`` (so the error names the failing
launch; both attempts' errors are in ``results.json`` under ``crashes``) and continues with the cases not
yet started in a fresh process. Processes are respawned after a crash only, not per case: a start costs
seconds (torch and triton imports, pytest collection), and no case ever runs in a process that crashed.
``CLIPFAST_SUITE_CRASH`` injects a crash (``crash_if_injected``) for the tests.

Without CUDA the same steps run as a rehearsal: smoke shapes through the Triton interpreter, no timings,
results labelled ``"rehearsal": true`` (``clipfast.benchmarks.summary`` refuses to file them as GPU results).

Output (at most 8 files, no folders): ``results.json`` (environment, steps, test outcomes, benchmark
rows), ``summary.md`` (targets met/missed, tables), ``log.txt``, ``junit.xml`` and up to three PNG plots.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

GPU_BUDGET_S = 420        # all steps; with the install, start-up and overruns the command stays under 8 minutes
REHEARSAL_BUDGET_S = 100  # the CPU rehearsal (each step also gets its start-up and one item: see run_step)
REHEARSAL_MIN_STEP_S = 3  # pays, on 2 cores, for the preflight and the crash the rehearsal's test injects
REHEARSAL_MIN_ATTEMPT_S = 1  # a process started after a crash runs at least its first case (rehearsal, reruns)
FINAL_RESERVE_S = 8       # kept for the plots and the last write
STARTUP_S = 20            # allowed per step for a child's start-up (imports, pytest collection) on the GPU machine
REHEARSAL_STARTUP_S = 90  # the same on a small, shared CPU machine
MAX_WORKERS = 16
OUTPUT_FILES = ("results.json", "summary.md", "log.txt", "junit.xml",
                "plot_headline.png", "plot_rest.png", "plot_loss_scaling.png")
LOG_LIMIT_BYTES = 8 * 2**20


OPTIONAL_PACKAGES = {  # what a missing package costs the run (skipped with this note, never a failure)
    "open_clip": "open_clip's benchmark cases and integration tests are",
    "clip": "OpenAI clip's integration tests are",
    "cn_clip": "Chinese-CLIP's integration tests are",
    "transformers": "Hugging Face benchmark cases and integration tests are",
    "matplotlib": "the plots are",
    "pytest": "the test steps are",
}


@dataclass(frozen=True)
class Pick:
    """Benchmark cases of one family whose name matches ``gpu`` (at GPU shapes) or ``smoke`` (rehearsal),
    with the implementations to run (None: all, torch.compile of the eager one included)."""
    family: str
    gpu: str
    smoke: str
    impls: tuple[str, ...] | None = None

    def matches(self, case, smoke: bool) -> bool:
        module_family = getattr(case, "module_family", case.family)
        return module_family == self.family and re.search(self.smoke if smoke else self.gpu, case.name) is not None


# The headline timings (priority 2), side by side in one run. Whole-model torch.compile is its own step.
HEADLINE = {
    "headline_kernels": [
        Pick("attention", r"^ViT-B/16 B=256 H=12 S=197 D=64$", r"^smoke .*S=65 "),
        Pick("attention", r"^text B=256 H=8 S=77 D=64 causal$", r"^smoke .*causal$"),
        Pick("mlp", r"^fc\+QuickGELU\+proj ViT-B/16 ", r"^fc\+QuickGELU\+proj smoke"),
        Pick("layer_norm", r"^ViT-B/16 ", r"^smoke"),
        Pick("layer_norm", r"^add\+LN ViT-B/16 ", r"^add\+LN smoke"),
        Pick("contrastive_loss", r"^CLIP loss N=32768 d=512$", r"^CLIP loss"),
        Pick("local_loss", r"^local loss N=256 M=32768 ", r"^local loss"),
        Pick("host_overhead", r"", r""),
    ],
    "headline_model": [
        Pick("model", r"^ViT-B-16 (training step|image encoding) ", r"^tiny ", impls=("clipfast", "eager")),
    ],
    "headline_model_compiled": [  # the two whole-model compiles of the run
        Pick("model", r"^ViT-B-16 training step ", r"^tiny training step ",
             impls=("torch.compile", "clipfast+torch.compile")),
    ],
}
WHOLE_MODEL_FAMILIES = ("model", "integrations")

EXIT_CUDA_ERROR = 3       # a worker that hit a CUDA error exits with this: its process is not reused
MAX_ATTEMPTS = 8          # processes per lane of a step (the first, reruns and respawns together)
CUDA_ERROR = re.compile(r"CUDA error|cudaError|CUDA_ERROR_|Triton Error \[CUDA\]|illegal memory access|illegal "
                        r"instruction|unspecified launch failure|device-side assert|misaligned address|"
                        r"AcceleratorError|CUBLAS_STATUS_EXECUTION_FAILED|CUDNN_STATUS_EXECUTION_FAILED|"
                        r"launch timed out")


def is_cuda_error(text) -> bool:
    """Whether an error text reads as a CUDA error that leaves the process's context unusable (an
    out-of-memory error does not)."""
    return any(CUDA_ERROR.search(line) and "out of memory" not in line for line in str(text or "").splitlines())


def crash_if_injected(where: str) -> None:
    """``CLIPFAST_SUITE_CRASH="KIND:REGEX[;KIND:REGEX]"``: the case (``step/family: case``, or ``step/node id``
    for a test) that REGEX finds crashes: ``exit`` ends its process at once (``os._exit``), ``cuda`` raises a
    simulated CUDA error. For the rehearsal's tests of the crash handling; inert without the variable."""
    for spec in filter(None, os.environ.get("CLIPFAST_SUITE_CRASH", "").split(";")):
        kind, _, pattern = spec.partition(":")
        if kind not in ("exit", "cuda") or not re.search(pattern, where):
            continue
        if kind == "exit":
            os._exit(70)
        raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated by CLIPFAST_SUITE_CRASH, "
                           f"CUDA_LAUNCH_BLOCKING={os.environ.get('CUDA_LAUNCH_BLOCKING', '0')})")


def bf16_first(entries: list[tuple[str, bool]]) -> list[str]:
    """Node ids, those flagged bf16 first, each group in its collected order."""
    return [n for n, bf16 in entries if bf16] + [n for n, bf16 in entries if not bf16]


def correctness_plan(entries: list[tuple[str, bool]], shards: int) -> list[list[str]]:
    """The correctness step's tests per shard (process), as ``_pytest_budget`` splits them: bf16 first
    (``CLIPFAST_SUITE_ORDER=bf16-first``), then every ``shards``-th test per shard, so every shard starts
    with its share of the bf16 checks. The rehearsal collects the same bf16 tests (skipped: the interpreter
    gets bf16 wrong), so its recorded plan is the GPU's order."""
    ordered = bf16_first(entries)
    return [ordered[i::shards] for i in range(shards)]


@dataclass(frozen=True)
class Step:
    name: str
    kind: str      # "warm", "pytest", "bench" or "tune"
    share: float   # of the whole budget; the last step takes whatever is left
    args: tuple[str, ...] = ()


# Runs beside the compile and correctness steps (its share counts on top of the compile step's budget)
BACKGROUND_STEP = Step("warm_models", "warm", 0.0)
BACKGROUND_SHARE = 0.22

STEPS = (
    Step("warm", "warm", 0.14),
    Step("correctness", "pytest", 0.22, ("tests", "-m", "gpu or gpu_suite")),
    Step("headline_kernels", "bench", 0.16),
    Step("headline_model", "bench", 0.07),
    Step("headline_model_compiled", "bench", 0.20),
    Step("tune_kernels", "tune", 0.08),
    Step("rest_tests", "pytest", 0.10, ("tests", "-m", "not gpu and not gpu_suite")),
    Step("rest_bench", "bench", 1.0),
)


# ------------------------------------------------------------------------------------------------
# Plans: which (case, implementations) a step runs
# ------------------------------------------------------------------------------------------------

def _all_cases(smoke: bool, families=None):
    """Every case, kernel families first and whole-model families last, each tagged with the name of its
    case module (the family ``clipfast bench`` and the picks select by); ``families``: those modules only."""
    from . import case_modules

    found = []
    modules = sorted(case_modules(), key=lambda m: m.__name__.rsplit(".", 1)[-1] in WHOLE_MODEL_FAMILIES)
    for module in modules:
        family = module.__name__.rsplit(".", 1)[-1]
        if families is not None and family not in families:
            continue  # building some modules' cases imports optional packages (seconds per process)
        for case in module.cases(smoke):
            case.module_family = family
            found.append(case)
    return found


def _impl_names(case, smoke: bool) -> list[str]:
    names = list(case.impls)
    if case.compile_impl and not smoke:
        names.append("torch.compile")
    return names


def _whole_model_compile(case, impl: str) -> bool:
    """A torch.compile of a whole model (minutes each): only the headline's two run in the check."""
    return case.module_family in WHOLE_MODEL_FAMILIES and "torch.compile" in impl


def plan(step: str, smoke: bool, cases=None) -> list[tuple]:
    """``[(case, [implementation names])]`` for a benchmark step (or ``warm``). A headline step's plan only
    depends on the cases of its picks' families (claims are per case), so only those are built for it."""
    if cases is None:
        cases = _all_cases(smoke, {p.family for p in HEADLINE[step]} if step in HEADLINE else None)
    claimed: dict[int, set] = {}
    picked: dict[str, list] = {}
    for name, picks in HEADLINE.items():
        picked[name] = []
        for case in cases:
            for pick in picks:
                if pick.matches(case, smoke):
                    impls = [i for i in _impl_names(case, smoke) if pick.impls is None or i in pick.impls]
                    impls = [i for i in impls if i not in claimed.get(id(case), set())]
                    if impls:
                        claimed.setdefault(id(case), set()).update(impls)
                        picked[name].append((case, impls))
    if step in picked:
        return picked[step]
    rest = [(case, [i for i in _impl_names(case, smoke) if i not in claimed.get(id(case), set())
                    and not _whole_model_compile(case, i)]) for case in cases]
    rest = [(case, impls) for case, impls in rest if impls]
    if step == "rest_bench":
        return rest
    if step == "warm":
        kernel_level = [(c, i) for c, i in picked["headline_kernels"] + rest
                        if c.module_family not in WHOLE_MODEL_FAMILIES]
        headline = {id(c) for c, _ in picked["headline_kernels"]}
        # clipfast everywhere; torch.compile only where it is timed first (the headline kernel cases)
        chosen = [(c, [i for i in impls if i == "clipfast" or (i == "torch.compile" and id(c) in headline)])
                  for c, impls in kernel_level]
        return [(c, impls) for c, impls in chosen if impls]
    raise ValueError(f"unknown step {step!r}")


# ------------------------------------------------------------------------------------------------
# Workers (child processes)
# ------------------------------------------------------------------------------------------------

def _append(path: str, entry: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")


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


def step_deadline() -> float:
    """When this child stops starting work: its step budget counted from its first call (after start-up:
    imports, collection), and never after the run's own deadline. Cached on first use."""
    global _STEP_DEADLINE
    if _STEP_DEADLINE is None:
        budget = float(os.environ.get("CLIPFAST_SUITE_STEP_BUDGET_S", "inf"))
        _STEP_DEADLINE = min(time.time() + budget, float(os.environ.get("CLIPFAST_SUITE_DEADLINE", "inf")))
    return _STEP_DEADLINE


_STEP_DEADLINE = None


def _listed(variable: str) -> set | None:
    path = os.environ.get(variable)
    if not path:
        return None
    with open(path) as f:
        return {line.rstrip("\n") for line in f if line.strip()}


def _label(case) -> str:
    return f"{getattr(case, 'module_family', case.family)}: {case.name}"


def _select(entries, records: str) -> list[tuple]:
    """``[(label, case, impls)]`` of ``entries`` that this process runs (``CLIPFAST_SUITE_ONLY_FILE``: the
    rerun of one case; ``CLIPFAST_SUITE_SKIP_FILE``: what a crashed process of this lane started), recorded
    as this process's plan; the step's budget starts now."""
    only, skip = _listed("CLIPFAST_SUITE_ONLY_FILE"), _listed("CLIPFAST_SUITE_SKIP_FILE") or set()
    chosen = [(_label(c), c, i) for c, i in entries]
    chosen = [e for e in chosen if (only is None or e[0] in only) and e[0] not in skip]
    step_deadline()
    _append(records, {"kind": "ready", "pid": os.getpid(), "t": time.time()})
    _append(records, {"kind": "plan", "pid": os.getpid(), "cases": [label for label, _, _ in chosen]})
    return chosen


def _start_case(records: str, step: str, label: str) -> None:
    """Record the case's start (a process that dies is pinned on it), then any injected crash."""
    _append(records, {"kind": "start", "case": label, "pid": os.getpid(), "t": time.time()})
    crash_if_injected(f"{step}/{label}")


def _device_error() -> str | None:
    """A sticky CUDA error: what synchronizing the device raises (None without CUDA or when it is fine)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    try:
        torch.cuda.synchronize()
    except Exception as exc:
        return f"device unusable after this case: {type(exc).__name__}: {exc}"[:500]
    return None


class _CudaError(Exception):
    pass


def _cuda_error_exit(records: str, label: str, error: str) -> int:
    """This process's CUDA context may be poisoned: record it and stop; the run reruns the case alone
    (CUDA_LAUNCH_BLOCKING=1) and continues the lane in a fresh process."""
    _append(records, {"kind": "cuda_error", "case": label, "pid": os.getpid(), "error": error[:500]})
    return EXIT_CUDA_ERROR


def worker_warm(share: int, workers: int, records: str, step: str = "warm") -> int:
    """Run this worker's share of a plan once (``warm``: the kernel cases; ``warm_models``: the whole-model
    torch.compile cases), compiling every autotuned config."""
    import torch

    smoke = not torch.cuda.is_available()
    device = torch.device("cuda" if not smoke else "cpu")
    entries = plan("headline_model_compiled" if step == "warm_models" else "warm", smoke)[share::workers]
    with compiling_every_config():
        return _warm(_select(entries, records), smoke, device, records, step)


# The headline model's first training step, precompiled by `clipfast warm` (the model and batch the
# headline_model step times; the rehearsal plans the tiny model for sm_90 without compiling).
MODEL_WARM = ("ViT-B-16", 256, "bf16")
MODEL_WARM_REHEARSAL = ("tiny", 2, "fp16")


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
        argv = [sys.executable, "-m", "clipfast.cli", "warm", model, "--train", "--batch", str(batch), "--dtype", dtype,
                "--jobs", str(max(1, jobs)), "--json", out] + (["--arch", "90", "--plan-only"] if smoke else [])
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # warm compiles for the GPU
        t0 = time.time()
        try:
            proc = subprocess.run(argv, env=env, capture_output=True, text=True,
                                  timeout=max(10.0, step_deadline() - time.time()))
            error = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["exit " + str(proc.returncode)])[-1]
        except subprocess.TimeoutExpired:
            error = "stopped at the step's time budget"
        report = json.load(open(out)) if os.path.exists(out) else {}
    entry = {"kind": "warm", "family": "model", "case": label, "impl": "clipfast warm", "mode": "fwd+bwd",
             "seconds": round(time.time() - t0, 2), "error": error, "pid": os.getpid()}
    for arch, figures in report.get("archs", {}).items():
        entry.update({"arch": arch, **{k: figures.get(k) for k in ("launches", "distinct_compiles", "per_family",
                                                                     "compile_seconds", "wall_seconds", "jobs")}})
    _append(records, entry)
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
        argv = [sys.executable, "-m", "clipfast.cli", "tune", "--kernels", model, "--train", "--batch", str(batch),
                "--dtype", dtype, "--json", out]
        env = dict(os.environ, CLIPFAST_CACHE_DIR=os.path.join(tmp, "cache"))  # the user's own table untouched
        t0 = time.time()
        try:
            proc = subprocess.run(argv, env=env, capture_output=True, text=True,
                                  timeout=max(10.0, step_deadline() - time.time()))
            error = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["exit " + str(proc.returncode)])[-1]
            note = (proc.stdout.strip().splitlines() or [""])[0] if smoke else None
        except subprocess.TimeoutExpired:
            error, note = "stopped at the step's time budget", None
        table = json.load(open(out)) if os.path.exists(out) else None
    _append(records, {"kind": "autotune_table", "model": model, "batch": batch, "dtype": dtype, "table": table,
                      "seconds": round(time.time() - t0, 1), "error": error, "note": note, "pid": os.getpid()})
    return 0


def _warm(entries, smoke: bool, device, records: str, step: str = "warm") -> int:
    import torch

    from .harness import _implementations, _step

    done = []
    # the rehearsal: every process gets at least its first launch, however slow the machine
    past_deadline = lambda: time.time() > step_deadline() and not (smoke and not done)  # noqa: E731
    for label, case, impls in entries:
        if past_deadline():
            _append(records, {"kind": "budget", "stopped_before": label})
            return 0
        cuda_error = None
        try:
            _start_case(records, step, label)
        except RuntimeError as exc:
            cuda_error = str(exc)
            _append(records, {"kind": "warm", "family": case.family, "case": case.name, "impl": "-", "mode": "-",
                              "seconds": 0, "error": cuda_error, "pid": os.getpid()})
        for impl, fn in ({} if cuda_error else _implementations(case, smoke, impls)).items():
            for mode in [m for m in case.modes if not (m == "bwd" and "fwd+bwd" in case.modes)]:
                if past_deadline():
                    _append(records, {"kind": "budget", "stopped_before": label})
                    return 0
                t0, error = time.time(), None
                try:
                    setup, run = _step(fn, case.make_inputs(device, case.dtype), mode)
                    run(setup())
                    if not smoke:
                        torch.cuda.synchronize()
                except Exception as exc:  # reported; the timed step will report it again
                    error = f"{type(exc).__name__}: {exc}"[:300]
                _append(records, {"kind": "warm", "family": case.family, "case": case.name, "impl": impl,
                                  "mode": mode, "seconds": round(time.time() - t0, 2), "error": error,
                                  "pid": os.getpid()})
                done.append(label)
                if is_cuda_error(error):
                    return _cuda_error_exit(records, label, error)
        error = cuda_error or _device_error()
        if error:
            return _cuda_error_exit(records, label, error)
    return 0


def worker_bench(step: str, records: str) -> int:
    """The step's cases in order, each recorded as started (with this pid) before it runs; after a case
    whose error reads as a CUDA error, or after which the device no longer synchronizes, the process
    records it and exits (``EXIT_CUDA_ERROR``): nothing later runs in a poisoned context."""
    import torch

    from .harness import run_case

    smoke = not torch.cuda.is_available()
    entries = _select(plan(step, smoke), records)
    rows = []
    # the rehearsal: every process gets at least its first row, however slow the machine
    past_deadline = lambda: time.time() > step_deadline() and not (smoke and not rows)  # noqa: E731

    def on_row(row):
        row["pid"] = os.getpid()
        rows.append(row)
        _append(records, {"kind": "row", **row})
        if is_cuda_error(row.get("error")):
            raise _CudaError(row["error"])  # the case's other implementations would fail in this context too

    for label, case, impls in entries:
        if past_deadline():
            _append(records, {"kind": "budget", "stopped_before": label})
            return 0
        error = None
        try:
            _start_case(records, step, label)
            run_case(case, smoke=smoke, impls=impls, should_stop=past_deadline, on_row=on_row)
        except _CudaError as exc:
            error = str(exc)
        except Exception as exc:  # the smoke pass's drift check, or a case that cannot build its inputs
            text = f"{type(exc).__name__}: {exc}"[:300]
            _append(records, {"kind": "row", "family": case.family, "case": case.name, "impl": "clipfast",
                              "mode": "-", "dtype": str(case.dtype).replace("torch.", ""), "shape": case.shape,
                              "smoke": smoke, "error": text, "pid": os.getpid()})
            error = text if is_cuda_error(text) else None
        error = error or _device_error()
        if error:
            return _cuda_error_exit(records, label, error)
    return 0


# ------------------------------------------------------------------------------------------------
# The run (parent process)
# ------------------------------------------------------------------------------------------------

def _nvidia_smi() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return None


def _kill(procs) -> None:
    """Kill the still-running ones among ``procs`` (children this run started, each in its own session),
    with whatever they started."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Run:
    """The results of one run, rewritten to ``OUT`` after every change."""

    def __init__(self, out: str, budget_s: float):
        import torch

        from .harness import environment

        self.out, self.started = out, time.time()
        self.deadline = self.started + budget_s
        self.rehearsal = not torch.cuda.is_available()
        # one process per core on the GPU machine; a small CPU machine runs the rehearsal one at a time
        cores = os.cpu_count() or 1
        self.workers = max(1, min(MAX_WORKERS, cores if not self.rehearsal else cores // 2))
        env = environment()
        env["nvidia_smi"] = _nvidia_smi() if not self.rehearsal else None
        self.data = {"rehearsal": self.rehearsal, "environment": env, "budget_s": budget_s,
                     "workers": self.workers, "preflight": None, "steps": [], "tests": [], "warm": [], "rows": [],
                     "crashes": [], "processes": [], "correctness_plan": {}, "autotune_table": None, "notes": []}
        if self.rehearsal:
            self.data["notes"].append("CPU rehearsal: smoke shapes through the Triton interpreter; no timings.")
        for package, what in OPTIONAL_PACKAGES.items():
            if importlib.util.find_spec(package) is None:
                self.data["notes"].append(f"{package} is not installed: {what} skipped.")
        self.tmp = tempfile.mkdtemp(prefix="clipfast-suite-")
        self.lock = threading.Lock()
        self.log = open(os.path.join(out, "log.txt"), "a")
        self.children: list[subprocess.Popen] = []
        self.background = None

    # -- output ------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        line = f"[{time.time() - self.started:6.1f}s] {text}"
        print(line, flush=True)
        self.write_log(line + "\n")

    def write_log(self, text: str) -> None:
        with self.lock:
            if self.log.tell() < LOG_LIMIT_BYTES:
                self.log.write(text)
                self.log.flush()

    def write(self) -> None:
        from .summary import suite_markdown

        self.data["elapsed_s"] = round(time.time() - self.started, 1)
        for name, text in (("results.json", json.dumps(self.data, indent=1, default=str)),
                           ("summary.md", suite_markdown(self.data))):
            path = os.path.join(self.out, name)
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)

    # -- preflight ---------------------------------------------------------------------------------
    def preflight(self) -> bool:
        """``preflight.run_preflight`` (compiler, Python.h, GPU visibility, libcuda, one tiny kernel launch);
        on a failure the one-line reason is in results.json and summary.md before anything else runs."""
        from .preflight import run_preflight

        t0 = time.time()
        self.say("== preflight")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **({"TRITON_INTERPRET": "1"} if self.rehearsal else {}))
        result = run_preflight(self.rehearsal, [sys.executable, "-m", "clipfast.benchmarks.preflight", "--launch"],
                               env, on_check=lambda c: self.say(f"   {c.line()}"))
        result["seconds"] = round(time.time() - t0, 1)
        self.data["preflight"] = result
        if not result["ok"]:
            self.data["stopped"] = result["reason"]
            self.say(f"STOPPED: {result['reason']}")
        self.write()
        return result["ok"]

    # -- children ----------------------------------------------------------------------------------
    # Each step runs in lanes (one per worker or pytest shard), each lane one process at a time. A lane's
    # process runs its cases in order until one crashes it: a CUDA error (recorded by the child, which then
    # exits) or any other abnormal exit (pinned on the case it had started last). The lane then reruns that
    # case alone with CUDA_LAUNCH_BLOCKING=1 (so the error names the launch that failed) and goes on with the
    # cases not yet started in a fresh process: a crash never poisons a later case, and the start-up cost
    # (torch + triton imports, pytest collection) is paid again only after a crash.
    def _child_env(self, budget: float, shard: str | None = None, step: str = "") -> dict:
        env = dict(os.environ, CLIPFAST_SUITE_DEADLINE=str(self.deadline), CLIPFAST_SUITE_STEP_BUDGET_S=str(budget),
                   CLIPFAST_SUITE_STEP=step, PYTHONUNBUFFERED="1")
        for name in ("CLIPFAST_SUITE_RECORDS", "CLIPFAST_SUITE_SKIP_FILE", "CLIPFAST_SUITE_ONLY_FILE",
                     "CLIPFAST_SUITE_ORDER", "CLIPFAST_SUITE_SHARD", "CUDA_LAUNCH_BLOCKING"):
            env.pop(name, None)
        if self.rehearsal:
            env["TRITON_INTERPRET"] = "1"
            del env["CLIPFAST_SUITE_DEADLINE"]  # the step budget alone: every step gets its turn
        if step == "correctness":
            env["CLIPFAST_SUITE_ORDER"] = "bf16-first"
        if shard:
            env["CLIPFAST_SUITE_SHARD"] = shard
        return env

    def _pump(self, proc: subprocess.Popen, prefix: str, tail) -> None:
        for line in proc.stdout:
            tail.append(line.rstrip())
            self.write_log(f"{prefix}{line}")

    def start(self, name: str, commands: list[tuple[list[str], dict]], status: dict, budget: float = 0.0,
              kind: str = "bench") -> dict:
        """Start one lane per command (``{records}`` and ``{junit}`` in its argv stand for the paths of each
        of its processes); ``finish`` supervises them."""
        group = {"name": name, "kind": kind, "status": status, "budget": budget, "lanes": [], "offsets": {},
                 "owners": {}, "hard": float("inf")}
        for i, (argv, env) in enumerate(commands):
            lane = {"index": i, "argv": argv, "env": env, "attempts": [], "started": [], "planned": None,
                    "used_s": 0.0, "pending": [("run", None)], "proc": None, "crashes": {}}
            group["lanes"].append(lane)
            self._spawn(group, lane)
        return group

    def _write_list(self, name: str, items) -> str:
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            f.writelines(f"{item}\n" for item in items)
        return path

    def _spawn(self, group: dict, lane: dict) -> None:
        role, case = lane["pending"].pop(0)
        n, name = len(lane["attempts"]), group["name"]
        tag = f"{name}_{lane['index']}_{n}"
        records = os.path.join(self.tmp, f"{tag}.jsonl")
        junit = os.path.join(self.tmp, f"{'rerun_' if role == 'rerun' else ''}junit_{tag}.xml")
        env = dict(lane["env"], CLIPFAST_SUITE_RECORDS=records)
        if n:  # what the lane's earlier processes left of the step's budget (their start-up not counted)
            left = group["budget"] - lane["used_s"]
            floor = REHEARSAL_MIN_ATTEMPT_S if self.rehearsal or role == "rerun" else 0.0
            env["CLIPFAST_SUITE_STEP_BUDGET_S"] = str(max(left, floor))
            cap = float("inf") if self.rehearsal else self.deadline + FINAL_RESERVE_S / 2
            group["hard"] = min(group["hard"] + (REHEARSAL_STARTUP_S if self.rehearsal else STARTUP_S), cap)
        if role == "rerun":
            env["CUDA_LAUNCH_BLOCKING"] = "1"
            env["CLIPFAST_SUITE_ONLY_FILE"] = self._write_list(f"{tag}.only", [case])
        elif role == "respawn":
            env["CLIPFAST_SUITE_SKIP_FILE"] = self._write_list(f"{tag}.skip", lane["started"])
        argv = [a.replace("{records}", records).replace("{junit}", junit) for a in lane["argv"]]
        open(records, "a").close()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        self.children.append(proc)
        entry = {"step": name, "lane": lane["index"], "attempt": n, "role": role, "pid": proc.pid}
        if role == "rerun":
            entry.update(case=case, env="CUDA_LAUNCH_BLOCKING=1")
        self.data["processes"].append(entry)
        attempt = {"role": role, "case": case, "pid": proc.pid, "t0": time.time(), "ready_t": None, "started": [],
                   "cuda_error": None, "errors": [], "tail": collections.deque(maxlen=20), "entry": entry,
                   "crash": lane["crashes"].get(case)}
        thread = threading.Thread(target=self._pump, args=(proc, f"  {name}[{lane['index']}{f'.{n}' if n else ''}] ",
                                                            attempt["tail"]), daemon=True)
        thread.start()
        attempt["thread"] = thread
        lane["attempts"].append(attempt)
        lane["proc"] = proc
        group["offsets"][records] = 0
        group["owners"][records] = (lane, attempt)
        if role == "rerun":
            self.say(f"   {name}[{lane['index']}]: rerunning {case} alone with CUDA_LAUNCH_BLOCKING=1 (pid {proc.pid})")
        elif role == "respawn":
            self.say(f"   {name}[{lane['index']}]: the rest in a fresh process (pid {proc.pid}), "
                     "respawned after a crash")

    def _supervise(self, group: dict, killed: bool = False) -> None:
        for lane in group["lanes"]:
            if lane["proc"] is not None and lane["proc"].poll() is not None:
                self._ended(group, lane, killed)
            if lane["proc"] is None and lane["pending"] and not killed:
                self._spawn(group, lane)

    @staticmethod
    def _died(proc: subprocess.Popen, attempt: dict) -> str:
        rc = proc.returncode
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 and -rc in signal.valid_signals() else f"exit code {rc}"
        tail = " | ".join([line.strip() for line in attempt["tail"] if line.strip()][-3:])
        return f"process {proc.pid} died ({how}) during this case" + (f": {tail}" if tail else "")[:600]

    def _record_death(self, group: dict, case: str, error: str, pid: int) -> None:
        """The failure of a case whose process died before it could report one."""
        if group["kind"] == "pytest":
            self.data["tests"].append({"nodeid": case, "outcome": "error", "when": "call", "message": error,
                                       "pid": pid, "step": group["name"]})
            return
        family, _, name = case.partition(": ")
        entry = {"family": family, "case": name, "impl": "clipfast", "mode": "-", "error": error, "pid": pid,
                 "step": group["name"]}
        if group["kind"] == "warm":
            self.data["warm"].append({**entry, "impl": "-", "seconds": 0})
        else:
            self.data["rows"].append({**entry, "dtype": "-"})

    def _ended(self, group: dict, lane: dict, killed: bool) -> None:
        proc, attempt = lane["proc"], lane["attempts"][-1]
        proc.wait()
        attempt["thread"].join(timeout=5)
        self.poll(group)  # its last records
        lane["proc"] = None
        end, rc = time.time(), proc.returncode
        lane["used_s"] += end - (attempt["ready_t"] or end)
        attempt["entry"].update(returncode=rc, cases=len(attempt["started"]), seconds=round(end - attempt["t0"], 1))
        ok = rc in ((0, 1, 2, 5) if group["kind"] == "pytest" else (0,)) and attempt["cuda_error"] is None
        name = f"{group['name']}[{lane['index']}]"
        if attempt["role"] == "rerun":
            error = (attempt["cuda_error"] or {}).get("error") or (None if ok else self._died(proc, attempt)) or \
                (attempt["errors"][0] if attempt["errors"] else None)
            attempt["crash"]["rerun"] = {"pid": proc.pid, "env": "CUDA_LAUNCH_BLOCKING=1", "returncode": rc,
                                         "error": error}
            self.say(f"   {name}: rerun of {attempt['case']} with CUDA_LAUNCH_BLOCKING=1: {error or 'no error'}"[:400])
            self.write()
            return
        if ok or killed:
            return
        case = attempt["cuda_error"]["case"] if attempt["cuda_error"] else (attempt["started"] or [None])[-1]
        error = attempt["cuda_error"]["error"] if attempt["cuda_error"] else self._died(proc, attempt)
        crash = {"step": group["name"], "lane": lane["index"], "case": case, "pid": proc.pid, "returncode": rc,
                 "error": error, "rerun": None, "respawned": False}
        self.data["crashes"].append(crash)
        self.say(f"   {name}: {case or 'start-up'} crashed process {proc.pid}: {error}"[:400])
        if case is None:
            crash["note"] = "died before its first case: not restarted"
            self.write()
            return
        if attempt["cuda_error"] is None:
            self._record_death(group, case, error, proc.pid)
        lane["crashes"][case] = crash
        room = MAX_ATTEMPTS - len(lane["attempts"])
        if room > 0 and not any(a["role"] == "rerun" and a["case"] == case for a in lane["attempts"]):
            lane["pending"].append(("rerun", case))
            room -= 1
        remaining = None if lane["planned"] is None else [c for c in lane["planned"] if c not in lane["started"]]
        left = group["budget"] - lane["used_s"]
        if room > 0 and remaining != [] and (left > 0 or self.rehearsal):
            lane["pending"].append(("respawn", None))
            crash["respawned"] = True
        else:
            crash["note"] = ("nothing left to run" if remaining == [] else "no budget left" if left <= 0 else
                             f"{MAX_ATTEMPTS} processes used: not restarted")
        self.write()

    def poll(self, group: dict) -> None:
        if self._ingest(group["name"], group["offsets"], group["status"], group["owners"]):
            self.write()

    def finish(self, group: dict, hard: float, also: tuple = ()) -> dict:
        """Supervise ``group``'s lanes (reruns and respawns after a crash) until all end, killing them at
        ``hard`` (moved on by a start-up allowance for each process started after a crash); ``also``: other
        groups running meanwhile, supervised and merged too."""
        group["hard"] = hard
        killed = False
        while True:
            if time.time() > group["hard"] and not killed:
                killed = True
                for lane in group["lanes"]:
                    lane["pending"].clear()
                _kill([lane["proc"] for lane in group["lanes"] if lane["proc"] is not None])
            self._supervise(group, killed)
            for other in also:
                self._supervise(other)
            if all(lane["proc"] is None for lane in group["lanes"]):
                break
            time.sleep(0.5)
            for g in (group, *also):
                self.poll(g)
        self.poll(group)
        return {"returncodes": [a["entry"].get("returncode") for lane in group["lanes"] for a in lane["attempts"]],
                "killed": killed}

    def hard_stop(self, budget: float) -> float:
        """When a step's children are killed: its budget, plus start-up (a child counts its budget from the
        end of its start-up and checks it between items) and a margin for the item under way."""
        hard = time.time() + budget + (REHEARSAL_STARTUP_S if self.rehearsal else STARTUP_S) + 0.1 * budget
        return hard if self.rehearsal else min(hard, self.deadline + FINAL_RESERVE_S / 2)

    def _ingest(self, step_name: str, offsets: dict, status: dict, owners: dict | None = None) -> bool:
        changed = False
        for records in offsets:
            lane, attempt = (owners or {}).get(records, (None, None))
            rerun = attempt is not None and attempt["role"] == "rerun"
            with open(records, "rb") as f:
                f.seek(offsets[records])
                chunk = f.read()
            complete = chunk[:chunk.rfind(b"\n") + 1]  # a line still being written waits for the next poll
            offsets[records] += len(complete)
            for line in complete.decode("utf-8", "replace").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                kind = entry.pop("kind")
                entry["step"] = step_name
                changed = True
                if rerun and kind in ("row", "test", "warm"):  # the CUDA_LAUNCH_BLOCKING=1 rerun: its errors only
                    error = entry.get("error") or (entry.get("message") if entry.get("outcome") in
                                                   ("failed", "error") else None)
                    if error:
                        attempt["errors"].append(str(error).strip().splitlines()[-1][:500])
                elif kind == "row":
                    self.data["rows"].append(entry)
                elif kind == "test":
                    self.data["tests"].append(entry)
                elif kind == "warm":
                    self.data["warm"].append(entry)
                elif kind == "autotune_table":
                    self.data["autotune_table"] = entry
                elif kind == "collected":
                    if attempt is None or attempt is lane["attempts"][0]:
                        status["collected"] = status.get("collected", 0) + entry["count"]
                elif kind == "budget":
                    status["stopped_by_budget"] = True
                elif attempt is None:
                    continue
                elif kind == "ready":
                    attempt["ready_t"] = entry["t"]
                elif kind == "start":
                    attempt["started"].append(entry["case"])
                    lane["started"].append(entry["case"])
                elif kind == "cuda_error":
                    attempt["cuda_error"] = entry
                elif kind == "plan" and lane["planned"] is None:
                    lane["planned"] = entry["cases"]
                    if step_name == "correctness":
                        self.data["correctness_plan"][str(lane["index"])] = entry["cases"]
                        bf16 = set(entry.get("bf16") or ())
                        self.say(f"   correctness[{lane['index']}]: {len(entry['cases'])} tests, the {len(bf16)} "
                                 "bf16 ones first" + (" (skipped without a GPU)" if self.rehearsal else ""))
        if changed:
            from .harness import add_speedups

            add_speedups(self.data["rows"])
        return changed

    def stop_children(self) -> None:
        _kill(self.children)

    # -- steps -------------------------------------------------------------------------------------
    def commands(self, step: Step, budget: float) -> list[tuple[list[str], dict]]:
        """One ``(argv, env)`` per lane; ``{records}`` / ``{junit}`` are filled in per process."""
        py = sys.executable
        me = [py, "-m", "clipfast.benchmarks.suite"]
        if step.kind == "warm":
            n = self.workers if step.name == "warm" else 1 if self.rehearsal else 2  # whole-model compiles: one each
            lanes = [([*me, "--worker", "warm", "--step", step.name, "--share", f"{i}/{n}", "--records", "{records}"],
                      self._child_env(budget, step=step.name)) for i in range(n)]
            if step.name == "warm":  # the headline model through `clipfast warm`, beside the kernel cases
                lanes.insert(0, ([*me, "--worker", "model_warm", "--share", f"0/{n}", "--records", "{records}"],
                                 self._child_env(budget, step=step.name)))
            return lanes
        if step.kind == "bench":
            return [([*me, "--worker", "bench", "--step", step.name, "--records", "{records}"],
                     self._child_env(budget, step=step.name))]
        if step.kind == "tune":
            env = self._child_env(budget, step=step.name)
            env.pop("TRITON_INTERPRET", None)  # on CPU the command only says there is nothing to time
            return [([*me, "--worker", "tune_kernels", "--records", "{records}"], env)]
        n = self.workers
        argv = [py, "-m", "pytest", *step.args, "-q", "-p", "no:cacheprovider", "-p",
                "clipfast.benchmarks._pytest_budget", "--junitxml={junit}", "-o", "junit_suite_name=" + step.name]
        return [(argv, self._child_env(budget, f"{i}/{n}", step.name)) for i in range(n)]

    def run_step(self, step: Step, last: bool) -> None:
        now = time.time()
        left = self.deadline - FINAL_RESERVE_S - now
        budget = left if last else min(left, step.share * (self.deadline - self.started))
        if self.rehearsal:  # every step runs at least its first item, however slow the machine
            budget = max(budget, REHEARSAL_MIN_STEP_S)
        self.current = {"name": step.name, "budget_s": round(budget, 1)}
        self.data["steps"].append(self.current)
        if step.kind == "pytest" and importlib.util.find_spec("pytest") is None:
            self.current["status"] = "skipped: pytest is not installed"
            self.say(f"== {step.name}: skipped, pytest is not installed")
            self.write()
            return
        if budget < 3:
            self.current["status"] = "skipped: no time left"
            self.say(f"== {step.name}: skipped, no time left")
            self.write()
            return
        if step.name == "warm":
            self.start_background(budget)
        if step.kind in ("bench", "tune"):
            self.stop_background()  # nothing else runs on the GPU while anything is timed
        self.say(f"== {step.name} (budget {budget:.0f}s)")
        group = self.start(step.name, self.commands(step, budget), self.current, budget, step.kind)
        result = self.finish(group, self.hard_stop(budget), also=(self.background,) if self.background else ())
        self.current["seconds"] = round(time.time() - now, 1)
        crashes = [c for c in self.data["crashes"] if c["step"] == step.name]
        self.current["status"] = ("killed at the budget" if result["killed"] else
                                  "stopped at the budget" if self.current.get("stopped_by_budget") else "done")
        if crashes:
            self.current["status"] += (f"; {len(crashes)} crash(es): each case rerun alone with "
                                       "CUDA_LAUNCH_BLOCKING=1, the rest in a fresh process")
        if step.kind == "pytest":
            self.merge_junit()
        self.say(f"   {step.name}: {self.current['status']} in {self.current['seconds']}s")
        self.write()

    def start_background(self, warm_budget: float) -> None:
        """The whole-model torch.compiles of the timed step, compiled once (inductor's and Triton's on-disk
        caches) in the background of the compile and correctness steps; stopped before any timing."""
        budget = warm_budget + BACKGROUND_SHARE * (self.deadline - self.started)
        status = {"name": BACKGROUND_STEP.name, "budget_s": round(budget, 1), "background": True}
        self.data["steps"].append(status)
        self.say(f"== {BACKGROUND_STEP.name} in the background (budget {budget:.0f}s)")
        self.background = self.start(BACKGROUND_STEP.name, self.commands(BACKGROUND_STEP, budget), status, budget,
                                     "warm")
        self.background_started = time.time()

    def stop_background(self) -> None:
        group, self.background = self.background, None
        if group is None:
            return
        running = any(lane["proc"] is not None and lane["proc"].poll() is None for lane in group["lanes"])
        self.finish(group, hard=0)  # kills what still runs
        group["status"]["seconds"] = round(time.time() - self.background_started, 1)
        group["status"]["status"] = "stopped before the timed steps" if running else "done"
        self.say(f"   {group['name']}: {group['status']['status']}")
        self.write()

    def merge_junit(self) -> None:
        merged = ET.Element("testsuites")
        for name in sorted(os.listdir(self.tmp)):
            if name.startswith("junit_") and name.endswith(".xml"):
                try:
                    root = ET.parse(os.path.join(self.tmp, name)).getroot()
                except ET.ParseError:
                    continue
                merged.extend(root.iter("testsuite"))
        ET.ElementTree(merged).write(os.path.join(self.out, "junit.xml"), encoding="unicode")

    def plots(self) -> None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:  # noted at the start
            return
        from .cli import plot, plot_loss_scaling

        rows = [r for r in self.data["rows"] if not r.get("error") and r.get("mode") != "-"]
        headline = [r for r in rows if r["step"].startswith("headline") and r["mode"] != "host"]
        rest = [r for r in rows if r["step"] == "rest_bench" and r["mode"] != "host"]
        for name, picked in (("plot_headline.png", headline), ("plot_rest.png", rest)):
            if picked:
                try:
                    plot(picked, os.path.join(self.out, name))
                except Exception as exc:  # a plot must not cost the results
                    self.data["notes"].append(f"{name}: {type(exc).__name__}: {exc}")
        try:
            plot_loss_scaling(rows, os.path.join(self.out, "plot_loss_scaling.png"))
        except Exception as exc:
            self.data["notes"].append(f"plot_loss_scaling.png: {type(exc).__name__}: {exc}")


def main_run(out: str, budget_s: float | None) -> int:
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        if name in OUTPUT_FILES:
            os.unlink(os.path.join(out, name))
    import torch

    budget_s = budget_s or float(os.environ.get("CLIPFAST_SUITE_BUDGET_S", 0)) or (
        GPU_BUDGET_S if torch.cuda.is_available() else REHEARSAL_BUDGET_S)
    run = Run(out, budget_s)

    def stop(signum, frame):
        run.stop_children()
        run.data["notes"].append(f"stopped by signal {signum}")
        run.write()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    run.say(f"clipfast GPU check -> {out} ({'CPU rehearsal' if run.rehearsal else run.data['environment']['gpu']}, "
            f"budget {budget_s:.0f}s, {run.workers} workers)")
    run.write()
    if not run.preflight():
        return 3
    for i, step in enumerate(STEPS):
        run.run_step(step, last=i == len(STEPS) - 1)
    run.stop_background()
    run.plots()
    run.write()
    failed = [t for t in run.data["tests"] if t["outcome"] in ("failed", "error")]
    broken = [r for r in run.data["rows"] if r.get("error") and r["impl"] in ("clipfast", "eager")]
    run.say(f"done in {time.time() - run.started:.0f}s: {len(run.data['tests'])} test outcomes "
            f"({len(failed)} failed), {len(run.data['rows'])} benchmark rows ({len(broken)} clipfast/eager errors)")
    return 1 if failed or broken else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m clipfast.benchmarks.suite", description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", help="output folder (created; its result files are replaced)")
    p.add_argument("--budget-s", type=float, default=None, help="seconds for all steps (default: "
                   f"{GPU_BUDGET_S} on a GPU, {REHEARSAL_BUDGET_S} for the CPU rehearsal; or CLIPFAST_SUITE_BUDGET_S)")
    p.add_argument("--worker", choices=["warm", "model_warm", "tune_kernels", "bench"], help=argparse.SUPPRESS)
    p.add_argument("--share", default="0/1", help=argparse.SUPPRESS)
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)
    p.add_argument("--records", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == "warm":
        share, workers = (int(v) for v in args.share.split("/"))
        return worker_warm(share, workers, args.records, args.step or "warm")
    if args.worker == "tune_kernels":
        return worker_tune_kernels(args.records)
    if args.worker == "model_warm":
        return worker_model_warm(args.records, int(args.share.split("/")[1]))
    if args.worker == "bench":
        return worker_bench(args.step, args.records)
    if not args.out:
        p.error("give the output folder")
    return main_run(args.out, args.budget_s)


if __name__ == "__main__":
    sys.exit(main())
