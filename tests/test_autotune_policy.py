"""The autotune policy (kernels/configs.py): one config per kernel, key and architecture by default (table
entry, else the kernel's first offered config), untimed; ``max`` offers today's lists and keeps its results
on disk so a second process times nothing; ``0`` and the interpreter unchanged."""
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import triton

from clipfast.kernels import attention, configs, environment, mlp, runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((16, 4), (32, 4), (64, 8))]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPFAST_CACHE_DIR", str(tmp_path))
    configs.clear_caches()
    yield tmp_path
    configs.clear_caches()


def _policy(name, prune=None, bench=None):
    return configs.Policy(name, ["n"], prune, bench, arch_of=runtime.launch_arch)


def test_default_mode_runs_the_first_offered_config_untimed_and_says_so_once(cache, monkeypatch):
    monkeypatch.setattr(configs, "_mode", "default")
    calls = []
    policy = _policy("test.default_kernel", prune=lambda cfgs, named, **kw: cfgs[1:], bench=lambda *a, **k: calls.append(1))
    args = {"X": torch.empty(4), "n": 100}
    with pytest.warns(RuntimeWarning, match="running its default BLOCK=32,w4,s3.*clipfast tune --kernels"):
        assert policy.prune(CFGS, args) == [CFGS[1]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per kernel
        assert policy.prune(CFGS, {**args, "n": 7}) == [CFGS[1]]
    assert policy.do_bench(lambda: None, quantiles=(0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0] and not calls


def test_table_entries_user_over_shipped_and_zero_mode_ignores_them(cache, monkeypatch):
    monkeypatch.setattr(configs, "_mode", "default")
    monkeypatch.setattr(configs, "_target_gpu", "Fake GPU")
    monkeypatch.setattr(runtime, "capability", lambda device: (9, 0))
    policy = _policy("test.table_kernel")
    args = {"X": torch.empty(4, dtype=torch.float16), "n": 100}
    key = configs.key_text(["n"], args)
    assert key == "n=100,dtype=float16"
    configs._shipped[90] = {"entries": {"test.table_kernel": {key: configs.config_record(CFGS[2])}}}
    assert policy.prune(CFGS, args) == [CFGS[2]]  # shipped (architecture)
    configs._shipped[90]["gpus"] = {"Fake GPU": {"test.table_kernel": {key: configs.config_record(CFGS[0])}}}
    assert policy.prune(CFGS, args) == [CFGS[0]]  # shipped (this GPU model)
    path = configs.write_user_table("Fake GPU", {"test.table_kernel": {key: configs.config_record(CFGS[1])}})
    assert path.startswith(str(cache))
    assert policy.prune(CFGS, args) == [CFGS[1]]  # the user's table wins
    monkeypatch.setattr(configs, "_mode", "0")
    assert policy.prune(CFGS, args) == [CFGS[0]]  # heuristic default, no tables
    # an entry the pruning does not offer for this launch is not run
    monkeypatch.setattr(configs, "_mode", "default")
    offered_without = _policy("test.table_kernel", prune=lambda cfgs, named, **kw: [c for c in cfgs if c is not CFGS[1]])
    with pytest.warns(RuntimeWarning):
        assert offered_without.prune(CFGS, args) == [CFGS[0]]


def test_max_mode_offers_what_the_kernels_own_pruning_offers(cache, monkeypatch):
    """CLIPFAST_AUTOTUNE=max: the lists are today's (the kernel's own early_config_prune), on every product."""
    monkeypatch.setattr(configs, "_mode", "max")
    monkeypatch.setattr(runtime, "INTERPRET", False)  # decorate as on a GPU (several configs)
    monkeypatch.setattr(runtime, "capability", lambda device: (9, 0))
    gemm = runtime.autotune(mlp._gemm_kernel.shipped_configs, key=["N"],
                            prune_configs_by={"early_config_prune": mlp._prune})(mlp._gemm_kernel.fn)
    assert len(gemm.configs) == len(mlp._gemm_kernel.shipped_configs) > 1
    a = torch.empty(8, dtype=torch.float16)
    checked = 0
    for flags in mlp._GEMM_VARIANTS.values():
        for aligned in (True, False):
            args = {**mlp._NO_EPILOGUE, **{k: v for k, v in flags.items() if not k.startswith("_")},
                    "IS_ALIGNED": aligned, "A": a, "N": 768}
            want = mlp._prune(gemm.configs, args, arch=90)
            assert gemm.policy.prune(gemm.configs, args) == want
            assert gemm.policy.offered(gemm.configs, args) == want
            checked += 1
    fwd = runtime.autotune(attention.FWD.configs(), key=["BLOCK_D"],
                           prune_configs_by={"early_config_prune": attention.FWD.early_prune})(attention._attn_fwd_kernel.fn)
    for d in (32, 64, 128):
        args = {"Q": a, "BLOCK_D": d}
        assert fwd.policy.prune(fwd.configs, args) == attention.FWD.early_prune(fwd.configs, args)
    assert checked > 4
    # forced_config still runs exactly one config
    with runtime.forced_config(gemm, gemm.configs[3]):
        assert gemm.configs == [gemm.shipped_configs[3]]
    assert len(gemm.configs) > 1


def test_planning_target_answers_the_device_queries_for_cpu_tensors(monkeypatch):
    """``configs.install_target`` (``clipfast warm``'s planning): CPU tensors answer as a GPU of that architecture
    (capability, its usual SM count, the launch architecture the pruning and the tables key on)."""
    monkeypatch.setattr(environment, "_target", None)
    monkeypatch.setattr(configs, "_target_gpu", None)
    cpu = torch.device("cpu")
    assert (runtime.capability(cpu), runtime.sm_count(cpu), runtime.launch_arch({"X": torch.empty(1)})) == ((0, 0), 4, 0)
    configs.install_target(90, gpu="Fake GPU")
    assert (runtime.capability(cpu), runtime.sm_count(cpu)) == ((9, 0), environment.TARGET_SM_COUNT[90])
    assert runtime.launch_arch({"n": 3, "X": torch.empty(1)}) == runtime.device_arch(cpu) == 90
    assert runtime.launch_arch({"X": torch.empty(1)}, "A") == 0  # no such operand
    assert configs._gpu_name({"X": torch.empty(1)}) == "Fake GPU"
    configs.install_target(80, sm_count=7)
    assert (runtime.capability(cpu), runtime.sm_count(cpu)) == ((8, 0), 7)


def test_one_tile_table_for_every_family():
    """``kernels/tiles.py``: rows per Triton version share a config (the running version's row answers for it),
    and one filter offers a launch the rows for its dtype, architecture, BLOCK_D and kinds (the family's
    enum.Flag) whose shared-memory estimate fits, in table order, else the smallest that can run at all."""
    import enum

    from clipfast.kernels import tiles

    class Kind(enum.Flag):
        HEAVY = enum.auto()
        SPLIT = enum.auto()

    rows = (tiles.Tile(128, 128, 64, 8, 3, avoid=Kind.HEAVY, tritons=((3, 0), (3, 0))),  # never ships
            tiles.Tile(128, 128, 64, 8, 3, avoid=Kind.SPLIT),
            tiles.Tile(64, 64, 32, 4, 2, meta=(("SPLIT_DV", 2),), dtypes=tiles.ANY_DTYPE, archs=(8,)),
            tiles.Tile(32, 32, 32, 4, 1, block_ds=(128,), dtypes=tiles.FP32))
    table = tiles.TileTable(rows, estimate=lambda t, launch: t.stages * t.block_m * t.block_n * 2,
                            rule=lambda t, launch: "too small" if launch.kinds and Kind.HEAVY in launch.kinds
                            and t.block_m < 128 else None)
    assert table.shipped() == rows[1:] and [table.tile_of(c) for c in table.configs()] == list(rows[1:])
    assert table.configs()[1].kwargs == {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_DV": 2}
    launch = tiles.Launch
    assert table.offered(launch(90)) == [rows[1]]  # fp16: not the fp32 row; sm_90: not the Ampere one
    assert table.offered(launch(80, "fp16", Kind.SPLIT)) == [rows[2]]
    assert table.offered(launch(0, "fp32", block_d=128)) == [rows[2], rows[3]]  # arch 0: any generation
    assert table.why_not_offered(rows[1], launch(86)) is None  # 98,304 B fit sm_86's 99 KB, not sm_75's 64 KB
    assert "shared memory" in table.why_not_offered(rows[1], launch(75)) and table.offered(launch(75)) == [rows[2]]
    # nothing offered (split: avoided; sm_75: not the Ampere row): the smallest of those that can run at all
    assert table.offered(launch(75, "fp16", Kind.SPLIT)) == [rows[2]]
    assert table.why_not_offered(rows[2], launch(75, "fp16", Kind.SPLIT)) is None
    assert table.why_not_offered(rows[1], launch(80, "fp16", Kind.SPLIT)) == "not offered to split launches"
    assert table.why_not_offered(rows[3], launch(80, "fp32", block_d=64)) == "shipped for BLOCK_D 128 only"
    assert table.why_not_offered(rows[2], launch(80, "fp16", Kind.HEAVY)) == "too small"
    assert table.prune(table.configs(), launch(80, "fp16", Kind.SPLIT)) == [table.configs()[1]]
    assert rows[2].launch_options()["num_stages"] == 2 and rows[2].with_meta(SPLIT_DV=4).param("SPLIT_DV") == 4


def test_interpreter_keeps_one_config_without_a_policy():
    if not runtime.INTERPRET:
        pytest.skip("interpreter only")
    assert len(mlp._gemm_kernel.configs) == 1 and not hasattr(mlp._gemm_kernel, "policy")
    assert mlp._gemm_kernel.configs[0] is mlp._gemm_kernel.shipped_configs[0]


_MAX_SCRIPT = textwrap.dedent('''
    import json, sys, torch, triton, triton.language as tl
    from clipfast.kernels import runtime
    calls = []
    timings = iter([3.0, 1.0, 2.0] * 10)

    def fake_bench(kernel_call, quantiles=None, **kw):
        calls.append(1)
        t = next(timings)
        return [t, t, t] if quantiles else t

    @runtime.autotune([triton.Config({"BLOCK": b}) for b in (16, 32, 64)], key=["n"], do_bench=fake_bench)
    @triton.jit
    def add_one(X, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(X + offs, tl.load(X + offs, mask=offs < n) + 1, mask=offs < n)

    x = torch.zeros(100)
    add_one[lambda meta: (triton.cdiv(100, meta["BLOCK"]),)](x, 100)
    assert torch.all(x == 1)
    print(json.dumps({"benchmarked": len(calls), "best": add_one.best_config.kwargs}))
''')


def test_max_mode_second_process_times_nothing(tmp_path):
    """Max mode keeps its results on disk: the first process benchmarks the 3 configs (a fake benchmark that
    counts), the second, at the same key, benchmarks none and runs the same winner."""
    script = tmp_path / "tune_once.py"
    script.write_text(_MAX_SCRIPT)
    env = dict(os.environ, CLIPFAST_CACHE_DIR=str(tmp_path / "cache"), CLIPFAST_AUTOTUNE="max",
               TRITON_INTERPRET="1", CLIPFAST_TARGET_ARCH="90", PYTHONPATH=ROOT)
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, cwd=str(tmp_path))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(__import__("json").loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0] == {"benchmarked": 3, "best": {"BLOCK": 32}}
    assert runs[1] == {"benchmarked": 0, "best": {"BLOCK": 32}}
    assert (tmp_path / "cache" / configs.RESULTS).exists()
