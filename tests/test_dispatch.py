"""The dispatcher: modes, measured choice with an injected timer, buckets, the disk cache, the tuning-time
bound, torch mode launching nothing from clipfast.kernels, torch.compile, the CLI."""
import json
import os
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import clipfast
from clipfast.dispatching import cache as dispatch_cache
from clipfast.dispatching import modes as dispatch_modes
from clipfast.dispatching import specs as dispatch_specs
from clipfast.dispatching import tuner as dispatch_tuner
from clipfast.cli import main
from clipfast.dispatching.modes import KERNEL
from clipfast.dispatching.specs import Candidate, OpSpec
from clipfast.dispatching.tuner import Tuner
from clipfast.kernels import environment, runtime


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    """Every test: its own cache dir, empty memory cache, the mode and tuner restored afterwards."""
    monkeypatch.setenv("CLIPFAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(environment, "_warned", {k for k in environment._warned if not k.startswith("dispatch_")})
    dispatch_tuner.clear_memory_cache()
    mode, tuner = dispatch_modes.get_dispatch(), dispatch_tuner._tuner
    yield
    dispatch_modes.set_dispatch(mode)
    dispatch_tuner.set_tuner(tuner)
    dispatch_tuner.clear_memory_cache()


class FakeTimer:
    """Times from a table instead of the clock; records what it was asked to time."""

    def __init__(self, ms: dict, clock=None, seconds_per_call=0.0):
        self.ms, self.calls, self.clock, self.seconds = ms, [], clock, seconds_per_call

    def __call__(self, step, *, op, name, share_s):
        self.calls.append((op, name))
        if self.clock is not None:
            self.clock.now += self.seconds
        return self.ms[name]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def cpu_tuner(ms, budget_s=600.0):
    timer = FakeTimer(ms)
    dispatch_tuner.set_tuner(Tuner(timer=timer, devices=("cpu",), budget_s=budget_s))
    return timer


@pytest.fixture
def eager_ops(monkeypatch):
    """The ops' eager-fallback path (the selection logic does not need the interpreter)."""
    monkeypatch.setattr(runtime, "INTERPRET", False)


@pytest.fixture
def toy_op():
    """An op whose candidates raise, return NaN, or are fine, registered for one test."""
    def boom(x):
        raise RuntimeError("no kernel for this case")

    spec = OpSpec("toy", lambda x: (dispatch_specs.bucket(x.shape[0]), x.shape[1]), [
        Candidate(KERNEL, None), Candidate("torch", lambda x: x * 2), Candidate("boom", boom),
        Candidate("nan", lambda x: x * float("nan")), Candidate("fast", lambda x: x + x)],
        "torch", lambda x: x * 2)
    dispatch_specs.specs()
    dispatch_specs.register(spec)
    yield spec
    dispatch_specs._specs.pop("toy")


# ----------------------------------------------------------------------------------------------
# Modes
# ----------------------------------------------------------------------------------------------

def test_modes_validate_and_restore():
    with pytest.raises(ValueError, match="'auto', 'kernel', 'torch'"):
        clipfast.set_dispatch("fastest")
    previous = clipfast.set_dispatch("torch")
    assert clipfast.get_dispatch() == "torch"
    with clipfast.dispatch("kernel"):
        assert clipfast.get_dispatch() == "kernel"
        with pytest.raises(ValueError):
            with clipfast.dispatch("bogus"):
                pass
        assert clipfast.get_dispatch() == "kernel"
    assert clipfast.get_dispatch() == "torch"
    clipfast.set_dispatch(previous)


def test_mode_from_environment(monkeypatch):
    monkeypatch.setenv("CLIPFAST_DISPATCH", "Torch")
    assert dispatch_modes._mode_from_env() == "torch"
    monkeypatch.setenv("CLIPFAST_DISPATCH", "never")
    with pytest.raises(ValueError, match="CLIPFAST_DISPATCH"):
        dispatch_modes._mode_from_env()


def test_auto_on_cpu_runs_clipfast_without_timing():
    timer = FakeTimer({})
    dispatch_tuner.set_tuner(Tuner(timer=timer))  # default devices: CUDA only
    with clipfast.dispatch("auto"):
        assert dispatch_tuner.route("layer_norm", (torch.randn(3, 8), None, None, 1e-5)) is None
    assert timer.calls == []


# ----------------------------------------------------------------------------------------------
# Measured choice
# ----------------------------------------------------------------------------------------------

def test_fastest_wins_and_is_run(eager_ops):
    timer = cpu_tuner({KERNEL: 2.0, "torch": 1.0})
    x, w, b = torch.randn(5, 16), torch.randn(16), torch.randn(16)
    with clipfast.dispatch("auto"):
        y = clipfast.layer_norm(x, w, b)
        assert dispatch_tuner.route("layer_norm", (x, w, b, 1e-5)).__name__ == "reference_layer_norm"
    assert sorted(timer.calls) == [("layer_norm", KERNEL), ("layer_norm", "torch")]
    torch.testing.assert_close(y, F.layer_norm(x, (16,), w, b))
    (record,) = dispatch_tuner.tune_records
    assert record.choice == "torch" and record.speedup() == 1.0


def test_kernel_wins_and_runs_inline(eager_ops):
    cpu_tuner({KERNEL: 1.0, "torch": 3.0})
    with clipfast.dispatch("auto"):
        assert dispatch_tuner.route("layer_norm", (torch.randn(5, 16), None, None, 1e-5)) is None
    assert dispatch_tuner.tune_records[0].speedup() == 3.0


def test_failing_and_non_finite_candidates_are_dropped_with_a_warning(toy_op):
    timer = cpu_tuner({KERNEL: 3.0, "torch": 2.0, "boom": 0.1, "nan": 0.2, "fast": 1.0})
    x = torch.randn(4, 8)
    with clipfast.dispatch("auto"), pytest.warns(RuntimeWarning) as warned:
        fn = dispatch_tuner.route("toy", (x,))
    torch.testing.assert_close(fn(x), x + x)
    messages = " ".join(str(w.message) for w in warned)
    assert "'boom' dropped (RuntimeError" in messages and "'nan' dropped (FloatingPointError" in messages
    assert ("toy", "boom") not in timer.calls and ("toy", "nan") not in timer.calls
    assert dispatch_tuner.tune_records[0].ms["boom"] is None


def test_buckets_and_grad_mode_key_the_choice(toy_op):
    timer = cpu_tuner({KERNEL: 3.0, "torch": 2.0, "boom": 9.0, "nan": 9.0, "fast": 1.0})
    with clipfast.dispatch("auto"), pytest.warns(RuntimeWarning):
        for rows in (5, 7, 8):  # one bucket (8)
            dispatch_tuner.route("toy", (torch.randn(rows, 8),))
        assert len(dispatch_tuner.tune_records) == 1
        dispatch_tuner.route("toy", (torch.randn(9, 8),))   # bucket 16
        dispatch_tuner.route("toy", (torch.randn(9, 4),))   # another width
        dispatch_tuner.route("toy", (torch.randn(9, 4, requires_grad=True),))  # forward + backward
        with torch.no_grad():
            dispatch_tuner.route("toy", (torch.randn(9, 4, requires_grad=True),))  # inference again: cached
    assert [r.key for r in dispatch_tuner.tune_records] == [
        "toy|float32|infer|8,8", "toy|float32|infer|16,8", "toy|float32|infer|16,4", "toy|float32|train|16,4"]
    assert dispatch_specs.bucket(1) == 1 and dispatch_specs.bucket(197) == 256 and dispatch_specs.bucket(256) == 256


def test_training_tuning_times_forward_and_backward_without_touching_grads(eager_ops):
    seen = []

    def timer(step, *, op, name, share_s):
        outs, grads = step()
        seen.append((name, [g is not None for g in grads]))
        return {KERNEL: 1.0, "torch": 2.0}[name]

    dispatch_tuner.set_tuner(Tuner(timer=timer, devices=("cpu",)))
    x, w = torch.randn(6, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    with clipfast.dispatch("auto"):
        clipfast.layer_norm(x, w, None).sum().backward()
    assert seen == [(KERNEL, [True, True]), ("torch", [True, True])]
    assert dispatch_tuner.tune_records[0].key.startswith("layer_norm|float32|train|")
    # tuning ran on detached copies: .grad holds exactly one backward's contribution
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    F.layer_norm(x2, (16,), w2).sum().backward()
    torch.testing.assert_close(w.grad, w2.grad)


def test_tuning_time_is_bounded(toy_op):
    clock = FakeClock()
    timer = FakeTimer({KERNEL: 5.0, "torch": 4.0, "boom": 1.0, "nan": 1.0, "fast": 0.5}, clock, seconds_per_call=1.0)
    dispatch_tuner.set_tuner(Tuner(timer=timer, clock=clock, budget_s=1.5, devices=("cpu",)))
    with clipfast.dispatch("auto"):
        fn = dispatch_tuner.route("toy", (torch.randn(4, 8),))
    assert timer.calls == [("toy", KERNEL), ("toy", "torch")]  # 2 s spent > 1.5 s: the rest is not timed
    rec = dispatch_tuner.tune_records[0]
    assert rec.choice == "torch" and rec.ms["fast"] is None and fn(torch.ones(1, 1)).item() == 2.0


def test_eager_loss_only_under_the_memory_cap(eager_ops, monkeypatch):
    from clipfast.dispatching import candidates

    timer = cpu_tuner({KERNEL: 9.0, "torch": 1.0})
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    monkeypatch.setattr(candidates, "EAGER_LOSS_MAX_LOGITS", 63)
    with clipfast.dispatch("auto"):
        clipfast.clip_loss(a, b, 2.0)
        assert timer.calls == []  # 64 logits > cap: the fused loss, nothing timed
        monkeypatch.setattr(candidates, "EAGER_LOSS_MAX_LOGITS", 64)
        loss = clipfast.siglip_loss(a, b, 2.0, -1.0)
    assert timer.calls == [("siglip_loss", KERNEL), ("siglip_loss", "torch")]
    with clipfast.dispatch("kernel"):
        torch.testing.assert_close(loss, clipfast.siglip_loss(a, b, 2.0, -1.0))


# ----------------------------------------------------------------------------------------------
# Disk cache
# ----------------------------------------------------------------------------------------------

def test_cache_is_written_reread_and_invalidated_by_a_version_change(toy_op, monkeypatch):
    ms = {KERNEL: 3.0, "torch": 2.0, "boom": 9.0, "nan": 9.0, "fast": 1.0}
    timer = cpu_tuner(ms)
    x = torch.randn(4, 8)
    with clipfast.dispatch("auto"), pytest.warns(RuntimeWarning):
        dispatch_tuner.route("toy", (x,))
    data = json.loads(open(dispatch_cache.cache_path()).read())
    (section,) = data["environments"].values()
    assert section["toy|float32|infer|4,8"]["choice"] == "fast"
    assert os.path.dirname(dispatch_cache.cache_path()) == os.environ["CLIPFAST_CACHE_DIR"]

    dispatch_tuner.clear_memory_cache()  # a new process: the choice comes from disk, nothing is timed
    timer.calls.clear()
    with clipfast.dispatch("auto"):
        assert dispatch_tuner.route("toy", (x,))(x).equal(x + x)
    assert timer.calls == []

    dispatch_tuner.clear_memory_cache()  # another clipfast version: tuned again, in a new section
    real = dispatch_cache.versions
    monkeypatch.setattr(dispatch_cache, "versions", lambda: {**real(), "clipfast": "9.9.9"})
    ms["torch"] = 0.5
    with clipfast.dispatch("auto"):
        assert dispatch_tuner.route("toy", (x,))(x).equal(x * 2)
    assert ("toy", "torch") in timer.calls
    assert len(json.loads(open(dispatch_cache.cache_path()).read())["environments"]) == 2


# Distributed: tests/test_dispatch_safety.py (no collective on the hot path, agreement at sync_dispatch)


# ----------------------------------------------------------------------------------------------
# Whole models: torch mode launches nothing, kernel mode launches, torch.compile in every mode
# ----------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, width=32, heads=2):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 2 * width), gelu=nn.GELU(),
                                             c_proj=nn.Linear(2 * width, width)))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


