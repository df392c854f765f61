"""What every child process of the GPU check shares (the benchmark workers and the pytest shards alike):
its records file, the step's deadline, how a CUDA error is told from other errors, and the crashes the
tests inject. Free of torch/triton imports: the pytest plugin loads it before ``tests/conftest.py`` sets
``TRITON_INTERPRET``.

Environment variables the parent (``run.Run``) sets for each child:

- ``CLIPFAST_SUITE_STEP_BUDGET_S`` / ``CLIPFAST_SUITE_DEADLINE``: the step's seconds (counted from the end of
  the child's start-up) / the run's end (a Unix time);
- ``CLIPFAST_SUITE_SKIP_FILE`` / ``CLIPFAST_SUITE_ONLY_FILE``: cases (one a line) to leave out (what a crashed
  process of this lane already started) / to run alone (the rerun of the case it crashed on);
- ``CLIPFAST_SUITE_CRASH``: a crash to inject (``crash_if_injected``).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time

EXIT_CUDA_ERROR = 3       # a worker that hit a CUDA error exits with this: its process is not reused
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


def device_error() -> str | None:
    """A sticky CUDA error: what synchronizing the device raises (None where torch is not imported, CUDA is
    unused, or the device is fine)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    try:
        torch.cuda.synchronize()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:500]
    return None


def append(path: str, entry: dict) -> None:
    """One JSON line onto a records file (the parent reads complete lines as they come)."""
    with open(path, "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")


def listed(variable: str) -> set | None:
    """The lines of the file that environment variable ``variable`` names (None without the variable)."""
    path = os.environ.get(variable)
    if not path:
        return None
    with open(path) as f:
        return {line.rstrip("\n") for line in f if line.strip()}


def step_deadline() -> float:
    """When this child stops starting work: its step budget counted from its first call (after start-up:
    imports, collection), and never after the run's own deadline. Cached on first use."""
    if not _STEP_DEADLINE:
        budget = float(os.environ.get("CLIPFAST_SUITE_STEP_BUDGET_S", "inf"))
        _STEP_DEADLINE.append(min(time.time() + budget, float(os.environ.get("CLIPFAST_SUITE_DEADLINE", "inf"))))
    return _STEP_DEADLINE[0]


_STEP_DEADLINE: list = []
