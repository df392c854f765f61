"""The performance targets (GUIDE §3, H100 bf16, ratios side by side in one run) as data, in one place.

``clipfast.gpu_check.summary`` checks every target against a run's benchmark rows and flags it met or
missed in ``summary.md`` and the README. A target names the rows it reads (family, case pattern, mode)
and one figure:

- ``speedup``: the fastest of ``against``'s times divided by clipfast's (above 1: clipfast is faster);
- ``tflops`` / ``pct_peak_bw``: clipfast's own row, at least ``threshold``;
- ``peak_mem_mb`` / ``host_us``: clipfast's own row, at most ``threshold``.
"""
from __future__ import annotations

from dataclasses import dataclass

SDPA = ("sdpa flash", "sdpa efficient", "sdpa cudnn")
AT_MOST = ("peak_mem_mb", "host_us")


@dataclass(frozen=True)
class Target:
    hot_path: str
    family: str
    case: str              # regular expression on the case name
    mode: str
    metric: str            # speedup | tflops | pct_peak_bw | peak_mem_mb | host_us
    threshold: float
    against: tuple[str, ...] = ()
    text: str = ""         # how the target reads in the tables

    @property
    def at_most(self) -> bool:
        return self.metric in AT_MOST


LN_SHAPES = r"(ViT-B/16|ViT-L/14) "
TARGETS = [
    Target("LayerNorm (+residual add)", "layer_norm", LN_SHAPES, "fwd+bwd", "speedup", 1.5, ("eager",),
           ">= 1.5x eager"),
    Target("LayerNorm (+residual add)", "layer_norm", LN_SHAPES, "fwd+bwd", "speedup", 1.1, ("torch.compile",),
           ">= 1.1x torch.compile"),
    Target("LayerNorm (+residual add)", "layer_norm", LN_SHAPES, "fwd", "pct_peak_bw", 85, text="fwd >= 85% HBM BW"),
    Target("LayerNorm (+residual add)", "layer_norm", LN_SHAPES, "bwd", "pct_peak_bw", 70, text="bwd >= 70% HBM BW"),
    Target("attention", "attention", r"^text .*causal$", "fwd+bwd", "speedup", 2.0,
           ("MHA path (float causal mask)",), ">= 2x the masked MHA path"),
    Target("attention", "attention", r"^(ViT-B/16 .*S=197|ViT-L/14 .*S=257|text .*S=77) ", "fwd+bwd", "speedup",
           1.0, SDPA, ">= 1.0x best SDPA backend"),
    Target("attention", "attention", r"^ViT-B/16 .*S=197 ", "fwd", "tflops", 200, text="fwd >= 200 TFLOP/s"),
    Target("MLP fc+QuickGELU+proj", "mlp", r"^fc\+QuickGELU", "fwd+bwd", "speedup", 1.3, ("eager",), ">= 1.3x eager"),
    Target("MLP fc+QuickGELU+proj", "mlp", r"^fc\+QuickGELU", "fwd+bwd", "speedup", 1.1, ("torch.compile",),
           ">= 1.1x torch.compile"),
    Target("MLP fc+QuickGELU+proj", "mlp", r"^fc\+QuickGELU", "fwd+bwd", "speedup", 1 / 1.1, ("bare GEMMs",),
           "within 10% of the bare cuBLAS GEMMs"),
    Target("MLP fc+QuickGELU+proj", "mlp", r"^fc\+QuickGELU", "fwd+bwd", "tflops", 600, text="GEMMs >= 600 TFLOP/s"),
    Target("patch embedding", "patch_embed", r"", "fwd+bwd", "speedup", 2.0, ("eager",), ">= 2x eager"),
    Target("patch embedding", "patch_embed", r"", "fwd+bwd", "speedup", 1.2, ("torch.compile",),
           ">= 1.2x torch.compile"),
    Target("patch embedding", "patch_embed", r"", "fwd+bwd", "pct_peak_bw", 80, text=">= 80% HBM BW"),
    Target("contrastive loss", "contrastive_loss", r"^CLIP loss N=(16384|32768|65536) ", "fwd+bwd", "speedup", 1.5,
           ("open_clip", "eager"), ">= 1.5x open_clip ClipLoss"),
    Target("contrastive loss", "contrastive_loss", r"^CLIP loss N=65536 ", "fwd+bwd", "peak_mem_mb", 1024,
           text="64k batch < 1 GB extra memory"),
    Target("ViT-B/16 training step B=256", "model", r"^ViT-B-16 training step", "fwd+bwd", "speedup", 1.3, ("eager",),
           ">= 1.3x eager"),
    Target("ViT-B/16 training step B=256", "model", r"^ViT-B-16 training step", "fwd+bwd", "speedup", 1.1,
           ("torch.compile",), ">= 1.1x torch.compile"),
    Target("host overhead per op call", "host_overhead", r"", "host", "speedup", 0.5, ("eager",),
           "<= 2x the plain PyTorch call"),
    Target("host overhead per op call", "host_overhead", r"", "host", "host_us", 20, text="<= 20 us"),
]
