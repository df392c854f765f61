"""Residual rule: pre-LN transformer blocks -> fused residual adds.

A pre-LN block computes ``x1 = x + attn(ln_1(x))`` then ``x1 + mlp(ln_2(x1))``. The replacement runs
- the first residual add and ``ln_2`` as one ``clipfast.add_layer_norm`` (reads x and the attention output
  once, writes x1 and ln_2(x1)), and
- the second residual add in the epilogue of the fused MLP's projection GEMM (``clipfast.mlp(...,
  residual=x1)``) when the block's ``mlp`` is a fused MLP (the ``mlp`` family patched it) and nothing
  scales its output; otherwise ``x1 + mlp(ln_2(x1))`` as before.
Everything before (``ln_1``, the attention) runs through the block's own children, patched or not.

Blocks recognized by structure (class name ``ResidualAttentionBlock`` and the names its ``forward``
uses), so copies of the same code in other packages are covered:
- OpenAI CLIP, Chinese-CLIP's vision tower and the reference model (``clipfast.models``):
  ``forward(x)`` over ``attention``, ``ln_1``, ``mlp``, ``ln_2``;
- open_clip: ``forward(q_x, k_x=None, v_x=None, attn_mask=None)`` with ``ls_1``/``ls_2`` (LayerScale or
  Identity) and the optional cross-attention ``ln_1_kv``: ``ls_1`` is applied to the attention output
  before the fused add; a LayerScale ``ls_2`` keeps the MLP's residual add outside the GEMM.

The replacement is a subclass of the block's class sharing its children (``state_dict`` and unpatch are
exact). It runs the original forward under autocast (LayerNorm and MLP dtypes differ by module there),
when ``ln_2`` or ``mlp`` has hooks the fused calls would bypass, and when the attention output's dtype
differs from the residual stream's.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from clipfast.dispatching import add_layer_norm
from clipfast.kernels import layer_norm as layer_norm_kernel
from clipfast.nn.mlp import MLP, fused_mlp, sequential_mlp_forward
from clipfast.patch_rules.layer_norm import INPUT_DTYPE_SUBCLASSES
from clipfast.patch_rules.registry import PatchRule, Unsupported, clone_as, fast_subclass, register_rule

BLOCK_CLASS_NAME = "ResidualAttentionBlock"
#: the names each known block ``forward`` uses, in order (its ``__code__.co_names``)
OPENAI_FORWARD_NAMES = ("attention", "ln_1", "mlp", "ln_2")
OPEN_CLIP_FORWARD_NAMES = ("hasattr", "ln_1_kv", "ls_1", "attention", "ln_1", "ls_2", "mlp", "ln_2")

_FUSED_MLP_FORWARDS = (sequential_mlp_forward, MLP.forward)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _original_forward(block: nn.Module):
    return type(block).__bases__[0].forward


def _runs_fused(block: nn.Module, x: torch.Tensor) -> bool:
    """Whether this call may take the fused path (see the module docstring)."""
    return not (torch.is_autocast_enabled(x.device.type) or _hooked(block.ln_2) or _hooked(block.mlp))


def _residual_tail(block: nn.Module, x: torch.Tensor, attn_out: torch.Tensor,
                   ls_2: Optional[nn.Module] = None) -> torch.Tensor:
    """``x1 = x + attn_out``; ``x1 + ls_2(mlp(ln_2(x1)))`` with the fused add + LayerNorm and, where the MLP
    is fused and unscaled, the add in its projection's epilogue."""
    if attn_out.dtype != x.dtype:
        x1 = x + attn_out
        out = block.mlp(block.ln_2(x1))
        return x1 + (ls_2(out) if ls_2 is not None else out)
    ln = block.ln_2
    # contiguous rows (the kernel would copy a permuted stream, e.g. a text tower's first block, anyway;
    # done here, the op's outputs have the same strides under torch.compile's fake tensors as when run)
    x1, h = add_layer_norm(x.contiguous(), attn_out.contiguous(), ln.weight, ln.bias, ln.eps)
    mlp = block.mlp
    spec = getattr(mlp, "_clipfast_mlp", None)
    if spec is not None and type(mlp).forward in _FUSED_MLP_FORWARDS and ls_2 is None:
        fc_name, proj_name, activation = spec
        return fused_mlp(h, getattr(mlp, fc_name), getattr(mlp, proj_name), activation, residual=x1)
    out = mlp(h)
    return x1 + (ls_2(out) if ls_2 is not None else out)


