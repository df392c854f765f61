"""Fused MLP modules: the transformer MLP block ``fc -> activation -> proj`` as one ``clipfast.mlp`` call.

- ``MLP``: an ``nn.Sequential`` with OpenAI CLIP's children (``c_fc``, ``gelu``, ``c_proj``), so its
  ``state_dict`` keys are those of OpenAI / open_clip's ``mlp`` and it loads their weights as is.
- ``QuickGELU``: the activation module running the elementwise kernel.
- ``sequential_mlp_forward`` / ``fc_act_fc_forward``: the forwards the patch rules give to subclasses of
  existing MLP classes (see ``clipfast/patch_rules/mlp.py``); they read which children to use and the
  activation from the ``_clipfast_mlp`` attribute the rule sets.

Under autocast the input is cast to the autocast dtype first, as ``nn.Linear`` would be, so the fused
block computes in the same precision as the modules it replaces.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from ..dispatching import mlp, quick_gelu
from ..ops.mlp import ACTIVATIONS


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 * x)`` (OpenAI CLIP's activation) through the fused elementwise kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quick_gelu(x)


def activation_module(activation: str) -> nn.Module:
    """The eager module computing ``activation``."""
    if activation == "quick_gelu":
        return QuickGELU()
    if activation == "gelu":
        return nn.GELU()
    if activation == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")


def _autocast(x: torch.Tensor) -> torch.Tensor:
    device = x.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


def fused_mlp(x: torch.Tensor, fc: nn.Linear, proj: nn.Linear, activation: str,
              residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``proj(act(fc(x))) (+ residual)`` for two ``nn.Linear`` modules, in one fused call."""
    x = _autocast(x)
    if residual is not None:
        residual = residual.to(x.dtype)
    return mlp(x, fc.weight, fc.bias, proj.weight, proj.bias, activation, residual=residual)


def sequential_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Forward of a patched ``Sequential(fc, act, proj)`` (children named in ``self._clipfast_mlp``)."""
    fc_name, proj_name, activation = self._clipfast_mlp
    return fused_mlp(x, self._modules[fc_name], self._modules[proj_name], activation)


def fc_act_fc_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Forward of a patched Hugging Face ``CLIPMLP``-style module (``fc1``, ``activation_fn``, ``fc2``)."""
    fc_name, proj_name, activation = self._clipfast_mlp
    return fused_mlp(hidden_states, getattr(self, fc_name), getattr(self, proj_name), activation)


class MLP(nn.Sequential):
    """``Sequential(c_fc=Linear(width, hidden), gelu=<activation>, c_proj=Linear(hidden, out))`` computed by
    the fused MLP kernels; same children, parameters and ``state_dict`` keys as OpenAI CLIP's ``mlp``.

    ``forward(x, residual=None)`` returns ``c_proj(act(c_fc(x))) (+ residual)``."""

    def __init__(self, width: int, hidden: Optional[int] = None, activation: str = "quick_gelu",
                 out_features: Optional[int] = None, bias: bool = True, device=None, dtype=None):
        hidden = hidden if hidden is not None else 4 * width
        out_features = out_features if out_features is not None else width
        factory = {"device": device, "dtype": dtype}
        super().__init__(OrderedDict([
            ("c_fc", nn.Linear(width, hidden, bias=bias, **factory)),
            ("gelu", activation_module(activation)),
            ("c_proj", nn.Linear(hidden, out_features, bias=bias, **factory)),
        ]))
        self._clipfast_mlp = ("c_fc", "c_proj", activation)

    @property
    def activation(self) -> str:
        return self._clipfast_mlp[2]

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return fused_mlp(x, self.c_fc, self.c_proj, self.activation, residual)
