"""``clipfast bench``: run benchmark cases, print a table, save JSON/CSV and optional PNG charts."""
from __future__ import annotations

import csv
import json
import os
import sys

import torch

from . import all_cases, case_modules
from .harness import RESULTS_ROOT, environment, results_dir_name, run_case

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: What ``clipfast bench TARGET`` runs (``clipfast bench --help`` lists these; a test keeps the case
#: families in step with the case modules found by ``clipfast.benchmarks.case_modules``).
SPECIAL_TARGETS = {
    "all": "every case family below",
    "overhead": "host microseconds per call of every op against its eager reference, the plain PyTorch it "
                "replaces (its own table)",
    "text": "tokens / FLOPs (and time on a GPU) of unpadded vs padded text towers (its own report)",
}
CASE_TARGETS = {
    "attention": "attention at CLIP shapes vs eager, every SDPA backend and nn.MultiheadAttention",
    "contrastive_loss": "contrastive losses at large-batch sizes (N = 4k..32k): time and peak memory",
    "host_overhead": "host time per op call as benchmark cases (what the GPU check times)",
    "integrations": "open_clip and Hugging Face CLIPModel: image encoding and a training step",
    "layer_norm": "LayerNorm (+ residual add) at CLIP widths",
    "local_loss": "one data-parallel rank's loss: 256 local pairs against 32k gathered features",
    "mlp": "fc -> activation -> proj vs eager, torch.compile and the bare cuBLAS GEMMs",
    "model": "the reference CLIP: image encoding and a training step, eager / compiled / patched",
    "patch_embed": "patch embedding + class token + positions + ln_pre vs eager and torch.compile",
    "siglip": "Hugging Face SiglipModel (base/16, so400m/14): encoding and a training step",
}


def target_names() -> list[str]:
    return [*SPECIAL_TARGETS, *CASE_TARGETS]


def targets_help() -> str:
    """The target list for ``clipfast bench --help``."""
    width = max(map(len, target_names()))
    return "\n".join(f"  {name:<{width}}  {text}" for name, text in {**SPECIAL_TARGETS, **CASE_TARGETS}.items())


def results_dir(env: dict) -> str:
    return os.path.join(RESULTS_ROOT, results_dir_name(env))


def format_rows(rows: list[dict]) -> str:
    lines = []
    smoke = all(r.get("smoke") for r in rows)
    if smoke:
        header = f"{'family':<18}{'case':<34}{'impl':<16}{'mode':<9}{'status':<10}{'seconds (interpreter)':>22}"
    else:
        header = (f"{'family':<18}{'case':<34}{'impl':<16}{'mode':<9}{'ms':>9}{'p20-p80':>16}"
                  f"{'TFLOP/s':>9}{'GB/s':>8}{'%peak':>7}{'clipfast x':>11}{'MiB':>8}")
    lines += [header, "-" * len(header)]
    for r in rows:
        head = f"{r['family'][:17]:<18}{r['case'][:33]:<34}{r['impl'][:15]:<16}{r['mode']:<9}"
        if r.get("error"):
            lines.append(head + f"error: {r['error'][:80]}")
        elif "host_us" in r:  # host time per call, not device time
            lines.append(head + f"{r['host_us']:>9.1f} us per call on the host"
                         f"{r.get('speedup_of_clipfast', float('nan')):>16.2f}x")
        elif smoke:
            lines.append(head + f"{'ok':<10}{r.get('smoke_seconds', 0):>22.3f}")
        else:
            pct = r.get("pct_peak_flops", r.get("pct_peak_bw"))
            lines.append(head + f"{r['ms_median']:>9.3f}{r['ms_p20']:>8.3f}-{r['ms_p80']:<7.3f}"
                         f"{r.get('tflops', float('nan')):>9.1f}{r.get('gbs', float('nan')):>8.0f}"
                         f"{pct if pct is not None else float('nan'):>7.1f}"
                         f"{r.get('speedup_of_clipfast', float('nan')):>10.2f}x{r.get('peak_mem_mb', float('nan')):>8.0f}")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str) -> None:
    keys = sorted({k for r in rows for k in r if k != "shape"}) + ["shape"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "shape": json.dumps(r.get("shape", {}))})


