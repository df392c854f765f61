"""What every integration test checks on a real codebase's model.

``check_patch(build, run, ...)``: three copies of one random-init model -- a float64 reference, the eager
model in ``dtype`` and the patched model in ``dtype`` -- run on the same (rounded) inputs. The patched
model's outputs and the gradient of every parameter must meet the numerics standard against the float64
reference (no worse than ``factor`` x the eager model's own error, plus a floor of a few ulps of the
tensor's scale); its
``state_dict`` must hold the very same tensors under the same keys; the report must list the expected
swaps; and ``unpatch`` must restore every original module.

A whole model composes dozens of ops (each held to 2x eager in its own tests) and its gradients are long
reductions: a scalar such as ``logit_scale``'s gradient can come out of eager PyTorch nearly exact by
chance. The model-level bar is therefore 4x eager plus 64 ulps in fp32 (8 in fp16/bf16, where eager's own
error dominates); a wrong kernel (errors of 1e-3 and more) fails it by orders of magnitude.
"""
from __future__ import annotations

import copy
import importlib
import re
from typing import Callable, Iterable

import pytest
import torch

from clipfast.patching import patch, registered_rules, unpatch

from ..conftest import DEVICE
from ..numerics import EPS, check, errors


def require(module: str):
    """Import an optional codebase, or skip with the reason when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.skip(f"{module} is not installed ({e}); `pip install -e .[integrations]` installs it")


def _cast_inputs(inputs, dtype):
    return [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]


def _outputs(model, run, inputs):
    out = run(model, *inputs)
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in out if isinstance(o, torch.Tensor) and o.is_floating_point()]


# LayerNorm subclasses that cast their input to float32: in the float64 reference they compute in float64
_FP32_CASTING_LAYER_NORMS = {"clip.model.LayerNorm", "cn_clip.clip.model.LayerNorm", "open_clip.transformer.LayerNormFp32"}


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Random init leaves LayerNorm at (1, 0) and some weights at zero; move every parameter a little so each
    gradient is exercised (in place; returns the model)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def float64_reference(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in float64, with the fp32-casting LayerNorm subclasses computing in float64 (the same math
    one precision up, which is what the reference must be)."""
    model = model.double()
    for m in model.modules():
        cls = type(m)
        if f"{cls.__module__}.{cls.__qualname__}" in _FP32_CASTING_LAYER_NORMS:
            m.forward = torch.nn.LayerNorm.forward.__get__(m)
    return model


def grad_problems(fast_model, eager_model, ref_model, dtype, factor, floor_ulps, grad_filter=None) -> list[str]:
    """Every parameter gradient of ``fast_model`` against the float64 reference (numerics standard).

    Gradients that are zero in exact arithmetic (a key-projection bias: softmax ignores a constant added
    to every key) come out of any implementation as rounding noise, where relative errors mean nothing;
    those (reference below 1e-4 of the model's largest gradient) are held to an absolute bound: the
    eager error x ``factor`` plus ``floor_ulps`` ulps of the model's largest gradient."""
    ref_params, eager_params = dict(ref_model.named_parameters()), dict(eager_model.named_parameters())
    scale = max(float(p.grad.abs().max()) for p in ref_params.values() if p.grad is not None and p.grad.numel())
    problems = []
    for name, p in fast_model.named_parameters():
        if grad_filter is not None and not grad_filter(name):
            continue
        r, e = ref_params[name].grad, eager_params[name].grad
        if r is None:
            if p.grad is not None and p.grad.any():
                problems.append(f"grad of {name}: nonzero where the reference has none")
            continue
        if p.grad is None:
            problems.append(f"grad of {name}: missing in the patched model")
        elif float(r.abs().max()) < 1e-4 * scale:
            ef, ee = errors(p.grad, r), errors(e, r)
            bound = factor * ee.max_abs + floor_ulps * EPS[dtype] * scale
            if not ef.finite or ef.max_abs > bound:
                problems.append(f"grad of {name} (zero in exact arithmetic): fused max-abs {ef.max_abs:.3e} > "
                                f"{bound:.3e} (eager {ee.max_abs:.3e}, model gradient scale {scale:.3e})")
        else:
            problems.append(check(f"grad of {name}", p.grad, e, r, dtype, factor, floor_ulps))
    return [p for p in problems if p]


def clip_tokens(vocab: int, context: int, batch: int = 3) -> torch.Tensor:
    """OpenAI-style token ids: end-of-text (the highest id) at different positions, zeros after it."""
    text = torch.randint(1, vocab - 1, (batch, context))
    for i, length in enumerate([context, 9, 5][:batch]):
        text[i, length - 1] = vocab - 1
        text[i, length:] = 0
    return text