def openai_block_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Forward of a patched OpenAI-style block (``x + attention(ln_1(x))``, then ``+ mlp(ln_2(.))``)."""
    if not _runs_fused(self, x):
        return _original_forward(self)(self, x)
    return _residual_tail(self, x, self.attention(self.ln_1(x)))


def open_clip_block_forward(self, q_x: torch.Tensor, k_x: Optional[torch.Tensor] = None,
                            v_x: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None):
    """Forward of a patched open_clip ``ResidualAttentionBlock`` (same signature as the original)."""
    if not _runs_fused(self, q_x):
        return _original_forward(self)(self, q_x, k_x, v_x, attn_mask)
    k_x = self.ln_1_kv(k_x) if hasattr(self, "ln_1_kv") and k_x is not None else None
    v_x = self.ln_1_kv(v_x) if hasattr(self, "ln_1_kv") and v_x is not None else None
    attn_out = self.ls_1(self.attention(q_x=self.ln_1(q_x), k_x=k_x, v_x=v_x, attn_mask=attn_mask))
    ls_2 = None if type(self.ls_2) is nn.Identity else self.ls_2
    return _residual_tail(self, q_x, attn_out, ls_2)


_FORWARDS = {OPENAI_FORWARD_NAMES: openai_block_forward, OPEN_CLIP_FORWARD_NAMES: open_clip_block_forward}


def _forward_names(cls: type) -> tuple:
    code = getattr(cls.forward, "__code__", None)
    return tuple(code.co_names) if code is not None else ()


def _match(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == BLOCK_CLASS_NAME and _forward_names(cls) in _FORWARDS


def _check_layer_norm(ln: nn.Module) -> None:
    """ln_2 must compute LayerNorm with fp32 statistics and return the input dtype outside autocast (what
    ``add_layer_norm`` does): nn.LayerNorm, or a subclass known to, or OpenAI's (same forward)."""
    ln = ln.__dict__.get("_clipfast_original", ln)
    cls = type(ln)
    if not isinstance(ln, nn.LayerNorm) or len(ln.normalized_shape) != 1:
        raise Unsupported(f"ln_2 is {cls.__qualname__}, not a LayerNorm over the last dimension")
    known = (cls.forward is nn.LayerNorm.forward or f"{cls.__module__}.{cls.__qualname__}" in INPUT_DTYPE_SUBCLASSES
             or (cls.__name__ == "LayerNorm" and _forward_names(cls) == ("dtype", "super", "forward", "type",
                                                                            "torch", "float32")))
    if not known:
        raise Unsupported(f"ln_2 is {cls.__module__}.{cls.__qualname__} with a forward of unknown semantics")
    if ln.normalized_shape[0] > layer_norm_kernel.MAX_COLS:
        raise Unsupported(f"{ln.normalized_shape[0]} features > {layer_norm_kernel.MAX_COLS}")


def _convert(module: nn.Module) -> nn.Module:
    _check_layer_norm(module.ln_2)
    cls = type(module)
    forward = _FORWARDS[_forward_names(cls)]
    return clone_as(module, fast_subclass(cls, forward, f"Fused{cls.__name__}"))


register_rule(PatchRule(family="residual", name="pre-LN ResidualAttentionBlock -> fused add + LayerNorm, MLP residual",
                        match=_match, convert=_convert))
