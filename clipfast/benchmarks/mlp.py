"""Transformer MLP (fc -> QuickGELU -> proj) at CLIP shapes, against the op's eager reference Linear ->
QuickGELU -> Linear (``clipfast.ops.mlp.reference_mlp``, in the input dtype as PyTorch code runs it), torch.compile of
it, and the two bare GEMMs without bias or activation (the floor: what cuBLAS takes for the matrix products
alone; its backward is the same four GEMMs). Also the standalone QuickGELU against its reference.

Targets (H100, bf16): >= 1.3x eager, >= 1.1x torch.compile, within 10% of the bare GEMMs, >= 600 TFLOP/s.
"""
import torch

import clipfast
from clipfast.ops.mlp import reference_activation, reference_mlp

from .harness import BenchCase

SHAPES = {  # label -> (rows = batch * tokens, width, hidden)
    "ViT-B/16 B=256 L=197 768->3072": (256 * 197, 768, 3072),
    "ViT-L/14 B=128 L=257 1024->4096": (128 * 257, 1024, 4096),
    "text B=256 L=77 512->2048": (256 * 77, 512, 2048),
    # small batch: the weight gradients have few output tiles for their K and run split-K
    "ViT-B/16 B=32 L=197 768->3072": (32 * 197, 768, 3072),
}
SMOKE_SHAPES = {"smoke 37x64->256": (37, 64, 256)}


def _quick_gelu(x):
    return reference_activation(x, "quick_gelu")


def _eager(x, w1, b1, w2, b2, residual=None):
    return reference_mlp(x, w1, b1, w2, b2, "quick_gelu", residual)


def _clipfast(x, w1, b1, w2, b2, residual=None):
    return clipfast.mlp(x, w1, b1, w2, b2, "quick_gelu", residual=residual)


def _bare_gemms(x, w1, b1, w2, b2, residual=None):
    return (x @ w1.t()) @ w2.t()


def cases(smoke: bool):
    found = []
    for label, (rows, width, hidden) in (SMOKE_SHAPES if smoke else SHAPES).items():
        dtype = torch.float32 if smoke else torch.bfloat16
        for residual in (False, True):
            if residual and not (smoke or label.startswith("ViT-B/16")):
                continue

            def make(device, dtype, rows=rows, width=width, hidden=hidden, residual=residual):
                def param(*shape, scale):
                    return (scale * torch.randn(*shape, device=device)).to(dtype).requires_grad_()

                inputs = {"x": torch.randn(rows, width, device=device, dtype=dtype, requires_grad=True),
                          "w1": param(hidden, width, scale=width ** -0.5), "b1": param(hidden, scale=0.1),
                          "w2": param(width, hidden, scale=hidden ** -0.5), "b2": param(width, scale=0.1)}
                if residual:
                    inputs["residual"] = torch.randn(rows, width, device=device, dtype=dtype, requires_grad=True)
                return inputs

            gemm_flops = 2.0 * rows * width * hidden  # one of the six products
            found.append(BenchCase(
                family="mlp", name=f"{'fc+QuickGELU+proj+residual' if residual else 'fc+QuickGELU+proj'} {label}",
                dtype=dtype, make_inputs=make,
                impls={"clipfast": _clipfast, "eager": _eager, "bare GEMMs": _bare_gemms},
                flops=lambda mode, f=gemm_flops: {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[mode] * f,
                shape={"rows": rows, "width": width, "hidden": hidden, "residual": residual},
            ))

        def make_act(device, dtype, rows=rows, hidden=hidden):
            return {"x": torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)}

        size = torch.finfo(dtype).bits // 8
        found.append(BenchCase(
            family="mlp", name=f"QuickGELU [{rows}x{hidden}]", dtype=dtype, make_inputs=make_act,
            impls={"clipfast": clipfast.quick_gelu, "eager": _quick_gelu},
            # fwd: read x, write y; bwd: read x and dy, write dx
            bytes=lambda mode, n=rows * hidden * size: {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode] * n,
            shape={"rows": rows, "hidden": hidden},
        ))
    return found


# ----------------------------------------------------------------------------------------------
# Activation memory: bytes saved for backward (measurable on any machine)
# ----------------------------------------------------------------------------------------------

