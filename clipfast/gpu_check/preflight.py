"""Preflight of the GPU check: what must hold before any step may spend the lease, each a function of what
it inspects (commands, paths, environment), so every failure path is testable on a CPU machine.

1. ``compiler``: a C compiler as Triton finds one (``$CC``, else ``gcc``, else ``clang``): Triton builds a
   C launcher stub at the first launch of a kernel.
2. ``python_h``: ``Python.h`` in the include folder Triton passes that compiler (sysconfig's, with Triton's
   Debian ``posix_local`` fix-up).
3. ``gpu_visible``: ``nvidia-smi -L`` against ``torch.cuda.is_available()``. A GPU that nvidia-smi lists but
   torch cannot use is a stop (never a quiet CPU rehearsal for the whole lease); with no GPU listed and no
   CUDA, the run is the CPU rehearsal.
4. ``libcuda``: ``libcuda.so.1`` findable the way Triton looks (``TRITON_LIBCUDA_PATH``, ``ldconfig -p``,
   ``LD_LIBRARY_PATH``); only where a GPU is used.
5. ``launch``: one tiny Triton kernel launched in a child process (on the GPU; through the interpreter in the
   rehearsal) whose result is checked, within a timeout.

``run_preflight`` stops at the first failure with a one-line reason. Compiler and ``Python.h`` only matter
where a GPU is used (the interpreter builds nothing): in the rehearsal (no GPU listed, no CUDA) their failures
are warnings.

    python -m clipfast.gpu_check.preflight            # the checks, one line each; exit 1 on a stop
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from typing import Callable

LAUNCH_TIMEOUT_S = 120  # import, first compile and the launcher stub's C build on a bare machine


@dataclass
class Check:
    name: str
    ok: bool | None  # None: not applicable here (skipped)
    detail: str
    fatal: bool = True  # a failure stops the run (False: a warning)

    def line(self) -> str:
        state = "ok" if self.ok else "skipped" if self.ok is None else "FAILED" if self.fatal else "warning"
        return f"{self.name}: {state}: {self.detail}"


def check_compiler(env=None, which: Callable[[str], str | None] = shutil.which) -> Check:
    """The C compiler Triton's launcher build uses: ``$CC`` if set (then only that), else gcc, else clang."""
    env = os.environ if env is None else env
    cc = env.get("CC")
    if cc:
        found = which(cc)
        if found:
            return Check("compiler", True, f"CC={cc} ({found})")
        return Check("compiler", False, f"no C compiler: CC={cc} is not an executable (Triton builds its "
                                        "launcher stub with it at the first kernel launch)")
    for name in ("gcc", "clang"):
        found = which(name)
        if found:
            return Check("compiler", True, found)
    return Check("compiler", False, "no C compiler (no CC, gcc or clang on PATH): Triton builds its launcher stub "
                                    "with one at the first kernel launch")


def python_include_dir() -> str:
    """The folder Triton adds to the launcher build's include path (triton/runtime/build.py)."""
    scheme = sysconfig.get_default_scheme()
    if scheme == "posix_local":
        scheme = "posix_prefix"
    return sysconfig.get_paths(scheme=scheme)["include"]


def check_python_h(include_dir: str | None = None, exists: Callable[[str], bool] = os.path.exists) -> Check:
    include_dir = include_dir or python_include_dir()
    if exists(os.path.join(include_dir, "Python.h")):
        return Check("python_h", True, os.path.join(include_dir, "Python.h"))
    return Check("python_h", False, f"Python.h not found in {include_dir} (the Python development headers are "
                                    "missing): Triton cannot build its launcher stub")


def nvidia_smi_listing(command=("nvidia-smi", "-L"), timeout: float = 20) -> str | None:
    """``nvidia-smi -L``'s output; None where nvidia-smi is missing or fails."""
    try:
        proc = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def listed_gpus(listing: str | None) -> list[str]:
    """The GPU names in ``nvidia-smi -L`` output (``GPU 0: NVIDIA H100 80GB HBM3 (UUID: ...)``)."""
    return [m.group(1).strip() for m in re.finditer(r"^GPU \d+: (.*?)(?: \(UUID: [^)]*\))?\s*$", listing or "", re.M)]


def check_gpu_visible(listing: str | None, cuda_available: bool, torch_info: str = "") -> Check:
    gpus = listed_gpus(listing)
    if gpus and not cuda_available:
        return Check("gpu_visible", False, f"nvidia-smi lists {len(gpus)} GPU(s) ({gpus[0]}) but "
                                           f"torch.cuda.is_available() is False ({torch_info}): stopped instead "
                                           "of running the CPU rehearsal on a GPU machine")
    if cuda_available:
        return Check("gpu_visible", True, f"{gpus[0] if gpus else 'a CUDA device'} ({torch_info})")
    return Check("gpu_visible", True, "no GPU listed by nvidia-smi and no CUDA in torch: CPU rehearsal")


