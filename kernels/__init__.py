"""Triton kernels and their launchers (installed as ``clipfast.kernels``).

One module per kernel family. Each module holds the ``@triton.jit`` kernels, plain-Python launchers
that allocate outputs and pick tiles, and ``aot_cases()``: the shipped configurations the AOT check
compiles. No autograd and no nn here; ``clipfast.ops`` builds the differentiable ops on top.
"""
import importlib
import os
import sys

if __name__ == "kernels":
    # Imported as a top-level package: Python found this source folder because the working directory is
    # the repository root. ``kernels`` there belongs to Hugging Face's package of that name (transformers
    # imports it), so step aside: load the installed one in our place, or fail as a missing module would.
    import importlib.machinery
    import importlib.util

    _source_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _source_root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _rest)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(
            "No module named 'kernels' (the folder kernels/ of the clipfast source tree is clipfast.kernels, "
            "not a top-level package)", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds when we return
    _spec.loader.exec_module(_module)
else:
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
