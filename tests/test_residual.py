"""Residual rule: pre-LN blocks run the first residual add with ln_2 as one add_layer_norm and the second in
the fused MLP's epilogue. Patched vs unpatched vs float64 (forward and every gradient: input and each
parameter), state_dict, unpatch, and the paths that must fall back to the original forward."""
import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import clipfast
from clipfast import models
from clipfast.patching import is_fast

from .conftest import DEVICE, DTYPES
from .numerics import assert_op_matches, randn

# attention stays eager here (its own tests cover it): the rule must work with children patched or not
FAMILIES = dict(attention=False, patch_embed=False, layer_norm=True, mlp=True, residual=True)


def _functional(block):
    """(fn(x, *params) running ``block`` with the given parameters, parameter names)."""
    names = [n for n, _ in block.named_parameters()]

    def fn(x, *params):
        return torch.func.functional_call(block, dict(zip(names, params)), (x,))
    return fn, names


def _assert_block_matches(block, x, dtype, name, reference=None):
    """Patched vs the same block unpatched (in dtype) vs float64 (``reference``: a block with the same
    parameter names, default ``block``), input and every parameter gradient; LayerNorm parameters stay
    fp32 (CPU LayerNorm takes fp32 weights with fp32 statistics)."""
    patched = copy.deepcopy(block)
    report = clipfast.patch(patched, **FAMILIES)
    assert report.counts().get("residual") == 1, report
    assert is_fast(patched) and patched.state_dict().keys() == block.state_dict().keys()
    fused_fn, names = _functional(patched)
    eager_fn, _ = _functional(block)
    params = [p.detach() for p in block.parameters()]
    keep_fp32 = [i + 1 for i, n in enumerate(names) if n.startswith(("ln_1", "ln_2"))]
    reference_fn = _functional(reference)[0] if reference is not None else None
    assert_op_matches(name, fused_fn, eager_fn, [x, *params], dtype, param_dtype_inputs=keep_fp32,
                      reference_fn=reference_fn)
    return patched


def _reference_block(width=64, heads=2):
    return models.ResidualAttentionBlock(width, heads).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_block_matches_float64(dtype):
    block = _reference_block()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for ln in (block.ln_1, block.ln_2):
            ln.weight.add_(0.3 * torch.randn_like(ln.weight))
            ln.bias.add_(0.3 * torch.randn_like(ln.bias))
    x = randn(17, 2, 64, device=DEVICE, outliers=2)  # [L, N, D], 17 tokens
    _assert_block_matches(block, x, dtype, "reference ResidualAttentionBlock")


def test_fused_calls_are_the_ones_that_run(monkeypatch):
    """The patched block calls add_layer_norm once and the MLP with the residual; ln_2 and the MLP
    module's own forwards are not called."""
    from clipfast.patch_rules import residual as rule

    calls = []
    real_add_ln, real_mlp = rule.add_layer_norm, rule.fused_mlp
    monkeypatch.setattr(rule, "add_layer_norm", lambda *a, **k: calls.append("add_ln") or real_add_ln(*a, **k))
    monkeypatch.setattr(rule, "fused_mlp", lambda *a, **k: calls.append(("mlp", k["residual"] is not None))
                        or real_mlp(*a, **k))
    block = _reference_block()
    clipfast.patch(block, **FAMILIES)
    block.ln_2.register_forward_pre_hook(lambda *a: calls.append("ln_2 module"))
    x = randn(5, 1, 64, device=DEVICE)
    block(x)  # a hook on ln_2: the original forward runs (the hook must fire)
    assert calls == ["ln_2 module"]
    block.ln_2._forward_pre_hooks.clear()
    calls.clear()
    block(x)
    assert calls == ["add_ln", ("mlp", True)]


def test_without_the_mlp_family_the_residual_add_stays_outside(monkeypatch):
    block = _reference_block()
    x = randn(7, 2, 64, device=DEVICE)
    report = clipfast.patch(block, **{**FAMILIES, "mlp": False})
    assert report.counts() == {"residual": 1, "layer_norm": 2}
    with torch.no_grad():
        torch.testing.assert_close(block(x), clipfast.unpatch(block)(x), atol=1e-5, rtol=1e-5)