def check_libcuda(ldconfig_output: str | None, env=None, exists: Callable[[str], bool] = os.path.exists) -> Check:
    """``libcuda.so.1`` where Triton looks for it (triton/backends/nvidia/driver.py: libcuda_dirs)."""
    env = os.environ if env is None else env
    if env.get("TRITON_LIBCUDA_PATH"):
        path = env["TRITON_LIBCUDA_PATH"]
        if exists(os.path.join(path, "libcuda.so.1")) or exists(path):
            return Check("libcuda", True, f"TRITON_LIBCUDA_PATH={path}")
        return Check("libcuda", False, f"TRITON_LIBCUDA_PATH={path} holds no libcuda.so.1")
    locs = [line.split()[-1] for line in (ldconfig_output or "").splitlines() if "libcuda.so.1" in line]
    found = [loc for loc in locs if exists(loc)]
    if found:
        return Check("libcuda", True, found[0])
    dirs = [d for d in env.get("LD_LIBRARY_PATH", "").split(":") if d and exists(os.path.join(d, "libcuda.so.1"))]
    if dirs:
        return Check("libcuda", True, os.path.join(dirs[0], "libcuda.so.1"))
    return Check("libcuda", False, "libcuda.so.1 not found (ldconfig -p, LD_LIBRARY_PATH, TRITON_LIBCUDA_PATH): "
                                   "Triton cannot load the CUDA driver")


def ldconfig_listing() -> str | None:
    for ldconfig in ("/sbin/ldconfig", "ldconfig"):
        try:
            return subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            continue
    return None


def check_launch(argv: list[str], env: dict, timeout: float = LAUNCH_TIMEOUT_S) -> Check:
    """Run ``argv`` (by default this module's ``--launch``: one tiny Triton kernel, its result checked) and
    take its last output line as the verdict."""
    t0 = time.time()
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Check("launch", False, f"a tiny Triton kernel did not launch within {timeout:.0f}s")
    lines = [line.strip() for line in (proc.stdout + "\n" + proc.stderr).splitlines() if line.strip()]
    last = lines[-1] if lines else f"no output, exit code {proc.returncode}"
    if proc.returncode == 0:
        return Check("launch", True, f"{last} ({time.time() - t0:.1f}s with start-up)")
    return Check("launch", False, f"a tiny Triton kernel failed (exit code {proc.returncode}): {last[:300]}")


def _torch_info() -> str:
    import torch

    return f"torch {torch.__version__}, CUDA build {torch.version.cuda}"


def run_preflight(rehearsal: bool, launch_argv: list[str] | None = None, launch_env: dict | None = None,
                  env=None, which=shutil.which, include_dir: str | None = None, listing: str | None | bool = False,
                  cuda_available: bool | None = None, ldconfig: str | None | bool = False,
                  on_check: Callable[[Check], None] | None = None) -> dict:
    """Every check in order, stopping at the first fatal failure. Returns ``{"ok", "reason", "checks"}``;
    the keyword arguments replace what each check inspects (tests). ``launch_argv`` None: no launch check."""
    env = os.environ if env is None else env
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    checks: list[Check] = []
    reason = None

    def add(check: Check) -> bool:
        checks.append(check)
        if on_check:
            on_check(check)
        return not (check.ok is False and check.fatal)

    listing = nvidia_smi_listing() if listing is False else listing
    uses_gpu = not rehearsal or bool(listed_gpus(listing))  # where a GPU is listed, it must be usable
    steps = [
        lambda: check_compiler(env, which),
        lambda: check_python_h(include_dir),
        lambda: check_gpu_visible(listing, cuda_available, _torch_info()),
        lambda: (check_libcuda(ldconfig_listing() if ldconfig is False else ldconfig, env) if uses_gpu
                 else Check("libcuda", None, "no GPU: not needed by the interpreter")),
        lambda: (check_launch(launch_argv, launch_env or dict(env)) if launch_argv
                 else Check("launch", None, "not run")),
    ]
    for step in steps:
        check = step()
        if check.name in ("compiler", "python_h") and not uses_gpu and check.ok is False:
            check.fatal = False  # the interpreter builds nothing; a GPU run would stop here
        if not add(check):
            reason = f"preflight {check.name}: {check.detail}"
            break
    return {"ok": reason is None, "reason": reason, "checks": [asdict(c) for c in checks]}


# ------------------------------------------------------------------------------------------------
# The launch check's child
# ------------------------------------------------------------------------------------------------

def launch_main() -> int:
    """One tiny Triton kernel (y = 2x + 1 over 1000 elements, masked tail) on the GPU, or through the
    interpreter without CUDA (``TRITON_INTERPRET=1`` set by the caller); its result checked exactly."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _affine(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2.0 + 1.0, mask=mask)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    try:
        x = torch.arange(1000, dtype=torch.float32, device=device)
        y = torch.full_like(x, float("nan"))
        _affine[(triton.cdiv(1000, 256),)](x, y, 1000, BLOCK=256)
        if device == "cuda":
            torch.cuda.synchronize()
        bad = int((y != x * 2 + 1).sum())
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"launch failed on {device}: {type(exc).__name__}: {first}")
        return 1
    if bad:
        print(f"launch ran on {device} but {bad} of 1000 results are wrong")
        return 1
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (interpreter)"
    print(f"tiny Triton kernel ok on {where} ({time.time() - t0:.1f}s, triton {triton.__version__})")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--launch"]:
        return launch_main()
    import torch

    rehearsal = not torch.cuda.is_available()
    env = dict(os.environ, **({"TRITON_INTERPRET": "1"} if rehearsal else {}))
    result = run_preflight(rehearsal, [sys.executable, "-m", "clipfast.gpu_check.preflight", "--launch"], env,
                           on_check=lambda c: print(c.line(), flush=True))
    print("preflight: ok" if result["ok"] else result["reason"])
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
