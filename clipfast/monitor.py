"""What clipfast did in a process: Triton kernels launched per family, and every fallback taken with its
reason (``clipfast run`` prints this at exit).

- **Launches** are counted where Triton launches a kernel: ``kernel[grid](...)``
  (``triton.runtime.jit.KernelInterface.__getitem__``, shared by JIT, autotuned and interpreted kernels), for
  kernels defined in ``clipfast.kernels.<family>``; the family is that module's name (``attention``,
  ``attention_varlen``, ``layer_norm``, ``mlp``, ``patch_embed``, ``contrastive_loss``). An autotuned kernel
  counts once per call, not once per timed config.
- **Fallbacks** are clipfast's one-time warnings (``clipfast._validate.warn_once``: a case a kernel does not
  take ran PyTorch), recorded with their key and message the first time each is raised.

``Monitor.start()`` installs both hooks, ``stop()`` removes them; nothing is recorded otherwise.
"""
from __future__ import annotations

import os
import sys
import types
from collections import Counter

__all__ = ["Monitor"]

_KERNELS = "clipfast.kernels."


def _kernel_family(kernel) -> str | None:
    fn = kernel
    for _ in range(8):  # Autotuner / Heuristics -> JITFunction / InterpretedFunction -> the Python function
        if isinstance(fn, types.FunctionType):
            break
        fn = getattr(fn, "fn", None)
        if fn is None:
            return None
    module = getattr(fn, "__module__", "") or ""
    if not module.startswith(_KERNELS):
        return None
    return module[len(_KERNELS):].split(".")[0]


class Monitor:
    def __init__(self):
        self.launches: Counter = Counter()
        self.fallbacks: dict[str, str] = {}
        self._families: dict[int, str | None] = {}
        self._undo: list = []

    # -- hooks -------------------------------------------------------------------------------------

    def start(self) -> "Monitor":
        if self._undo:
            return self
        from triton.runtime.jit import KernelInterface

        original_getitem = KernelInterface.__dict__["__getitem__"]
        families, launches = self._families, self.launches

        def __getitem__(kernel, grid):
            launch = original_getitem(kernel, grid)
            key = id(kernel)
            family = families[key] if key in families else families.setdefault(key, _kernel_family(kernel))
            if family is None:
                return launch

            def counted(*args, **kwargs):
                launches[family] += 1
                return launch(*args, **kwargs)

            return counted

        KernelInterface.__getitem__ = __getitem__
        self._undo.append(lambda: setattr(KernelInterface, "__getitem__", original_getitem))

        from . import _validate

        original_warn = _validate.warn_once
        fallbacks = self.fallbacks

        def warn_once(key: str, message: str) -> None:
            if key not in _validate._warned:
                fallbacks.setdefault(key, message)
            return original_warn(key, message)

        warn_once.__wrapped__ = original_warn
        # every clipfast module that imported the name, and (through _validate) those that import it later
        swapped = []
        for name, module in list(sys.modules.items()):
            if module is not None and (name == "clipfast" or name.startswith("clipfast.")):
                namespace = getattr(module, "__dict__", {})
                for attr, value in list(namespace.items()):
                    if value is original_warn:
                        namespace[attr] = warn_once
                        swapped.append((namespace, attr))

        def restore():
            for namespace, attr in swapped:
                if namespace.get(attr) is warn_once:
                    namespace[attr] = original_warn
            for name, module in list(sys.modules.items()):  # modules imported since
                if module is not None and (name == "clipfast" or name.startswith("clipfast.")):
                    namespace = getattr(module, "__dict__", {})
                    for attr, value in list(namespace.items()):
                        if value is warn_once:
                            namespace[attr] = original_warn

        self._undo.append(restore)
        return self

    def stop(self) -> None:
        while self._undo:
            self._undo.pop()()

    # -- the summary -------------------------------------------------------------------------------

    def summary(self) -> str:
        """One line: kernels launched per family, and every fallback with its reason."""
        if self.launches:
            total = sum(self.launches.values())
            kernels = f"{total} kernel launches (" + ", ".join(
                f"{family} {n}" for family, n in sorted(self.launches.items())) + ")"
        else:
            kernels = "no clipfast kernel launched"
            why = _why_no_kernels()
            if why:
                kernels += f" ({why})"
        if self.fallbacks:
            fallbacks = f"{len(self.fallbacks)} fallback(s): " + "; ".join(
                f"{msg} [{key}]" for key, msg in self.fallbacks.items())
        else:
            fallbacks = "no fallbacks"
        return f"{kernels}; {fallbacks}"


def _why_no_kernels() -> str:
    try:
        import torch

        from .dispatching import get_dispatch
    except Exception:  # pragma: no cover
        return ""
    if get_dispatch() == "torch":
        return "dispatch mode torch: PyTorch ran every op"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "CPU without the Triton interpreter: clipfast's eager reference ran; --interpret runs the kernels"
    return ""
