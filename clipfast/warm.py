"""``clipfast warm MODEL``: compile, before the first step, exactly the kernels and configs that step compiles.

    clipfast warm MODEL [--train|--infer] [--batch N] [--dtype fp32|fp16|bf16] [--arch 80 90] [--jobs N]
                        [--plan-only] [--json PATH]

Plan: a child process runs the model's first step (the names ``clipfast verify`` / ``tune`` take, e.g.
``ViT-B-16``, ``tiny``, ``hf:clip``) on CPU tensors under the Triton interpreter, in dispatch ``kernel``,
with the target architecture forced (``CLIPFAST_TARGET_ARCH``: ``runtime.capability`` and ``sm_count``
answer as that GPU for CPU tensors), so every launcher, pruning rule and the autotune policy decide as
they would on the GPU. Every kernel launch is recorded (the kernel, its arguments: pointer dtypes and
16-byte alignment, integer values, constexprs, and the config the policy picked) and not executed.
bf16 is planned too (the interpreter would compute it wrongly, but nothing is computed).

Compile: each recorded launch goes through the JIT's own binder for the target (the nvidia backend's
``create_function_from_signature`` and ``JITFunction._pack_args``, as ``JITFunction.run`` does), which
yields the signature, constexprs, specialization attributes and options of the launch; launches with the
same compile cache key are one compile; the distinct ones are compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32), options)`` in parallel worker processes (without ``TRITON_INTERPRET``)
into Triton's cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``), where the real launch finds them.

On a GPU host without ``--arch`` the plan is for the local GPU (its architecture, SM count and name, so
the user's table is used). In ``CLIPFAST_AUTOTUNE=max`` every config the pruning offers is compiled.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

# ---------------------------------------------------------------------------------------------
# Recording launches (the planning child: TRITON_INTERPRET=1, CLIPFAST_TARGET_ARCH set)
# ---------------------------------------------------------------------------------------------


class TensorArg:
    """A pointer argument as the JIT specializes it: element dtype and whether data_ptr % 16 == 0."""

    def __init__(self, dtype: str, aligned: bool):
        self.dtype, self.aligned = dtype, aligned

    def __eq__(self, other):
        return isinstance(other, TensorArg) and (self.dtype, self.aligned) == (other.dtype, other.aligned)

    def __hash__(self):
        return hash((self.dtype, self.aligned))

    def __repr__(self):
        return f"*{self.dtype}{'' if self.aligned else '(unaligned)'}"


def _encode(value):
    import torch

    if isinstance(value, torch.Tensor):
        return TensorArg(str(value.dtype).replace("torch.", ""), value.data_ptr() % 16 == 0)
    if isinstance(value, (tuple, list)):
        return type(value)(_encode(v) for v in value)
    return value


def _fn_id(interpreted) -> tuple[str, str]:
    fn = interpreted.fn
    return fn.__module__, fn.__name__


class Recorder:
    """Records every kernel launch (``InterpretedFunction.run``) while active; ``execute=False`` skips the
    kernel itself (planning), ``True`` runs it as usual (the tests compare the two). Autotuned launches carry
    the configs their pruning offered (``offered``) when the policy is in ``max`` mode."""

    def __init__(self, execute: bool = False):
        self.execute = execute
        self.launches: list[dict] = []
        self._offered: dict[str, list] = {}

    def _listener(self, name, key, offered, chosen):
        self._offered[name] = [c.all_kwargs() for c in offered] if len(chosen) > 1 else None

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction

        from clipfast.kernels import configs, kernel_modules

        self._cls, self._run = InterpretedFunction, InterpretedFunction.run
        self._policies = [k.policy for m in kernel_modules() for k in vars(m).values() if hasattr(k, "policy")]
        for policy in self._policies:
            policy.listeners.append(self._listener)
        recorder, real_run = self, self._run

        def run(fn_self, *args, grid, warmup, **kwargs):
            module, name = _fn_id(fn_self)
            launch = {"module": module, "name": name, "args": [_encode(a) for a in args],
                      "kwargs": {k: _encode(v) for k, v in kwargs.items()}}
            offered = recorder._offered.pop(configs.kernel_name(fn_self), None)
            if offered:
                launch["offered"] = offered
            recorder.launches.append(launch)
            if recorder.execute:
                return real_run(fn_self, *args, grid=grid, warmup=warmup, **kwargs)
            return None

        InterpretedFunction.run = run
        return self

    def __exit__(self, *exc):
        self._cls.run = self._run
        for policy in self._policies:
            policy.listeners.remove(self._listener)
        return False


def run_first_step(model: str, train: bool, batch: int, dtype: str, execute: bool = False) -> list[dict]:
    """The launches of ``model``'s first step (forward; with ``train`` forward + CLIP loss + backward) on CPU
    in dispatch ``kernel``. Needs TRITON_INTERPRET=1 and CLIPFAST_TARGET_ARCH in the environment at import."""
    import warnings

    import torch

    from clipfast.dispatching import modes
    from clipfast.kernels import runtime
    from clipfast.patching import patch
    from clipfast.tune import _step
    from clipfast.verify import DTYPES
    from clipfast.verify_models import resolve

    if not execute:  # nothing is computed, so the interpreter's wrong bf16 arithmetic does not matter
        runtime.INTERPRETER_WRONG_DTYPES = ()
    torch.manual_seed(0)
    spec = resolve(model, tiny=False)
    net = spec.build().to(dtype=DTYPES[dtype])
    net.train(train)
    patch(net)
    inputs = spec.make_inputs(batch, torch.device("cpu"))
    previous = modes.set_dispatch("kernel")
    try:
        with warnings.catch_warnings(), Recorder(execute) as recorder:
            warnings.simplefilter("ignore")
            _step(net, spec, inputs, train)
    finally:
        modes.set_dispatch(previous)
    return recorder.launches


def _plan_child(request: dict, out_path: str) -> int:
    from clipfast.kernels import configs

    configs.install_target(request["arch"], request.get("sm_count"), request.get("gpu"))
    launches = run_first_step(request["model"], request["train"], request["batch"], request["dtype"],
                              request.get("execute", False))
    with open(out_path, "wb") as f:
        pickle.dump(launches, f)
    return 0


def plan_launches(model: str, train: bool, batch: int, dtype: str, arch: int, sm_count: int | None = None,
                  gpu: str | None = None, execute: bool = False, mode: str | None = None) -> list[dict]:
    """Run the planning child for one architecture; the recorded launches."""
    env = dict(os.environ, TRITON_INTERPRET="1", CLIPFAST_TARGET_ARCH=str(arch), CLIPFAST_NO_REEXEC="1")
    if mode is not None:
        env["CLIPFAST_AUTOTUNE"] = mode
    request = {"model": model, "train": train, "batch": batch, "dtype": dtype, "arch": arch,
               "sm_count": sm_count, "gpu": gpu, "execute": execute}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "plan.pkl")
        proc = subprocess.run([sys.executable, "-m", "clipfast.warm", "--plan-child", json.dumps(request), out],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"planning {model} for sm_{arch} failed:\n{proc.stderr[-4000:]}")
        with open(out, "rb") as f:
            return pickle.load(f)


# ---------------------------------------------------------------------------------------------
# From a launch to the compile a real launch performs (no TRITON_INTERPRET)
# ---------------------------------------------------------------------------------------------

_binders: dict = {}


def _decode(value):
    import torch

    if isinstance(value, TensorArg):
        dtype = getattr(torch, value.dtype)
        t = torch.empty(32, dtype=dtype)
        return t if value.aligned else t[1:]  # data_ptr() % 16 != 0, as the launch's
    if isinstance(value, (tuple, list)):
        return type(value)(_decode(v) for v in value)
    return value


def compile_inputs(launch: dict, arch: int):
    """What ``JITFunction.run`` hands ``triton.compile`` for this launch on a GPU of ``arch``:
    (ASTSource, GPUTarget, options), computed with the JIT's own binder for that target."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from clipfast.kernels import runtime

    fn = runtime.jit_function(getattr(importlib.import_module(launch["module"]), launch["name"]))
    ident = (launch["module"], launch["name"], arch)
    if ident not in _binders:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        _binders[ident] = (fn, target, backend, create_function_from_signature(fn.signature, fn.params, backend))
    fn, target, backend, binder = _binders[ident]
    args = [_decode(a) for a in launch["args"]]
    kwargs = {k: _decode(v) for k, v in launch["kwargs"].items()}
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), target, options