def module_types(model) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


def paths_of(model, predicate: Callable) -> set[str]:
    """Paths of the modules a family should swap, e.g. ``paths_of(m, lambda m: isinstance(m, nn.LayerNorm))``."""
    return {name for name, m in model.named_modules() if predicate(m)}


def check_patch(build: Callable[[], torch.nn.Module], run: Callable, inputs: Iterable, *,
                dtype=torch.float32, expected: dict[str, set[str]] | None = None, factor: float = 4.0,
                floor_ulps: float | None = None, grads: bool = True, patch_kwargs: dict | None = None,
                cast: Callable | None = None, grad_filter: Callable[[str], bool] | None = None):
    """Patched vs unpatched ``build()`` model (see the module docstring). ``run(model, *inputs)`` returns the
    outputs to compare (floating tensors, any nesting flattened by the caller); ``inputs`` are float64 or
    integer tensors, rounded to ``dtype`` once so every copy sees the same values. ``expected`` maps a
    family to the module paths it must swap (checked for the families that have rules registered).
    ``cast(model, dtype)`` puts a model in ``dtype`` (default ``model.to(dtype)``; e.g. a codebase's own
    low-precision conversion, which keeps LayerNorm parameters in fp32). ``grad_filter(name)`` picks the parameter
    gradients to compare (default: all). Returns ``(patched model, report)``."""
    cast = cast or (lambda model, dt: model.to(dt))
    if floor_ulps is None:
        floor_ulps = 64.0 if dtype == torch.float32 else 8.0
    base = build().to(DEVICE)
    inputs = [t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in inputs]
    rounded = _cast_inputs(inputs, dtype)
    base = cast(base, dtype) or base
    ref_model = float64_reference(copy.deepcopy(base))  # the same rounded parameters
    eager_model = copy.deepcopy(base)
    fast_model = copy.deepcopy(base)

    types_before = module_types(fast_model)
    state_before = fast_model.state_dict()
    report = patch(fast_model, **(patch_kwargs or {}))

    # state_dict: same keys, the very same tensors (shared, not copied)
    state_after = fast_model.state_dict()
    assert list(state_after) == list(state_before), "patching changed the state_dict keys"
    for key, value in state_before.items():
        assert state_after[key].data_ptr() == value.data_ptr() and state_after[key].dtype == value.dtype, key

    # the report lists the swaps the families with registered rules should make
    swapped = {}
    for s in report.swapped:
        swapped.setdefault(s.family, set()).add(s.path)
    originals = dict(base.named_modules())  # base itself is never patched
    for family, paths in (expected or {}).items():
        if report.families.get(family) != "enabled":
            continue
        # checked once the family's own rules file exists, and wherever any of its rules matches
        rules = registered_rules(family)
        has_owner = any(r.match.__module__ == f"clipfast.patch_rules.{family}" for r in rules)
        due = {p for p in paths if has_owner or any(r.match(originals[p]) for r in rules)}
        missing = sorted(due - swapped.get(family, set()))
        assert not missing, f"{family}: not swapped: {missing}\n{report}"
    assert str(report).startswith("clipfast.patch:")

    # numerics: outputs and every parameter gradient
    ref_inputs = [t.detach().double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in rounded]
    ref_out = _outputs(ref_model, run, ref_inputs)
    eager_out = _outputs(eager_model, run, rounded)
    fast_out = _outputs(fast_model, run, rounded)
    assert len(fast_out) == len(ref_out) > 0
    problems = [check(f"output {i}", f, e, r, dtype, factor, floor_ulps)
                for i, (f, e, r) in enumerate(zip(fast_out, eager_out, ref_out))]
    if grads:
        upstream = [torch.randn_like(r).to(dtype) for r in ref_out]
        for model, outs in ((ref_model, ref_out), (eager_model, eager_out), (fast_model, fast_out)):
            torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(upstream, outs)])
        assert any(p.grad is not None for p in ref_model.parameters())
        problems += grad_problems(fast_model, eager_model, ref_model, dtype, factor, floor_ulps, grad_filter)
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems) + f"\n{report}"

    # unpatch restores every original module class and keeps the same tensors
    unpatch(fast_model)
    assert module_types(fast_model) == types_before
    restored = fast_model.state_dict()
    assert all(restored[k].data_ptr() == v.data_ptr() for k, v in state_before.items())
    patch(fast_model, **(patch_kwargs or {}))  # patched again for the caller's own checks
    return fast_model, report


def swapped_paths(report, family: str | None = None, pattern: str = ".*") -> set[str]:
    return {s.path for s in report.swapped if (family is None or s.family == family) and re.fullmatch(pattern, s.path)}
