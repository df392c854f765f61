"""Dispatch: the measured choice between clipfast's kernels and PyTorch, above the ops (being assembled)."""
from ..dispatcher import FAMILY_OPS, describe, dispatch, get_dispatch, set_dispatch, sync_dispatch  # noqa: F401
from ..ops import (add_layer_norm, clip_loss, contrastive_cross_entropy, flash_attention,  # noqa: F401
                   flash_attention_varlen, layer_norm, mlp, patch_embed, quick_gelu, siglip_loss)
from ..ops.contrastive_loss import clip_loss_scaled, siglip_loss_scaled  # noqa: F401
