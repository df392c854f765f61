"""Attention at CLIP shapes: ``clipfast.flash_attention`` against the op's eager reference
(``clipfast.ops.attention.reference_attention``: SDPA with the backend PyTorch picks), every SDPA backend
(flash, efficient, cuDNN, and math: the materialized ``softmax(q k^T) v``) and, on the causal text shape, the
path ``nn.MultiheadAttention`` takes with OpenAI's float causal mask (SDPA with an additive [L, L] mask,
which rules out its flash backend). A second family of cases times the whole ``nn.MultiheadAttention``
module (projections included) against ``clipfast.nn.MultiheadAttention``.

Targets (H100, bf16): >= 1.0x the best SDPA backend, >= 2x the masked MHA path on the text shape, forward
>= 200 TFLOP/s at S=197.
"""
import torch
import torch.nn.functional as F

import clipfast
from clipfast.ops.attention import reference_attention

from .harness import BenchCase

SHAPES = {  # label -> (batch, heads, seqlen, head_dim, causal)
    "ViT-B/16 B=256 H=12 S=197 D=64": (256, 12, 197, 64, False),
    "ViT-L/14 B=128 H=16 S=257 D=64": (128, 16, 257, 64, False),
    "text B=256 H=8 S=77 D=64 causal": (256, 8, 77, 64, True),
    "ViT-H/14 B=64 H=16 S=257 D=80": (64, 16, 257, 80, False),
}
SMOKE_SHAPES = {"smoke B=1 H=2 S=65 D=64": (1, 2, 65, 64, False), "smoke B=1 H=2 S=77 D=32 causal": (1, 2, 77, 32, True)}


def _eager(q, k, v, causal):
    return reference_attention(q, k, v, None, causal, None)


def _sdpa(backend):
    def run(q, k, v, causal):
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def _sdpa_float_mask(q, k, v, causal):
    # nn.MultiheadAttention(need_weights=False) with OpenAI's mask: SDPA with an additive float mask
    length = q.shape[-2]
    mask = torch.full((length, length), float("-inf"), device=q.device, dtype=q.dtype).triu(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _attention_cases(smoke: bool):
    from torch.nn.attention import SDPBackend

    found = []
    for label, (b, h, s, d, causal) in (SMOKE_SHAPES if smoke else SHAPES).items():
        dtype = torch.float32 if smoke else torch.bfloat16

        def make(device, dtype, b=b, h=h, s=s, d=d, causal=causal):
            qkv = [torch.randn(b, h, s, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
            return {"q": qkv[0], "k": qkv[1], "v": qkv[2], "causal": causal}

        impls = {"clipfast": lambda q, k, v, causal: clipfast.flash_attention(q, k, v, is_causal=causal),
                 "eager": _eager}
        if not smoke:
            impls.update({"sdpa flash": _sdpa(SDPBackend.FLASH_ATTENTION),
                          "sdpa efficient": _sdpa(SDPBackend.EFFICIENT_ATTENTION),
                          "sdpa cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
                          "sdpa math": _sdpa(SDPBackend.MATH)})
        if causal:
            impls["MHA path (float causal mask)"] = _sdpa_float_mask
        # two products of 2*s*s*d per head, half of them skipped when causal; backward is 2.5x forward
        fwd = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
        found.append(BenchCase(
            family="attention", name=label, dtype=dtype, make_inputs=make, impls=impls,
            flops=lambda mode, fwd=fwd: {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode] * fwd,
            shape={"batch": b, "heads": h, "seqlen": s, "head_dim": d, "causal": causal},
        ))
    return found


MODULE_SHAPES = {  # label -> (batch, seqlen, width, heads, causal)
    "MHA text B=256 L=77 w512 H=8 causal": (256, 77, 512, 8, True),
    "MHA ViT-B/16 B=256 L=197 w768 H=12": (256, 197, 768, 12, False),
}
SMOKE_MODULE_SHAPES = {"MHA smoke B=2 L=33 w64 H=2 causal": (2, 33, 64, 2, True)}


def _module_cases(smoke: bool):
    found = []
    for label, (b, length, width, heads, causal) in (SMOKE_MODULE_SHAPES if smoke else MODULE_SHAPES).items():
        dtype = torch.float32 if smoke else torch.bfloat16

        def make(device, dtype, b=b, length=length, width=width, heads=heads, causal=causal):
            torch_mha = torch.nn.MultiheadAttention(width, heads).to(device=device, dtype=dtype)
            fast = clipfast.nn.MultiheadAttention(width, heads).to(device=device, dtype=dtype)
            fast.load_state_dict(torch_mha.state_dict())
            mask = torch.full((length, length), float("-inf"), device=device).triu(1).to(dtype) if causal else None
            x = torch.randn(length, b, width, device=device, dtype=dtype, requires_grad=True)  # sequence-first
            return {"x": x, "mask": mask, "torch_mha": torch_mha, "fast": fast}

        def run(module):
            return lambda x, mask, torch_mha, fast: {"torch": torch_mha, "fast": fast}[module](
                x, x, x, need_weights=False, attn_mask=mask)[0]

        proj = 2.0 * b * length * width * width * 4  # in-projection (3 products) and out-projection
        attn = 4.0 * b * length * length * width * (0.5 if causal else 1.0)
        found.append(BenchCase(
            family="attention", name=label, dtype=dtype, make_inputs=make,
            impls={"clipfast": run("fast"), "eager": run("torch")},
            flops=lambda mode, f=proj + attn: {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}[mode] * f,
            shape={"batch": b, "seqlen": length, "width": width, "heads": heads, "causal": causal, "module": True},
        ))
    return found


def cases(smoke: bool):
    return _attention_cases(smoke) + _module_cases(smoke)
