"""Test harness: on a machine without CUDA the real Triton kernels run on CPU tensors through the Triton
interpreter. TRITON_INTERPRET must be set before triton is imported, so this runs first."""
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# the tests check clipfast's kernels: no measured choice of PyTorch instead (tests/test_dispatch.py tests that)
os.environ.setdefault("CLIPFAST_DISPATCH", "kernel")

import pytest  # noqa: E402

from clipfast.kernels import runtime  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# bf16 is silently wrong in the interpreter (triton issue #11584): tested on GPU and by the AOT check.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")
    config.addinivalue_line("markers", "gpu_suite: the GPU check's correctness step (bench/gpu_suite.sh); cheap on CPU")


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _poison_outputs():
    """Every kernel output starts as NaN, so an element a kernel does not write fails the test."""
    previous = runtime.set_poison_outputs(True)
    yield
    runtime.set_poison_outputs(previous)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed(request):
    """A different seed per test (fresh inputs for every check) that is reproducible from the test id;
    CLIPFAST_TEST_SEED shifts all of them to draw another set of inputs."""
    base = int(os.environ.get("CLIPFAST_TEST_SEED", "0"))
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) + base) % (2**31))


def run_without_interpreter(script: str) -> str:
    """Run ``script`` in a fresh Python without TRITON_INTERPRET, so CPU tensors take the ops' eager reference
    path (what a laptop without CUDA runs); returns its stdout, failing the test on a non-zero exit."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
