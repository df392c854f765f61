"""Summaries of GPU-check results: ``summary.md`` for one run, and the README's results section generated
from the committed results (never typed by hand). Every target in ``targets.TARGETS`` is flagged met or
missed.

    python -m clipfast.gpu_check.summary                              # print the README section
    python -m clipfast.gpu_check.summary --write-readme --from OUT    # file OUT (bench/gpu_suite.sh's output)
                                                                       # under bench/results/ and regenerate it
    python -m clipfast.gpu_check.summary --write-readme               # regenerate from bench/results/

A CPU rehearsal's output is refused: it has no timings and is not a GPU result.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys

from ..benchmarks.harness import RESULTS_ROOT, results_dir_name
from .targets import TARGETS, Target

START, END = "<!-- results:start -->", "<!-- results:end -->"
COMMITTED_FILES = ("results.json", "summary.md", "junit.xml", "plot_headline.png", "plot_rest.png",
                   "plot_loss_scaling.png")  # log.txt stays out of the repository
COMPARED = ("eager", "torch.compile")


def _time(row: dict):
    return row.get("host_us", row.get("ms_median"))


def _groups(rows: list[dict]) -> dict:
    """(family, case, dtype, mode) -> {impl: row}, timed rows without errors only."""
    groups: dict = {}
    for r in rows:
        if r.get("error") or _time(r) is None:
            continue
        groups.setdefault((r["family"], r["case"], r["dtype"], r["mode"]), {})[r["impl"]] = r
    return groups


def check_target(target: Target, rows: list[dict]) -> list[dict]:
    """One verdict per matching case: ``{"case", "value", "met"}``; ``met`` is None when the figure is
    missing (not measured, or the alternative did not run)."""
    verdicts = []
    for (family, case, _dtype, mode), impls in _groups(rows).items():
        if family != target.family or mode != target.mode or not re.search(target.case, case):
            continue
        fast = impls.get("clipfast")
        if fast is None:
            continue
        value = None
        if target.metric == "speedup":
            times = [_time(impls[a]) for a in target.against if a in impls]
            value = min(times) / _time(fast) if times else None
        else:
            value = fast.get(target.metric)
        met = None if value is None else (value <= target.threshold if target.at_most else value >= target.threshold)
        verdicts.append({"case": case, "value": value, "met": met})
    return verdicts


def _fmt(metric: str, value) -> str:
    if value is None:
        return "—"
    return {"speedup": f"{value:.2f}x", "tflops": f"{value:.0f} TFLOP/s", "pct_peak_bw": f"{value:.0f}%",
            "peak_mem_mb": f"{value:.0f} MiB", "host_us": f"{value:.1f} us"}.get(metric, f"{value:.3g}")


def targets_table(rows: list[dict]) -> list[str]:
    out = ["| hot path | target | case | measured | |", "|---|---|---|---|---|"]
    for target in TARGETS:
        verdicts = check_target(target, rows)
        if not verdicts:
            out.append(f"| {target.hot_path} | {target.text} | — | not measured | — |")
        for v in verdicts:
            flag = {True: "met", False: "**missed**", None: "no figure"}[v["met"]]
            measured = _fmt(target.metric, v["value"])
            out.append(f"| {target.hot_path} | {target.text} | {v['case']} | {measured} | {flag} |")
    return out


def timings_table(rows: list[dict]) -> list[str]:
    out = ["| family | case | dtype | mode | clipfast | vs eager | vs torch.compile | vs others |",
           "|---|---|---|---|---|---|---|---|"]
    for (family, case, dtype, mode), impls in _groups(rows).items():
        fast = impls.get("clipfast")
        if fast is None:
            continue
        unit = " us" if "host_us" in fast else " ms"

        def ratio(impl):
            return f"{_time(impls[impl]) / _time(fast):.2f}x" if impl in impls else "—"

        others = ", ".join(f"{k} {ratio(k)}" for k in impls if k not in ("clipfast", *COMPARED))
        out.append(f"| {family} | {case} | {dtype} | {mode} | {_time(fast):.3f}{unit} | {ratio('eager')} | "
                   f"{ratio('torch.compile')} | {others or '—'} |")
    return out


def _test_counts(data: dict) -> dict:
    counts: dict = {}
    for t in data.get("tests", []):
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    return counts


def _check_line(check: dict) -> str:
    state = ("ok" if check["ok"] else "skipped" if check["ok"] is None else
             "**FAILED**" if check.get("fatal", True) else "warning")
    return f"{check['name']}: {state}: {check['detail']}"


def suite_markdown(data: dict) -> str:
    """``summary.md`` of one run of the GPU check (``clipfast.gpu_check``)."""
    env = data["environment"]
    rehearsal = data.get("rehearsal")
    title = "CPU rehearsal (smoke shapes through the Triton interpreter; no timings)" if rehearsal else env["gpu"]
    if data.get("stopped"):
        title = "stopped by the preflight"
    out = [f"# clipfast GPU check: {title}", ""]
    if data.get("stopped"):
        out += [f"**Stopped: {data['stopped']}**", ""]
    out += [f"{env['date']}, torch {env['torch']}, triton {env['triton']}, python {env['python']}"
            + (f", CUDA {env.get('cuda')}, {env.get('nvidia_smi')}" if not rehearsal else "")
            + f"; {data.get('elapsed_s', 0):.0f}s of a {data['budget_s']:.0f}s budget, {data['workers']} workers.", ""]
    pre = data.get("preflight")
    if pre:
        out += ["## Preflight", "", *[f"- {_check_line(c)}" for c in pre.get("checks", [])], ""]
    crashes = data.get("crashes") or []
    if crashes:
        out += ["## Crashed processes", "", "Each crash: the case under way, its error, then the same case rerun alone "
                "in a fresh process with `CUDA_LAUNCH_BLOCKING=1`; the cases after it ran in a fresh process.", ""]
        for c in crashes:
            rerun = c.get("rerun")
            again = ("not rerun" if not isinstance(rerun, dict) else
                     f"rerun (pid {rerun['pid']}, CUDA_LAUNCH_BLOCKING=1): {(rerun.get('error') or 'no error')[:300]}")
            out.append(f"- {c['step']} / `{c.get('case') or 'start-up'}` (pid {c['pid']}): {str(c['error'])[:300]}; "
                       f"{again}; rest {'respawned' if c.get('respawned') else 'not restarted: ' + c.get('note', '')}")
        out.append("")
    out += ["## Steps", "", "| step | status | seconds | budget (s) |", "|---|---|---|---|"]
    out += [f"| {s['name']} | {s.get('status', 'running')} | {s.get('seconds', '—')} | {s['budget_s']} |"
            for s in data["steps"]]
    counts = _test_counts(data)
    collected = sum(s.get("collected", 0) for s in data["steps"])
    out += ["", "## Tests", "", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none run yet",
            f"({collected} selected; {max(0, collected - sum(counts.values()))} not run within the budgets)", ""]
    failures = [t for t in data.get("tests", []) if t["outcome"] in ("failed", "error")]
    for t in failures[:40]:
        first = (t.get("message") or "").strip().splitlines()[-1:] or [""]
        out.append(f"- `{t['nodeid']}` ({t['outcome']}): {first[0][:200]}")
    warm = data.get("warm", [])
    if warm:
        errors = [w for w in warm if w.get("error")]
        out += ["", f"Compile step: {len(warm)} case launches in {data['workers']} processes, {len(errors)} errors."]
    rows = [r for r in data.get("rows", []) if r.get("mode") != "-" or r.get("error")]
    broken = [r for r in rows if r.get("error")]
    if rehearsal:
        out += ["", "## Benchmarks", "", f"{len(rows)} smoke rows ({len(broken)} errors); no timings without a GPU."]
    else:
        headline = [r for r in rows if str(r.get("step", "")).startswith("headline")]
        out += ["", "## Targets (GUIDE §3)", "", *targets_table(rows), "",
                "## Headline timings (median, CUDA events)", "",
                *timings_table(headline), "", "## Other benchmark cases", "",
                *timings_table([r for r in rows if r.get("step") == "rest_bench"])]
    if broken:
        out += ["", "## Benchmark errors", ""]
        out += [f"- {r['family']} / {r['case']} / {r['impl']} / {r['mode']}: {r['error'][:200]}" for r in broken[:60]]
    if data.get("notes"):
        out += ["", "## Notes", "", *[f"- {n}" for n in data["notes"]]]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------
# The README section from committed results
# ------------------------------------------------------------------------------------------------

def load_results(root: str = RESULTS_ROOT) -> list[dict]:
    """Committed GPU runs (``results.json`` of the GPU check, or ``bench_*.json`` of ``clipfast bench``)."""
    found = []
    paths = glob.glob(os.path.join(root, "*", "results.json")) + glob.glob(os.path.join(root, "*", "bench_*.json"))
    for path in sorted(paths):
        with open(path) as f:
            data = json.load(f)
        if not data.get("smoke") and not data.get("rehearsal") and data.get("rows"):
            data["path"] = path
            found.append(data)
    return found


def section(results: list[dict]) -> str:
    if not results:
        targets = ["| hot path | target | case |", "|---|---|---|"]
        targets += [f"| {t.hot_path} | {t.text} | {t.family} `{(t.case or '*').replace('|', chr(92) + '|')}` {t.mode} |"
                    for t in TARGETS]
        return ("No GPU results are committed yet. `bash bench/gpu_suite.sh OUT` on a GPU writes them; "
                "`python -m clipfast.gpu_check.summary --write-readme --from OUT` files them under `bench/results/` "
                "and regenerates this section, flagging each target below met or missed "
                "(`clipfast/gpu_check/targets.py`):\n\n" + "\n".join(targets))
    out = []
    for data in results:
        env, rows = data["environment"], data["rows"]
        out += [f"**{env['gpu']}**, {env['date']}, torch {env['torch']}, triton {env['triton']} (`{data['path']}`)", ""]
        counts = _test_counts(data)
        if counts:
            out += ["Tests on the GPU: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ".", ""]
        out += ["Targets:", "", *targets_table(rows), "", "Timings (clipfast's median; ratios: the alternative's time "
                "over clipfast's, above 1 means clipfast is faster):", "",
                *timings_table([r for r in rows if str(r.get("step", "headline")).startswith("headline")]), ""]
    out.append("Measured side by side in one run; the full tables are in each folder's `summary.md`.")
    return "\n".join(out).strip()


def render_readme(readme: str, body: str) -> str:
    if START not in readme or END not in readme:
        raise ValueError(f"README has no {START} ... {END} markers")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{body}\n{END}{tail}"


def file_results(src: str, root: str = RESULTS_ROOT) -> str:
    """Copy a GPU check's output into ``root/<gpu>_<date>_torch<v>_triton<v>/``; refuses a rehearsal."""
    path = os.path.join(src, "results.json")
    if not os.path.exists(path):
        raise ValueError(f"{src} has no results.json (the output of bash bench/gpu_suite.sh OUT)")
    with open(path) as f:
        data = json.load(f)
    if data.get("rehearsal") or not data["environment"].get("gpu"):
        raise ValueError(f"{src} is a CPU rehearsal (no GPU, no timings): it is not filed as GPU results")
    dest = os.path.join(root, results_dir_name(data["environment"]))
    os.makedirs(dest, exist_ok=True)
    for name in COMMITTED_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dest, name))
    return dest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m clipfast.gpu_check.summary", description=__doc__.split("\n\n")[0])
    p.add_argument("--write-readme", action="store_true", help="replace the README's results section")
    p.add_argument("--from", dest="source", default=None, help="a GPU check's output folder to file first")
    p.add_argument("--readme", default="README.md")
    p.add_argument("--root", default=RESULTS_ROOT, help="where results are filed")
    args = p.parse_args(argv)
    if args.source:
        try:
            print(f"filed {file_results(args.source, args.root)}")
        except ValueError as exc:
            print(f"summary: {exc}", file=sys.stderr)
            return 2
    body = section(load_results(args.root))
    if not args.write_readme:
        print(body)
        return 0
    with open(args.readme) as f:
        text = f.read()
    with open(args.readme, "w") as f:
        f.write(render_readme(text, body))
    print(f"wrote the results section of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
