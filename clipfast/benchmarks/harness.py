"""The one benchmark harness: ``clipfast bench``, the pytest-benchmark suite in ``bench/`` and the GPU check
(``clipfast.gpu_check``) call it.

A ``BenchCase`` names the implementations of one hot path at one shape (always ``clipfast`` and
``eager``; optionally other alternatives, e.g. SDPA backends) and how to make inputs. ``run_case``
times each implementation in each mode (``fwd``, ``bwd``, ``fwd+bwd``; ``host`` for host time per call),
adds ``torch.compile`` of the eager implementation, and reports the median of CUDA-event timings (L2 flushed
before each call) with its spread, TFLOP/s or GB/s, percent of peak, speedups and peak memory. Each row can
be handed to a callback as soon as it is measured, so a run that is stopped keeps what it measured.

On a machine without CUDA there is nothing to time: ``run_case`` runs a smoke pass (tiny shapes through
the Triton interpreter, results compared with eager) so the harness and the cases cannot rot, and marks
the rows as smoke with no timings.
"""
from __future__ import annotations

import math
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

MODES = ("fwd", "bwd", "fwd+bwd")

# Peak numbers used for "percent of peak" (dense, no sparsity), by device-name substring.
GPU_PEAKS = {
    "H100": {"hbm_gbs": 3350.0, "bf16_tflops": 989.0, "fp16_tflops": 989.0, "fp32_tflops": 67.0},
    "H200": {"hbm_gbs": 4800.0, "bf16_tflops": 989.0, "fp16_tflops": 989.0, "fp32_tflops": 67.0},
    "A100": {"hbm_gbs": 2039.0, "bf16_tflops": 312.0, "fp16_tflops": 312.0, "fp32_tflops": 19.5},
}


@dataclass
class BenchCase:
    family: str                      # kernel family, e.g. "layer_norm"
    name: str                        # shape label, e.g. "ViT-B/16 [50432x768]"
    dtype: torch.dtype
    make_inputs: Callable[[torch.device, torch.dtype], dict]  # tensors that need grads have requires_grad set
    impls: dict[str, Callable[..., Any]]  # name -> fn(**inputs) -> tensor or tuple; "clipfast" and "eager" required
    compile_impl: str | None = "eager"    # also time torch.compile of this implementation
    flops: Callable[[str], float] | None = None   # mode -> floating point operations
    bytes: Callable[[str], float] | None = None   # mode -> bytes that must move to/from memory
    modes: tuple[str, ...] = MODES
    shape: dict = field(default_factory=dict)


def _outputs(result) -> list[torch.Tensor]:
    items = result if isinstance(result, (tuple, list)) else (result,)
    return [t for t in items if isinstance(t, torch.Tensor) and t.requires_grad]


def _grad_leaves(inputs: dict) -> list[torch.Tensor]:
    return [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]


def timed_step(fn: Callable, inputs: dict, mode: str) -> tuple[Callable[[], Any], Callable[[Any], Any]]:
    """``(setup, run)`` for one ``mode`` step of ``fn``: ``run(setup())`` is the step; only ``run`` is timed.

    ``bwd`` runs a fresh forward in ``setup`` for every backward, so each timed backward consumes its own
    graph (no ``retain_graph``: torch.compile's donated buffers forbid it, and re-running one graph would
    time a backward that reuses buffers the real one frees). ``host`` is ``fwd`` timed on the host clock.
    """
    leaves = _grad_leaves(inputs)

    def clear():
        for t in leaves:
            t.grad = None

    if mode in ("fwd", "host"):
        def run(_state):
            with torch.no_grad() if not leaves else torch.enable_grad():
                return fn(**inputs)
        return (lambda: None), run
    if mode == "fwd+bwd":
        def run(_state):
            outs = _outputs(fn(**inputs))
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        return clear, run
    if mode == "bwd":
        def setup():
            clear()
            outs = _outputs(fn(**inputs))
            return outs, [torch.ones_like(o) for o in outs]

        def run(state):
            torch.autograd.backward(*state)
        return setup, run
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES + ('host',)}")


def gpu_peaks() -> dict:
    if not torch.cuda.is_available():
        return {}
    name = torch.cuda.get_device_name()
    return next((v for k, v in GPU_PEAKS.items() if k in name), {})


