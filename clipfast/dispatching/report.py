"""What the dispatcher runs, in words, for ``clipfast.patch``'s report."""
from __future__ import annotations

import torch

from . import modes, tuner

FAMILY_OPS = {"layer_norm": ("layer_norm", "add_layer_norm"), "attention": ("flash_attention", "flash_attention_varlen"),
              "mlp": ("mlp", "quick_gelu"), "patch_embed": ("patch_embed",),
              "loss": ("clip_loss", "siglip_loss")}


def _kernels_here() -> str:
    """What "clipfast's path" means on this machine: the kernels, or on CPU without the interpreter the
    eager reference."""
    if torch.cuda.is_available():
        return "clipfast kernels"
    from clipfast.kernels import runtime

    if runtime.INTERPRET:
        return "clipfast kernels (CPU: Triton interpreter)"
    return "eager PyTorch reference on CPU (TRITON_INTERPRET=1 runs clipfast's kernels in the interpreter)"


def describe(family: str) -> str:
    """What a swapped module of ``family`` runs under the current mode, for ``clipfast.patch``'s report."""
    mode = modes.get_dispatch()
    if mode != "auto":
        return "PyTorch (dispatch 'torch')" if mode == "torch" else f"{_kernels_here()} (dispatch 'kernel')"
    ops = FAMILY_OPS.get(family, ())
    counts: dict[str, int] = {}
    for key, name in tuner._chosen_names.items():
        if key[0] in ops:
            counts[name] = counts.get(name, 0) + 1
    if not counts and torch.cuda.is_available():
        for key, entry in tuner._disk.entries(torch.device("cuda", torch.cuda.current_device())).items():
            if key.split("|", 1)[0] in ops and isinstance(entry, dict) and "choice" in entry:
                counts[entry["choice"]] = counts.get(entry["choice"], 0) + 1
    if not counts:
        return "auto: " + (_kernels_here() + ("; not tuned yet" if torch.cuda.is_available() else ""))
    return "auto: " + ", ".join(f"{name} x{n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))
