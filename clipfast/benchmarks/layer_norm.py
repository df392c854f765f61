"""LayerNorm (+ residual add) at CLIP widths: [B*L, 512/768/1024/1280], B*L up to 256*257, against the ops'
eager references (``F.layer_norm``, after ``x + residual``) and torch.compile of them."""
import torch

import clipfast
from clipfast.ops.layer_norm import reference_add_layer_norm, reference_layer_norm

from .harness import BenchCase

EPS = 1e-5  # the ops' default, which the clipfast calls below use

SHAPES = {  # label -> (rows, width)
    "dispatch overhead 8x768": (8, 768),  # time here is launch + custom-op dispatch, not bandwidth
    "text B=256 L=77 w512": (256 * 77, 512),
    "ViT-B/16 B=256 L=197 w768": (256 * 197, 768),
    "ViT-L/14 B=128 L=257 w1024": (128 * 257, 1024),
    "ViT-H/14 B=64 L=257 w1280": (64 * 257, 1280),
}
SMOKE_SHAPES = {"smoke 37x96": (37, 96)}


def _eager_ln(x, weight, bias):
    return reference_layer_norm(x, weight, bias, EPS)


def _eager_add_ln(x, residual, weight, bias):
    return reference_add_layer_norm(x, residual, weight, bias, EPS)


def cases(smoke: bool):
    found = []
    for label, (rows, width) in (SMOKE_SHAPES if smoke else SHAPES).items():
        for dtype in ([torch.float32] if smoke else [torch.bfloat16]):
            def make(device, dtype, rows=rows, width=width):
                x = torch.randn(rows, width, device=device, dtype=dtype, requires_grad=True)
                return {"x": x, "weight": torch.ones(width, device=device, dtype=dtype, requires_grad=True),
                        "bias": torch.zeros(width, device=device, dtype=dtype, requires_grad=True)}

            size = torch.finfo(dtype).bits // 8
            # fwd: read x, write y; bwd: read x, dy, write dx (parameters are negligible)
            traffic = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}
            found.append(BenchCase(
                family="layer_norm", name=label, dtype=dtype, make_inputs=make,
                impls={"clipfast": lambda x, weight, bias: clipfast.layer_norm(x, weight, bias),
                       "eager": _eager_ln},
                bytes=lambda mode, rows=rows, width=width, size=size: traffic[mode] * rows * width * size,
                shape={"rows": rows, "width": width},
            ))

            def make_res(device, dtype, rows=rows, width=width, make=make):
                inputs = make(device, dtype)
                inputs["residual"] = torch.randn(rows, width, device=device, dtype=dtype, requires_grad=True)
                return inputs

            res_traffic = {"fwd": 4, "bwd": 4, "fwd+bwd": 8}
            found.append(BenchCase(
                family="layer_norm", name=f"add+LN {label}", dtype=dtype, make_inputs=make_res,
                impls={"clipfast": lambda x, residual, weight, bias: clipfast.add_layer_norm(x, residual, weight, bias),
                       "eager": _eager_add_ln},
                bytes=lambda mode, rows=rows, width=width, size=size: res_traffic[mode] * rows * width * size,
                shape={"rows": rows, "width": width, "residual": True},
            ))
    return found
