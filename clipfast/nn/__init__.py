"""Drop-in modules: same constructor, parameters, state_dict keys and isinstance relations as the
modules they replace."""
from .layer_norm import LayerNorm
from .attention import MultiheadAttention

__all__ = ["LayerNorm", "MultiheadAttention"]
