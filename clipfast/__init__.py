"""clipfast: fused Triton kernels for CLIP models.

Functional ops run the Triton kernels on CUDA tensors, through the Triton interpreter on CPU tensors
when ``TRITON_INTERPRET=1`` is set before import, and the eager reference otherwise. The functions here are
the dispatched ops (``clipfast.dispatching``): in ``auto`` mode each op and shape runs the faster of
clipfast's kernels and PyTorch; ``clipfast.ops`` holds the same ops without dispatch.
"""
from ._cli_guard import check_cli_environment as _check_cli_environment

_check_cli_environment()  # the command line: a bad CLIPFAST_DISPATCH is one clean line, not a traceback

from . import nn, ops  # noqa: E402
from . import models
from .patching import patch, unpatch
from . import integrations  # registers attn_implementation="clipfast" for transformers
from .dispatching import add_layer_norm, layer_norm
from .dispatching import patch_embed
from .dispatching import mlp, quick_gelu
from .dispatching import clip_loss, siglip_loss
from .dispatching import flash_attention
from .dispatching import flash_attention_varlen
from .dispatching import dispatch, get_dispatch, set_dispatch, sync_dispatch
from .autopatching import autopatch

__version__ = "0.1.0"

__all__ = ["nn", "ops", "models", "patch", "unpatch", "integrations", "layer_norm", "add_layer_norm", "patch_embed",
           "mlp", "quick_gelu", "clip_loss", "siglip_loss", "flash_attention", "flash_attention_varlen",
           "set_dispatch", "get_dispatch", "dispatch", "sync_dispatch", "autopatch"]
