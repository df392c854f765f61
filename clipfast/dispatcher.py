"""Never slower than PyTorch: a measured choice, per op and shape bucket, between clipfast's kernels and
the PyTorch implementations a user would otherwise run.

Modes (``CLIPFAST_DISPATCH`` at import, ``set_dispatch(mode)``, ``with dispatch(mode):``):

- ``"auto"`` (default): on CUDA, the first call of an op at a new shape *bucket* times every candidate
  (``clipfast.candidates``) with CUDA events after a warm-up -- the forward alone under ``no_grad`` /
  inference, forward and backward when a gradient is wanted -- and keeps the fastest. On CPU the op runs
  as it always has (Triton interpreter under ``TRITON_INTERPRET=1``, else the eager reference).
- ``"kernel"``: always clipfast's path (the tests and the kernel benchmarks run this way).
- ``"torch"``: always the plain PyTorch implementation; nothing from ``clipfast.kernels`` is launched.

Hot path (every op call): ``route(op, args)`` is a global read in ``kernel`` mode, one dict lookup in
``torch`` mode, and in ``auto`` a key of a few integers (sizes rounded up to a power of two, exact feature
widths, dtype, whether a gradient is wanted) looked up in a dict. It never synchronizes the device, so a
tuned model can be captured in a CUDA graph; while compiling or capturing, a bucket without a choice runs
clipfast's path and tunes nothing. Under ``torch.compile`` the lookup runs at trace time (the chosen
implementation is traced: no graph break) and a later tuning triggers a recompile through dynamo's guards.

Tuning is invisible to the code around it: it draws its inputs from a private generator (every global RNG
is left as it was), saves its tensors past any ``saved_tensors_hooks`` in force (activation checkpointing,
CPU offloading), so a checkpointed forward saves the same tensors when it is recomputed, and it never runs
inside a backward pass (a bucket first met there, e.g. by a reentrant checkpoint's recompute, runs
clipfast's path and is tuned at its next call outside).

Choices are kept in memory and on disk: ``dispatch.json`` under ``cache_dir()`` (``CLIPFAST_CACHE_DIR``,
else ``$XDG_CACHE_HOME/clipfast``, else ``~/.cache/clipfast``), one section per environment (GPU name and
the torch, triton and clipfast versions), so an upgrade re-tunes. Tuning time per op and bucket is bounded
(``CLIPFAST_TUNE_BUDGET_S``, default 1 s). A candidate that raises or returns non-finite values is dropped
with a one-time warning. Under ``torch.distributed`` each rank decides on its own (from the shared disk
cache or by timing): the hot path never runs a collective, so a bucket met by one rank alone (rank-0
evaluation, uneven last batches) never blocks. Every candidate computes the same math, so ranks that chose
differently still train together; to make them run the same code, call ``sync_dispatch()`` on every rank at
a point they all reach (e.g. after the first step): rank 0's choices are broadcast and adopted.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

from .kernels.environment import cache_dir, versions, warn_once

MODES = ("auto", "kernel", "torch")
KERNEL = "clipfast"  # the name of clipfast's own candidate in every op
ENV_MODE = "CLIPFAST_DISPATCH"


def _check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"clipfast dispatch mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    return mode


def _mode_from_env() -> str:
    value = os.environ.get(ENV_MODE, "auto").strip().lower() or "auto"
    try:
        return _check_mode(value)
    except ValueError as exc:
        raise ValueError(f"{ENV_MODE}: {exc}") from None


_mode: str = _mode_from_env()


def set_dispatch(mode: str) -> str:
    """Set the dispatch mode (``"auto"``, ``"kernel"`` or ``"torch"``) for the process; returns the previous."""
    global _mode
    previous, _mode = _mode, _check_mode(mode)
    return previous


def get_dispatch() -> str:
    return _mode


@contextlib.contextmanager
def dispatch(mode: str) -> Iterator[None]:
    """``with clipfast.dispatch("torch"): ...`` runs the block in ``mode`` and restores the previous one."""
    previous = set_dispatch(mode)
    try:
        yield
    finally:
        set_dispatch(previous)


# ----------------------------------------------------------------------------------------------
# Op specifications (filled by clipfast.candidates on first use)
# ----------------------------------------------------------------------------------------------

@dataclass
class Candidate:
    """One implementation of an op. ``fn`` takes the op's hook arguments; ``None`` means clipfast's own
    path, which the op runs inline (no extra call). ``cuda_only`` candidates are not offered on CPU."""

    name: str
    fn: Optional[Callable]
    cuda_only: bool = False


@dataclass
class OpSpec:
    """How the dispatcher sees one op: its shape key (already bucketed; dtype and gradient flag are added
    here), its candidates (clipfast's first), the one ``torch`` mode runs, clipfast's path as a callable for
    timing, and an optional filter of the candidates a call may use (e.g. the eager loss under a memory cap).
    """

    op: str
    shape_key: Callable[..., tuple]
    candidates: list[Candidate]
    torch_name: str
    kernel_fn: Callable
    eligible: Optional[Callable[..., bool]] = None  # eligible(name, *args) for the non-clipfast candidates
    by_name: dict[str, Candidate] = field(init=False)

    def __post_init__(self):
        self.by_name = {c.name: c for c in self.candidates}

    def runner(self, name: str) -> Callable:
        fn = self.by_name[name].fn
        return self.kernel_fn if fn is None else fn


_specs: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    _specs[spec.op] = spec
    return spec


def specs() -> dict[str, OpSpec]:
    if not _specs:
        from . import candidates  # noqa: F401  (registers every op)
    return _specs


def bucket(n: int) -> int:
    """Sizes that vary between calls (batch, tokens, rows) are rounded up to a power of two."""
    return 1 << (n - 1).bit_length() if n > 1 else n


# ----------------------------------------------------------------------------------------------
# The hot path
# ----------------------------------------------------------------------------------------------

_choices: dict[tuple, Optional[Callable]] = {}   # key -> the candidate's fn (None: clipfast inline)
_chosen_names: dict[tuple, str] = {}
_UNTUNED = object()


def _wants_grad(args) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def route(op: str, args: tuple) -> Optional[Callable]:
    """What the op should run: ``None`` for clipfast's own path, else a callable taking ``*args``."""
    mode = _mode
    if mode == "kernel":
        return None
    spec = _specs.get(op) or specs()[op]
    if mode == "torch":
        return spec.by_name[spec.torch_name].fn
    first = args[0]
    if not first.is_cuda and (not _tuner.devices or first.device.type not in _tuner.devices):
        return None
    try:
        key = (op, first.dtype, _wants_grad(args), spec.shape_key(*args))
    except (TypeError, AttributeError):  # symbolic sizes while tracing with dynamic shapes
        return None
    fn = _choices.get(key, _UNTUNED)
    return _decide(spec, key, args) if fn is _UNTUNED else fn


def _in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread (a reentrant checkpoint's recompute,
    a custom Function's backward): no nested timing there."""
    return _graph_task_id() != -1


# the autograd engine's id of the backward pass running on this thread (-1: none); private, so looked up once
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _busy() -> bool:
    """While tracing, capturing a CUDA graph or running a backward pass nothing may be timed (or synchronized)."""
    if torch.compiler.is_compiling() or _in_backward():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _eligible_names(spec: OpSpec, args: tuple) -> list[str]:
    on_cuda = args[0].is_cuda
    names = []
    for c in spec.candidates:
        if c.name != KERNEL and ((c.cuda_only and not on_cuda) or (spec.eligible and not spec.eligible(c.name, *args))):
            continue
        names.append(c.name)
    return names


def _decide(spec: OpSpec, key: tuple, args: tuple) -> Optional[Callable]:
    if _busy():
        return None
    names = _eligible_names(spec, args)
    name = names[0] if len(names) == 1 else _cached_or_timed(spec, key, args, names)
    return _adopt(spec, key, name)


def _adopt(spec: OpSpec, key: tuple, name: str) -> Optional[Callable]:
    if name not in spec.by_name:  # a cache written by another clipfast build
        name = KERNEL
    _chosen_names[key] = name
    fn = _choices[key] = spec.by_name[name].fn
    return fn


def sync_dispatch(group=None) -> int:
    """Make every rank of ``group`` run what rank 0 chose, for every bucket rank 0 has decided.

    A collective: call it on every rank at a point all of them reach (after the first training step, say);
    the hot path itself never communicates. Buckets rank 0 has not met stay as each rank has them. Returns
    how many choices this rank took over (0 outside ``torch.distributed``)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1):
        return 0
    specs()
    box = [list(_chosen_names.items()) if dist.get_rank(group) == 0 else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    changed = 0
    for key, name in box[0]:
        spec = _specs.get(key[0])
        if spec is not None and _chosen_names.get(key) != name:
            _adopt(spec, key, name)
            changed += 1
    return changed


_retune = False


@contextlib.contextmanager
def retuning() -> Iterator[None]:
    """Time every bucket met in the block again, whatever the disk cache holds (``clipfast tune``)."""
    global _retune
    clear_memory_cache()
    previous, _retune = _retune, True
    try:
        yield
    finally:
        _retune = previous


def _cached_or_timed(spec, key, args, names) -> str:
    text = key_text(key)
    entry = None if _retune else _disk.lookup(args[0].device, text)
    if entry is not None and entry.get("choice") in names:
        return entry["choice"]
    times = _tuner.measure(spec, args, names, train=key[2])
    timed = {n: t for n, t in times.items() if t is not None}
    choice = min(timed, key=timed.get) if timed else KERNEL
    record = TuneRecord(spec.op, text, times, choice, spec.torch_name)
    tune_records.append(record)
    _disk.store(args[0].device, text, {"choice": choice, "ms": times})
    return choice


def key_text(key: tuple) -> str:
    op, dtype, train, shape = key
    sizes = ",".join(str(v).replace("torch.", "") for v in shape)
    return f"{op}|{str(dtype).replace('torch.', '')}|{'train' if train else 'infer'}|{sizes}"


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

@dataclass
class TuneRecord:
    """One tuning: each candidate's time in ms (None: dropped or not timed within the budget)."""

    op: str
    key: str
    ms: dict[str, Optional[float]]
    choice: str
    torch_name: str

    def speedup(self) -> Optional[float]:
        """PyTorch's time over the choice's (>= 1 by construction when both were timed)."""
        base, best = self.ms.get(self.torch_name), self.ms.get(self.choice)
        return base / best if base and best else None


tune_records: list[TuneRecord] = []


def cuda_event_timer(step: Callable[[], Any], *, op: str, name: str, share_s: float) -> float:
    """Milliseconds per call of ``step`` on the current CUDA stream: two warm-up calls, one timed call to
    size the repetitions to ``share_s``, then the mean over those repetitions."""
    for _ in range(2):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    reps = int(max(1, min(50, share_s * 1e3 / once)))
    start.record()
    for _ in range(reps):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def wall_clock_timer(step: Callable[[], Any], *, op: str, name: str, share_s: float) -> float:
    """Milliseconds per call by the host clock (CPU tensors: ``clipfast tune --cpu-timer``)."""
    step()
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _finite(tensors) -> bool:
    with torch.no_grad():  # a check, not part of anyone's graph
        return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None and t.is_floating_point())


class Tuner:
    """Times candidates. ``timer(step, op=, name=, share_s=) -> ms`` (CUDA events by default; tests inject
    their own), ``clock`` bounds the total per op and bucket to ``budget_s``; ``devices`` lists the device
    types besides CUDA whose tensors are tuned in ``auto`` mode (none by default: CPU runs as it always has).
    """

    def __init__(self, timer: Callable = cuda_event_timer, clock: Callable[[], float] = time.perf_counter,
                 budget_s: Optional[float] = None, devices: tuple[str, ...] = ()):
        self.timer, self.clock, self.devices = timer, clock, tuple(devices)
        self.budget_s = float(os.environ.get("CLIPFAST_TUNE_BUDGET_S", "1.0")) if budget_s is None else budget_s

    @staticmethod
    def _isolated(run: Callable[[], Any]) -> Callable[[], Any]:
        """``run`` with its saved tensors kept as they are, past whatever ``saved_tensors_hooks`` the caller
        has in force (a checkpoint's hooks would count them, an offloading hook would move them)."""
        def step():
            with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
                return run()
        return step

    def _step(self, fn: Callable, args: tuple, train: bool) -> Callable[[], Any]:
        if not train:
            def forward():
                with torch.no_grad():
                    return fn(*args)
            return forward
        # fresh leaves: tuning neither extends the caller's graph nor accumulates into .grad
        args = tuple(a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args)
        inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        grads: list[torch.Tensor] = []

        def forward_backward():
            with torch.enable_grad():
                outs = [t for t in _tensors(fn(*args)) if t.requires_grad]
                if not grads:
                    grads.extend(_private_randn(t) if t.dim() else torch.ones_like(t) for t in outs)
                return outs, torch.autograd.grad(outs, inputs, grads, allow_unused=True)
        return self._isolated(forward_backward)

    def measure(self, spec: OpSpec, args: tuple, names: list[str], train: bool) -> dict[str, Optional[float]]:
        """Times clipfast's path and PyTorch's always (the guarantee needs both), then the other candidates
        while the budget lasts."""
        names = sorted(names, key=lambda n: (n != KERNEL, n != spec.torch_name))
        start = self.clock()
        times: dict[str, Optional[float]] = {}
        for i, name in enumerate(names):
            if i >= 2 and self.clock() - start > self.budget_s:
                times.update({n: None for n in names[i:]})
                break
            step = self._step(spec.runner(name), args, train)
            try:
                if not _finite(_tensors(step())):
                    raise FloatingPointError("non-finite values")
                times[name] = float(self.timer(step, op=spec.op, name=name,
                                               share_s=self.budget_s / max(1, len(names))))
            except Exception as exc:  # a candidate that cannot run this case is dropped, visibly
                warn_once(f"dispatch_drop_{spec.op}_{name}_{type(exc).__name__}",
                          f"dispatch: {spec.op} candidate {name!r} dropped ({type(exc).__name__}: {exc})")
                times[name] = None
        return times


def _keep(t):
    return t


_generators: dict[torch.device, torch.Generator] = {}


def _private_randn(like: torch.Tensor) -> torch.Tensor:
    """Random upstream gradients for timing, from clipfast's own generator (one per device, fixed seed):
    tuning never advances the caller's RNG, so seeds set for reproducibility keep their meaning."""
    gen = _generators.get(like.device)
    if gen is None:
        gen = _generators[like.device] = torch.Generator(device=like.device)
        gen.manual_seed(0x5EED)
    return torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)


