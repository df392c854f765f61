"""Error measures shared by the test suite's numerics standard (tests/numerics.py) and ``clipfast verify``:
max-abs and relative Frobenius error of a result against a float64 reference, and each dtype's unit roundoff."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# unit roundoff of each dtype
EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}


@dataclass
class Errors:
    max_abs: float
    rel_fro: float
    where: tuple
    finite: bool


def errors(out: torch.Tensor, ref: torch.Tensor) -> Errors:
    out64, ref64 = out.detach().double(), ref.detach().double()
    finite = bool(torch.isfinite(out64).all())
    if out64.numel() == 0:
        return Errors(0.0, 0.0, (), finite)
    diff = (out64 - ref64).abs()
    diff = torch.where(torch.isfinite(diff), diff, torch.full_like(diff, float("inf")))
    flat = int(torch.argmax(diff))
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    ref_norm = float(ref64.norm())
    rel = float((out64 - ref64).norm()) / ref_norm if ref_norm > 0 else float(diff.max())
    return Errors(float(diff.max()), rel, where, finite)
