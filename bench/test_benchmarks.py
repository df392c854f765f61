"""pytest-benchmark suite over every registered case (the same harness as ``clipfast bench``).

On a GPU each case is timed (pytest-benchmark records the clipfast fwd+bwd step; the full comparison
rows are attached as extra_info). Without a GPU the smoke pass runs through the interpreter.

    python -m pytest bench -q                 # GPU: timings; CPU: smoke
"""
import pytest
import torch

from clipfast.benchmarks import all_cases
from clipfast.benchmarks.harness import run_case

ON_GPU = torch.cuda.is_available()
CASES = all_cases(smoke=not ON_GPU)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.family}:{c.name}" for c in CASES])
def test_bench(case, benchmark):
    rows = benchmark.pedantic(run_case, args=(case,), rounds=1, iterations=1)
    errors = [r for r in rows if r["error"] and r["impl"] in ("clipfast", "eager")]
    assert not errors, errors
    benchmark.extra_info["rows"] = rows