def saved_activation_bytes(fn, *args, exclude=()) -> int:
    """Bytes of the distinct storages that autograd keeps for the backward of ``fn(*args)``, counted with
    ``torch.autograd.graph.saved_tensors_hooks`` as the forward saves them; storages of the tensors in
    ``exclude`` (parameters) are not counted. The ops save the same tensors on every device and path."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    del out
    return sum(seen.values())


def _eager_gelu(x, w1, b1, w2, b2):
    return reference_mlp(x, w1, b1, w2, b2, "gelu", None)


def _fused_gelu(x, w1, b1, w2, b2):
    return clipfast.mlp(x, w1, b1, w2, b2, "gelu")


def _failure(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def _measure(fn, *args, exclude=()):
    """``saved_activation_bytes``, or the reason ``fn`` failed (e.g. torch.compile without a toolchain)."""
    try:
        return saved_activation_bytes(fn, *args, exclude=exclude)
    except Exception as exc:
        return _failure(exc)


VIT_B16_SHAPES = [("ViT-B/16 MLP, 197 tokens", 197, 768, 3072), ("ViT-B/16 MLP, 8 x 197 tokens", 8 * 197, 768, 3072)]


def saved_bytes_rows(shapes=VIT_B16_SHAPES, dtype=torch.bfloat16, with_compile: bool = True,
                     model: str | None = "tiny"):
    """Rows of the saved-for-backward table: one MLP block at each ``(label, rows, width, hidden)`` (the op's
    eager reference with erf GELU and with QuickGELU, their torch.compile, the fused MLP), and a whole reference
    model (``clipfast.models.create(model)``, batch 2) eager, compiled and patched. Parameters are excluded."""
    rows = []
    for label, tokens, width, hidden in shapes:
        x = torch.randn(tokens, width, dtype=dtype, requires_grad=True)
        params = [(torch.randn(*s) * 0.02).to(dtype).requires_grad_()
                  for s in [(hidden, width), (hidden,), (width, hidden), (width,)]]
        impls = {"eager nn.GELU": _eager_gelu, "eager QuickGELU": _eager, "clipfast gelu": _fused_gelu,
                 "clipfast quick_gelu": _clipfast}
        if with_compile:
            impls["torch.compile nn.GELU"] = torch.compile(_eager_gelu)
            impls["torch.compile QuickGELU"] = torch.compile(_eager)
        rows.append({"case": label, "rows": tokens, "width": width, "hidden": hidden, "dtype": str(dtype),
                     "bytes": {name: _measure(fn, x, *params, exclude=params) for name, fn in impls.items()}})
    if model:
        rows.append(_model_row(model, torch.float32, with_compile))  # fp32: its LayerNorms take fp32 weights
    return rows


def _model_row(name: str, dtype, with_compile: bool) -> dict:
    import copy

    from clipfast.models import create

    model = create(name).to(dtype)
    images = torch.randn(2, 3, model.visual.input_resolution, model.visual.input_resolution, dtype=dtype)
    text = torch.randint(1, model.vocab_size - 1, (2, model.context_length))
    text[:, -1] = model.vocab_size - 1  # end-of-text token

    def measure(m):
        return _measure(lambda: m(images, text)[0], exclude=list(m.parameters()))

    found = {"eager": measure(model)}
    if with_compile:
        found["torch.compile"] = measure(torch.compile(model))
    for label, families in (("clipfast.patch (mlp only)", dict(layer_norm=False, attention=False, patch_embed=False)),
                            ("clipfast.patch (all families)", {})):
        patched = copy.deepcopy(model)
        clipfast.patch(patched, **families)
        found[label] = measure(patched)
    return {"case": f"reference model {name!r}, 2 images + 2 texts", "dtype": str(dtype), "bytes": found}


def saved_bytes_markdown(rows) -> str:
    """The table: bytes and the ratio to each eager baseline of the row's case."""
    lines = ["| case | implementation | saved bytes | / eager nn.GELU (model: / eager) | / eager QuickGELU |",
             "|---|---|---:|---:|---:|"]
    for row in rows:
        measured = row["bytes"]
        bases = [measured.get("eager nn.GELU", measured.get("eager")), measured.get("eager QuickGELU")]
        for impl, value in measured.items():
            if not isinstance(value, int):
                lines.append(f"| {row['case']} | {impl} | failed: {value} | | |")
                continue
            ratios = [f"{value / base:.2f}" if isinstance(base, int) and base else "" for base in bases]
            lines.append(f"| {row['case']} | {impl} | {value:,} | {ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


def write_saved_bytes(out_dir: str) -> None:
    """Measure the saved-bytes table on this machine and write ``README.md`` and ``saved_bytes.json``."""
    import json
    import os
    import platform

    rows = saved_bytes_rows()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "saved_bytes.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(f"""# Activation bytes saved for backward: fused MLP against eager and torch.compile

Measured with `python -m clipfast.benchmarks.mlp OUT_DIR` (torch {torch.__version__}, {platform.machine()} CPU,
bf16 for the MLP blocks, fp32 for the model). `torch.autograd.graph.saved_tensors_hooks` sees every
tensor the forward saves for backward; the table sums the distinct storages, parameters excluded (only
activations). The clipfast ops save the same tensors on every path (kernels or eager fallback), so a CPU
measures what a GPU keeps. The clipfast MLP keeps x and the pre-activation Z (H = act(Z) is recomputed
in the backward). The eager rows are the op's eager reference (`clipfast.ops.mlp.reference_mlp`, in the
input dtype as PyTorch code writes it: "eager nn.GELU" with `F.gelu`, keeping x, Z and H; "eager QuickGELU"
with `z * sigmoid(1.702 * z)`, also the sigmoid). torch.compile ran with CPU inductor.

{saved_bytes_markdown(rows)}
""")


if __name__ == "__main__":
    import sys

    write_saved_bytes(sys.argv[1] if len(sys.argv) > 1 else "bench/results/mlp_saved_bytes_cpu")