def test_autocast_runs_the_original_forward():
    block = _reference_block()
    patched = copy.deepcopy(block)
    clipfast.patch(patched, **{**FAMILIES, "mlp": False, "layer_norm": False})
    x = randn(5, 2, 64, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16), torch.no_grad():
        assert torch.equal(patched(x), block(x))


def test_tiny_model_state_dict_and_unpatch_exact():
    model = models.create("tiny").to(DEVICE)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    image = torch.randn(2, 3, 32, 32, device=DEVICE)
    text = torch.randint(1, 100, (2, 13), device=DEVICE)
    with torch.no_grad():
        ref = model(image, text)
    blocks = [m for m in model.modules() if type(m) is models.ResidualAttentionBlock]
    report = clipfast.patch(model, attention=False, patch_embed=False)
    assert report.counts()["residual"] == len(blocks) == 4
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        out = model(image, text)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    clipfast.unpatch(model)
    assert [type(m) for m in model.modules() if type(m).__name__ == "ResidualAttentionBlock"] == \
        [models.ResidualAttentionBlock] * 4
    assert all(a is b for a, b in zip([m for m in model.modules() if type(m) is models.ResidualAttentionBlock], blocks))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(image, text), ref))


def test_openai_clip_block_when_installed():
    from .test_models import _openai_clip_model

    openai = _openai_clip_model()
    block = openai.ResidualAttentionBlock(64, 2).to(DEVICE)
    x = randn(13, 2, 64, device=DEVICE)
    # float64 reference: the reference model's block (OpenAI's LayerNorm computes in fp32 at most)
    _assert_block_matches(block, x, torch.float32, "OpenAI ResidualAttentionBlock", reference=_reference_block())


def _open_clip_block(ls_init_value=None, act_layer=nn.GELU):
    transformer = pytest.importorskip("open_clip.transformer")
    return transformer.ResidualAttentionBlock(64, 2, ls_init_value=ls_init_value, act_layer=act_layer,
                                              batch_first=True).to(DEVICE)


@pytest.mark.parametrize("ls_init_value", [None, 0.5])
def test_open_clip_block_matches_float64(ls_init_value):
    """open_clip (batch-first, erf GELU): with LayerScale the MLP's residual add stays outside the GEMM."""
    block = _open_clip_block(ls_init_value)
    x = randn(2, 11, 64, device=DEVICE)
    patched = _assert_block_matches(block, x, torch.float32, f"open_clip block ls={ls_init_value}")
    # called as open_clip's Transformer (and its gradient checkpointing) calls it: positional mask
    mask = torch.full((11, 11), float("-inf"), device=DEVICE).triu(1)
    with torch.no_grad():
        torch.testing.assert_close(patched(x, None, None, mask), block(x, None, None, mask), atol=1e-5, rtol=1e-5)


def test_unknown_block_forward_and_layer_norm_are_left_alone():
    class ResidualAttentionBlock(models.ResidualAttentionBlock):
        def forward(self, x):  # post-LN: not the structure the rule knows
            x = self.ln_1(x + self.attention(x))
            return self.ln_2(x + self.mlp(x))

    report = clipfast.patch(ResidualAttentionBlock(64, 2), **FAMILIES)
    assert "residual" not in report.counts()

    block = _reference_block()

    class ScaledNorm(nn.LayerNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    block.ln_2 = ScaledNorm(64)
    report = clipfast.patch(block, **{**FAMILIES, "layer_norm": False})
    assert "residual" not in report.counts()
    assert any("unknown semantics" in s.reason for s in report.skipped)


def test_sequential_resblocks_in_a_custom_container():
    """A block reached through any container is patched (the rule matches the block itself)."""
    net = nn.Sequential(OrderedDict(blocks=nn.Sequential(_reference_block(), _reference_block())))
    report = clipfast.patch(net, **FAMILIES)
    assert report.counts()["residual"] == 2