@pytest.fixture
def launches(monkeypatch):
    """Counts Triton kernel launches (interpreter or GPU)."""
    import triton.runtime.jit as jit

    count = [0]
    classes = [jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:
        pass
    for cls in classes:
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            count[0] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(cls, "run", run)
    return count


def _block_and_patched():
    import copy

    ref = Block()
    fast = copy.deepcopy(ref)
    counts = clipfast.patch(fast).counts()
    assert counts.get("layer_norm") == 2 and counts.get("attention") == 1 and counts.get("mlp") == 1, counts
    return ref, fast


def test_torch_mode_launches_nothing_and_matches_the_unpatched_model(launches):
    ref, fast = _block_and_patched()
    x = torch.randn(2, 5, 32)
    with clipfast.dispatch("torch"):
        out = fast(x)
        loss = clipfast.clip_loss(out[:, 0], out[:, 1], 2.0) + clipfast.quick_gelu(out).sum()
        pixels, weight, cls, pos = torch.randn(1, 3, 8, 8), torch.randn(32, 3, 4, 4), torch.randn(32), torch.randn(5, 32)
        tokens = clipfast.patch_embed(pixels, weight, cls, pos)
        loss.backward()
    assert launches[0] == 0
    # torch mode runs SDPA, F.layer_norm and the eager MLP; the unpatched block nn.MultiheadAttention's own
    # path: different kernels, so the numerics standard against float64, not bitwise equality
    import copy

    from .numerics import check

    with torch.no_grad():
        problem = check("torch-mode block", out, ref(x), copy.deepcopy(ref).double()(x.double()), torch.float32,
                        reduction=2 * 32)
    assert problem is None, problem
    # the patch embedding's torch path is the same F.conv2d: bitwise
    patches = F.conv2d(pixels, weight, stride=4).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens, torch.cat([cls.expand(1, 1, 32), patches], 1) + pos, rtol=0, atol=0)


