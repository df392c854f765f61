"""Host overhead per op call: ``clipfast bench overhead``.

Every clipfast op pays, per call, its argument checks, the dispatch lookup, the custom-op call and (when a
gradient is wanted) the autograd node, on top of the work itself. On tiny tensors the work is negligible,
so the time per call is that overhead. This measures, for every op, microseconds per call of

- ``torch``: the op's eager reference (``reference_*`` in ``clipfast.ops``: the plain PyTorch calls the op
  replaces, ``F.layer_norm``, SDPA, ``F.linear`` ...), called directly on the arguments a user passes (the
  same formula the clipfast op falls back to, without its checks, dispatch or custom op);
- ``clipfast``: the clipfast op in dispatch ``kernel`` (on CPU the eager-fallback path, which shares the
  checks, dispatch and autograd plumbing with the kernel path; on CUDA the kernel path);
- ``clipfast (auto)``: the same in dispatch ``auto`` (the lookup of the measured choice included);
- ``plumbing``: the clipfast op in dispatch ``kernel`` with every implementation replaced by its fake
  (which only allocates the outputs): what clipfast's layers above the kernels cost -- argument checks,
  dispatch, the custom-op or direct call, autograd bookkeeping -- without the eager reference's arithmetic
  (on CPU) or the Triton launcher (on CUDA),

each in ``infer`` (no_grad) and ``train`` (forward with inputs that require grad) form, as the minimum over
repeats of the mean over a batch of calls (on CUDA the calls are queued, not waited for, as a model's are).
On CPU the clock is this thread's CPU time (``time.thread_time``), so other processes on a shared machine
slow the figures (caches, frequency) but do not add their own time to them; on CUDA it is wall time.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

import clipfast
from clipfast.dispatching import dispatch
from clipfast.ops.attention import reference_attention
from clipfast.ops.contrastive_loss import CLIP, SIGLIP, reference_loss
from clipfast.ops.layer_norm import reference_add_layer_norm, reference_layer_norm
from clipfast.ops.mlp import reference_activation, reference_mlp
from clipfast.ops.patch_embed import reference_patch_embed

EPS = 1e-5  # the LayerNorm default of the clipfast calls below


@dataclass
class OverheadCase:
    op: str
    make: Callable[[torch.device, bool], dict]   # (device, requires_grad) -> inputs
    clipfast: Callable[..., object]
    torch: Callable[..., object]


def _t(device, grad, *shape):
    return torch.randn(*shape, device=device).requires_grad_(grad)


CASES = [
    OverheadCase("layer_norm", lambda d, g: dict(x=_t(d, g, 4, 32), weight=_t(d, g, 32), bias=_t(d, g, 32)),
                 lambda x, weight, bias: clipfast.layer_norm(x, weight, bias),
                 lambda x, weight, bias: reference_layer_norm(x, weight, bias, EPS)),
    OverheadCase("add_layer_norm",
                 lambda d, g: dict(x=_t(d, g, 4, 32), r=_t(d, g, 4, 32), weight=_t(d, g, 32), bias=_t(d, g, 32)),
                 lambda x, r, weight, bias: clipfast.add_layer_norm(x, r, weight, bias),
                 lambda x, r, weight, bias: reference_add_layer_norm(x, r, weight, bias, EPS)),
    OverheadCase("flash_attention", lambda d, g: dict(q=_t(d, g, 1, 2, 8, 16), k=_t(d, g, 1, 2, 8, 16),
                                                      v=_t(d, g, 1, 2, 8, 16)),
                 clipfast.flash_attention, lambda q, k, v: reference_attention(q, k, v, None, False, None)),
    OverheadCase("mlp", lambda d, g: dict(x=_t(d, g, 4, 32), w1=_t(d, g, 64, 32), b1=_t(d, g, 64),
                                          w2=_t(d, g, 32, 64), b2=_t(d, g, 32)),
                 lambda x, w1, b1, w2, b2: clipfast.mlp(x, w1, b1, w2, b2),
                 lambda x, w1, b1, w2, b2: reference_mlp(x, w1, b1, w2, b2, "quick_gelu", None)),
    OverheadCase("quick_gelu", lambda d, g: dict(x=_t(d, g, 4, 32)), clipfast.quick_gelu,
                 lambda x: reference_activation(x, "quick_gelu")),
    OverheadCase("patch_embed", lambda d, g: dict(pixels=_t(d, False, 1, 3, 16, 16), weight=_t(d, g, 32, 3, 8, 8),
                                                  cls=_t(d, g, 32), pos=_t(d, g, 5, 32)),
                 lambda pixels, weight, cls, pos: clipfast.patch_embed(pixels, weight, cls, pos),
                 lambda pixels, weight, cls, pos: reference_patch_embed(pixels, weight, None, cls, pos, None, None,
                                                                        None, None, EPS)),
    OverheadCase("clip_loss", lambda d, g: dict(image=_t(d, g, 4, 16), text=_t(d, g, 4, 16),
                                                logit_scale=_t(d, g, ())),
                 lambda image, text, logit_scale: clipfast.clip_loss(image, text, logit_scale),
                 lambda image, text, logit_scale: reference_loss(image, text, logit_scale.exp().float(), None, CLIP, 0,
                                                                 True, True)),
    OverheadCase("siglip_loss", lambda d, g: dict(image=_t(d, g, 4, 16), text=_t(d, g, 4, 16),
                                                  logit_scale=_t(d, g, ()), logit_bias=_t(d, g, ())),
                 lambda image, text, logit_scale, logit_bias: clipfast.siglip_loss(image, text, logit_scale, logit_bias),
                 lambda image, text, logit_scale, logit_bias: reference_loss(image, text, logit_scale.exp().float(),
                                                                             logit_bias, SIGLIP, 0, False, True)),
]


@contextlib.contextmanager
def eager_fallback():
    """On CPU, the eager-fallback path even when the Triton interpreter is on (the interpreter's time is
    not host overhead)."""
    from clipfast.kernels import runtime

    previous, runtime.INTERPRET = runtime.INTERPRET, False
    try:
        yield
    finally:
        runtime.INTERPRET = previous


@contextlib.contextmanager
def stubbed_implementations():
    """Every clipfast op's implementation replaced by its fake (output allocation only) for the block; the
    direct calls run them (the registered custom ops keep their real implementations)."""
    from clipfast.ops._custom_op import OPS

    saved = {name: op.impl for name, op in OPS.items()}
    try:
        for op in OPS.values():
            if op.fake is not None:
                op.impl = op.fake
        yield
    finally:
        for name, impl in saved.items():
            OPS[name].impl = impl


def microseconds_per_call(fn: Callable[[], object], calls: int, repeats: int, sync: Callable[[], None],
                          clock: Callable[[], float] = time.perf_counter) -> float:
    for _ in range(max(3, calls // 10)):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        for _ in range(calls):
            fn()
        best = min(best, clock() - t0)
        sync()
    return best / calls * 1e6


@contextlib.contextmanager
def one_thread():
    """Host time, not intra-op thread wake-ups (on a shared CPU those dominate tiny ops)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure(device: torch.device | None = None, calls: int = 200, repeats: int = 5,
            ops: list[str] | None = None) -> list[dict]:
    """One row per op and form: microseconds per call of torch, clipfast, clipfast (auto) and plumbing."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    rows = []
    with eager_fallback() if device.type == "cpu" else contextlib.nullcontext(), one_thread():
        for case in CASES:
            if ops and case.op not in ops:
                continue
            for form in ("infer", "train"):
                inputs = case.make(device, form == "train")
                grad = torch.enable_grad() if form == "train" else torch.no_grad()
                row = {"op": case.op, "form": form, "device": device.type}
                for label, fn, mode in (("torch", case.torch, None), ("clipfast", case.clipfast, "kernel"),
                                        ("clipfast (auto)", case.clipfast, "auto"),
                                        ("plumbing", case.clipfast, "kernel")):
                    stub = stubbed_implementations() if label == "plumbing" else contextlib.nullcontext()
                    with grad, stub, (dispatch(mode) if mode else contextlib.nullcontext()):
                        row[f"{label} us"] = microseconds_per_call(lambda: fn(**inputs), calls, repeats, sync,
                                                                   clock)
                row["clipfast x torch"] = row["clipfast us"] / row["torch us"]
                rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    header = (f"{'op':<17}{'form':<7}{'torch us':>10}{'clipfast us':>13}{'auto us':>10}{'x torch':>9}"
              f"{'plumbing us':>13}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['op']:<17}{r['form']:<7}{r['torch us']:>10.1f}{r['clipfast us']:>13.1f}"
                     f"{r['clipfast (auto) us']:>10.1f}{r['clipfast x torch']:>8.1f}x{r['plumbing us']:>13.1f}")
    return "\n".join(lines)


def main_overhead(args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = getattr(args, "smoke", False)
    rows = measure(device, calls=10 if smoke else 200, repeats=1 if smoke else 5)
    path = "the eager-fallback path" if device.type == "cpu" else "the kernel path"
    print(f"clipfast bench overhead: host microseconds per call on tiny tensors, {device.type} ({path})")
    print(format_rows(rows))
    if getattr(args, "json", None):
        with open(args.json, "w") as f:
            json.dump({"environment": {"torch": torch.__version__, "device": device.type}, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
