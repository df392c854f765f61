"""clipfast's ops as torch custom ops, with a direct eager call of the same code outside tracing.

Every op is a ``torch.library`` custom op (``clipfast::<name>``): that is what ``torch.compile`` /
``torch.export`` trace without a graph break (through its fake), what ``torch.library.opcheck`` checks and
what a ``TorchDispatchMode`` (FakeTensorMode, make_fx, FlopCounterMode, ...) sees. Calling a custom op costs,
besides the op's own work, the dispatcher round trip through Python and, when a gradient is wanted, the
generated autograd function's bookkeeping: about 40 us without and 100 us with a gradient per call on a
CPU host, more than the op's eager reference on tiny inputs.

``custom_op(name)`` registers the custom op as ``torch.library.custom_op`` does and returns an ``Op`` that
calls it only when something needs to see it (``needs_custom_op``): while torch.compile / export / jit
trace, under a dispatch mode or a functorch transform, or with a tensor subclass among the arguments.
Otherwise it runs the same implementation directly:

- no gradient wanted (grad mode off, or no input requires grad): the implementation itself, as the custom
  op's autograd kernel does (it calls the implementation below autograd);
- a gradient wanted: an ``autograd.Function`` built from the same implementation, ``setup_context`` and
  ``backward`` that ``register_autograd`` received, so the forward, what is saved and the backward are
  the custom op's own. An op without a registered backward (the ``*_bwd`` ops) called where a gradient is
  wanted (double backward) goes through the custom op, which raises as it always did.

``set_direct_calls(False)`` routes every call through the custom op (the tests compare both routes).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

_C = torch._C
# argument types that need no closer look (anything else is checked for being a tensor subclass)
_PLAIN_TYPES = frozenset((Tensor, torch.nn.Parameter, type(None), bool, int, float, str))

_direct = True

OPS: dict[str, "Op"] = {}  # every clipfast op by its custom op's name


def set_direct_calls(enabled: bool) -> bool:
    """Whether ops outside tracing call their implementation directly (default) or always go through the
    registered custom op; returns the previous setting."""
    global _direct
    previous, _direct = _direct, bool(enabled)
    return previous


def needs_custom_op(args: tuple) -> bool:
    """Whether a call must go through the registered custom op: under torch.compile / export, jit
    tracing, a ``TorchDispatchMode`` (fake tensors, make_fx, flop counting ...), a functorch transform, or
    with a tensor subclass argument (``nn.Parameter`` is a plain tensor here). A handful of C calls, well
    under a microsecond."""
    if (not _direct or torch.compiler.is_compiling() or _C._len_torch_dispatch_stack()
            or _C._are_functorch_transforms_active() or _C._get_tracing_state() is not None):
        return True
    for a in args:
        if type(a) not in _PLAIN_TYPES and isinstance(a, Tensor):
            return True
    return False


class Op:
    """A clipfast op: the registered custom op (``.custom``) and its direct call (``__call__``)."""

    def __init__(self, name: str, impl: Callable):
        self.name = name
        self.impl = impl
        self.custom = torch.library.custom_op(name, mutates_args=())(impl)
        self.fake: Optional[Callable] = None
        self._function: Optional[type] = None
        self.__doc__ = impl.__doc__
        OPS[name] = self

    def register_fake(self, fake: Callable) -> Callable:
        self.custom.register_fake(fake)
        self.fake = fake
        return fake

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.custom.register_autograd(backward, setup_context=setup_context)
        op = self

        # forward(ctx, *args) rather than a separate setup_context staticmethod: autograd.Function.apply
        # binds the arguments against forward's signature (inspect.signature, ~40 us) in that style
        def forward(ctx, *args):
            output = op.impl(*args)
            setup_context(ctx, args, output)
            return output

        self._function = type(f"{self.name.split('::')[-1]}_function", (torch.autograd.Function,),
                              {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *args, **kwargs):
        if kwargs or needs_custom_op(args):  # keyword arguments: the custom op binds them to its schema
            return self.custom(*args, **kwargs)
        if _C.is_grad_enabled() and _C._any_requires_grad(*args):
            if self._function is None:  # no autograd formula: the custom op raises as it always has
                return self.custom(*args)
            return self._function.apply(*args)
        return self.impl(*args)


def custom_op(name: str) -> Callable[[Callable], Op]:
    """``@custom_op("clipfast::name")`` on an annotated implementation: ``torch.library.custom_op(name,
    mutates_args=())`` plus the direct call (see the module docstring)."""
    def decorate(impl: Callable) -> Op:
        return Op(name, impl)
    return decorate