_L2_FLUSH: list[torch.Tensor] = []


def _flush_l2() -> None:
    """Overwrite a buffer larger than any L2 (H100/H200: 50 MB) so every timed call starts cold."""
    if not _L2_FLUSH:
        _L2_FLUSH.append(torch.empty(256 * 2**20, dtype=torch.int8, device="cuda"))
    _L2_FLUSH[0].zero_()


def _time_cuda(setup: Callable, run: Callable, warmup_ms: float = 25, rep_ms: float = 100,
               min_reps: int = 5, max_reps: int = 1000) -> list[float]:
    """Milliseconds of each timed ``run`` by CUDA events, ``setup`` and an L2 flush before each one
    (untimed). At least ``min_reps`` samples and about ``rep_ms`` of timed work, after ``warmup_ms``."""
    def once(start=None, end=None):
        state = setup()
        _flush_l2()
        if start is not None:
            start.record()
        run(state)
        if end is not None:
            end.record()
        del state

    once()  # first call: compiles, autotunes, fills caches
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    warm = 0
    while warm < 2 or (time.perf_counter() - t0) * 1e3 < warmup_ms:
        once()
        torch.cuda.synchronize()
        warm += 1
    estimate_ms = (time.perf_counter() - t0) * 1e3 / warm
    reps = int(min(max_reps, max(min_reps, rep_ms / max(estimate_ms, 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        once(start, end)
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def _time_host(setup: Callable, run: Callable, calls: int = 200, min_seconds: float = 0.05) -> float:
    """Microseconds of host time per call, launches queued without synchronizing in between (what a
    training loop pays on the CPU for each op while the GPU is busy)."""
    state = setup()
    run(state)
    n, t0 = 0, time.perf_counter()
    while n < calls or time.perf_counter() - t0 < min_seconds:
        run(state)
        n += 1
    elapsed = time.perf_counter() - t0
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return elapsed / n * 1e6


def compiled(fn: Callable) -> Callable:
    """torch.compile at the exact shapes (dynamic=False: a dynamic-shape graph is not what a fixed-shape
    training run gets), with room for one graph per benchmarked shape."""
    import torch._dynamo.config as dynamo_config

    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, knob):
            setattr(dynamo_config, knob, max(getattr(dynamo_config, knob), 64))
    return torch.compile(fn, dynamic=False)


def _in_dispatch(mode: str, fn: Callable) -> Callable:
    from clipfast.dispatching import dispatch

    def run(**inputs):
        with dispatch(mode):
            return fn(**inputs)
    return run


def implementations(case: BenchCase, smoke: bool, names=None) -> dict[str, Callable]:
    """The case's implementations, ``clipfast`` running the kernels (dispatch "kernel") and, on CUDA,
    ``clipfast (auto)`` beside it running the measured choice between them and PyTorch (dispatch "auto"),
    plus ``torch.compile`` of ``compile_impl`` (not in the smoke pass: the interpreter's kernels are not what
    inductor would generate); ``names`` selects a subset."""
    impls = dict(case.impls)
    impls["clipfast"] = _in_dispatch("kernel", case.impls["clipfast"])
    if torch.cuda.is_available():
        impls["clipfast (auto)"] = _in_dispatch("auto", case.impls["clipfast"])
    if case.compile_impl and not smoke and (names is None or "torch.compile" in names):
        impls["torch.compile"] = compiled(case.impls[case.compile_impl])
    return {k: v for k, v in impls.items() if names is None or k in names}


def _first_tensor(result) -> torch.Tensor:
    return result[0] if isinstance(result, (tuple, list)) else result


def compare_with_eager(case: BenchCase, device: torch.device) -> float:
    """Relative max-abs difference between the clipfast and eager forward outputs on the same inputs.
    The smoke pass fails a case whose clipfast output drifts from eager, so cases cannot rot."""
    inputs = case.make_inputs(device, case.dtype)
    with torch.no_grad():
        fast = _first_tensor(case.impls["clipfast"](**inputs)).double()
        ref = _first_tensor(case.impls["eager"](**inputs)).double()
    scale = max(float(ref.abs().max()), 1e-12) if ref.numel() else 1.0
    return float((fast - ref).abs().max()) / scale if ref.numel() else 0.0


SMOKE_TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _measure(case: BenchCase, row: dict, run_pair, mode: str, smoke: bool, peaks: dict) -> None:
    setup, run = run_pair
    if smoke:
        t0 = time.perf_counter()
        run(setup())
        row["smoke_seconds"] = round(time.perf_counter() - t0, 4)
        return
    if mode == "host":
        row["host_us"] = _time_host(setup, run)
        return
    _flush_l2()  # allocates the flush buffer before the baseline
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = _time_cuda(setup, run)
    row["peak_mem_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    row["ms_median"] = statistics.median(times)
    row["ms_p20"], row["ms_p80"] = _quantiles(times)
    row["samples"] = len(times)
    seconds = row["ms_median"] / 1e3
    if case.flops:
        row["tflops"] = case.flops(mode) / seconds / 1e12
        peak = peaks.get(f"{row['dtype'].replace('float', 'fp').replace('bfloat16', 'bf16')}_tflops")
        if peak:
            row["pct_peak_flops"] = 100 * row["tflops"] / peak
    if case.bytes:
        row["gbs"] = case.bytes(mode) / seconds / 1e9
        if peaks.get("hbm_gbs"):
            row["pct_peak_bw"] = 100 * row["gbs"] / peaks["hbm_gbs"]


def time_key(row: dict) -> str | None:
    """The row's time figure: ``ms_median`` (device) or ``host_us`` (host mode)."""
    return "host_us" if "host_us" in row else "ms_median" if "ms_median" in row else None


def run_case(case: BenchCase, device: torch.device | None = None, smoke: bool | None = None,
             impls=None, on_row: Callable[[dict], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> list[dict]:
    """Rows of results, one per implementation and mode; ``impls`` selects implementations by name
    (``"torch.compile"`` included), ``on_row`` receives each row as soon as it is measured, and the
    case ends early (with the rows so far) once ``should_stop()`` is true."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = (device.type != "cuda") if smoke is None else smoke
    rows = []
    if smoke:
        drift = compare_with_eager(case, device)
        if not drift <= SMOKE_TOLERANCE[case.dtype]:
            raise AssertionError(f"{case.family} {case.name}: clipfast differs from eager by {drift:.2e} (relative)")
    peaks = gpu_peaks()
    chosen = implementations(case, smoke, impls)
    for mode in case.modes:
        for impl_name, fn in chosen.items():
            if should_stop and should_stop():
                return rows
            row = {"family": case.family, "case": case.name, "impl": impl_name, "mode": mode,
                   "dtype": str(case.dtype).replace("torch.", ""), "shape": case.shape, "smoke": smoke}
            try:
                inputs = case.make_inputs(device, case.dtype)
                _measure(case, row, timed_step(fn, inputs, mode), mode, smoke, peaks)
                row["error"] = None
            except Exception as exc:  # one broken alternative must not hide the others' numbers
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            inputs = None
            rows.append(row)
            add_speedups(rows)
            if on_row:
                on_row(row)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """``speedup_of_clipfast`` on every timed row whose case and mode has a timed clipfast row:
    the row's time divided by clipfast's (above 1: clipfast is faster)."""
    clipfast_time = {}
    for r in rows:
        key = time_key(r)
        if r["impl"] == "clipfast" and key and not r.get("error"):
            clipfast_time[(r["family"], r["case"], r["dtype"], r["mode"])] = r[key]
    for r in rows:
        key = time_key(r)
        base = clipfast_time.get((r["family"], r["case"], r["dtype"], r["mode"]))
        if key and base and not r.get("error"):
            r["speedup_of_clipfast"] = r[key] / base


def _quantiles(times: list[float]) -> tuple[float, float]:
    s = sorted(times)
    pick = lambda q: s[min(len(s) - 1, max(0, int(math.floor(q * (len(s) - 1)))))]  # noqa: E731
    return pick(0.2), pick(0.8)


def environment() -> dict:
    import platform

    import triton

    env = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["gpu"] = None
    return env


RESULTS_ROOT = os.path.join("bench", "results")  # GPU results, one folder per run (results_dir_name)


def results_dir_name(env: dict) -> str:
    """``<gpu>_<date>_torch<v>_triton<v>`` of an ``environment()``."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", env.get("gpu") or "cpu").strip("-")
    return f"{gpu}_{env['date']}_torch{env['torch'].split('+')[0]}_triton{env['triton']}"
