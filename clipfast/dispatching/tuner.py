"""The hot path (``route``) and the tuner: per op and shape bucket, the first call in ``auto`` mode times the
candidates (or reads the disk cache) and keeps the fastest; later calls are one dict lookup."""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from clipfast.kernels.environment import warn_once

from . import modes
from .cache import DiskCache
from .modes import KERNEL
from .specs import OpSpec, _specs

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
    mode = modes._mode
    if mode == "kernel":
        return None
    spec = _specs[op]
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


_disk = DiskCache()


def clear_memory_cache() -> None:
    """Forget every choice made or read in this process (the disk cache is re-read on the next miss)."""
    global _disk
    _choices.clear()
    _chosen_names.clear()
    tune_records.clear()
    _disk = DiskCache()
