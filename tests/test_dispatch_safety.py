"""The dispatcher inside real training code: ``auto`` mode's tuning never runs a collective (a rank that meets
a new bucket alone never blocks), never draws from the caller's random generators, works under activation
checkpointing (non-reentrant, reentrant, composable) and saved-tensor hooks, and ``torch`` mode covers every
op, packed attention included.

Tuning runs on CPU tensors here through the dispatcher's test hook (a ``Tuner`` with ``devices=("cpu",)`` and
a table timer); the ops take their eager-fallback path, which is all the selection logic needs."""
import copy
import json
import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.checkpoint import checkpoint

import clipfast
from clipfast.dispatching import modes as dispatch_modes
from clipfast.dispatching import specs as dispatch_specs
from clipfast.dispatching import tuner as dispatch_tuner
from clipfast.dispatching.modes import KERNEL
from clipfast.dispatching.specs import Candidate, OpSpec
from clipfast.dispatching.tuner import Tuner
from clipfast.kernels import runtime
from tests.numerics import assert_op_matches
from tests.test_dispatch import Block, FakeTimer, _fresh, cpu_tuner, eager_ops, launches  # noqa: F401  (fixtures)

# the eager MLP is timed fastest, the rest keep clipfast's path: both kinds of choice are exercised
TIMES = {KERNEL: 1.0, "torch": 2.0, "hybrid": 0.5, "sdpa_flash": 9.0, "sdpa_cudnn": 9.0, "sdpa_efficient": 9.0,
         "clipfast_chunk256": 9.0}


def _blocks(n=2, width=32):
    torch.manual_seed(0)
    ref = torch.nn.Sequential(*[Block(width) for _ in range(n)])
    fast = copy.deepcopy(ref)
    clipfast.patch(fast)
    return fast


def _train_step(model, x, wrap):
    for p in model.parameters():
        p.grad = None
    h = x
    for block in model:
        h = wrap(block, h)
    h.square().mean().backward()
    return h.detach(), [p.grad.clone() for p in model.parameters()]


CHECKPOINTS = {
    "non_reentrant": lambda block, h: checkpoint(block, h, use_reentrant=False),
    "reentrant": lambda block, h: checkpoint(block, h, use_reentrant=True),
    "no_checkpoint": lambda block, h: block(h),
}


@pytest.mark.parametrize("how", sorted(CHECKPOINTS))
def test_first_tuned_step_under_activation_checkpointing(eager_ops, how):
    """The first step tunes every op inside the checkpointed blocks and matches the same step in kernel mode."""
    model = _blocks()
    x = torch.randn(3, 5, 32, requires_grad=True)
    with clipfast.dispatch("kernel"):
        expected_out, expected_grads = _train_step(model, x, CHECKPOINTS[how])
    timer = cpu_tuner(TIMES)
    with clipfast.dispatch("auto"):
        for _ in range(2):  # the first step tunes, the second runs the choices
            out, grads = _train_step(model, x, CHECKPOINTS[how])
            torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
            for g, e in zip(grads, expected_grads):
                torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    assert ("mlp", "hybrid") in timer.calls and ("layer_norm", KERNEL) in timer.calls
    assert "hybrid" in dispatch_tuner._chosen_names.values()


def test_composable_checkpoint_recipe_from_the_readme(eager_ops):
    from torch.distributed._composable import checkpoint as composable_checkpoint

    model = _blocks()
    for block in model:
        composable_checkpoint(block)
    x = torch.randn(2, 7, 32, requires_grad=True)
    with clipfast.dispatch("kernel"):
        expected_out, expected_grads = _train_step(model, x, lambda b, h: b(h))
    cpu_tuner(TIMES)
    with clipfast.dispatch("auto"):
        out, grads = _train_step(model, x, lambda b, h: b(h))
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_tuning_saves_nothing_through_the_callers_saved_tensor_hooks(eager_ops):
    """A user's pack hook (CPU offloading, a checkpoint's counter) sees only the model's own tensors."""
    model = _blocks(n=1)
    x = torch.randn(2, 5, 32, requires_grad=True)
    packed = {"kernel": 0, "auto": 0}
    cpu_tuner({**TIMES, "hybrid": 9.0})  # clipfast's path wins everywhere: the model saves the same tensors
    for mode in ("kernel", "auto"):
        def pack(t, mode=mode):
            packed[mode] += 1
            return t
        with clipfast.dispatch(mode), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model[0](x).sum().backward()
    assert dispatch_tuner.tune_records, "nothing was tuned"
    assert packed["auto"] == packed["kernel"] > 0, packed


def test_tuning_leaves_every_global_rng_untouched(eager_ops):
    model = _blocks(n=1)
    x = torch.randn(2, 5, 32, requires_grad=True)
    cpu_tuner(TIMES)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    with clipfast.dispatch("auto"):
        model[0](x).sum().backward()
        loss = clipfast.clip_loss(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(),
                                  torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), 1.0)
        loss.backward()
    assert dispatch_tuner.tune_records, "nothing was tuned"
    assert torch.equal(torch.get_rng_state(), before)


def test_a_bucket_first_met_inside_a_backward_pass_is_not_timed_there(eager_ops):
    """A reentrant checkpoint recomputes its forward with gradients inside the backward pass: a bucket met
    there for the first time runs clipfast's path untimed and is tuned at its next call outside."""
    model = _blocks(n=1)
    x = torch.randn(2, 5, 32, requires_grad=True)
    timer = cpu_tuner(TIMES)
    with clipfast.dispatch("auto"):
        checkpoint(model[0], x, use_reentrant=True).sum().backward()
        train_keys = [k for k in dispatch_tuner._chosen_names if k[2]]
        assert not train_keys, train_keys  # the original forward ran without grad; the recompute tuned nothing
        timed = len(timer.calls)
        model[0](x).sum().backward()
    assert len(timer.calls) > timed and any(k[2] for k in dispatch_tuner._chosen_names)


