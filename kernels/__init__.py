"""Triton kernels and their launchers (installed as ``clipfast.kernels``).

One module per kernel family. Each module holds the ``@triton.jit`` kernels, plain-Python launchers
that allocate outputs and pick tiles, and ``aot_cases()``: the shipped configurations the AOT check
compiles. No autograd and no nn here; ``clipfast.ops`` builds the differentiable ops on top.
"""
import importlib
import os
import sys


def _step_aside(namespace: dict) -> None:
    """Imported as a top-level ``kernels``: Python found this source folder because the working directory is
    the repository root. That name belongs to Hugging Face's package (transformers imports it), so load the
    installed one in our place. Where none is installed, stay an empty placeholder that looks like a
    namespace package (no ``__file__``, no attributes, no submodules): importers such as transformers take
    that for a folder shadowing a missing distribution and treat the package as absent."""
    import importlib.machinery
    import importlib.util

    source_root = os.path.dirname(os.path.dirname(os.path.abspath(namespace["__file__"])))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != source_root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module  # the import statement returns what sys.modules holds when we return
        spec.loader.exec_module(module)
        return

    def missing(name):
        raise AttributeError(f"module 'kernels' has no attribute {name!r}: Hugging Face's kernels package is not "
                             "installed (the folder kernels/ of the clipfast source tree is clipfast.kernels)")
    for name in [n for n in namespace if not (n.startswith("__") and n.endswith("__"))] + ["__file__"]:
        namespace.pop(name, None)
    namespace.update(__path__=[], __getattr__=missing)


if __name__ == "kernels":
    _step_aside(globals())
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
