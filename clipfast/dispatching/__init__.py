"""Never slower than PyTorch: a measured choice, per op and shape bucket, between clipfast's kernels and
the PyTorch implementations a user would otherwise run.

Modes (``CLIPFAST_DISPATCH`` at import, ``set_dispatch(mode)``, ``with dispatch(mode):``):

- ``"auto"`` (default): on CUDA, the first call of an op at a new shape *bucket* times every candidate
  (``candidates``) with CUDA events after a warm-up -- the forward alone under ``no_grad`` /
  inference, forward and backward when a gradient is wanted -- and keeps the fastest. On CPU the op runs
  as it always has (Triton interpreter under ``TRITON_INTERPRET=1``, else the eager reference).
- ``"kernel"``: always clipfast's path (the tests and the kernel benchmarks run this way).
- ``"torch"``: always the plain PyTorch implementation; nothing from ``clipfast.kernels`` is launched.

Hot path (every op call): ``route(op, args)`` is a global read in ``kernel`` mode, one dict lookup in
``torch`` mode, and in ``auto`` a key of a few integers (sizes rounded up to a power of two, exact feature
widths, dtype, whether a gradient is wanted) looked up in a dict. It never synchronizes the device, so a
tuned model can be captured in a CUDA graph; while compiling or capturing, a bucket without a choice runs
clipfast's path and tunes nothing. Under ``torch.compile`` the lookup runs at trace time (the chosen
implementation is traced: no graph break) and a later tuning triggers a recompile through dynamo's guards.

Tuning is invisible to the code around it: it draws its inputs from a private generator (every global RNG
is left as it was), saves its tensors past any ``saved_tensors_hooks`` in force (activation checkpointing,
CPU offloading), so a checkpointed forward saves the same tensors when it is recomputed, and it never runs
inside a backward pass (a bucket first met there, e.g. by a reentrant checkpoint's recompute, runs
clipfast's path and is tuned at its next call outside).

Choices are kept in memory and on disk: ``dispatch.json`` under ``cache_dir()`` (``CLIPFAST_CACHE_DIR``,
else ``$XDG_CACHE_HOME/clipfast``, else ``~/.cache/clipfast``), one section per environment (GPU name and
the torch, triton and clipfast versions), so an upgrade re-tunes. Tuning time per op and bucket is bounded
(``CLIPFAST_TUNE_BUDGET_S``, default 1 s). A candidate that raises or returns non-finite values is dropped
with a one-time warning. Under ``torch.distributed`` each rank decides on its own (from the shared disk
cache or by timing): the hot path never runs a collective, so a bucket met by one rank alone (rank-0
evaluation, uneven last batches) never blocks. Every candidate computes the same math, so ranks that chose
differently still train together; to make them run the same code, call ``sync_dispatch()`` on every rank at
a point they all reach (e.g. after the first step): rank 0's choices are broadcast and adopted.

The package sits above ``clipfast.ops`` (which never dispatch) and below ``clipfast.nn``:

- ``modes``: the mode and its environment variable;
- ``specs``: ``OpSpec`` / ``Candidate``, the registry, ``bucket``;
- ``candidates``: every op's candidates, built from the ops' ``kernel_<op>`` and ``reference_<op>``;
- ``tuner``: ``route`` (the hot path), the timing, the in-memory choices, ``sync_dispatch``;
- ``cache``: the disk cache;
- ``ops``: the dispatched public functions (``clipfast.layer_norm`` ... are these);
- ``report``: what a family runs, in words, for the patch report.
"""
from .cache import cache_path
from .modes import KERNEL, MODES, dispatch, get_dispatch, set_dispatch
from .ops import (add_layer_norm, clip_loss, clip_loss_scaled, contrastive_cross_entropy, flash_attention,
                  flash_attention_varlen, layer_norm, mlp, patch_embed, quick_gelu, siglip_loss, siglip_loss_scaled)
from .report import FAMILY_OPS, describe
from .tuner import clear_memory_cache, retuning, route, sync_dispatch

__all__ = ["MODES", "KERNEL", "set_dispatch", "get_dispatch", "dispatch", "sync_dispatch", "route", "retuning",
           "clear_memory_cache", "cache_path", "describe", "FAMILY_OPS", "layer_norm", "add_layer_norm",
           "flash_attention", "flash_attention_varlen", "mlp", "quick_gelu", "patch_embed", "clip_loss",
           "siglip_loss", "contrastive_cross_entropy", "clip_loss_scaled", "siglip_loss_scaled"]
