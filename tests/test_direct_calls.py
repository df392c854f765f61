"""Outside tracing, ops call their implementation directly instead of through the registered custom op
(``clipfast/ops/_custom_op.py``). The direct call must compute exactly what the custom op computes, forward
and every gradient; tracing, dispatch modes and tensor subclasses must still see the custom op; and the
cheap common-case argument check must never admit what the full checks reject."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import clipfast
from clipfast.dispatching import modes as dispatch_modes
from clipfast.benchmarks import overhead
from clipfast.ops import _custom_op


def _run(case, inputs, train):
    """Outputs and (train) the gradients of every input that requires grad, from fresh leaves."""
    leaves = {k: v.detach().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    with torch.set_grad_enabled(train):
        out = case.clipfast(**leaves)
    outs = out if isinstance(out, tuple) else (out,)
    grads = ()
    if train:
        wanted = [v for v in leaves.values() if v.requires_grad]
        total = sum((o.float() * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum() for o in outs)
        grads = torch.autograd.grad(total, wanted)
    return [o.detach() for o in outs], list(grads)


@pytest.mark.parametrize("interpret", [True, False], ids=["kernels", "eager-fallback"])
@pytest.mark.parametrize("case", overhead.CASES, ids=[c.op for c in overhead.CASES])
def test_direct_call_matches_the_custom_op(case, interpret):
    torch.manual_seed(0)
    fallback = overhead.eager_fallback() if not interpret else dispatch_modes.dispatch("kernel")
    with fallback, dispatch_modes.dispatch("kernel"):
        for train in (False, True):
            inputs = case.make(torch.device("cpu"), train)
            direct = _run(case, inputs, train)
            previous = _custom_op.set_direct_calls(False)
            try:
                registered = _run(case, inputs, train)
            finally:
                _custom_op.set_direct_calls(previous)
            for a, b in zip(direct[0] + direct[1], registered[0] + registered[1], strict=True):
                assert torch.equal(a, b), (case.op, train)
            # the custom op refuses outputs that alias an input; the direct call does not check, so here
            with torch.no_grad():
                outs = case.clipfast(**inputs)
            storages = {t.untyped_storage().data_ptr() for t in inputs.values() if t.numel()}
            for out in outs if isinstance(outs, tuple) else (outs,):
                assert out.untyped_storage().data_ptr() not in storages, case.op


class _Seen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_and_compile_still_see_the_custom_op():
    x, w = torch.randn(3, 8), torch.randn(8)
    with _Seen() as seen:
        clipfast.layer_norm(x, w)
    assert "clipfast.layer_norm_fwd.default" in seen.ops
    graph_ops = []

    def backend(gm, example_inputs):
        graph_ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    torch.compile(lambda x: clipfast.layer_norm(x, w), backend=backend, fullgraph=True)(x)
    assert any("layer_norm_fwd" in t for t in graph_ops), graph_ops


def test_direct_call_decision():
    x = torch.randn(2)
    assert not _custom_op.needs_custom_op((x, torch.nn.Parameter(x), None, 1.0, 2, "s", True))

    class Sub(torch.Tensor):
        pass

    assert _custom_op.needs_custom_op((x, x.as_subclass(Sub)))
    with _Seen():
        assert _custom_op.needs_custom_op((x,))
    previous = _custom_op.set_direct_calls(False)
    try:
        assert _custom_op.needs_custom_op((x,))
    finally:
        _custom_op.set_direct_calls(previous)


def test_keyword_arguments_go_through_the_custom_op():
    from clipfast.ops.mlp import activation_fwd

    x = torch.randn(5)
    torch.testing.assert_close(activation_fwd(x, activation="quick_gelu"), activation_fwd(x, "quick_gelu"))


def test_double_backward_still_raises():
    """The backward ops have no autograd formula: asking for a graph through them raises, as the custom
    op always did, instead of silently returning gradients that do not depend on the inputs."""
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    with overhead.eager_fallback():
        (gx,) = torch.autograd.grad(clipfast.layer_norm(x, w).square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError):
            gx.sum().backward()


META = torch.device("meta")


@pytest.mark.parametrize("call", [
    lambda: clipfast.layer_norm(torch.randn(2, 8), torch.randn(8, device=META)),
    lambda: clipfast.layer_norm(torch.randn(2, 8), torch.randn(7)),
    lambda: clipfast.layer_norm(torch.randn(2, 8).long()),
    lambda: clipfast.layer_norm(torch.randn(2, 8), [1.0] * 8),
    lambda: clipfast.add_layer_norm(torch.randn(2, 8), torch.randn(2, 8).half()),
    lambda: clipfast.mlp(torch.randn(2, 8), torch.randn(16, 8), None, torch.randn(8, 15), None),
    lambda: clipfast.mlp(torch.randn(2, 8), torch.randn(16, 8), None, torch.randn(8, 16), None, "relu"),
    lambda: clipfast.mlp(torch.randn(2, 8), torch.randn(16, 8), torch.randn(16, device=META), torch.randn(8, 16), None),
    lambda: clipfast.mlp(torch.randn(2, 8), torch.randn(16, 8), None, torch.randn(8, 16), None,
                         residual=torch.randn(2, 8).half()),
    lambda: clipfast.quick_gelu(torch.ones(3, dtype=torch.int32)),
    lambda: clipfast.flash_attention(*(torch.randn(1, 2, 4, 8),) * 2, torch.randn(1, 2, 5, 8)),
    lambda: clipfast.flash_attention(*(torch.randn(1, 2, 4, 8),) * 3, attn_mask=torch.ones(4, 4, dtype=torch.int64)),
    lambda: clipfast.flash_attention(*(torch.randn(1, 2, 4, 8),) * 3, scale="x"),
    lambda: clipfast.patch_embed(torch.randn(1, 3, 16, 16), torch.randn(8, 3, 4, 4), torch.randn(8),
                                 torch.randn(16, 8)),
    lambda: clipfast.patch_embed(torch.randn(1, 3, 15, 16), torch.randn(8, 3, 4, 4)),
    lambda: clipfast.clip_loss(torch.randn(4, 8), torch.randn(3, 8), 1.0),
    lambda: clipfast.clip_loss(torch.randn(4, 8), torch.randn(4, 8).half(), 1.0),
    lambda: clipfast.siglip_loss(torch.randn(4, 8), torch.randn(4, 8), 1.0, 0.0, label_offset=1),
])
def test_bad_arguments_are_still_rejected(call):
    with pytest.raises((TypeError, ValueError)):
        call()
