"""``clipfast tune MODEL``: pre-tune the dispatch cache for one model, batch and dtype on this machine.

Builds the model (the names ``clipfast verify`` takes), patches it, runs one step -- the forward under
``no_grad`` with ``--infer``, forward + CLIP loss + backward with ``--train`` -- in dispatch ``auto``, timing
every op and shape bucket it meets (the disk cache is ignored and rewritten), and prints one row per op and
bucket: each candidate's time, the choice, and the choice's speedup over PyTorch's implementation; then
the whole step of the unpatched model against the patched one under the choices made. Without a
GPU there is nothing to time; ``--cpu-timer`` times the CPU paths by the host clock instead (to exercise
the command, not to choose anything worth keeping).
"""
from __future__ import annotations

import copy
import json
import sys

import torch

from .dispatching import cache as dispatch_cache
from .dispatching import modes, tuner as dispatch_tuner


def _features(out: dict) -> list[torch.Tensor]:
    """The first two [N, d] outputs of a model step (image and text features)."""
    return [t for t in out.values() if isinstance(t, torch.Tensor) and t.dim() == 2][:2]


def _step(model, spec, inputs, train: bool) -> None:
    if not train:
        with torch.no_grad():
            spec.forward(model, inputs)
        return
    from .dispatching import clip_loss

    out = spec.forward(model, inputs)
    feats = _features(out)
    loss = clip_loss(feats[0], feats[1], torch.tensor(2.6592, device=feats[0].device)) if len(feats) == 2 \
        else sum(t.float().mean() for t in out.values())
    loss.backward()


def step_ms(model, spec, inputs, train: bool, timer) -> float:
    """Milliseconds per step (forward, or forward + loss + backward) of ``model``."""
    def step():
        model.zero_grad(set_to_none=True)
        _step(model, spec, inputs, train)
    return timer(step, op="step", name="step", share_s=2.0)


def format_records(records: list[dispatch_tuner.TuneRecord]) -> str:
    names = list(dict.fromkeys(n for r in records for n in r.ms))
    header = f"{'op':<16}{'bucket':<44}" + "".join(f"{n:>15}" for n in names) + f"{'choice':>16}{'vs torch':>10}"
    lines = [header, "-" * len(header)]
    for r in records:
        cells = "".join(f"{r.ms[n]:>12.4f} ms" if r.ms.get(n) is not None else
                        f"{'-' if n not in r.ms else 'n/a':>15}" for n in names)
        speedup = r.speedup()
        lines.append(f"{r.op:<16}{r.key.split('|', 1)[1][:43]:<44}{cells}{r.choice:>16}"
                     f"{f'{speedup:.2f}x' if speedup else '-':>10}")
    return "\n".join(lines)


def main_tune(args) -> int:
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.cpu_timer:
        print("clipfast tune: no CUDA device: nothing to time (on CPU clipfast runs as it always has). "
              "Run this on the GPU machine that will train or serve the model.")
        return 0
    from .verify import DTYPES
    from .verify_models import resolve
    from .patching import patch

    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    spec = resolve(args.model, tiny=not on_gpu)
    model = spec.build().to(device=device, dtype=dtype)
    model.train(args.train)
    eager = copy.deepcopy(model)
    report = patch(model)
    inputs = spec.make_inputs(args.batch, device)
    tuner = dispatch_tuner.Tuner() if on_gpu else dispatch_tuner.Tuner(timer=dispatch_tuner.wall_clock_timer, devices=("cpu",))
    previous_tuner, previous_mode = dispatch_tuner.set_tuner(tuner), modes.set_dispatch("auto")
    try:
        with dispatch_tuner.retuning():
            _step(model, spec, inputs, args.train)
            records = list(dispatch_tuner.tune_records)
        report_text = str(report)  # what each swapped module now runs
        steps = {"eager": step_ms(eager, spec, inputs, args.train, tuner.timer),
                 "clipfast (auto)": step_ms(model, spec, inputs, args.train, tuner.timer)}
    finally:
        dispatch_tuner.set_tuner(previous_tuner)
        modes.set_dispatch(previous_mode)
    print(f"clipfast tune: {spec.name}, batch {args.batch}, {str(dtype).replace('torch.', '')}, "
          f"{'train (forward + backward)' if args.train else 'inference (forward)'} on "
          f"{torch.cuda.get_device_name(device) if on_gpu else 'CPU (host clock)'}")
    print(format_records(records))
    print("whole step: " + ", ".join(f"{k} {v:.3f} ms" for k, v in steps.items())
          + f" ({steps['eager'] / steps['clipfast (auto)']:.2f}x)")
    print(f"cache: {dispatch_cache.cache_path()}")
    print(report_text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": spec.name, "batch": args.batch, "dtype": str(dtype), "train": args.train,
                       "environment": dispatch_cache.environment(device), "step_ms": steps,
                       "records": [r.__dict__ | {"speedup": r.speedup()} for r in records]}, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
