"""The GPU check (bench/gpu_suite.sh, clipfast.gpu_check): its correctness step's tests, its plans,
the benchmark harness it relies on, the summary's target verdicts, and the CPU rehearsal of the whole
command (so it cannot rot between GPU runs).

Tests marked ``gpu_suite`` are the check's first step: every kernel family forward and backward against
float64 at CLIP shapes in fp16 and bf16 on a GPU, every shipped tile of every autotuned kernel forced once,
and tensors past 2**31 elements; on CPU the same tests run once at tiny shapes through the interpreter.
"""
import contextlib
import json
import os
import stat
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import clipfast
from clipfast.benchmarks import harness
from clipfast.benchmarks import patch_embed as bench_patch_embed
from clipfast.gpu_check import child, preflight, steps, summary, workers
from clipfast.gpu_check import run as check
from clipfast.gpu_check.targets import TARGETS
from clipfast.kernels import attention as attention_kernel
from clipfast.kernels import mlp as mlp_kernel
from clipfast.kernels import runtime

from .conftest import DEVICE, ON_GPU
from .numerics import assert_op_matches, randn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# bf16 is collected everywhere (skipped in the interpreter, which computes it wrong), so the rehearsal's
# correctness plan is the GPU's: bf16 checks of every family first (steps.correctness_plan)
HALF = [pytest.param(torch.float16, id="fp16"),
        pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(
            not ON_GPU, reason="bf16 runs on the GPU only (the interpreter computes it wrong)"))]


# ------------------------------------------------------------------------------------------------
# Correctness step: every family at CLIP shapes, every shipped tile forced
# ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def forced(tuner, config):
    """Run ``tuner`` (an autotuned kernel) at exactly ``config``: a single config skips benchmarking."""
    saved = tuner.configs, tuner.cache
    tuner.configs, tuner.cache = [config], {}
    try:
        yield
    finally:
        tuner.configs, tuner.cache = saved


def _tiles(tuner):
    """(index, config) pairs to force: every shipped one on a GPU, the interpreter's one on CPU."""
    configs = tuner.shipped_configs if ON_GPU else tuner.shipped_configs[:1]
    return list(enumerate(configs))


def _eager_attention(q, k, v, causal):
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


ATTENTION_TABLES = {"_attn_fwd_kernel": attention_kernel.FWD, "_attn_bwd_dkdv_kernel": attention_kernel.DKDV,
                    "_attn_bwd_dq_kernel": attention_kernel.DQ}


def _head_dim(kernel, config) -> int:
    """A head dim the config's tile is shipped for (80 stands for CLIP's ViT-H, BLOCK_D 128)."""
    if not ON_GPU:
        return 32
    tile = next(t for t in ATTENTION_TABLES[kernel].tiles if t.key == attention_kernel._config_key(config))
    return {16: 64, 32: 32, 64: 64, 128: 80, 256: 256}[tile.block_ds[0]]


ATTENTION_TILES = [(name, i) for name in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
                   for i, _ in _tiles(getattr(attention_kernel, name))]


@pytest.mark.gpu_suite
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kernel,tile", ATTENTION_TILES)
def test_attention_every_tile_matches_float64(kernel, tile, dtype):
    tuner = getattr(attention_kernel, kernel)
    config = tuner.shipped_configs[tile]
    d = _head_dim(kernel, config)
    if ON_GPU:  # a tile the offer rules never run on this GPU in this dtype (``AttentionTileTable.why_not_offered``)
        table, arch = ATTENTION_TABLES[kernel], attention_kernel._arch({"Q": torch.empty(0, device=DEVICE)})
        rows = [t for t in table.tiles if t.key == attention_kernel._config_key(config)]  # (rows per head dim)
        run = attention_kernel.launch(attention_kernel.block_d(d), arch, dtype)
        reasons = [table.why_not_offered(row, run) for row in rows]
        if all(reasons):
            pytest.skip(f"attention {kernel} tile {tile} is not offered to {dtype} on sm_{arch}: {reasons[0]}")
    shapes = [(2, 3, 197, False), (2, 2, 77, True)] if ON_GPU else [(1, 2, 33, True)]
    with forced(tuner, config):
        for b, h, s, causal in shapes:
            qkv = [randn(b, h, s, d, device=DEVICE, outliers=2) for _ in range(3)]
            assert_op_matches(f"attention {kernel} tile {tile} S={s} D={d}",
                              lambda q, k, v: clipfast.flash_attention(q, k, v, is_causal=causal),
                              lambda q, k, v: _eager_attention(q, k, v, causal), qkv, dtype)


def _mlp_inputs(rows, width, hidden, residual=True):
    x = randn(rows, width, device=DEVICE, outliers=2)
    w1, w2 = randn(hidden, width, device=DEVICE) * width ** -0.5, randn(width, hidden, device=DEVICE) * hidden ** -0.5
    b1, b2 = 0.1 * randn(hidden, device=DEVICE), 0.1 * randn(width, device=DEVICE)
    return [x, w1, b1, w2, b2] + ([randn(rows, width, device=DEVICE)] if residual else [])