def _wrapped(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def labels_fit(fig) -> bool:
    """Whether every label, title, tick label and legend of ``fig`` lies inside the figure (after drawing)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    texts = [fig._suptitle] if getattr(fig, "_suptitle", None) else []
    for ax in fig.axes:
        (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
        texts += [ax.xaxis.label, ax.yaxis.label, ax.title]
        texts += [t for t in ax.get_xticklabels() if x0 <= t.get_position()[0] <= x1]  # the ticks drawn
        texts += [t for t in ax.get_yticklabels() if y0 <= t.get_position()[1] <= y1]
        if ax.get_legend() is not None:
            texts.append(ax.get_legend())
    for t in texts:
        if not t.get_visible() or (hasattr(t, "get_text") and not t.get_text()):
            continue
        e = t.get_window_extent(renderer)
        if e.x0 < box.x0 - 1 or e.y0 < box.y0 - 1 or e.x1 > box.x1 + 1 or e.y1 > box.y1 + 1:
            return False
    return True


def speedup_figure(rows: list[dict]):
    """The chart ``plot`` writes: speedup of clipfast over each alternative per case (fwd+bwd); smoke rows
    plot interpreter seconds. Long labels are wrapped and the legend sits beside the axes, so all of it fits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    smoke = all(r.get("smoke") for r in rows)
    mode = "fwd+bwd" if any(r["mode"] == "fwd+bwd" for r in rows) else rows[0]["mode"]
    picked = [r for r in rows if r["mode"] == mode and not r.get("error")]
    cases = list(dict.fromkeys(f"{r['family']}: {r['case']}" for r in picked))
    impls = [i for i in dict.fromkeys(r["impl"] for r in picked) if smoke or i != "clipfast"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases) + 3), 4.5))
    width = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        values = []
        for c in cases:
            match = [r for r in picked if f"{r['family']}: {r['case']}" == c and r["impl"] == impl]
            values.append((match[0].get("smoke_seconds") if smoke else match[0].get("speedup_of_clipfast")) if match else 0)
        ax.bar([i + j * width for i in range(len(cases))], [v or 0 for v in values], width, label=impl)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels([_wrapped(c, 28) for c in cases], rotation=30, ha="right", fontsize=7)
    if smoke:
        ax.set_ylabel(_wrapped("seconds in the Triton interpreter (smoke run, not a timing)", 34), fontsize=9)
    else:
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel(_wrapped(f"clipfast speedup over implementation ({mode})", 34), fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    env = environment()
    ax.set_title(_wrapped(f"clipfast {mode} — {env['gpu'] or 'CPU smoke'}, torch {env['torch']}, "
                          f"triton {env['triton']}", 90), fontsize=8)
    fig.tight_layout()
    return fig


def plot(rows: list[dict], path: str) -> None:
    """Write ``speedup_figure(rows)`` to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = speedup_figure(rows)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _batch(row: dict):
    """The contrastive-loss batch size N of a row (the cases record it as ``n``)."""
    shape = row.get("shape", {})
    return shape.get("n", shape.get("N"))


def plot_loss_scaling(rows: list[dict], path: str) -> bool:
    """Contrastive-loss time and peak memory against batch size N (fwd+bwd), one line per implementation.
    Returns False when there are no timed loss rows to plot."""
    picked = [r for r in rows if r["family"] == "contrastive_loss" and r["mode"] == "fwd+bwd"
              and not r.get("error") and "ms_median" in r and _batch(r) and "m" not in r["shape"]]
    if not picked:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for impl in dict.fromkeys(r["impl"] for r in picked):
        mine = sorted((r for r in picked if r["impl"] == impl), key=_batch)
        ns = [_batch(r) for r in mine]
        ax_t.plot(ns, [r["ms_median"] for r in mine], marker="o", label=impl)
        ax_m.plot(ns, [r.get("peak_mem_mb", float("nan")) for r in mine], marker="o", label=impl)
    for ax, label in ((ax_t, "fwd+bwd time (ms)"), (ax_m, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size N")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    env = environment()
    fig.suptitle(f"contrastive loss — {env['gpu']}, torch {env['torch']}, triton {env['triton']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main_bench(args) -> int:
    if args.target == "text":  # tokens / FLOPs (and GPU time) of the unpadded text tower: its own report
        from .text import main
        return main(["--json", args.json] if args.json else [])
    on_gpu = torch.cuda.is_available()
    smoke = args.smoke or not on_gpu
    families = [m.__name__.rsplit(".", 1)[-1] for m in case_modules()]
    if args.target not in ("all", *families):
        names = ", ".join(dict.fromkeys([*SPECIAL_TARGETS, *families]))
        print(f"clipfast bench: unknown target {args.target!r}; choose one of: {names} "
              f"(clipfast bench --help says what each runs)", file=sys.stderr)
        return 2
    if not on_gpu:
        print("clipfast bench: no GPU found: timings need a GPU. Running the smoke pass (tiny shapes through the "
              "Triton interpreter) so the harness and every case are exercised.", file=sys.stderr)
    cases = all_cases(smoke=smoke, family=args.target)
    if args.dtype:
        if smoke and args.dtype == "bf16":
            print("clipfast bench: bf16 cannot run in the Triton interpreter", file=sys.stderr)
            return 2
        for c in cases:
            c.dtype = DTYPES[args.dtype]
    env = environment()
    json_path, csv_path = args.json, args.csv
    if on_gpu and not smoke and not json_path:
        out = results_dir(env)
        os.makedirs(out, exist_ok=True)
        json_path = os.path.join(out, f"bench_{args.target}.json")
        csv_path = csv_path or os.path.join(out, f"bench_{args.target}.csv")
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    rows = []
    for i, case in enumerate(cases):
        print(f"[{i + 1}/{len(cases)}] {case.family}: {case.name}", file=sys.stderr, flush=True)
        rows.extend(run_case(case, smoke=smoke))
        if json_path:  # after every case: a run that is stopped keeps what it measured
            with open(json_path + ".tmp", "w") as f:
                json.dump({"environment": env, "smoke": smoke, "rows": rows}, f, indent=1)
            os.replace(json_path + ".tmp", json_path)
    print(format_rows(rows))
    if json_path:
        print(f"wrote {json_path}")
    if csv_path:
        write_csv(rows, csv_path)
        print(f"wrote {csv_path}")
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
        loss_plot = os.path.splitext(args.plot)[0] + "_loss_scaling.png"
        if plot_loss_scaling(rows, loss_plot):
            print(f"wrote {loss_plot}")
    failed = [r for r in rows if r.get("error") and r["impl"] in ("clipfast", "eager")]
    return 1 if failed else 0