def cache_hash(src, target, options) -> str:
    """The hash ``triton.compile`` files the compiled kernel under in Triton's cache."""
    import hashlib

    from triton.compiler import compiler

    backend = compiler.make_backend(target)
    opts = backend.parse_options(dict(options.__dict__, **src.parse_options()))
    key = compiler.get_cache_key(src, backend, opts, env_vars=compiler.get_cache_invalidating_env_vars())
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _cached(hash_: str) -> bool:
    from triton.runtime.cache import get_cache_manager

    folder = get_cache_manager(hash_).cache_dir
    return os.path.isdir(folder) and any(f.endswith(".cubin") for f in os.listdir(folder))


def expand(launches: list[dict]) -> list[dict]:
    """Each launch once per config it is compiled at: the one it ran, or (max mode) each one offered."""
    out = []
    for launch in launches:
        for cfg in launch.get("offered") or [None]:
            out.append(launch if cfg is None else {**launch, "kwargs": {**launch["kwargs"], **cfg}})
    return out


def distinct_compiles(launches: list[dict], arch: int) -> dict[str, dict]:
    """{cache hash: launch} over the launches' compiles (launches with one key compile once)."""
    found: dict[str, dict] = {}
    for launch in expand(launches):
        src, target, options = compile_inputs(launch, arch)
        found.setdefault(cache_hash(src, target, options), launch)
    return found


def family(launch: dict) -> str:
    return launch["module"].rsplit(".", 1)[-1]


