"""Ahead-of-time compile check: every kernel at its shipped configurations, for sm_80 and sm_90, fp16
and bf16 (and fp32 where the offer rules give fp32 operands the configuration), on a machine without a GPU.

Each kernel module in ``clipfast.kernels`` declares ``aot_cases()``. The compile runs in a child process
without ``TRITON_INTERPRET`` (the interpreter replaces ``triton.jit``), and the cubins are inspected with
the ``cuobjdump`` that ships with Triton: registers, spill bytes (STACK/LOCAL), shared memory and whether
tensor-core instructions (HGMMA on sm_90, HMMA on sm_80) are present where the kernel has a ``tl.dot``,
whether loads use the tensor memory accelerator (UTMALDG, sm_90; required of cases that load through
tensor descriptors, ``AotCase.expects_tma``) or asynchronous copies (LDGSTS, the
software-pipelined cp.async loads), and the occupancy: resident warps per SM as registers, shared memory
and the warp limit allow (``occupancy``). Pointer arguments are compiled as 16-byte aligned, and integer
arguments a case lists in ``AotCase.divisible_by_16`` as multiples of 16, as the JIT specializes them
at run time (torch allocations; CLIP's widths and strides), so the figures match what runs.

Shared memory: the compiled kernel's ``shared`` (what Triton compares with the device's per-block maximum
at launch, raising OutOfResources above it) must fit the architecture's ``MAX_SHARED_PER_BLOCK``
(``clipfast.kernels.runtime``), and must not exceed the case's ``shared_estimate`` where it has one: the
estimate the offer rules prune tiles by must be an upper bound.

Exit status is non-zero on any compile error, any spill, shared memory over the per-block maximum or over
the case's estimate, a missing tensor-core instruction, or a missing TMA load where a case expects one.

    python -m clipfast.aot [--quick] [--arch 80 90] [--dtype fp16 bf16 fp32] [--filter NAME] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ARCHS = (80, 90)
DTYPES = ("fp16", "bf16", "fp32")


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _inspect_cubin(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True).stdout
    finally:
        os.unlink(path)

    def field(name):
        m = re.search(rf"\b{name}:(\d+)", usage)
        return int(m.group(1)) if m else 0

    return {"registers": field("REG"), "stack": field("STACK"), "local": field("LOCAL"),
            "hgmma": "HGMMA" in sass, "hmma": "HMMA" in sass, "tma": "UTMALDG" in sass, "ldgsts": "LDGSTS" in sass}


# Per-SM limits (CUDA occupancy calculator): registers, shared memory, resident warps and blocks; shared
# memory reserved per block; register allocation unit per warp.
SM_LIMITS = {
    80: {"registers": 65536, "shared": 167936, "warps": 64, "blocks": 32},
    90: {"registers": 65536, "shared": 233472, "warps": 64, "blocks": 32},
}
SHARED_RESERVED_PER_BLOCK = 1024
REGISTER_UNIT_PER_WARP = 256


def occupancy(arch: int, registers: int, shared: int, num_warps: int) -> int:
    """Resident warps per SM for a kernel using ``registers`` per thread and ``shared`` bytes per block
    of ``num_warps`` warps: the fewest blocks any of registers, shared memory, warps or blocks allow."""
    limits = SM_LIMITS[arch]
    regs_per_warp = -(-max(registers, 1) * 32 // REGISTER_UNIT_PER_WARP) * REGISTER_UNIT_PER_WARP
    by_registers = (limits["registers"] // regs_per_warp) // num_warps
    by_shared = limits["shared"] // (shared + SHARED_RESERVED_PER_BLOCK)
    blocks = min(by_registers, by_shared, limits["warps"] // num_warps, limits["blocks"])
    return blocks * num_warps


def case_constexprs(case) -> dict:
    """The case's constexprs, plus the kernel's defaults for those it leaves out (as a launch fills them)."""
    defaults = {p.name: p.default for p in case.kernel.params if p.is_constexpr and p.has_default}
    return {**defaults, **case.constexprs}


def _format_type(t, dtype: str):
    """A signature type with the case's dtype filled in; a tuple argument's type is a tuple of types."""
    return tuple(_format_type(e, dtype) for e in t) if isinstance(t, tuple) else t.format(dtype=dtype)


def _compile_case(case, dtype: str, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = case_constexprs(case)
    signature = {k: _format_type(v, dtype) for k, v in case.signature.items()}
    # constexprs keyed by a path (a tuple argument's element) are typed "constexpr" in the signature's tuple
    signature.update({k: "constexpr" for k in constexprs if isinstance(k, str)})
    arg_names = case.kernel.arg_names
    attrs = {(arg_names.index(name),): [["tt.divisibility", 16]] for name in case.aligned_args()}
    src = ASTSource(fn=case.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": case.num_warps, "num_stages": case.num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    info = _inspect_cubin(compiled.asm["cubin"])
    info["shared"] = int(compiled.metadata.shared)
    info["occupancy_warps"] = occupancy(arch, info["registers"], info["shared"], case.num_warps)
    return info


def _worker(args) -> int:
    from clipfast.kernels import kernel_modules

    for module in kernel_modules():
        family = module.__name__.rsplit(".", 1)[-1]
        for case in module.aot_cases():
            if args.quick and not case.quick:
                continue
            if args.filter and args.filter not in case.name and args.filter != family:
                continue
            for dtype in case.dtypes:
                if args.dtype and dtype not in args.dtype:
                    continue
                for arch in args.arch:
                    if case.archs is not None and arch not in case.archs:
                        continue
                    row = {"family": family, "kernel": case.name, "config": case.config_text(), "dtype": dtype,
                           "arch": f"sm_{arch}", "expects_mma": case.expects_mma,
                           "expects_tma": case.expects_tma, "shared_estimate": case.shared_estimate}
                    t0 = time.time()
                    try:
                        row.update(_compile_case(case, dtype, arch))
                        row["error"] = None
                    except Exception as exc:  # reported, and fails the run
                        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                    row["seconds"] = round(time.time() - t0, 2)
                    print(json.dumps(row), flush=True)
    return 0


def shared_memory_problems(row: dict) -> list[str]:
    """A compiled row's shared memory over its architecture's per-block maximum (the launch would raise
    OutOfResources), or over the shared-memory estimate its tile is offered by."""
    from clipfast.kernels.runtime import max_shared_per_block

    found = []
    shared, limit = row.get("shared", 0), max_shared_per_block(int(row["arch"].removeprefix("sm_")))
    if limit is not None and shared > limit:
        found.append(f"shared memory {shared} B over {row['arch']}'s {limit} B per block")
    estimate = row.get("shared_estimate")
    if estimate is not None and shared > estimate:
        found.append(f"shared memory {shared} B over the offer rule's estimate {estimate} B")
    return found


def _problems(row: dict) -> list[str]:
    if row["error"]:
        return [row["error"]]
    found = []
    if row["stack"] or row["local"]:
        found.append(f"spills {row['stack'] + row['local']} bytes")
    found += shared_memory_problems(row)
    if row["expects_mma"]:
        want = "hgmma" if row["arch"] == "sm_90" else "hmma"
        if not row[want]:
            found.append(f"no {want.upper()} tensor-core instructions")
    if row.get("expects_tma") and row["arch"] != "sm_80" and not row["tma"]:
        found.append("no UTMALDG (TMA) loads")
    return found


def run(arch=ARCHS, quick=False, name_filter=None, json_path=None, stream=sys.stdout, dtypes=None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "clipfast.aot", "--worker", "--arch", *map(str, arch)]
    if dtypes:
        cmd += ["--dtype", *dtypes]
    if quick:
        cmd.append("--quick")
    if name_filter:
        cmd += ["--filter", name_filter]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not rows:
        stream.write(proc.stderr[-4000:] + "\n")
        stream.write("clipfast aot: the compile worker failed\n")
        return 1

    header = (f"{'kernel':<44} {'config':<34} {'dtype':<5} {'arch':<6} {'regs':>4} {'spill':>5} {'smem':>7} {'mma':<6} "
              f"{'tma':<3} {'async':<5} {'warps/SM':>8} status")
    stream.write(header + "\n" + "-" * len(header) + "\n")
    failures = 0
    for row in rows:
        problems = _problems(row)
        failures += bool(problems)
        row["status"] = "FAIL: " + "; ".join(problems) if problems else "ok"
        mma = ("HGMMA" if row.get("hgmma") else "HMMA" if row.get("hmma") else "-") if not row["error"] else "?"
        stream.write(f"{row['kernel']:<44} {row['config']:<34} {row['dtype']:<5} {row['arch']:<6} "
                     f"{row.get('registers', 0):>4} {row.get('stack', 0) + row.get('local', 0):>5} "
                     f"{row.get('shared', 0):>7} {mma:<6} {'yes' if row.get('tma') else '-':<3} "
                     f"{'yes' if row.get('ldgsts') else '-':<5} {row.get('occupancy_warps', 0):>8} {row['status']}\n")
    stream.write(f"\n{len(rows)} compiles, {failures} failing\n")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="clipfast aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the quick subset of cases (CI)")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--dtype", nargs="+", default=None, choices=DTYPES,
                        help="only these dtypes (default: each case's own)")
    parser.add_argument("--filter", default=None, help="only kernels whose name contains this text, or a family")
    parser.add_argument("--json", default=None, help="also write the rows as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)
    return run(args.arch, args.quick, args.filter, args.json, dtypes=args.dtype)


if __name__ == "__main__":
    sys.exit(main())
