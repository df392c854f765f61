"""``clipfast warm``: its plan is what a real step launches and compiles, its compile keys are the JIT's, and
a ViT-B/16 training step's distinct compiles are counted."""
import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from clipfast import warm
from clipfast.kernels import mlp, runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CLIPFAST_TARGET_ARCH")}
    env["PYTHONPATH"] = ROOT
    return env


def test_plan_equals_the_launches_of_a_real_step(monkeypatch):
    """A real tiny training step under the interpreter with sm_90 set (kernels executed) launches exactly the
    kernels, arguments and configs of warm's plan (kernels not executed); every autotuned launch runs the
    first config its kernel's own pruning offers on sm_90 (the default, no table entries ship)."""
    plan = warm.plan_launches("tiny", True, 2, "fp32", 90, execute=False)
    real = warm.plan_launches("tiny", True, 2, "fp32", 90, execute=True)
    assert len(plan) > 50 and plan == real
    monkeypatch.setattr(runtime, "capability", lambda device: (9, 0))
    checked = 0
    for launch in real:
        module = __import__(launch["module"], fromlist=["_"])
        kernel = getattr(module, launch["name"])
        if not hasattr(kernel, "shipped_configs") or len(kernel.shipped_configs) < 2:
            continue
        pyfn = kernel.fn.fn if hasattr(kernel.fn, "fn") else kernel.fn
        names = list(inspect.signature(pyfn).parameters)
        tile_keys = set(kernel.shipped_configs[0].kwargs)
        named = dict(zip(names, [warm._decode(a) for a in launch["args"]]))
        kwargs = {k: warm._decode(v) for k, v in launch["kwargs"].items() if k in names and k not in tile_keys}
        prune = kernel.prune_configs_by["early_config_prune"] if getattr(kernel, "prune_configs_by", None) \
            else kernel.early_config_prune
        want = prune(kernel.shipped_configs, named, **kwargs)[0] if prune else kernel.shipped_configs[0]
        assert {k: launch["kwargs"][k] for k in want.kwargs} == want.kwargs, launch["name"]
        assert (launch["kwargs"]["num_warps"], launch["kwargs"]["num_stages"]) == (want.num_warps, want.num_stages)
        checked += 1
    assert checked >= 10


def test_warm_compile_keys_are_the_jit_launch_keys(tmp_path):
    """For launches of a tiny step, the cache hash warm compiles under equals the one ``JITFunction.run``
    computes for the same arguments on sm_90 (its own binder and packing, a stand-in driver, compile
    intercepted); one compile lands in TRITON_CACHE_DIR under that hash."""
    script = tmp_path / "keys.py"
    script.write_text(textwrap.dedent('''
        import json, os
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.runtime import driver
        from clipfast import warm
        from clipfast.kernels import runtime

        class StandIn:
            def get_current_device(self): return 0
            def get_current_stream(self, device=None): return 0
            def get_current_target(self): return GPUTarget("cuda", 90, 32)

        launches = warm.plan_launches("tiny", False, 2, "fp16", 90)
        driver.set_active(StandIn())
        compared, seen = 0, {}
        for launch in launches:
            key = (launch["module"], launch["name"], repr(launch["args"]), repr(sorted(launch["kwargs"].items())))
            if key in seen:
                continue
            seen[key] = 1
            fn = runtime.jit_function(getattr(__import__(launch["module"], fromlist=["_"]), launch["name"]))
            got = {}
            def capture(key, signature, device, constexprs, options, attrs, warmup, fn=fn):
                got["hash"] = warm.cache_hash(ASTSource(fn, signature, constexprs, attrs), GPUTarget("cuda", 90, 32), options)
            fn._do_compile = capture
            fn.run(*[warm._decode(a) for a in launch["args"]], grid=(1,), warmup=True,
                   **{k: warm._decode(v) for k, v in launch["kwargs"].items()})
            src, target, options = warm.compile_inputs(launch, 90)
            assert got["hash"] == warm.cache_hash(src, target, options), launch["name"]
            compared += 1
        ln = next(l for l in launches if l["name"] == "_layer_norm_fwd_kernel")
        h = warm.cache_hash(*warm.compile_inputs(ln, 90))
        assert not warm._cached(h)
        row = warm.compile_all([(ln, 90, h)], 1)[0]
        assert row["error"] is None, row
        print(json.dumps({"compared": compared, "cached": warm._cached(h)}))
    '''))
    env = dict(_env(), TRITON_CACHE_DIR=str(tmp_path / "triton"))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["compared"] >= 10 and out["cached"]


# The cold-start target (sm_90, bf16, default mode, no table entries): at most 32 distinct compiles. Measured
# with this planner: 32 at batch 16 and at batch 256 (row and reduction counts are not specialized).
VIT_B16_TRAIN_COMPILES_MAX = 32


def test_vit_b16_training_step_distinct_compiles(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "-m", "clipfast.cli", "warm", "ViT-B-16", "--train", "--dtype", "bf16",
                           "--arch", "90", "--batch", "16", "--plan-only", "--json", str(out)],
                          env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    entry = json.loads(out.read_text())["archs"]["sm_90"]
    assert entry["distinct_compiles"] <= VIT_B16_TRAIN_COMPILES_MAX, entry
    # every MLP product runs one tile: at most one compile per product variant and specialization
    assert entry["per_family"]["mlp"] <= 9 and entry["per_family"]["attention"] <= 4


def test_warm_cli_edges(capsys):
    from clipfast.cli import main

    env_interp = os.environ.get("TRITON_INTERPRET")
    if env_interp == "1" and not torch.cuda.is_available():
        assert main(["warm", "tiny", "--arch", "90", "--plan-only"]) == 2  # the compiles are for GPUs
        assert "unset TRITON_INTERPRET" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["warm", "tiny", "--arch"])
