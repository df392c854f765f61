"""Benchmark cases per kernel family and the harness that times them.

Each module here (other than ``harness``) defines ``cases(smoke: bool) -> list[BenchCase]``; modules are
discovered by scanning, so ``clipfast bench`` (``cli``), the pytest-benchmark suite in ``bench/`` and the GPU
check (``clipfast.gpu_check``, which runs these cases and is never imported from here) all pick a new family
up without registering it anywhere.
"""
import importlib
import pkgutil


def case_modules():
    modules = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name in ("harness",) or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "cases"):
            modules.append(module)
    return modules


def all_cases(smoke: bool, family: str | None = None):
    found = []
    for module in case_modules():
        name = module.__name__.rsplit(".", 1)[-1]
        if family in (None, "all", name):
            found.extend(module.cases(smoke))
    return found
