"""Host overhead per op call as benchmark cases (mode ``host``) for ``clipfast bench`` and the GPU check:
the CPU time one call of each clipfast op costs at a tiny shape, against the plain PyTorch it replaces (the
op's eager reference, called directly), launches queued without synchronizing. At tiny shapes the GPU
finishes each kernel before the next launch, so the figure is what the host pays per call: argument checks,
dispatch, custom-op and autograd bookkeeping and the Triton launcher. The ops, shapes and PyTorch
counterparts are ``overhead.CASES`` (also behind ``clipfast bench overhead``).

Target (GUIDE §3): at most 2x the plain PyTorch call, and at most 20 µs on a GPU host.
"""
import torch

from .harness import BenchCase
from .overhead import CASES


def _inputs_in(case):
    """The case's inputs (gradients wanted, as in training) in the benchmark's dtype."""
    def make(device, dtype):
        return {name: t.detach().to(dtype).requires_grad_(t.requires_grad)
                for name, t in case.make(device, True).items()}
    return make


def cases(smoke: bool):
    # the same tiny shapes in the smoke pass: they are already cheap through the interpreter
    dtype = torch.float32 if smoke else torch.bfloat16
    return [BenchCase(family="host_overhead", name=case.op, dtype=dtype, make_inputs=_inputs_in(case),
                      impls={"clipfast": case.clipfast, "eager": case.torch}, compile_impl=None, modes=("host",),
                      shape={"op": case.op})
            for case in CASES]
