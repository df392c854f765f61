"""Transformer MLP (fc -> QuickGELU -> proj) at CLIP shapes, against eager Linear -> QuickGELU -> Linear,
torch.compile of it, and the two bare GEMMs without bias or activation (the floor: what cuBLAS takes for
the matrix products alone; its backward is the same four GEMMs). Also the standalone QuickGELU.

Targets (H100, bf16): >= 1.3x eager, >= 1.1x torch.compile, within 10% of the bare GEMMs, >= 600 TFLOP/s.
"""
import torch
import torch.nn.functional as F

import clipfast

from .harness import BenchCase

SHAPES = {  # label -> (rows = batch * tokens, width, hidden)
    "ViT-B/16 B=256 L=197 768->3072": (256 * 197, 768, 3072),
    "ViT-L/14 B=128 L=257 1024->4096": (128 * 257, 1024, 4096),
    "text B=256 L=77 512->2048": (256 * 77, 512, 2048),
}
SMOKE_SHAPES = {"smoke 37x64->256": (37, 64, 256)}


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def _eager(x, w1, b1, w2, b2, residual=None):
    y = F.linear(_quick_gelu(F.linear(x, w1, b1)), w2, b2)
    return y + residual if residual is not None else y


def _clipfast(x, w1, b1, w2, b2, residual=None):
    return clipfast.mlp(x, w1, b1, w2, b2, "quick_gelu", residual=residual)


def _bare_gemms(x, w1, b1, w2, b2, residual=None):
    return (x @ w1.t()) @ w2.t()


def cases(smoke: bool):
    found = []
    for label, (rows, width, hidden) in (SMOKE_SHAPES if smoke else SHAPES).items():
        dtype = torch.float32 if smoke else torch.bfloat16
        for residual in (False, True):
            if residual and not (smoke or label.startswith("ViT-B/16")):
                continue

            def make(device, dtype, rows=rows, width=width, hidden=hidden, residual=residual):
                def param(*shape, scale):
                    return (scale * torch.randn(*shape, device=device)).to(dtype).requires_grad_()

                inputs = {"x": torch.randn(rows, width, device=device, dtype=dtype, requires_grad=True),
                          "w1": param(hidden, width, scale=width ** -0.5), "b1": param(hidden, scale=0.1),
                          "w2": param(width, hidden, scale=hidden ** -0.5), "b2": param(width, scale=0.1)}
                if residual:
                    inputs["residual"] = torch.randn(rows, width, device=device, dtype=dtype, requires_grad=True)
                return inputs

            gemm_flops = 2.0 * rows * width * hidden  # one of the six products
            found.append(BenchCase(
                family="mlp", name=f"{'fc+QuickGELU+proj+residual' if residual else 'fc+QuickGELU+proj'} {label}",
                dtype=dtype, make_inputs=make,
                impls={"clipfast": _clipfast, "eager": _eager, "bare GEMMs": _bare_gemms},
                flops=lambda mode, f=gemm_flops: {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[mode] * f,
                shape={"rows": rows, "width": width, "hidden": hidden, "residual": residual},
            ))

        def make_act(device, dtype, rows=rows, hidden=hidden):
            return {"x": torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)}

        size = torch.finfo(dtype).bits // 8
        found.append(BenchCase(
            family="mlp", name=f"QuickGELU [{rows}x{hidden}]", dtype=dtype, make_inputs=make_act,
            impls={"clipfast": clipfast.quick_gelu, "eager": _quick_gelu},
            # fwd: read x, write y; bwd: read x and dy, write dx
            bytes=lambda mode, n=rows * hidden * size: {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode] * n,
            shape={"rows": rows, "hidden": hidden},
        ))
    return found
