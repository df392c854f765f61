"""``clipfast tune --kernels MODEL``: tune the config of every autotuned kernel a model's step meets.

Runs the model's step (``--infer``: forward under no_grad; ``--train``: forward + CLIP loss + backward) in
dispatch ``kernel`` with ``CLIPFAST_AUTOTUNE=max``: each autotuned kernel times every config its pruning
offers at each autotune key it meets (results kept on disk, so a repeated run times nothing new), and the
winners are written to the user's config table (``autotune-table.json`` under the cache dir, one section per
GPU and torch/triton/clipfast versions), which later processes read in the default mode. ``--json PATH``
writes the same entries in the shipped tables' format (``kernels/configs/sm<arch>.json``, section ``gpus``)
so they can be committed. Without a GPU there is nothing to time.
"""
from __future__ import annotations

import json
import sys

import torch


def table_entries(records: list[dict]) -> dict:
    """``{kernel: {key: config record}}`` from ``configs.tuned_in_process`` records (the last one wins)."""
    entries: dict = {}
    for r in records:
        entries.setdefault(r["kernel"], {})[r["key"]] = r["config"]
    return entries


def shipped_format(arch: int, gpu: str, entries: dict) -> dict:
    from .kernels.environment import versions

    return {"format": 1, "arch": arch, "measured_with": versions(), "gpus": {gpu: entries}}


def main_tune_kernels(args) -> int:
    if not torch.cuda.is_available():
        print("clipfast tune --kernels: no CUDA device: nothing to time (on CPU clipfast runs one config per "
              "kernel, as it always has). Run this on the GPU machine that will train or serve the model.")
        return 0
    from .dispatching import modes
    from .kernels import configs
    from .patching import patch
    from .tune import _step
    from .verify import DTYPES
    from .verify_models import resolve

    device = torch.device("cuda")
    dtype = DTYPES[args.dtype or "bf16"]
    spec = resolve(args.model, tiny=False)
    model = spec.build().to(device=device, dtype=dtype)
    model.train(args.train)
    patch(model)
    inputs = spec.make_inputs(args.batch, device)
    previous_mode, previous_dispatch = configs.set_mode("max"), modes.set_dispatch("kernel")
    start = len(configs.tuned_in_process)
    try:
        _step(model, spec, inputs, args.train)
        torch.cuda.synchronize()
    finally:
        configs.set_mode(previous_mode)
        modes.set_dispatch(previous_dispatch)
    records = configs.tuned_in_process[start:]
    gpu = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    entries = table_entries(records)
    path = configs.write_user_table(gpu, entries)
    print(f"clipfast tune --kernels: {spec.name}, batch {args.batch}, {str(dtype).replace('torch.', '')}, "
          f"{'train' if args.train else 'inference'} on {gpu}")
    for r in records:
        best = min(r["ms"].values()) if r["ms"] else None
        print(f"  {r['kernel']:<40} {r['key'][:70]:<70} {configs.config_text(_Cfg(r['config']))}"
              f"{f'  {best:.4f} ms' if best is not None else ''}  ({len(r['ms'])} timed)")
    print(f"{sum(len(v) for v in entries.values())} table entries written to {path}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(shipped_format(10 * major + minor, gpu, entries), f, indent=1, sort_keys=True)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


class _Cfg:
    def __init__(self, record: dict):
        self.kwargs, self.num_warps, self.num_stages = record["kwargs"], record["num_warps"], record["num_stages"]
