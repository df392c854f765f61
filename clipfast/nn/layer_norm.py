from __future__ import annotations

import math

import torch

from ..dispatching import layer_norm


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` running the fused kernel. Computes in fp32 and returns the input dtype (what
    OpenAI CLIP's LayerNorm subclass does), whatever the parameters' dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = len(self.normalized_shape)
        if tuple(x.shape[x.dim() - k:]) != tuple(self.normalized_shape):
            raise ValueError(f"LayerNorm: input shape {tuple(x.shape)} does not end with normalized_shape "
                             f"{tuple(self.normalized_shape)}")
        weight, bias = self.weight, self.bias
        if k > 1:  # normalizing over several trailing dims == over their flattening
            n = math.prod(self.normalized_shape)
            y = layer_norm(x.reshape(*x.shape[:x.dim() - k], n),
                           weight.reshape(n) if weight is not None else None,
                           bias.reshape(n) if bias is not None else None, self.eps)
            return y.reshape(x.shape)
        return layer_norm(x, weight, bias, self.eps)