_tuner = Tuner()


def set_tuner(tuner: Tuner) -> Tuner:
    """Replace the tuner (tests inject timers and clocks); returns the previous one."""
    global _tuner
    previous, _tuner = _tuner, tuner
    return previous


# ----------------------------------------------------------------------------------------------
# The on-disk cache
# ----------------------------------------------------------------------------------------------

def cache_path() -> str:
    return os.path.join(cache_dir(), "dispatch.json")


def environment(device: torch.device) -> str:
    """The cache section of ``device``: its name and the versions a choice depends on."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return "|".join([name] + [f"{k} {v}" for k, v in versions().items()])


class DiskCache:
    """``{"format": 1, "environments": {environment: {key_text: {"choice": name, "ms": {...}}}}}``, read once
    per process and rewritten (atomically, merged with what is on disk) after each tuning."""

    FORMAT = 1

    def __init__(self):
        self._data: Optional[dict] = None
        self._env: dict[Any, str] = {}

    def _read(self) -> dict:
        try:
            with open(cache_path()) as f:
                data = json.load(f)
            if data.get("format") == self.FORMAT and isinstance(data.get("environments"), dict):
                return data
        except (OSError, ValueError, AttributeError):
            pass
        return {"format": self.FORMAT, "environments": {}}

    def _section(self, device: torch.device) -> dict:
        if self._data is None:
            self._data = self._read()
        env = self._env.get(device)
        if env is None:
            env = self._env[device] = environment(device)
        return self._data["environments"].setdefault(env, {})

    def lookup(self, device: torch.device, key: str) -> Optional[dict]:
        return self._section(device).get(key)

    def store(self, device: torch.device, key: str, entry: dict) -> None:
        self._section(device)[key] = entry
        env = self._env[device]
        path = cache_path()
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            merged = self._read()
            merged["environments"].setdefault(env, {}).update(self._data["environments"][env])
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(merged, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError as exc:
            warn_once("dispatch_cache_write", f"dispatch: cannot write the tuning cache {path} ({exc})")

    def entries(self, device: torch.device) -> dict:
        return dict(self._section(device))


_disk = DiskCache()


def clear_memory_cache() -> None:
    """Forget every choice made or read in this process (the disk cache is re-read on the next miss)."""
    global _disk
    _choices.clear()
    _chosen_names.clear()
    tune_records.clear()
    _disk = DiskCache()


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------

FAMILY_OPS = {"layer_norm": ("layer_norm", "add_layer_norm"), "attention": ("flash_attention", "flash_attention_varlen"),
              "mlp": ("mlp", "quick_gelu"), "patch_embed": ("patch_embed",),
              "loss": ("clip_loss", "siglip_loss")}


def _kernels_here() -> str:
    """What "clipfast's path" means on this machine: the kernels, or on CPU without the interpreter the
    eager reference."""
    if torch.cuda.is_available():
        return "clipfast kernels"
    from clipfast.kernels import runtime

    if runtime.INTERPRET:
        return "clipfast kernels (CPU: Triton interpreter)"
    return "eager PyTorch reference on CPU (TRITON_INTERPRET=1 runs clipfast's kernels in the interpreter)"


def describe(family: str) -> str:
    """What a swapped module of ``family`` runs under the current mode, for ``clipfast.patch``'s report."""
    if _mode != "auto":
        return "PyTorch (dispatch 'torch')" if _mode == "torch" else f"{_kernels_here()} (dispatch 'kernel')"
    ops = FAMILY_OPS.get(family, ())
    counts: dict[str, int] = {}
    for key, name in _chosen_names.items():
        if key[0] in ops:
            counts[name] = counts.get(name, 0) + 1
    if not counts and torch.cuda.is_available():
        for key, entry in _disk.entries(torch.device("cuda", torch.cuda.current_device())).items():
            if key.split("|", 1)[0] in ops and isinstance(entry, dict) and "choice" in entry:
                counts[entry["choice"]] = counts.get(entry["choice"], 0) + 1
    if not counts:
        return "auto: " + (_kernels_here() + ("; not tuned yet" if torch.cuda.is_available() else ""))
    return "auto: " + ", ".join(f"{name} x{n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))
