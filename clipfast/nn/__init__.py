"""Drop-in modules: same constructor, parameters, state_dict keys and isinstance relations as the
modules they replace."""
from .layer_norm import LayerNorm
from .mlp import MLP, QuickGELU
from .attention import MultiheadAttention
from .loss import ClipLoss, SigLipLoss

__all__ = ["LayerNorm", "MLP", "QuickGELU", "ClipLoss", "SigLipLoss", "MultiheadAttention"]
