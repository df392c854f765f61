"""Argument checks shared by the ops: clear ``TypeError``/``ValueError`` messages naming the argument,
and one-time warnings for the cases that fall back to eager PyTorch."""
from __future__ import annotations

import functools

import torch

from clipfast.kernels.environment import _warned, warn_once  # noqa: F401  (re-exported for the layers above)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def host_sync_forbidden() -> bool:
    """True while ``torch.compile`` traces or a CUDA graph is being captured: nothing may read device values
    on the host then. Checks that would need such a read are skipped, and paths that need one (the unpadded
    text towers' packed lengths) run their sync-free alternative."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


@functools.lru_cache(maxsize=None)
def _runtime():
    from clipfast.kernels import runtime  # imported on first use: clipfast.kernels imports triton

    return runtime


def kernel_takes_width(op: str, x: torch.Tensor, max_width: int) -> bool:
    """Whether ``op`` runs its Triton kernel on ``x``: on CUDA (or CPU under the interpreter), and only while
    the last dimension fits the kernel's registers (``max_width``); wider inputs run the eager reference after a
    one-time warning."""
    if not _runtime().uses_triton(x):
        return False
    if x.shape[-1] > max_width:
        warn_once(f"{op}_wide", f"{op} over {x.shape[-1]} > {max_width} features runs in eager PyTorch")
        return False
    return True


def plain_float_tensors_on(device: torch.device, *tensors) -> bool:
    """The common case of an op's tensor arguments in one pass: each one (None skipped) a plain tensor or
    ``nn.Parameter`` of a float dtype on ``device``.

    Every op checks its usual call with this and its shape relations (a few attribute reads) and runs its
    full checks, which name the offending argument, only when that fails: the full checks cost several
    microseconds per call, paid on every call of every op."""
    for t in tensors:
        if t is not None and (type(t) not in PLAIN_TENSOR_TYPES or t.dtype not in FLOAT_DTYPES or t.device != device):
            return False
    return True


def any_requires_grad(*tensors) -> bool:
    """Whether any of ``tensors`` (None skipped) requires grad."""
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def check_tensor(op: str, name: str, t, *, dtypes=FLOAT_DTYPES, min_dim: int = 0, ndim: int | None = None,
                 optional: bool = False) -> None:
    if t is None:
        if optional:
            return
        raise TypeError(f"{op}: `{name}` must be a tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: `{name}` has dtype {str(t.dtype).replace('torch.', '')}; expected one of {names}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: `{name}` must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dim() < min_dim:
        raise ValueError(f"{op}: `{name}` must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")


def check_same_device(op: str, **tensors) -> None:
    device = None
    for t in tensors.values():  # one comparison per tensor: this runs on every op call
        if t is None:
            continue
        if device is None:
            device = t.device
        elif t.device != device:
            listing = ", ".join(f"{k} on {v.device}" for k, v in tensors.items() if v is not None)
            raise ValueError(f"{op}: all tensors must be on one device, got {listing}")


def check_shape(op: str, name: str, t, expected: tuple) -> None:
    if t is not None and tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: `{name}` must have shape {tuple(expected)}, got {tuple(t.shape)}")
