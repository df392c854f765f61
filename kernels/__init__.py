"""Triton kernels and their launchers (installed as ``clipfast.kernels``).

One module per kernel family. Each module holds the ``@triton.jit`` kernels, plain-Python launchers
that allocate outputs and pick tiles, and ``aot_cases()``: the shipped configurations the AOT check
compiles. No autograd and no nn here; ``clipfast.ops`` builds the differentiable ops on top.
"""
import importlib
import pkgutil

from . import runtime

__all__ = ["runtime", "kernel_modules"]


def kernel_modules():
    """Every kernel module in this package that declares AOT cases (found by scanning, so a new kernel
    file is picked up by ``clipfast aot`` without registering it anywhere)."""
    modules = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name == "runtime" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "aot_cases"):
            modules.append(module)
    return modules
