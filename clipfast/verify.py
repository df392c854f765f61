"""``clipfast verify``: a model's numerics under clipfast, module by module, against eager PyTorch.

The model is built three times from the same weights: eager in the chosen dtype, patched in the chosen
dtype, and eager in float64 (the reference). All three run forward and backward on the same random
inputs and upstream gradients. For every swapped module (and the model's final outputs and parameter
gradients) the report gives the max-abs and relative (Frobenius) errors of clipfast vs eager, clipfast vs
float64 and eager vs float64, and pass/fail against the numerics standard: clipfast's error against
float64 is at most ``factor`` times eager's own error in that dtype plus a floor that is
machine-independent (``clipfast.numerics.floor_unit``): a few units of roundoff of the dtype plus the forward
error bound of a float32-accumulated sum of the model's longest reduction, times the reference's magnitude
(for a parameter gradient: the largest gradient among its module's parameters, as terms of a sum may cancel;
a gradient that is 0 in exact arithmetic, like a key bias's, is judged by that absolute bound, not
relatively); NaN or inf never passes.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .numerics import Errors, errors, judge

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Row:
    name: str
    kind: str  # "module", "output" or "grad"
    clipfast_vs_eager: dict
    clipfast_vs_fp64: dict
    eager_vs_fp64: dict
    passed: bool


@dataclass
class VerifyResult:
    model: str
    dtype: str
    device: str
    interpreter: bool
    batch: int
    swapped: list[str]
    skipped: list[str]
    rows: list[Row] = field(default_factory=list)
    # swapped modules whose own forward never ran: a fused parent did their work (e.g. ln_pre inside the
    # fused patch embedding); their effect is checked through the parent and the outputs
    fused_into_parent: list[str] = field(default_factory=list)
    # swapped text-tower modules that ran on packed tokens (``unpad_text``): their outputs have no padded
    # counterpart; they are checked through the text features and the parameter gradients
    ran_unpadded: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def to_json(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def _err(a: torch.Tensor, b: torch.Tensor) -> dict:
    if a.shape != b.shape:
        return {"max_abs": float("inf"), "rel": float("inf"), "finite": False}
    e = errors(a, b)
    inf = float("inf")
    return {"max_abs": e.max_abs if e.finite else inf, "rel": e.rel_fro if e.finite else inf, "finite": e.finite}


def _judge(fused: dict, eager: dict, dtype: torch.dtype, ref_scale: float, scale: float, reduction: int,
           factor: float, floor_ulps: float) -> bool:
    as_errors = lambda d: Errors(d["max_abs"], d["rel"], (), d["finite"])  # noqa: E731
    return judge(as_errors(fused), as_errors(eager), dtype, ref_scale, scale, reduction, factor, floor_ulps).passed


def model_reduction(model: torch.nn.Module) -> int:
    """The longest dot product a module of ``model`` computes: the largest input width of its weight
    matrices (a Linear's in_features, an embedding's width), which sizes the floor's accumulation term."""
    return max((int(p.shape[-1]) for p in model.parameters() if p.dim() >= 2), default=1)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for item in out:
            t = _first_tensor(item)
            if t is not None:
                return t
    if isinstance(out, dict):
        for item in out.values():
            t = _first_tensor(item)
            if t is not None:
                return t
    if hasattr(out, "to_tuple"):
        return _first_tensor(out.to_tuple())
    return None


def _record(model: torch.nn.Module, paths: list[str]) -> tuple[dict, list]:
    """Forward hooks that keep the (first tensor) output of each module in ``paths``."""
    store, handles = {}, []
    modules = dict(model.named_modules())
    for path in paths:
        if path in modules:
            def hook(_m, _i, out, path=path):
                t = _first_tensor(out)
                if t is not None:
                    store.setdefault(path, t.detach().clone())
            hook.observes_only = True  # changes nothing: unpadded text towers may skip it (clipfast.unpad)
            handles.append(modules[path].register_forward_hook(hook))
    return store, handles