def _eager_mlp(x, w1, b1, w2, b2, residual):
    h = F.linear(x, w1, b1)
    return F.linear(h * torch.sigmoid(1.702 * h), w2, b2) + residual


@pytest.mark.gpu_suite
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("tile", [i for i, _ in _tiles(mlp_kernel._gemm_kernel)])
def test_mlp_every_tile_matches_float64(tile, dtype):
    config = mlp_kernel._gemm_kernel.shipped_configs[tile]
    if ON_GPU:  # a tile the offer rules never run on this GPU in this dtype (``why_not_offered``: the persistent
        # TMA variant before sm_90; sm_86/89 refuse the fp16 128x128x64, 128x256 and 256x128 tiles by shared memory)
        arch = runtime.device_arch(torch.device(DEVICE))
        kinds = mlp_kernel._product_kinds({"A": torch.empty(0, dtype=dtype)})
        reason = mlp_kernel.why_not_offered(mlp_kernel._tile(config), kinds, True, arch)
        if reason:
            pytest.skip(f"mlp tile {tile} is not offered to {dtype} on sm_{arch}: {reason}")
    shapes = [(2 * 197, 768, 3072), (77, 512, 2048)] if ON_GPU else [(37, 64, 128)]
    with forced(mlp_kernel._gemm_kernel, mlp_kernel._gemm_kernel.shipped_configs[tile]):
        for rows, width, hidden in shapes:
            assert_op_matches(f"mlp tile {tile} {rows}x{width}->{hidden}",
                              lambda x, w1, b1, w2, b2, r: clipfast.mlp(x, w1, b1, w2, b2, "quick_gelu", residual=r),
                              _eager_mlp, _mlp_inputs(rows, width, hidden), dtype)


@pytest.mark.gpu_suite
@pytest.mark.parametrize("dtype", HALF)
def test_layer_norm_clip_widths_match_float64(dtype):
    widths = [512, 768, 1024, 1280] if ON_GPU else [96]
    for width in widths:
        rows = 2 * 197 if ON_GPU else 37
        x, r = randn(rows, width, device=DEVICE, outliers=2), randn(rows, width, device=DEVICE)
        w, b = 1 + 0.1 * randn(width, device=DEVICE), 0.1 * randn(width, device=DEVICE)
        assert_op_matches(f"layer_norm w{width}", clipfast.layer_norm,
                          lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b), [x, w, b], dtype)
        assert_op_matches(f"add_layer_norm w{width}", clipfast.add_layer_norm,
                          lambda x, r, w, b: (x + r, F.layer_norm(x + r, x.shape[-1:], w, b)), [x, r, w, b], dtype)


def _eager_clip_loss(image, text, logit_scale):
    logits = logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@pytest.mark.gpu_suite
@pytest.mark.parametrize("dtype", HALF)
def test_contrastive_losses_match_float64(dtype):
    n, m, d = (256, 1024, 512) if ON_GPU else (33, 66, 32)
    image, text = randn(n, d, device=DEVICE), randn(n, d, device=DEVICE)
    scale = torch.tensor(4.6, device=DEVICE)
    assert_op_matches("clip_loss", clipfast.clip_loss, _eager_clip_loss, [image, text, scale], dtype,
                      param_dtype_inputs=[2])
    queries, keys = F.normalize(randn(n, d, device=DEVICE), dim=-1), F.normalize(randn(m, d, device=DEVICE), dim=-1)
    offset = m - n

    def local_eager(q, k, s):
        return F.cross_entropy(s * q @ k.T, torch.arange(q.shape[0], device=q.device) + offset)

    def local_fused(q, k, s):
        return clipfast.ops.contrastive_cross_entropy(q, k, s, label_offset=offset)

    assert_op_matches("local loss", local_fused, local_eager, [queries, keys, torch.tensor(50.0, device=DEVICE)], dtype,
                      param_dtype_inputs=[2])


def _per_sequence_attention(q, k, v, cu, causal):
    out = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        out.append(_eager_attention(*(t[start:end].transpose(0, 1) for t in (q, k, v)), causal).transpose(0, 1))
    return torch.cat(out)


@pytest.mark.gpu_suite
@pytest.mark.parametrize("dtype", HALF)
def test_varlen_attention_matches_float64(dtype):
    lengths, heads, d = ([1, 77, 13, 50, 77, 5], 8, 64) if ON_GPU else ([1, 13, 5], 1, 32)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    for causal in (True, False) if ON_GPU else (True,):
        qkv = [randn(sum(lengths), heads, d, device=DEVICE, outliers=2) for _ in range(3)]
        assert_op_matches(f"varlen attention causal={causal}",
                          lambda q, k, v: clipfast.flash_attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths),
                                                                          is_causal=causal),
                          lambda q, k, v: _per_sequence_attention(q, k, v, cu, causal), qkv, dtype)