# ----------------------------------------------------------------------------------------------
# Distributed: no collective on the hot path; agreement at an explicit call
# ----------------------------------------------------------------------------------------------

def _rank_worker(rank, init_file, out_dir):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=30))
        os.environ["CLIPFAST_CACHE_DIR"] = os.path.join(out_dir, f"cache{rank}")
        spec = OpSpec("toy", lambda x: (dispatch_specs.bucket(x.shape[0]),), [
            Candidate(KERNEL, None), Candidate("torch", lambda x: x * 2), Candidate("fast", lambda x: x + x)],
            "torch", lambda x: x * 2)
        dispatch_specs.specs()
        dispatch_specs.register(spec)
        # the ranks' timers disagree: rank 0 finds "torch" fastest, rank 1 "fast"
        ms = [{KERNEL: 3.0, "torch": 1.0, "fast": 2.0}, {KERNEL: 3.0, "torch": 2.0, "fast": 1.0}][rank]
        dispatch_tuner.set_tuner(Tuner(timer=FakeTimer(ms), devices=("cpu",)))
        dispatch_modes.set_dispatch("auto")
        dispatch_tuner.route("toy", (torch.randn(4, 8),))         # both ranks: a training step
        if rank == 0:
            dispatch_tuner.route("toy", (torch.randn(64, 8),))    # rank 0 alone: evaluation at a new bucket
        own = dict(dispatch_tuner._chosen_names)
        dist.barrier()
        taken = clipfast.sync_dispatch()                       # every rank, at a point all reach
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"own": sorted(own.values()), "synced": sorted(dispatch_tuner._chosen_names.values()),
                       "taken": taken}, f)
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_a_bucket_met_by_one_rank_alone_never_blocks_and_ranks_agree_when_asked(tmp_path):
    try:
        mp.spawn(_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    except Exception as exc:
        pytest.fail(f"a rank failed: {exc}\n" + "\n".join(p.read_text() for p in tmp_path.glob("*.err")))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["own"] == ["torch", "torch"] and ranks[1]["own"] == ["fast"]  # each rank decided alone
    assert ranks[0]["synced"] == ranks[1]["synced"] == ["torch", "torch"]       # then took rank 0's choices
    assert ranks[0]["taken"] == 0 and ranks[1]["taken"] == 2


def test_sync_dispatch_outside_distributed_is_a_no_op():
    assert clipfast.sync_dispatch() == 0


# ----------------------------------------------------------------------------------------------
# torch mode: every op, packed attention included
# ----------------------------------------------------------------------------------------------

def _packed(lengths, heads=2, dim=16, dtype=torch.float32):
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(total, heads, dim, dtype=dtype) for _ in range(3))
    return q, k, v, cu, max(lengths)


def test_torch_mode_runs_packed_attention_without_a_launch(launches):
    q, k, v, cu, longest = _packed([5, 1, 9, 3])
    with clipfast.dispatch("torch"):
        out = clipfast.flash_attention_varlen(q, k, v, cu, cu, longest, longest, is_causal=True)
    assert launches[0] == 0
    with clipfast.dispatch("kernel"):
        expected = clipfast.flash_attention_varlen(q, k, v, cu, cu, longest, longest, is_causal=True)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)


def test_torch_mode_unpadded_text_tower_launches_nothing(launches):
    model = clipfast.models.create("tiny")
    clipfast.patch(model)
    text = torch.randint(1, model.vocab_size - 1, (3, model.context_length))
    for b, eot in enumerate((4, 9, 2)):
        text[b, eot] = model.vocab_size - 1  # the argmax token ends each prompt
        text[b, eot + 1:] = 0
    with clipfast.dispatch("torch"):
        features = model.encode_text(text)
    assert launches[0] == 0
    with clipfast.dispatch("kernel"):
        expected = model.encode_text(text)
    assert launches[0] > 0
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_padded_sdpa_candidate_for_packed_attention_matches_float64(causal, dtype):
    """The ``torch`` candidate of packed attention (the op's eager reference: scatter to a padded batch,
    SDPA with a key-padding mask, gather) against SDPA run on each sequence alone in float64: output and
    every gradient."""
    from clipfast.ops.attention_varlen import reference_attention_varlen

    lengths = [7, 1, 12, 3, 1]
    q, k, v, cu, longest = _packed(lengths, heads=3, dim=16)
    bounds = cu.tolist()

    def torch_candidate(q, k, v):
        return reference_attention_varlen(q, k, v, cu, cu, longest, longest, causal, 0.25)

    def reference(q, k, v):
        outs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
            o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=0.25)
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs)

    assert_op_matches("varlen torch candidate", torch_candidate, reference, [q, k, v], dtype)


def test_patch_report_on_cpu_names_the_eager_reference_without_the_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the CPU wording")
    model = _blocks(n=1)
    monkeypatch.setattr(runtime, "INTERPRET", False)
    with clipfast.dispatch("auto"):
        assert "eager PyTorch reference on CPU" in str(clipfast.patch(model))
    monkeypatch.setattr(runtime, "INTERPRET", True)
    with clipfast.dispatch("auto"):
        assert "clipfast kernels (CPU: Triton interpreter)" in str(clipfast.patch(model))