@pytest.mark.skipif(not runtime.INTERPRET and not torch.cuda.is_available(), reason="needs the interpreter or a GPU")
def test_kernel_mode_launches_the_kernels(launches):
    _, fast = _block_and_patched()
    with clipfast.dispatch("kernel"):
        fast(torch.randn(2, 5, 32))
    assert launches[0] >= 4  # two LayerNorms, attention, the fused MLP


@pytest.mark.parametrize("mode", ["kernel", "torch", "auto"])
def test_compile_fullgraph_in_every_mode(mode):
    ref, fast = _block_and_patched()
    x = torch.randn(2, 5, 32, requires_grad=True)
    cpu_tuner({KERNEL: 2.0, "torch": 1.0, "hybrid": 0.5})  # auto: PyTorch LayerNorm, hybrid MLP
    with clipfast.dispatch(mode):
        expected = fast(x)  # tunes (auto) outside the trace
        torch._dynamo.reset()
        out = torch.compile(fast, fullgraph=True, backend="aot_eager")(x)
        out.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, ref(x), rtol=1e-4, atol=1e-5)
    if mode == "auto":
        assert {r.op: r.choice for r in dispatch_tuner.tune_records} == {
            "layer_norm": "torch", "flash_attention": "torch", "mlp": "hybrid"}


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["auto", "kernel", "torch"])
def test_cuda_graph_capture_of_a_patched_forward(mode):
    """Once tuned, the forward path neither tunes nor synchronizes: it can be captured in a CUDA graph."""
    _, fast = _block_and_patched()
    fast = fast.cuda().half()
    x = torch.randn(4, 17, 32, device="cuda", dtype=torch.half)
    with clipfast.dispatch(mode), torch.no_grad():
        expected = fast(x)  # auto: tunes here, before the capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fast(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fast(x)
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(out, expected)


