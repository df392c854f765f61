"""``clipfast bench text``: tokens processed and text-tower FLOPs of the unpadded text tower
(``clipfast.patch(model, unpad_text=True)``) against the padded one, and their time on a GPU.

Length mixes: the token-length histogram of a real prompt set (``_text_lengths.py``, with its source) and
all-77 prompts (the worst case: nothing to skip). Towers (``--tower``): the reference model's
``encode_text`` (default) or Hugging Face ``CLIPModel.get_text_features`` with an ``attention_mask`` (its
default text config, the same dims as ViT-B-16's). Three ways to run a batch:
- padded: every prompt at the 77-token context (what OpenAI clip / open_clip compute);
- truncated: every prompt cut to the batch's longest prompt (the fallback);
- unpadded: each prompt's own tokens, packed (the varlen path).

FLOPs are the text tower's matmul FLOPs, counted the same way for all three: per layer and token
``24 * width**2`` (QKV 6, out-projection 2, MLP 16, for the 4x MLP), per layer and prompt of n tokens
``2 * width * n * (n + 1)`` for causal attention (only the keys at or below each query: the padded
tower's masked scores are not charged to it, so its ratio is a lower bound), and ``2 * width * embed`` per
prompt for the projection. Counting runs on any machine; time needs a GPU.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from ._text_lengths import IMAGENET_PROMPT_LENGTHS, SOURCE

CONTEXT = 77


def tower_dims(name: str) -> dict:
    from clipfast.models import model_config

    cfg = model_config(name)
    return dict(width=cfg["transformer_width"], layers=cfg["transformer_layers"], heads=cfg["transformer_heads"],
                embed=cfg["embed_dim"], context=cfg["context_length"])


def text_tower_flops(lengths, width: int, layers: int, embed: int, **_) -> int:
    """Matmul FLOPs of a causal text tower over prompts of the given token counts (see the module docstring)."""
    tokens = sum(lengths)
    attention = sum(2 * width * n * (n + 1) for n in lengths)
    return layers * (24 * width * width * tokens + attention) + 2 * width * embed * len(lengths)


def sample_lengths(histogram: dict[int, int], batch: int, seed: int = 0) -> list[int]:
    """``batch`` prompt lengths drawn from ``histogram`` (seeded)."""
    keys = list(histogram)
    weights = torch.tensor([histogram[k] for k in keys], dtype=torch.float64)
    picks = torch.multinomial(weights, batch, replacement=True, generator=torch.Generator().manual_seed(seed))
    return [keys[i] for i in picks.tolist()]


def count(lengths: list[int], dims: dict) -> dict:
    """Tokens and FLOPs of the three ways to run one batch of prompts."""
    rows = {"padded": [dims["context"]] * len(lengths), "truncated": [max(lengths)] * len(lengths),
            "unpadded": list(lengths)}
    out = {}
    for mode, lens in rows.items():
        out[mode] = {"tokens": sum(lens), "gflop": text_tower_flops(lens, **dims) / 1e9}
    for mode in ("truncated", "unpadded"):
        out[mode]["padded_over_this_tokens"] = out["padded"]["tokens"] / out[mode]["tokens"]
        out[mode]["padded_over_this_flops"] = out["padded"]["gflop"] / out[mode]["gflop"]
    return out


def _prompts(lengths: list[int], vocab: int, device, context: int = CONTEXT) -> torch.Tensor:
    text = torch.randint(1, vocab - 1, (len(lengths), context), device=device)
    for i, n in enumerate(lengths):
        text[i, n - 1] = vocab - 1
        text[i, n:] = 0
    return text


def _reference_tower(model_name: str, lengths: list[int], device, dtype):
    from clipfast import models

    base = models.create(model_name).to(device, dtype)
    text = _prompts(lengths, base.vocab_size, device)
    return base, lambda model: model.encode_text(text)


def hf_text_config(**overrides):
    """Hugging Face CLIP's default text tower (openai/clip-vit-base-patch16's: width 512, 12 layers, 8 heads,
    77 positions, end-of-text id 49407 = the largest id) with a tiny vision tower (never run here)."""
    import transformers

    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=16)
    return transformers.CLIPConfig(text_config=overrides, vision_config=vision, projection_dim=512)


def _hf_clip_tower(lengths: list[int], device, dtype, **config):
    """HF ``CLIPModel.get_text_features`` with a right-padding ``attention_mask`` (what its tokenizer returns)."""
    import transformers

    base = transformers.CLIPModel(hf_text_config(**config)).to(device, dtype).eval()
    ids = _prompts(lengths, base.config.text_config.vocab_size, device, context=base.config.text_config.max_position_embeddings)
    mask = (torch.arange(ids.shape[1], device=device)[None] < torch.tensor(lengths, device=device)[:, None]).long()
    return base, lambda model: model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output


TOWERS = {"reference": "the reference model's encode_text",
          "hf-clip": "Hugging Face CLIPModel.get_text_features with attention_mask"}


def tower_times(tower: str, lengths: list[int], model_name: str = "ViT-B-16", device="cuda", dtype=torch.float16,
                repeats: int = 20, **config) -> dict:
    """Median milliseconds of the tower's text features (forward, and forward + backward) for the unpatched
    padded model and the patched one with and without ``unpad_text`` (CUDA events on a GPU, wall time else).
    ``config``: Hugging Face text-config overrides (a small tower for tests)."""
    import copy
    import time

    import clipfast

    if tower == "reference":
        base, encode = _reference_tower(model_name, lengths, device, dtype)
    else:
        base, encode = _hf_clip_tower(lengths, device, dtype, **config)
    variants = {"eager padded": base}
    for label, unpad in (("clipfast padded", False), ("clipfast unpadded", True)):
        m = copy.deepcopy(base)
        clipfast.patch(m, unpad_text=unpad)
        variants[label] = m
    cuda = torch.device(device).type == "cuda"
    out = {}
    for label, model in variants.items():
        for mode in ("fwd", "fwd+bwd"):
            def step():
                with torch.set_grad_enabled(mode != "fwd"):
                    y = encode(model)
                    if mode != "fwd":
                        y.float().sum().backward()
            for _ in range(min(3, repeats - 1)):  # warm-up
                step()
            times = []
            for _ in range(repeats):
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    step()
                    end.record()
                    torch.cuda.synchronize()
                    times.append(start.elapsed_time(end))
                else:
                    t0 = time.perf_counter()
                    step()
                    times.append((time.perf_counter() - t0) * 1e3)
            out[f"{label} {mode}"] = sorted(times)[len(times) // 2]
    return out


def hf_tower_dims() -> dict:
    config = hf_text_config()
    t = config.text_config
    return dict(width=t.hidden_size, layers=t.num_hidden_layers, heads=t.num_attention_heads,
                embed=config.projection_dim, context=t.max_position_embeddings)


def report(model_name: str = "ViT-B-16", batch: int = 256, seed: int = 0, time_on_gpu: bool = True,
           tower: str = "reference") -> dict:
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {', '.join(TOWERS)}, got {tower!r}")
    dims = tower_dims(model_name) if tower == "reference" else hf_tower_dims()
    label = model_name if tower == "reference" else "HF CLIPModel (default text config)"
    full_mix = [n for n, c in IMAGENET_PROMPT_LENGTHS.items() for _ in range(c)]
    mixes = {"imagenet-prompts": sample_lengths(IMAGENET_PROMPT_LENGTHS, batch, seed), "all-77": [CONTEXT] * batch}
    result = {"model": label, "tower": TOWERS[tower], "dims": dims, "batch": batch, "seed": seed,
              "length_source": SOURCE, "whole_histogram": count(full_mix, dims)["unpadded"], "mixes": {}}
    for name, lengths in mixes.items():
        entry = {"mean_length": sum(lengths) / len(lengths), "max_length": max(lengths), **count(lengths, dims)}
        if time_on_gpu and torch.cuda.is_available():
            entry["gpu_ms"] = tower_times(tower, lengths, model_name)
        result["mixes"][name] = entry
    return result


def format_report(r: dict) -> str:
    d = r["dims"]
    lines = [f"text tower of {r['model']} (width {d['width']}, {d['layers']} layers, context {d['context']}), "
             f"batch {r['batch']}; timed: {r['tower']}",
             f"length mix: {r['length_source']}",
             f"{'mix':<18}{'mode':<11}{'tokens':>9}{'GFLOP':>10}{'padded/this':>14}"]
    for name, e in r["mixes"].items():
        for mode in ("padded", "truncated", "unpadded"):
            ratio = e[mode].get("padded_over_this_flops")
            lines.append(f"{name:<18}{mode:<11}{e[mode]['tokens']:>9}{e[mode]['gflop']:>10.1f}"
                         + (f"{ratio:>13.2f}x" if ratio else f"{'':>14}"))
        for label, ms in e.get("gpu_ms", {}).items():
            lines.append(f"{name:<18}{label:<29}{ms:>9.3f} ms (GPU)")
    w = r["whole_histogram"]
    lines.append(f"whole histogram ({sum(IMAGENET_PROMPT_LENGTHS.values())} prompts): padded/unpadded "
                 f"{w['padded_over_this_tokens']:.2f}x tokens, {w['padded_over_this_flops']:.2f}x FLOPs")
    if not torch.cuda.is_available():
        lines.append("no GPU: tokens and FLOPs only (time needs a GPU)")
    return "\n".join(lines)


def _available(tower: str) -> bool:
    if tower == "reference":
        return True
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="clipfast bench text", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-B-16", help="reference model whose text tower is counted")
    p.add_argument("--tower", default="all", choices=["all", *TOWERS],
                   help="which codebase's tower to count and time (all: every installed one): "
                        + "; ".join(f"{k}: {v}" for k, v in TOWERS.items()))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the numbers as JSON")
    args = p.parse_args(argv)
    towers = [t for t in TOWERS if _available(t)] if args.tower == "all" else [args.tower]
    results = [report(args.model, args.batch, args.seed, tower=t) for t in towers]
    print("\n\n".join(format_report(r) for r in results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results[0] if len(results) == 1 else {r["tower"]: r for r in results}, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