def verify(name: str, build: Callable[[], torch.nn.Module], make_inputs: Callable[[int, torch.device], tuple],
           forward: Callable[[torch.nn.Module, tuple], dict], dtype: torch.dtype, device: torch.device,
           batch: int = 2, factor: float = 2.0, floor_ulps: float = 16.0, progress=sys.stderr,
           patch_options: dict | None = None, reduction: int | None = None) -> VerifyResult:
    """Patch a copy of ``build()`` and compare it with eager and float64 copies, module by module.

    ``forward(model, inputs)`` returns a dict of named output tensors; their sum against random upstream
    gradients is what the backward pass differentiates. ``reduction`` sizes the error floor's accumulation
    term (default: :func:`model_reduction`)."""
    import clipfast
    from clipfast.kernels import runtime

    t0 = time.time()
    steps = ["build", "float64 reference", "eager", "clipfast", "compare"]

    def step(i):
        if progress:
            bar = "#" * (i + 1) + "." * (len(steps) - i - 1)
            progress.write(f"\r[{bar}] {steps[i]:<20}")
            progress.flush()

    step(0)
    torch.manual_seed(0)
    base = build().to(device).float()
    eager = copy.deepcopy(base).to(dtype)
    ref = copy.deepcopy(base).double()
    fast = copy.deepcopy(base).to(dtype)
    report = clipfast.patch(fast, **(patch_options or {}))
    swapped = [s.path for s in report.swapped]
    inputs = make_inputs(batch, device)
    reduction = model_reduction(base) if reduction is None else reduction

    def run(model, cast):
        cast_inputs = tuple(t.to(cast) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)
        store, handles = _record(model, swapped)
        try:
            outs = forward(model, cast_inputs)
        finally:
            for h in handles:
                h.remove()
        return outs, store

    step(1)
    ref_outs, ref_store = run(ref, torch.float64)
    grads = {k: torch.randn_like(v) for k, v in ref_outs.items()}

    def backward(model, outs):
        model.zero_grad(set_to_none=True)
        torch.autograd.backward([outs[k] for k in grads], [grads[k].to(outs[k].dtype) for k in grads])
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    ref_grads = backward(ref, ref_outs)
    step(2)
    eager_outs, eager_store = run(eager, dtype)
    eager_grads = backward(eager, eager_outs)
    step(3)
    fast_outs, fast_store = run(fast, dtype)
    fast_grads = backward(fast, fast_outs)
    step(4)

    result = VerifyResult(name, str(dtype).replace("torch.", ""), str(device), runtime.INTERPRET and device.type == "cpu",
                          batch, swapped, [f"{s.path}: {s.reason}" for s in report.skipped])

    def magnitude(t):
        return float(t.detach().double().abs().max()) if t.numel() else 0.0

    # A parameter gradient is a sum over tokens whose terms may cancel (a key bias's gradient is exactly 0 in
    # softmax attention): its rounding error scales with the terms, so its floor uses the largest gradient
    # of the same module's parameters (the weight's), never less than its own magnitude.
    module_scale: dict[str, float] = {}
    for pname, g in ref_grads.items():
        owner = pname.rpartition(".")[0]
        module_scale[owner] = max(module_scale.get(owner, 0.0), magnitude(g))

    def add(row_name, kind, f, e, r):
        cf, ce, er = _err(f, e), _err(f, r), _err(e, r)
        scale = module_scale[row_name.rpartition(".")[0]] if kind == "grad" else 0.0
        result.rows.append(Row(row_name, kind, cf, ce, er,
                               _judge(ce, er, dtype, magnitude(r), scale, reduction, factor, floor_ulps)))

    for path in swapped:
        if path in fast_store and path in eager_store and path in ref_store:
            if fast_store[path].shape != eager_store[path].shape and getattr(fast, "_clipfast_unpadded_base", None):
                result.ran_unpadded.append(path)
                continue
            add(path, "module", fast_store[path], eager_store[path], ref_store[path])
        elif path not in fast_store:
            result.fused_into_parent.append(path)
    for key in ref_outs:
        add(key, "output", fast_outs[key], eager_outs[key], ref_outs[key])
    for pname in ref_grads:
        if pname in fast_grads and pname in eager_grads:
            add(pname, "grad", fast_grads[pname], eager_grads[pname], ref_grads[pname])
    result.seconds = round(time.time() - t0, 2)
    if progress:
        progress.write("\n")
    return result


def format_table(result: VerifyResult) -> str:
    lines = [f"clipfast verify: {result.model}  dtype={result.dtype}  device={result.device}"
             + ("  (CPU: Triton interpreter, small configuration)" if result.interpreter else "")
             + f"  batch={result.batch}",
             f"swapped {len(result.swapped)} modules, left {len(result.skipped)} alone"]
    for s in result.skipped[:20]:
        lines.append(f"  left alone: {s}")
    if result.fused_into_parent:
        lines.append(f"  run inside a fused parent (checked through it): {', '.join(result.fused_into_parent)}")
    if result.ran_unpadded:
        lines.append(f"  ran on packed text tokens (unpadded text tower, checked through its features and gradients): "
                     f"{', '.join(result.ran_unpadded)}")
    header = f"{'':<4}{'kind':<7}{'name':<52}{'clipfast-eager':>15}{'clipfast-fp64':>15}{'eager-fp64':>13}  rel(cf/eager vs fp64)"
    lines += ["", header, "-" * len(header)]
    for r in result.rows:
        mark = "ok" if r.passed else "XX"
        lines.append(f"{mark:<4}{r.kind:<7}{r.name[-51:]:<52}{r.clipfast_vs_eager['max_abs']:>15.2e}"
                     f"{r.clipfast_vs_fp64['max_abs']:>15.2e}{r.eager_vs_fp64['max_abs']:>13.2e}  "
                     f"{r.clipfast_vs_fp64['rel']:.1e} / {r.eager_vs_fp64['rel']:.1e}")
    n_fail = sum(not r.passed for r in result.rows)
    lines += ["", f"{len(result.rows)} checks, {n_fail} failing: {'PASS' if result.passed else 'FAIL'} "
                  f"(clipfast's error vs float64 must be <= 2x eager's own error in {result.dtype} + a machine-independent floor)",
              f"took {result.seconds:.1f} s"]
    return "\n".join(lines)


def write_json(result: VerifyResult, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result.to_json(), f, indent=1)