def test_compile_reads_the_choice_and_never_tunes_while_tracing(toy_op):
    timer = cpu_tuner({KERNEL: 3.0, "torch": 2.0, "boom": 9.0, "nan": 9.0, "fast": 1.0})

    def f(x):
        alt = dispatch_tuner.route("toy", (x,))
        return alt(x) if alt is not None else x * 3  # x * 3: "clipfast's path"

    x = torch.randn(4, 8)
    with clipfast.dispatch("auto"):
        torch._dynamo.reset()
        assert torch.compile(f, fullgraph=True, backend="eager")(x).equal(x * 3)  # untuned: clipfast, no timing
        assert timer.calls == [] and not dispatch_tuner._choices
        with pytest.warns(RuntimeWarning):
            f(x)  # tuned eagerly
        assert torch.compile(f, fullgraph=True, backend="eager")(x).equal(x + x)  # guards see the new choice
    torch._dynamo.reset()


def test_patch_report_names_what_the_modules_run(eager_ops):
    _, fast = _block_and_patched()
    with clipfast.dispatch("torch"):
        assert "mlp: 1 swapped (runs PyTorch" in str(clipfast.patch(fast))
    cpu_tuner({KERNEL: 2.0, "torch": 1.0, "hybrid": 0.5})
    with clipfast.dispatch("auto"):
        fast(torch.randn(2, 5, 32))
        text = str(clipfast.patch(fast))
    assert "mlp: 1 swapped (runs auto: hybrid x1)" in text and "layer_norm: 2 swapped (runs auto: torch x1)" in text


# ----------------------------------------------------------------------------------------------
# clipfast tune
# ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message")
def test_tune_without_gpu_has_nothing_to_time(capsys):
    assert main(["tune", "tiny"]) == 0
    assert "nothing to time" in capsys.readouterr().out


def test_tune_cli_times_every_op_with_the_host_clock(tmp_path, capsys, eager_ops):
    out = tmp_path / "tune.json"
    assert main(["tune", "tiny", "--batch", "2", "--train", "--cpu-timer", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    ops = {r["op"] for r in data["records"]}
    assert {"layer_norm", "flash_attention", "mlp", "patch_embed", "clip_loss"} <= ops, ops
    for r in data["records"]:
        assert r["choice"] in r["ms"] and r["ms"][r["choice"]] is not None
        assert r["speedup"] is None or r["speedup"] >= 1.0
    assert "choice" in text and "vs torch" in text and "(runs auto:" in text and "whole step: eager" in text
    assert set(data["step_ms"]) == {"eager", "clipfast (auto)"}
    assert os.path.exists(dispatch_cache.cache_path())
