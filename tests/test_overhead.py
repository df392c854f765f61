"""Host overhead per op call: the benchmark runs for every op, and the dispatch lookup stays a dict lookup."""
import json
import math
import time

import torch

from clipfast.dispatching import modes as dispatch_modes
from clipfast.dispatching import tuner as dispatch_tuner
from clipfast.benchmarks import overhead
from clipfast.cli import main
from clipfast.dispatching.modes import KERNEL
from clipfast.dispatching.tuner import Tuner


def test_bench_overhead_reports_every_op(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    assert main(["bench", "overhead", "--smoke", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["op"], r["form"]) for r in rows} == {(c.op, f) for c in overhead.CASES for f in ("infer", "train")}
    for r in rows:
        for key in ("torch us", "clipfast us", "clipfast (auto) us", "plumbing us"):
            assert math.isfinite(r[key]) and r[key] > 0, r
    assert "x torch" in capsys.readouterr().out


def test_overhead_cases_compute_what_torch_computes():
    """Each case's clipfast and torch calls agree, so the benchmark times the same work."""
    with overhead.eager_fallback(), dispatch_modes.dispatch("kernel"):
        for case in overhead.CASES:
            inputs = case.make(torch.device("cpu"), False)
            a, b = case.clipfast(**inputs), case.torch(**inputs)
            a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))  # add_layer_norm returns (h, y)
            for x, y in zip(a, b, strict=True):
                torch.testing.assert_close(x.float(), y.float(), rtol=1e-4, atol=1e-4, msg=case.op)


def test_plumbing_runs_every_op_with_its_implementation_stubbed():
    """The plumbing column replaces every op's implementation by its fake (allocation only) and restores it."""
    from clipfast.ops._custom_op import OPS

    before = {name: op.impl for name, op in OPS.items()}
    assert {"clipfast::layer_norm_fwd", "clipfast::mlp_fwd", "clipfast::flash_attention_fwd",
            "clipfast::patch_embed_fwd", "clipfast::contrastive_loss_fwd"} <= set(OPS)
    with overhead.stubbed_implementations():
        assert all(op.impl is op.fake for op in OPS.values() if op.fake is not None)
        x = torch.randn(4, 32)
        y = overhead.CASES[0].clipfast(x, torch.ones(32), torch.zeros(32))
        assert y.shape == x.shape
    assert {name: op.impl for name, op in OPS.items()} == before


def _per_call_us(fn, calls=2000):
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / calls * 1e6


def test_dispatch_lookup_is_cheap(tmp_path, monkeypatch):
    """A tuned bucket costs a key of a few integers and one dict lookup: a few microseconds at most
    (about 0.3 us here), against tens to hundreds for the op itself."""
    monkeypatch.setenv("CLIPFAST_CACHE_DIR", str(tmp_path))
    previous = dispatch_tuner.set_tuner(Tuner(timer=lambda step, **kw: {KERNEL: 1.0, "torch": 2.0}[kw["name"]],
                                          devices=("cpu",)))
    try:
        x, w, b = torch.randn(4, 32), torch.randn(32), torch.randn(32)
        args = (x, w, b, 1e-5)
        with overhead.eager_fallback(), dispatch_modes.dispatch("auto"):
            assert dispatch_tuner.route("layer_norm", args) is None  # tuned: clipfast
            auto_us = _per_call_us(lambda: dispatch_tuner.route("layer_norm", args))
        with dispatch_modes.dispatch("kernel"):
            kernel_us = _per_call_us(lambda: dispatch_tuner.route("layer_norm", args))
    finally:
        dispatch_tuner.set_tuner(previous)
        dispatch_tuner.clear_memory_cache()
    assert auto_us < 20 and kernel_us < 5, (auto_us, kernel_us)