@pytest.mark.gpu_suite
@pytest.mark.parametrize("dtype", HALF)
def test_patch_embed_matches_float64(dtype):
    batch, image, patch, width = (2, 224, 16, 768) if ON_GPU else (2, 32, 16, 64)
    tokens = (image // patch) ** 2 + 1
    inputs = [randn(batch, 3, image, image, device=DEVICE), 0.02 * randn(width, 3, patch, patch, device=DEVICE),
              0.02 * randn(width, device=DEVICE), 0.02 * randn(tokens, width, device=DEVICE),
              1 + 0.1 * randn(width, device=DEVICE), 0.1 * randn(width, device=DEVICE)]
    assert_op_matches("patch_embed +cls+pos+ln_pre", bench_patch_embed._fused, bench_patch_embed._eager, inputs, dtype,
                      differentiable=[False, True, True, True, True, True])


@pytest.mark.gpu
@pytest.mark.gpu_suite
def test_past_2_31_elements_on_gpu():
    """Offsets beyond int32: the last rows of tensors with more than 2**31 elements match float64."""
    torch.cuda.empty_cache()
    width, tail = 768, 64
    rows = 2**31 // width + 1000
    x = torch.randn(rows, width, device=DEVICE, dtype=torch.bfloat16)
    w = torch.ones(width, device=DEVICE, dtype=torch.bfloat16)
    b = torch.zeros_like(w)
    y = clipfast.layer_norm(x, w, b)
    ref = F.layer_norm(x[-tail:].double(), (width,), w.double(), b.double())
    torch.testing.assert_close(y[-tail:].double(), ref, atol=3e-2, rtol=2e-2)
    del x, y
    # MLP: the [rows, hidden] activation passes 2**31 elements
    hidden, rows = 3072, 2**31 // 3072 + 1000
    x, w1, b1, w2, b2 = (t.to(torch.bfloat16) for t in _mlp_inputs(rows, width, hidden, residual=False))
    y = clipfast.mlp(x, w1, b1, w2, b2, "quick_gelu")
    h = F.linear(x[-tail:].double(), w1.double(), b1.double())
    ref = F.linear(h * torch.sigmoid(1.702 * h), w2.double(), b2.double())
    torch.testing.assert_close(y[-tail:].double(), ref, atol=5e-2, rtol=5e-2)
    del x, y
    # attention: batch * heads * seqlen * head_dim past 2**31
    b, h, s, d = 2**31 // (8 * 77 * 64) + 16, 8, 77, 64
    q, k, v = (torch.randn(b, h, s, d, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    out = clipfast.flash_attention(q, k, v, is_causal=True)
    ref = _eager_attention(q[-2:].double(), k[-2:].double(), v[-2:].double(), True)
    torch.testing.assert_close(out[-2:].double(), ref, atol=2e-2, rtol=2e-2)
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# Harness
# ------------------------------------------------------------------------------------------------

def test_backward_timing_runs_a_fresh_forward_each_time():
    """bwd mode: each backward consumes its own graph (no retain_graph; torch.compile's donated buffers
    forbid it), and gives the single backward's gradients every time."""
    x = torch.randn(5, 3, requires_grad=True)
    setup, run = harness.timed_step(lambda x: (x * x).sum(-1), {"x": x}, "bwd")
    for _ in range(3):
        run(setup())
        torch.testing.assert_close(x.grad, 2 * x.detach())
    setup, run = harness.timed_step(lambda x: x * 2, {"x": x}, "fwd+bwd")
    run(setup())
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


KERNEL_FAMILIES = ("attention", "mlp", "layer_norm", "patch_embed", "contrastive_loss", "local_loss")


def test_gpu_shape_cases_build_consistent_inputs():
    """Every GPU-shape kernel case's eager implementation runs on its own inputs (on the meta device:
    shapes only), e.g. the add+LN cases' residual matches x."""
    meta = torch.device("meta")
    cases = [c for c in steps.cases_by_module(smoke=False) if c.module_family in KERNEL_FAMILIES]
    assert {c.module_family for c in cases} == set(KERNEL_FAMILIES)
    for case in cases:
        if case.module_family == "attention" and "MHA" in case.name:
            continue  # nn.MultiheadAttention's fast path inspects values
        inputs = case.make_inputs(meta, case.dtype)
        out = case.impls["eager"](**inputs)
        assert out is not None, case.name


def test_compile_step_compiles_every_pruned_config_then_runs_the_first(monkeypatch):
    """The compile step's autotuner: each launch compiles every config the pruning keeps (JIT warmup mode,
    nothing runs), then runs the first config only, so the op's result is still right."""
    tuner = mlp_kernel._gemm_kernel
    calls = []
    real_run = tuner.fn.run

    def counting(*args, warmup=False, **kwargs):
        calls.append((warmup, kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["BLOCK_K"]))
        return real_run(*args, warmup=warmup, **kwargs)

    monkeypatch.setattr(tuner.fn, "run", counting)
    # three tiles every architecture and Triton version is offered (some are Hopper-only under triton < 3.8)
    everywhere = [c for c in tuner.shipped_configs if mlp_kernel._tile(c).archs is None][:3]
    monkeypatch.setattr(tuner, "configs", everywhere)
    monkeypatch.setattr(tuner, "cache", {})
    x, w1, b1, w2, b2, _ = _mlp_inputs(37, 64, 128)
    with workers.compiling_every_config():
        out = clipfast.mlp(x, w1, b1, w2, b2, "quick_gelu")
    h = F.linear(x, w1, b1)
    torch.testing.assert_close(out, F.linear(h * torch.sigmoid(1.702 * h), w2, b2), atol=1e-4, rtol=1e-4)
    tiles = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in everywhere]
    launches = len(calls) // 4
    assert launches >= 1 and calls == [(True, *t) for t in tiles] + [(False, *tiles[0])] + calls[4:]
    assert calls[4:] == ([(True, *t) for t in tiles] + [(False, *tiles[0])]) * (launches - 1)
    from triton.runtime.autotuner import Autotuner
    assert Autotuner.run.__name__ == "run" and "compiling_every_config" not in Autotuner.run.__qualname__


# ------------------------------------------------------------------------------------------------
# Plans
# ------------------------------------------------------------------------------------------------

def _names(entries):
    return {(c.module_family, c.name, i) for c, impls in entries for i in impls}


def test_plans_cover_the_headline_and_every_case_once():
    cases = steps.cases_by_module(smoke=False)
    names = ("headline_kernels", "headline_model", "headline_model_compiled", "rest_bench")
    plans = {s: _names(steps.plan(s, False, cases)) for s in names}
    compiled = plans["headline_model_compiled"]
    everything = {(c.module_family, c.name, i) for c in cases for i in steps.impl_names(c, False)
                  if not steps.whole_model_compile(c, i) or (c.module_family, c.name, i) in compiled}
    assert set().union(*plans.values()) == everything
    assert sum(len(p) for p in plans.values()) == len(everything)  # nothing twice
    kernels = plans["headline_kernels"]
    for family, case in [("attention", "ViT-B/16 B=256 H=12 S=197 D=64"),
                         ("attention", "text B=256 H=8 S=77 D=64 causal"),
                         ("contrastive_loss", "CLIP loss N=32768 d=512"),
                         ("local_loss", "local loss N=256 M=32768 d=512")]:
        assert (family, case, "clipfast") in kernels and (family, case, "eager") in kernels
    assert {i for f, c, i in kernels if c.startswith("ViT-B/16 B=256 H=12")} >= {
        "sdpa flash", "sdpa efficient", "sdpa cudnn", "sdpa math", "torch.compile"}
    assert any(f == "mlp" and i == "bare GEMMs" for f, c, i in kernels)
    assert any(f == "host_overhead" for f, c, i in kernels)
    # two whole-model torch.compiles, none in the rest
    assert {i for _, _, i in compiled} == {"torch.compile", "clipfast+torch.compile"} and len(compiled) == 2
    assert not any("compile" in i for f, c, i in plans["headline_model"])
    warm = steps.plan("warm", False, cases)
    assert warm and all(c.module_family not in steps.WHOLE_MODEL_FAMILIES for c, _ in warm)
    # a headline step's worker builds its picks' families alone (others import optional packages): same plan
    for step in steps.HEADLINE:
        assert _names(steps.plan(step, False)) == plans[step], step


def test_smoke_plans_pick_every_headline_family():
    cases = steps.cases_by_module(smoke=True)
    for step, picks in steps.HEADLINE.items():
        chosen = {c.module_family for c, _ in steps.plan(step, True, cases)}
        wanted = {p.family for p in picks}
        if step != "headline_model_compiled":  # no torch.compile in the rehearsal
            assert chosen == wanted, step


def test_correctness_plan_schedules_the_bf16_checks_of_every_family_first():
    families = ["attention_every_tile[_attn_fwd_kernel-0", "mlp_every_tile[0", "layer_norm_clip_widths[",
                "contrastive_losses[", "varlen_attention[", "patch_embed["]
    entries = [(f"tests/test_gpu_suite.py::test_{f}-{dtype}]".replace("[-", "["), dtype == "bf16")
               for f in families for dtype in ("fp16", "bf16")] + [("tests/test_attention.py::test_gpu_only", False)]
    for shards in (1, 4, 16):
        plan = steps.correctness_plan(entries, shards)
        assert sorted(n for shard in plan for n in shard) == sorted(n for n, _ in entries)
        for shard in plan:
            flags = [n.endswith("-bf16]") or n.endswith("[bf16]") for n in shard]
            assert flags == sorted(flags, reverse=True), shard  # no bf16 check after a non-bf16 one
        firsts = [shard[0] for shard in plan if shard]
        assert all("bf16" in n for n in firsts[:min(shards, 6)])
    assert steps.bf16_first([("a", False), ("b", True), ("c", False), ("d", True)]) == ["b", "d", "a", "c"]


def test_cuda_errors_are_told_from_other_errors():
    assert child.is_cuda_error("RuntimeError: CUDA error: an illegal memory access was encountered")
    assert child.is_cuda_error("torch.AcceleratorError: CUDA error: unspecified launch failure")
    assert child.is_cuda_error("RuntimeError: Triton Error [CUDA]: misaligned address")
    assert not child.is_cuda_error("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert not child.is_cuda_error("AssertionError: max abs error 3e-2 > 1e-2")
    assert not child.is_cuda_error(None)


# ------------------------------------------------------------------------------------------------
# Summary and targets
# ------------------------------------------------------------------------------------------------

def _row(family, case, impl, mode, ms, **extra):
    return {"family": family, "case": case, "impl": impl, "mode": mode, "dtype": "bfloat16", "ms_median": ms,
            "error": None, "step": "headline_kernels", **extra}


def test_targets_are_flagged_met_or_missed():
    case = "ViT-B/16 B=256 H=12 S=197 D=64"
    rows = [_row("attention", case, "clipfast", "fwd+bwd", 1.0), _row("attention", case, "sdpa flash", "fwd+bwd", 0.9),
            _row("attention", case, "sdpa cudnn", "fwd+bwd", 1.2), _row("attention", case, "clipfast", "fwd", 0.3,
                                                                         tflops=250.0),
            _row("mlp", "fc+QuickGELU+proj ViT-B/16 B=256 L=197 768->3072", "clipfast", "fwd+bwd", 1.0),
            _row("mlp", "fc+QuickGELU+proj ViT-B/16 B=256 L=197 768->3072", "eager", "fwd+bwd", 1.4)]
    verdicts = {(t.family, t.text): summary.check_target(t, rows) for t in TARGETS}
    best_sdpa = verdicts["attention", ">= 1.0x best SDPA backend"]
    assert best_sdpa == [{"case": case, "value": pytest.approx(0.9), "met": False}]  # the fastest backend counts
    assert verdicts["attention", "fwd >= 200 TFLOP/s"][0]["met"] is True
    assert verdicts["mlp", ">= 1.3x eager"][0]["met"] is True
    no_compile = [t for t in TARGETS if t.family == "mlp" and t.against == ("torch.compile",)][0]
    assert summary.check_target(no_compile, rows)[0]["met"] is None  # torch.compile did not run
    table = "\n".join(summary.targets_table(rows))
    assert "**missed**" in table and "| met |" in table and "not measured" in table


def _results(rehearsal: bool) -> dict:
    return {"rehearsal": rehearsal, "budget_s": 1, "workers": 1, "steps": [], "tests": [], "warm": [], "notes": [],
            "environment": {"date": "2026-11-30", "torch": "2.11.0+cu130", "triton": "3.6.0", "python": "3.12.1",
                            "gpu": None if rehearsal else "NVIDIA H200"},
            "rows": [_row("layer_norm", "ViT-B/16 B=256 L=197 w768", "clipfast", "fwd+bwd", 0.5),
                     _row("layer_norm", "ViT-B/16 B=256 L=197 w768", "eager", "fwd+bwd", 1.0)]}


def test_summary_files_gpu_results_and_refuses_a_rehearsal(tmp_path, capsys):
    root, readme = tmp_path / "results", tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Results\n\n{summary.START}\nOLD SECTION\n{summary.END}\n\n## Testing\n")
    for name, rehearsal in (("cpu", True), ("gpu", False)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(_results(rehearsal)))
    args = ["--write-readme", "--readme", str(readme), "--root", str(root)]
    assert summary.main(["--from", str(tmp_path / "cpu"), *args]) == 2
    assert "rehearsal" in capsys.readouterr().err and not root.exists()
    assert summary.main(["--from", str(tmp_path / "gpu"), *args]) == 0
    assert os.listdir(root) == ["NVIDIA-H200_2026-11-30_torch2.11.0_triton3.6.0"]
    text = readme.read_text()
    assert "NVIDIA H200" in text and "| met |" in text and "OLD SECTION" not in text and text.endswith("## Testing\n")
    assert "| layer_norm | ViT-B/16 B=256 L=197 w768 | bfloat16 | fwd+bwd | 0.500 ms | 2.00x |" in text
    assert "CPU rehearsal" in summary.suite_markdown(_results(True))


def test_records_are_merged_as_they_come_and_partial_lines_wait(tmp_path):
    run = check.Run(str(tmp_path), budget_s=60)
    records, status = tmp_path / "r.jsonl", {}
    row = {"kind": "row", "family": "layer_norm", "case": "c µs", "impl": "clipfast", "mode": "fwd",
           "dtype": "float16", "ms_median": 1.0, "error": None}
    line = json.dumps(row, ensure_ascii=False)
    records.write_bytes((line + "\n" + line[:10]).encode())
    offsets = {str(records): 0}
    assert run._ingest("headline_kernels", offsets, status)
    assert len(run.data["rows"]) == 1 and run.data["rows"][0]["step"] == "headline_kernels"
    with open(records, "ab") as f:
        f.write((line[10:] + "\n" + json.dumps({"kind": "collected", "count": 3}) + "\n").encode())
    run._ingest("headline_kernels", offsets, status)
    assert [r["case"] for r in run.data["rows"]] == ["c µs", "c µs"] and status["collected"] == 3
    run.write()
    assert json.loads((tmp_path / "results.json").read_text())["rows"][1]["case"] == "c µs"
    assert (tmp_path / "summary.md").exists()


# ------------------------------------------------------------------------------------------------
# Preflight
# ------------------------------------------------------------------------------------------------

H100 = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5c3e0b2a-0000-0000-0000-000000000000)\n"


def test_preflight_checks_each_find_their_failure(tmp_path):
    assert preflight.check_compiler({}, which=lambda name: None).ok is False
    assert preflight.check_compiler({"CC": "/nonexistent/cc"}, which=lambda name: None).ok is False
    assert "CC=/nonexistent/cc" in preflight.check_compiler({"CC": "/nonexistent/cc"}).detail  # CC alone counts
    found = preflight.check_compiler({}, which=lambda name: "/usr/bin/clang" if name == "clang" else None)
    assert found.ok and found.detail == "/usr/bin/clang"
    missing = preflight.check_python_h(str(tmp_path))
    assert missing.ok is False and "Python.h" in missing.detail and str(tmp_path) in missing.detail
    (tmp_path / "Python.h").write_text("")
    assert preflight.check_python_h(str(tmp_path)).ok
    two = H100 + "GPU 1: NVIDIA H200 (UUID: GPU-1)\n"
    assert preflight.listed_gpus(two) == ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]
    assert preflight.listed_gpus("No devices were found\n") == [] and preflight.listed_gpus(None) == []
    hidden = preflight.check_gpu_visible(H100, cuda_available=False, torch_info="torch 2.11.0+cpu")
    assert hidden.ok is False and "nvidia-smi lists 1 GPU(s) (NVIDIA H100 80GB HBM3)" in hidden.detail
    assert preflight.check_gpu_visible(None, cuda_available=False).ok
    assert preflight.check_gpu_visible(H100, cuda_available=True).ok
    ldconfig = "\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1\n"
    assert preflight.check_libcuda(ldconfig, {}, exists=lambda p: p.endswith("libcuda.so.1")).ok
    assert preflight.check_libcuda(ldconfig, {}, exists=lambda p: False).ok is False
    assert preflight.check_libcuda("", {"LD_LIBRARY_PATH": "/a:/b"}, exists=lambda p: p == "/b/libcuda.so.1").ok
    launch = preflight.check_launch([sys.executable, "-c", "print('launch failed on cuda: boom'); raise SystemExit(1)"],
                                    dict(os.environ))
    assert launch.ok is False and launch.detail.endswith("launch failed on cuda: boom")
    slow = preflight.check_launch([sys.executable, "-c", "import time; time.sleep(30)"], dict(os.environ), timeout=1)
    assert slow.ok is False and "within 1s" in slow.detail


@pytest.mark.parametrize("broken", ["compiler", "python_h", "gpu_visible"])
def test_preflight_stops_at_the_first_failure_with_a_one_line_reason(tmp_path, broken):
    """Missing compiler, missing Python.h, a GPU that nvidia-smi lists but torch cannot use: each stops the
    run with its reason before the kernel launch (whose child would leave a marker file)."""
    marker = tmp_path / "launched"
    launch = [sys.executable, "-c", f"open({str(marker)!r}, 'w').close(); print('ok')"]
    include = tmp_path / "include"
    include.mkdir()
    if broken != "python_h":
        (include / "Python.h").write_text("")
    result = preflight.run_preflight(
        rehearsal=True, launch_argv=launch, launch_env=dict(os.environ), env={}, include_dir=str(include),
        which=(lambda name: None) if broken == "compiler" else (lambda name: f"/usr/bin/{name}"),
        listing=H100, cuda_available=False, ldconfig="")
    assert result["ok"] is False and result["reason"].startswith(f"preflight {broken}: ")
    assert "\n" not in result["reason"] and result["checks"][-1]["name"] == broken
    assert not marker.exists()
    # without a GPU listed, the rehearsal only warns about the compiler and Python.h, and launches
    result = preflight.run_preflight(rehearsal=True, launch_argv=launch, launch_env=dict(os.environ), env={},
                                     include_dir=str(include), which=lambda name: None, listing=None,
                                     cuda_available=False)
    assert result["ok"] and marker.exists()
    assert [c["name"] for c in result["checks"]] == ["compiler", "python_h", "gpu_visible", "libcuda", "launch"]
    assert result["checks"][0]["ok"] is False and result["checks"][0]["fatal"] is False


@pytest.mark.skipif(ON_GPU, reason="needs torch without CUDA")
def test_gpu_listed_but_not_usable_stops_the_run_without_a_rehearsal(tmp_path, monkeypatch):
    """The check where nvidia-smi lists a GPU that torch does not see: it stops at once with the one-line
    reason in results.json and summary.md (exit code 3), and runs no step of the CPU rehearsal."""
    import signal

    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\nprintf '{H100.strip()}\\n'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "out"
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert check.main_run(str(out), 60) == 3
    finally:
        signal.signal(signal.SIGTERM, handler)
    data = json.loads((out / "results.json").read_text())
    assert data["stopped"].startswith("preflight gpu_visible: nvidia-smi lists 1 GPU(s) (NVIDIA H100 80GB HBM3)")
    assert data["steps"] == [] and data["tests"] == [] and data["rows"] == [] and data["processes"] == []
    assert [c["name"] for c in data["preflight"]["checks"]] == ["compiler", "python_h", "gpu_visible"]
    assert "Stopped: preflight gpu_visible" in (out / "summary.md").read_text()
    assert "STOPPED: preflight gpu_visible" in (out / "log.txt").read_text()


# ------------------------------------------------------------------------------------------------
# A crash costs one case, not the rest of its process's cases
# ------------------------------------------------------------------------------------------------

PYTEST_LANE = """
def test_a():
    pass

def test_b():
    pass

def test_c():
    pass
"""


def test_a_cuda_error_is_rerun_alone_and_the_rest_runs_in_a_fresh_process(tmp_path, monkeypatch):
    """A pytest step whose second test raises a (simulated) CUDA error: the shard stops there, the test is
    rerun alone with CUDA_LAUNCH_BLOCKING=1 (both errors recorded), and the third test runs in a new process."""
    (tmp_path / "lane").mkdir()
    (tmp_path / "lane" / "test_lane.py").write_text(PYTEST_LANE)
    monkeypatch.setenv("CLIPFAST_SUITE_CRASH", "cuda:^correctness/.*::test_b$")
    run = check.Run(str(tmp_path), budget_s=60)
    run.workers = 1
    run.run_step(steps.Step("correctness", "pytest", 1.0, (str(tmp_path / "lane"),)), last=True)
    tests = {t["nodeid"].rsplit("::", 1)[-1]: t for t in run.data["tests"]}
    assert [t["outcome"] for t in (tests["test_a"], tests["test_b"], tests["test_c"])] == ["passed", "failed", "passed"]
    assert len(run.data["tests"]) == 3  # the rerun's outcome is in the crash record, not counted twice
    [crash] = run.data["crashes"]
    assert crash["case"].endswith("::test_b") and crash["respawned"] is True
    assert "simulated" in crash["error"] and "CUDA_LAUNCH_BLOCKING=0" in crash["error"]
    assert crash["rerun"]["env"] == "CUDA_LAUNCH_BLOCKING=1" and "CUDA_LAUNCH_BLOCKING=1" in crash["rerun"]["error"]
    roles = [(p["role"], p["pid"]) for p in run.data["processes"]]
    assert [r for r, _ in roles] == ["run", "rerun", "respawn"] and len({p for _, p in roles}) == 3
    assert tests["test_a"]["pid"] == tests["test_b"]["pid"] == roles[0][1] == crash["pid"]
    assert tests["test_c"]["pid"] == roles[2][1] and crash["rerun"]["pid"] == roles[1][1]
    assert run.data["steps"][0]["collected"] == 3 and "1 crash" in run.data["steps"][0]["status"]
    assert "Crashed processes" in summary.suite_markdown(run.data)


# ------------------------------------------------------------------------------------------------
# The rehearsal of the whole command
# ------------------------------------------------------------------------------------------------

CRASHED = "model: tiny image encoding B=2"  # the headline_model step's first case, made to crash in the rehearsal


@pytest.mark.skipif(ON_GPU, reason="the rehearsal is the CPU stand-in for the GPU run")
def test_cpu_rehearsal_of_the_gpu_check(tmp_path):
    """``bash bench/gpu_suite.sh OUT`` end to end on CPU: the preflight, then every step (within a small
    budget); the output respects the return limits (at most 8 files, nothing deeper than two folders), and the
    results hold tests, compile launches and benchmark rows, each with the pid of the process that ran it.
    One case is made to kill its process: the next case runs in a fresh process, and the case is rerun alone
    with CUDA_LAUNCH_BLOCKING=1."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, CLIPFAST_SUITE_BUDGET_S=os.environ.get("CLIPFAST_REHEARSAL_S", "40"),
               CLIPFAST_SUITE_CRASH=f"exit:^headline_model/{CRASHED}$")
    env.pop("TRITON_INTERPRET", None)  # the command must set it up itself
    t0 = time.time()
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_suite.sh"), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    files = [os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs]
    assert len(files) <= 8 and all(f.count(os.sep) <= 1 for f in files), files
    assert {"results.json", "summary.md", "log.txt", "junit.xml"} <= set(files)
    data = json.loads((out / "results.json").read_text())
    # the preflight ran first, the tiny kernel launched through the interpreter
    assert data["preflight"]["ok"] and [c["name"] for c in data["preflight"]["checks"]] == [
        "compiler", "python_h", "gpu_visible", "libcuda", "launch"]
    assert data["preflight"]["checks"][-1]["ok"] and "interpreter" in data["preflight"]["checks"][-1]["detail"]
    ran = [s["name"] for s in data["steps"] if not s.get("background")]
    assert data["rehearsal"] is True and ran == [s.name for s in steps.STEPS]
    assert [s["name"] for s in data["steps"] if s.get("background")] == [steps.BACKGROUND_STEP.name]
    assert all("status" in s for s in data["steps"])
    assert data["warm"] and data["tests"] and data["rows"], (data["steps"], proc.stdout[-2000:])
    assert not [t for t in data["tests"] if t["outcome"] in ("failed", "error")]
    # the headline model's first step planned by `clipfast warm` (compiled on a GPU), beside the kernel cases
    [model_warm] = [w for w in data["warm"] if w["impl"] == "clipfast warm"]
    assert model_warm["error"] is None and model_warm["arch"] == "sm_90", model_warm
    assert 0 < model_warm["distinct_compiles"] <= 32 and model_warm["launches"] > model_warm["distinct_compiles"]
    # the kernel-config table step ran (on a GPU its winners are the table the next commit ships)
    table = data["autotune_table"]
    assert table["error"] is None and table["table"] is None and "no CUDA device" in table["note"], table
    crashed = lambda r: f"{r['family']}: {r['case']}" == CRASHED  # noqa: E731
    assert not [r for r in data["rows"] if r.get("error") and r["impl"] in ("clipfast", "eager") and not crashed(r)]
    # every result names its process; every step ran in processes of its own
    assert all(r.get("pid") for r in data["rows"] + data["tests"] + data["warm"])
    pids = {s: {p["pid"] for p in data["processes"] if p["step"] == s} for s in {p["step"] for p in data["processes"]}}
    assert sum(len(p) for p in pids.values()) == len(set().union(*pids.values())) == len(data["processes"])
    # the crash: pinned on its case, rerun alone with CUDA_LAUNCH_BLOCKING=1, the next case in a fresh process
    [crash] = data["crashes"]
    assert crash["step"] == "headline_model" and crash["case"] == CRASHED and crash["respawned"] is True
    assert "exit code 70" in crash["error"] and "exit code 70" in crash["rerun"]["error"]
    assert crash["rerun"]["env"] == "CUDA_LAUNCH_BLOCKING=1"
    model = [p for p in data["processes"] if p["step"] == "headline_model"]
    assert [p["role"] for p in model] == ["run", "rerun", "respawn"]
    assert model[0]["pid"] == crash["pid"] and model[1]["pid"] == crash["rerun"]["pid"]
    assert model[1]["env"] == "CUDA_LAUNCH_BLOCKING=1" and model[1]["case"] == CRASHED
    after = [r for r in data["rows"] if r["step"] == "headline_model" and not crashed(r)]
    assert after and all(r["error"] is None and r["pid"] == model[2]["pid"] for r in after), after
    # the correctness step ran the bf16 checks of every family first (skipped here: the interpreter)
    [shard] = data["correctness_plan"].values()
    bf16 = [n for n in shard if n.endswith("-bf16]") or n.endswith("[bf16]")]
    assert shard[:len(bf16)] == bf16
    for family in ("attention", "mlp", "layer_norm", "contrastive_losses", "varlen_attention", "patch_embed"):
        assert any(f"test_{family}" in n for n in bf16), family
    assert 0 < data["elapsed_s"] <= time.time() - t0
    text = (out / "summary.md").read_text()
    assert "CPU rehearsal" in text and "## Preflight" in text and "CUDA_LAUNCH_BLOCKING=1" in text
