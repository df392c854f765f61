"""The one benchmark harness: ``clipfast bench``, the pytest-benchmark suite and the GPU suite call it.

A ``BenchCase`` names the implementations of one hot path at one shape (always ``clipfast`` and
``eager``; optionally other alternatives, e.g. SDPA backends) and how to make inputs. ``run_case``
times each implementation in each mode (``fwd``, ``bwd``, ``fwd+bwd``), adds ``torch.compile`` of the
eager implementation, and reports median/spread, TFLOP/s or GB/s, percent of peak, speedups and peak memory.

On a machine without CUDA there is nothing to time: ``run_case`` runs a smoke pass (tiny shapes through
the Triton interpreter, results compared with eager) so the harness and the cases cannot rot, and marks
the rows as smoke with no timings.
"""
from __future__ import annotations

import math
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


def _step(fn: Callable, inputs: dict, mode: str) -> Callable[[], Any]:
    """A zero-argument callable that performs one ``mode`` step of ``fn``."""
    leaves = _grad_leaves(inputs)

    def clear():
        for t in leaves:
            t.grad = None

    if mode == "fwd":
        def run():
            with torch.no_grad() if not leaves else torch.enable_grad():
                return fn(**inputs)
        return run
    if mode == "fwd+bwd":
        def run():
            clear()
            outs = _outputs(fn(**inputs))
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        return run
    if mode == "bwd":
        outs = _outputs(fn(**inputs))
        grads = [torch.ones_like(o) for o in outs]

        def run():
            clear()
            torch.autograd.backward(outs, grads, retain_graph=True)
        return run
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def gpu_peaks() -> dict:
    if not torch.cuda.is_available():
        return {}
    name = torch.cuda.get_device_name()
    return next((v for k, v in GPU_PEAKS.items() if k in name), {})


def _time_cuda(run: Callable, warmup_ms: float = 25, rep_ms: float = 100) -> list[float]:
    import triton.testing

    times = triton.testing.do_bench(run, warmup=warmup_ms, rep=rep_ms, return_mode="all")
    return list(times)


def _in_dispatch(mode: str, fn: Callable) -> Callable:
    from clipfast.dispatcher import dispatch

    def run(**inputs):
        with dispatch(mode):
            return fn(**inputs)
    return run


def _implementations(case: BenchCase) -> dict[str, Callable]:
    """``clipfast`` runs the kernels (dispatch "kernel"); on CUDA ``clipfast (auto)`` beside it runs the
    measured choice between them and PyTorch (dispatch "auto")."""
    impls = dict(case.impls)
    impls["clipfast"] = _in_dispatch("kernel", case.impls["clipfast"])
    if torch.cuda.is_available():
        impls["clipfast (auto)"] = _in_dispatch("auto", case.impls["clipfast"])
    if case.compile_impl and torch.cuda.is_available():
        impls["torch.compile"] = torch.compile(case.impls[case.compile_impl])
    return impls


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


def run_case(case: BenchCase, device: torch.device | None = None, smoke: bool | None = None) -> list[dict]:
    """Rows of results, one per implementation and mode."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = (device.type != "cuda") if smoke is None else smoke
    rows = []
    if smoke:
        drift = compare_with_eager(case, device)
        if not drift <= SMOKE_TOLERANCE[case.dtype]:
            raise AssertionError(f"{case.family} {case.name}: clipfast differs from eager by {drift:.2e} (relative)")
    peaks = gpu_peaks()
    for mode in case.modes:
        medians = {}
        for impl_name, fn in _implementations(case).items():
            inputs = case.make_inputs(device, case.dtype)
            row = {"family": case.family, "case": case.name, "impl": impl_name, "mode": mode,
                   "dtype": str(case.dtype).replace("torch.", ""), "shape": case.shape, "smoke": smoke}
            try:
                run = _step(fn, inputs, mode)
                if smoke:
                    t0 = time.perf_counter()
                    run()
                    row["smoke_seconds"] = round(time.perf_counter() - t0, 4)
                else:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    times = _time_cuda(run)
                    row["peak_mem_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
                    row["ms_median"] = statistics.median(times)
                    row["ms_p20"], row["ms_p80"] = _quantiles(times)
                    medians[impl_name] = row["ms_median"]
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
                row["error"] = None
            except Exception as exc:  # one broken alternative must not hide the others' numbers
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
        if "clipfast" in medians:
            for row in rows:
                if row["mode"] == mode and row["case"] == case.name and row["impl"] in medians:
                    row["speedup_of_clipfast"] = medians[row["impl"]] / medians["clipfast"]
    return rows


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
