"""The README's results section, generated from the committed GPU results (never typed by hand).

    python -m clipfast.benchmarks.summary                  # print the section
    python -m clipfast.benchmarks.summary --write-readme   # replace it in README.md
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

START, END = "<!-- results:start -->", "<!-- results:end -->"


def load_results(root: str = os.path.join("bench", "results")) -> list[dict]:
    found = []
    for path in sorted(glob.glob(os.path.join(root, "*", "bench_*.json"))):
        with open(path) as f:
            data = json.load(f)
        if not data.get("smoke") and data.get("rows"):
            data["path"] = path
            found.append(data)
    return found


def section(results: list[dict]) -> str:
    if not results:
        return ("No GPU results are committed yet. `bash bench/gpu_suite.sh` on a GPU writes them under "
                "`bench/results/`; this section is then regenerated from them.")
    out = []
    for data in results:
        env = data["environment"]
        out.append(f"**{env['gpu']}**, {env['date']}, torch {env['torch']}, triton {env['triton']} "
                   f"(`{data['path']}`)\n")
        out.append("| family | case | dtype | mode | clipfast ms | vs eager | vs torch.compile | other alternatives |")
        out.append("|---|---|---|---|---|---|---|---|")
        rows = [r for r in data["rows"] if not r.get("error") and "ms_median" in r]
        keys = list(dict.fromkeys((r["family"], r["case"], r["dtype"], r["mode"]) for r in rows))
        for key in keys:
            group = {r["impl"]: r for r in rows if (r["family"], r["case"], r["dtype"], r["mode"]) == key}
            if "clipfast" not in group:
                continue
            speed = lambda impl: f"{group[impl]['speedup_of_clipfast']:.2f}x" if impl in group else "—"  # noqa: E731
            others = ", ".join(f"{k} {v['speedup_of_clipfast']:.2f}x" for k, v in group.items()
                               if k not in ("clipfast", "eager", "torch.compile"))
            out.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {group['clipfast']['ms_median']:.3f} | "
                       f"{speed('eager')} | {speed('torch.compile')} | {others or '—'} |")
        out.append("")
    out.append("Speedups are clipfast's time divided into the alternative's, measured side by side in one run.")
    return "\n".join(out).strip()


def render_readme(readme: str, body: str) -> str:
    if START not in readme or END not in readme:
        raise ValueError(f"README has no {START} ... {END} markers")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{body}\n{END}{tail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write-readme", action="store_true")
    p.add_argument("--readme", default="README.md")
    args = p.parse_args(argv)
    body = section(load_results())
    if not args.write_readme:
        print(body)
        return 0
    with open(args.readme) as f:
        text = f.read()
    with open(args.readme, "w") as f:
        f.write(render_readme(text, body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