def _compile_one(job) -> dict:
    launch, arch, hash_ = job
    import triton

    row = {"kernel": f"{family(launch)}.{launch['name']}", "arch": arch, "hash": hash_}
    t0 = time.time()
    try:
        row["cached"] = _cached(hash_)
        src, target, options = compile_inputs(launch, arch)
        triton.compile(src, target=target, options=options.__dict__)
        row["error"] = None
    except Exception as exc:  # reported, and fails the command
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    row["seconds"] = round(time.time() - t0, 3)
    return row


def _worker_init():
    os.environ.pop("TRITON_INTERPRET", None)


def compile_all(jobs: list[tuple], workers: int) -> list[dict]:
    import multiprocessing

    os.environ.pop("TRITON_INTERPRET", None)
    if workers <= 1:
        return [_compile_one(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init) as pool:
        return list(pool.map(_compile_one, jobs))


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def _local_target():
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return 10 * major + minor, props.multi_processor_count, torch.cuda.get_device_name()


def main_warm(args) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("clipfast warm: unset TRITON_INTERPRET (the compiles are for GPUs)", file=sys.stderr)
        return 2
    local = _local_target()
    archs = args.arch or ([local[0]] if local else None)
    if not archs:
        print("clipfast warm: no CUDA device: name the architectures to compile for, e.g. --arch 90",
              file=sys.stderr)
        return 2
    from clipfast.kernels import configs

    dtype = args.dtype or "bf16"
    t_start = time.time()
    report = {"model": args.model, "train": args.train, "batch": args.batch, "dtype": dtype,
              "mode": configs.mode(), "archs": {}}
    failures = 0
    for arch in archs:
        use_local = local is not None and local[0] == arch
        t0 = time.time()
        launches = plan_launches(args.model, args.train, args.batch, dtype, arch,
                                 sm_count=local[1] if use_local else None, gpu=local[2] if use_local else None)
        plan_s = time.time() - t0
        compiles = distinct_compiles(launches, arch)
        per_family = Counter(family(launch) for launch in compiles.values())
        entry = {"launches": len(launches), "distinct_compiles": len(compiles), "per_family": dict(per_family),
                 "plan_seconds": round(plan_s, 1)}
        print(f"clipfast warm: {args.model} {'train' if args.train else 'inference'} step, batch {args.batch}, "
              f"{dtype}, sm_{arch}, autotune mode {configs.mode()}: {len(launches)} launches, "
              f"{len(compiles)} distinct compiles ({', '.join(f'{k} {v}' for k, v in sorted(per_family.items()))}); "
              f"planned in {plan_s:.1f} s")
        if not args.plan_only:
            t1 = time.time()
            rows = compile_all([(launch, arch, h) for h, launch in compiles.items()], args.jobs)
            wall = time.time() - t1
            errors = [r for r in rows if r["error"]]
            failures += len(errors)
            for r in errors:
                print(f"  FAILED {r['kernel']}: {r['error']}", file=sys.stderr)
            summed = sum(r["seconds"] for r in rows if not r["cached"])
            cached = sum(r["cached"] for r in rows)
            entry.update({"compiled": len(rows) - cached, "already_cached": cached, "compile_seconds": round(summed, 1),
                          "wall_seconds": round(wall, 1), "jobs": args.jobs, "rows": rows})
            print(f"  compiled {len(rows) - cached} ({cached} already in Triton's cache): {summed:.1f} s summed "
                  f"compile time, {wall:.1f} s wall with {args.jobs} jobs; cache: {_cache_dir()}")
        report["archs"][f"sm_{arch}"] = entry
    report["wall_seconds"] = round(time.time() - t_start, 1)
    print(f"clipfast warm: done in {report['wall_seconds']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if failures else 0


def _cache_dir() -> str:
    from triton import knobs

    return knobs.cache.dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model name, as for verify (e.g. ViT-B-16, tiny, open_clip:NAME, hf:clip)")
    step = p.add_mutually_exclusive_group()
    step.add_argument("--infer", dest="train", action="store_false", help="forward under no_grad (default)")
    step.add_argument("--train", dest="train", action="store_true", help="forward, CLIP loss and backward")
    p.add_argument("--batch", type=int, default=16,
                   help="the batch the first step runs (decides shape buckets and alignment; default 16)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="compute dtype (default bf16)")
    p.add_argument("--arch", type=int, nargs="+", default=None,
                   help="architectures to compile for, e.g. 80 90 (default: the local GPU's)")
    p.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1), help="parallel compile processes")
    p.add_argument("--plan-only", action="store_true", help="count the distinct compiles, compile nothing")
    p.add_argument("--json", default=None, help="write the plan counts and compile rows as JSON")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--plan-child":
        return _plan_child(json.loads(argv[1]), argv[2])
    p = argparse.ArgumentParser(prog="clipfast warm", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return main_warm(p.parse_args(argv))


if __name__ == "__main__":  # run as the module clipfast.warm, so pickled launches name its classes
    from clipfast import warm as _module

    sys.exit(_module.main())
