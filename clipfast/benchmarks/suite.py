"""The GPU check: one command that answers where clipfast stands on a GPU within a short lease.

    python -m clipfast.benchmarks.suite OUT [--budget-s S]     # what bench/gpu_suite.sh runs

Steps, in priority order, each in its own processes with its own time budget (a share of the whole);
every result is appended to ``OUT`` as soon as it exists, so a run stopped at any point returns all it
finished:

1. ``warm``: N worker processes (one per core, at most 16) each run their share of the benchmark cases
   the timed steps use, once per mode, with every autotuned kernel compiling *all* its pruned shipped
   configs at the case's real arguments (``compiling_every_config``: the JIT function is launched with
   each config's meta-parameters in warmup mode, i.e. compiled without running, then the first one runs),
   so Triton's on-disk cache holds every binary the timed steps will load, specialized exactly as they
   will launch it. torch.compile of the kernel-level cases is run too (inductor's on-disk caches).
   Whole-model cases are left out: their kernels run at the same shapes as the kernel cases. Beside this
   step and the next, ``warm_models`` runs the two whole-model torch.compiles of step 3 once (two
   processes), so the timed step loads them from inductor's caches; it is stopped before any timing.
2. ``correctness``: ``pytest -m "gpu or gpu_suite"`` split over N parallel processes (each compiles its
   own kernels): every family forward and backward in fp16/bf16 against float64 at CLIP shapes, every
   shipped tile forced, the large-tensor cases. No ``-x``; a test does not start after the budget.
3. ``headline_kernels``, ``headline_model``, ``headline_model_compiled``: the headline timings
   (``HEADLINE``), the whole-model torch.compile cases (two compiles) in a step of their own.
4. ``rest_tests``: the rest of the test suite, in parallel; ``rest_bench``: every remaining benchmark
   case and implementation, as long as time is left.

Without CUDA the same steps run as a rehearsal: smoke shapes through the Triton interpreter, no timings,
results labelled ``"rehearsal": true`` (``clipfast.benchmarks.summary`` refuses to file them as GPU results).

Output (at most 8 files, no folders): ``results.json`` (environment, steps, test outcomes, benchmark
rows), ``summary.md`` (targets met/missed, tables), ``log.txt``, ``junit.xml`` and up to three PNG plots.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

GPU_BUDGET_S = 420        # all steps; with the install, start-up and overruns the command stays under 8 minutes
REHEARSAL_BUDGET_S = 100  # the CPU rehearsal (each step also gets its start-up and one item: see run_step)
REHEARSAL_MIN_STEP_S = 5
FINAL_RESERVE_S = 8       # kept for the plots and the last write
STARTUP_S = 20            # allowed per step for a child's start-up (imports, pytest collection) on the GPU machine
REHEARSAL_STARTUP_S = 90  # the same on a small, shared CPU machine
MAX_WORKERS = 16
OUTPUT_FILES = ("results.json", "summary.md", "log.txt", "junit.xml",
                "plot_headline.png", "plot_rest.png", "plot_loss_scaling.png")
LOG_LIMIT_BYTES = 8 * 2**20


OPTIONAL_PACKAGES = {  # what a missing package costs the run (skipped with this note, never a failure)
    "open_clip": "open_clip's benchmark cases and integration tests are",
    "clip": "OpenAI clip's integration tests are",
    "cn_clip": "Chinese-CLIP's integration tests are",
    "transformers": "Hugging Face benchmark cases and integration tests are",
    "matplotlib": "the plots are",
    "pytest": "the test steps are",
}


@dataclass(frozen=True)
class Pick:
    """Benchmark cases of one family whose name matches ``gpu`` (at GPU shapes) or ``smoke`` (rehearsal),
    with the implementations to run (None: all, torch.compile of the eager one included)."""
    family: str
    gpu: str
    smoke: str
    impls: tuple[str, ...] | None = None

    def matches(self, case, smoke: bool) -> bool:
        module_family = getattr(case, "module_family", case.family)
        return module_family == self.family and re.search(self.smoke if smoke else self.gpu, case.name) is not None


# The headline timings (priority 2), side by side in one run. Whole-model torch.compile is its own step.
HEADLINE = {
    "headline_kernels": [
        Pick("attention", r"^ViT-B/16 B=256 H=12 S=197 D=64$", r"^smoke .*S=65 "),
        Pick("attention", r"^text B=256 H=8 S=77 D=64 causal$", r"^smoke .*causal$"),
        Pick("mlp", r"^fc\+QuickGELU\+proj ViT-B/16 ", r"^fc\+QuickGELU\+proj smoke"),
        Pick("layer_norm", r"^ViT-B/16 ", r"^smoke"),
        Pick("layer_norm", r"^add\+LN ViT-B/16 ", r"^add\+LN smoke"),
        Pick("contrastive_loss", r"^CLIP loss N=32768 d=512$", r"^CLIP loss"),
        Pick("local_loss", r"^local loss N=256 M=32768 ", r"^local loss"),
        Pick("host_overhead", r"", r""),
    ],
    "headline_model": [
        Pick("model", r"^ViT-B-16 (training step|image encoding) ", r"^tiny ", impls=("clipfast", "eager")),
    ],
    "headline_model_compiled": [  # the two whole-model compiles of the run
        Pick("model", r"^ViT-B-16 training step ", r"^tiny training step ",
             impls=("torch.compile", "clipfast+torch.compile")),
    ],
}
WHOLE_MODEL_FAMILIES = ("model", "integrations")


@dataclass(frozen=True)
class Step:
    name: str
    kind: str      # "warm", "pytest" or "bench"
    share: float   # of the whole budget; the last step takes whatever is left
    args: tuple[str, ...] = ()


# Runs beside the compile and correctness steps (its share counts on top of the compile step's budget)
BACKGROUND_STEP = Step("warm_models", "warm", 0.0)
BACKGROUND_SHARE = 0.22

STEPS = (
    Step("warm", "warm", 0.14),
    Step("correctness", "pytest", 0.22, ("tests", "-m", "gpu or gpu_suite")),
    Step("headline_kernels", "bench", 0.16),
    Step("headline_model", "bench", 0.07),
    Step("headline_model_compiled", "bench", 0.20),
    Step("rest_tests", "pytest", 0.10, ("tests", "-m", "not gpu and not gpu_suite")),
    Step("rest_bench", "bench", 1.0),
)


# ------------------------------------------------------------------------------------------------
# Plans: which (case, implementations) a step runs
# ------------------------------------------------------------------------------------------------

def _all_cases(smoke: bool):
    """Every case, kernel families first and whole-model families last, each tagged with the name of its
    case module (the family ``clipfast bench`` and the picks select by)."""
    from . import case_modules

    found = []
    modules = sorted(case_modules(), key=lambda m: m.__name__.rsplit(".", 1)[-1] in WHOLE_MODEL_FAMILIES)
    for module in modules:
        for case in module.cases(smoke):
            case.module_family = module.__name__.rsplit(".", 1)[-1]
            found.append(case)
    return found


def _impl_names(case, smoke: bool) -> list[str]:
    names = list(case.impls)
    if case.compile_impl and not smoke:
        names.append("torch.compile")
    return names


def _whole_model_compile(case, impl: str) -> bool:
    """A torch.compile of a whole model (minutes each): only the headline's two run in the check."""
    return case.module_family in WHOLE_MODEL_FAMILIES and "torch.compile" in impl


def plan(step: str, smoke: bool, cases=None) -> list[tuple]:
    """``[(case, [implementation names])]`` for a benchmark step (or ``warm``)."""
    cases = _all_cases(smoke) if cases is None else cases
    claimed: dict[int, set] = {}
    picked: dict[str, list] = {}
    for name, picks in HEADLINE.items():
        picked[name] = []
        for case in cases:
            for pick in picks:
                if pick.matches(case, smoke):
                    impls = [i for i in _impl_names(case, smoke) if pick.impls is None or i in pick.impls]
                    impls = [i for i in impls if i not in claimed.get(id(case), set())]
                    if impls:
                        claimed.setdefault(id(case), set()).update(impls)
                        picked[name].append((case, impls))
    if step in picked:
        return picked[step]
    rest = [(case, [i for i in _impl_names(case, smoke) if i not in claimed.get(id(case), set())
                    and not _whole_model_compile(case, i)]) for case in cases]
    rest = [(case, impls) for case, impls in rest if impls]
    if step == "rest_bench":
        return rest
    if step == "warm":
        kernel_level = [(c, i) for c, i in picked["headline_kernels"] + rest
                        if c.module_family not in WHOLE_MODEL_FAMILIES]
        headline = {id(c) for c, _ in picked["headline_kernels"]}
        # clipfast everywhere; torch.compile only where it is timed first (the headline kernel cases)
        chosen = [(c, [i for i in impls if i == "clipfast" or (i == "torch.compile" and id(c) in headline)])
                  for c, impls in kernel_level]
        return [(c, impls) for c, impls in chosen if impls]
    raise ValueError(f"unknown step {step!r}")


# ------------------------------------------------------------------------------------------------
# Workers (child processes)
# ------------------------------------------------------------------------------------------------

def _append(path: str, entry: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")


@contextlib.contextmanager
def compiling_every_config():
    """Within this block ``triton.runtime.autotuner.Autotuner.run`` compiles every pruned config at the
    actual arguments (a JIT launch in warmup mode: the same specialization and on-disk cache key as a real
    launch, nothing runs), then launches the first one so the results downstream stay defined. No
    benchmarking: that happens, from the warm cache, in the timed steps."""
    from triton.runtime.autotuner import Autotuner

    original = Autotuner.run

    def run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        try:
            configs = self.prune_configs(kwargs)
            for config in configs:
                if config.pre_hook is not None:
                    config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
                self.fn.run(*args, **{**kwargs, "warmup": True}, **config.all_kwargs())
        finally:
            self.nargs = None
        saved, self.configs = self.configs, configs[:1]
        try:
            return original(self, *args, **kwargs)
        finally:
            self.configs = saved

    Autotuner.run = run
    try:
        yield
    finally:
        Autotuner.run = original


def step_deadline() -> float:
    """When this child stops starting work: its step budget counted from its first call (after start-up:
    imports, collection), and never after the run's own deadline. Cached on first use."""
    global _STEP_DEADLINE
    if _STEP_DEADLINE is None:
        budget = float(os.environ.get("CLIPFAST_SUITE_STEP_BUDGET_S", "inf"))
        _STEP_DEADLINE = min(time.time() + budget, float(os.environ.get("CLIPFAST_SUITE_DEADLINE", "inf")))
    return _STEP_DEADLINE


_STEP_DEADLINE = None


def worker_warm(share: int, workers: int, records: str, step: str = "warm") -> int:
    """Run this worker's share of a plan once (``warm``: the kernel cases; ``warm_models``: the whole-model
    torch.compile cases), compiling every autotuned config."""
    import torch

    smoke = not torch.cuda.is_available()
    device = torch.device("cuda" if not smoke else "cpu")
    entries = plan("headline_model_compiled" if step == "warm_models" else "warm", smoke)[share::workers]
    with compiling_every_config():
        return _warm(entries, smoke, device, records)


def _warm(entries, smoke: bool, device, records: str) -> int:
    import torch

    from .harness import _implementations, _step

    for case, impls in entries:
        for impl, fn in _implementations(case, smoke, impls).items():
            for mode in [m for m in case.modes if not (m == "bwd" and "fwd+bwd" in case.modes)]:
                if time.time() > step_deadline():
                    _append(records, {"kind": "budget", "stopped_before": f"{case.family}: {case.name}"})
                    return 0
                t0, error = time.time(), None
                try:
                    setup, run = _step(fn, case.make_inputs(device, case.dtype), mode)
                    run(setup())
                    if not smoke:
                        torch.cuda.synchronize()
                except Exception as exc:  # reported; the timed step will report it again
                    error = f"{type(exc).__name__}: {exc}"[:300]
                _append(records, {"kind": "warm", "family": case.family, "case": case.name, "impl": impl,
                                  "mode": mode, "seconds": round(time.time() - t0, 2), "error": error})
    return 0


def worker_bench(step: str, records: str) -> int:
    import torch

    from .harness import run_case

    smoke = not torch.cuda.is_available()
    past_deadline = lambda: time.time() > step_deadline()  # noqa: E731
    for case, impls in plan(step, smoke):
        if past_deadline():
            _append(records, {"kind": "budget", "stopped_before": f"{case.family}: {case.name}"})
            return 0
        try:
            run_case(case, smoke=smoke, impls=impls, should_stop=past_deadline,
                     on_row=lambda row: _append(records, {"kind": "row", **row}))
        except Exception as exc:  # the smoke pass's drift check, or a case that cannot build its inputs
            _append(records, {"kind": "row", "family": case.family, "case": case.name, "impl": "clipfast",
                              "mode": "-", "dtype": str(case.dtype).replace("torch.", ""), "shape": case.shape,
                              "smoke": smoke, "error": f"{type(exc).__name__}: {exc}"[:300]})
    return 0


# ------------------------------------------------------------------------------------------------
# The run (parent process)
# ------------------------------------------------------------------------------------------------

def _nvidia_smi() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return None


def _kill(procs) -> None:
    """Kill the still-running ones among ``procs`` (children this run started, each in its own session),
    with whatever they started."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Run:
    """The results of one run, rewritten to ``OUT`` after every change."""

    def __init__(self, out: str, budget_s: float):
        import torch

        from .harness import environment

        self.out, self.started = out, time.time()
        self.deadline = self.started + budget_s
        self.rehearsal = not torch.cuda.is_available()
        # one process per core on the GPU machine; a small CPU machine runs the rehearsal one at a time
        cores = os.cpu_count() or 1
        self.workers = max(1, min(MAX_WORKERS, cores if not self.rehearsal else cores // 2))
        env = environment()
        env["nvidia_smi"] = _nvidia_smi() if not self.rehearsal else None
        self.data = {"rehearsal": self.rehearsal, "environment": env, "budget_s": budget_s,
                     "workers": self.workers, "steps": [], "tests": [], "warm": [], "rows": [], "notes": []}
        if self.rehearsal:
            self.data["notes"].append("CPU rehearsal: smoke shapes through the Triton interpreter; no timings.")
        for package, what in OPTIONAL_PACKAGES.items():
            if importlib.util.find_spec(package) is None:
                self.data["notes"].append(f"{package} is not installed: {what} skipped.")
        self.tmp = tempfile.mkdtemp(prefix="clipfast-suite-")
        self.lock = threading.Lock()
        self.log = open(os.path.join(out, "log.txt"), "a")
        self.children: list[subprocess.Popen] = []
        self.background = None

    # -- output ------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        line = f"[{time.time() - self.started:6.1f}s] {text}"
        print(line, flush=True)
        self.write_log(line + "\n")

    def write_log(self, text: str) -> None:
        with self.lock:
            if self.log.tell() < LOG_LIMIT_BYTES:
                self.log.write(text)
                self.log.flush()

    def write(self) -> None:
        from .summary import suite_markdown

        self.data["elapsed_s"] = round(time.time() - self.started, 1)
        for name, text in (("results.json", json.dumps(self.data, indent=1, default=str)),
                           ("summary.md", suite_markdown(self.data))):
            path = os.path.join(self.out, name)
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)

    # -- children ----------------------------------------------------------------------------------
    def _child_env(self, budget: float, records: str, shard: str | None = None) -> dict:
        env = dict(os.environ, CLIPFAST_SUITE_DEADLINE=str(self.deadline), CLIPFAST_SUITE_STEP_BUDGET_S=str(budget),
                   CLIPFAST_SUITE_RECORDS=records, PYTHONUNBUFFERED="1")
        if self.rehearsal:
            env["TRITON_INTERPRET"] = "1"
            del env["CLIPFAST_SUITE_DEADLINE"]  # the step budget alone: every step gets its turn
        if shard:
            env["CLIPFAST_SUITE_SHARD"] = shard
        else:
            env.pop("CLIPFAST_SUITE_SHARD", None)
        return env

    def _pump(self, proc: subprocess.Popen, prefix: str) -> None:
        for line in proc.stdout:
            self.write_log(f"{prefix}{line}")

    def start(self, name: str, commands: list[tuple[list[str], dict, str]], status: dict) -> dict:
        """Start every command of a step; their records are merged by ``poll``."""
        group = {"name": name, "procs": [], "threads": [], "status": status,
                 "offsets": {records: 0 for _, _, records in commands}}
        for argv, env, records in commands:
            open(records, "a").close()
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            self.children.append(proc)
            group["procs"].append(proc)
            thread = threading.Thread(target=self._pump, args=(proc, f"  {name}[{len(group['procs']) - 1}] "),
                                      daemon=True)
            thread.start()
            group["threads"].append(thread)
        return group

    def poll(self, group: dict) -> None:
        if self._ingest(group["name"], group["offsets"], group["status"]):
            self.write()

    def finish(self, group: dict, hard: float, also: tuple = ()) -> dict:
        """Merge records until every command of ``group`` ends, killing them at ``hard`` (``also``: other
        groups running meanwhile, merged too)."""
        killed = False
        while any(p.poll() is None for p in group["procs"]):
            time.sleep(1.0)
            for g in (group, *also):
                self.poll(g)
            if time.time() > hard:
                killed = True
                _kill(group["procs"])
        for p in group["procs"]:
            p.wait()
        for t in group["threads"]:
            t.join(timeout=5)
        self.poll(group)
        return {"returncodes": [p.returncode for p in group["procs"]], "killed": killed}

    def hard_stop(self, budget: float) -> float:
        """When a step's children are killed: its budget, plus start-up (a child counts its budget from the
        end of its start-up and checks it between items) and a margin for the item under way."""
        hard = time.time() + budget + (REHEARSAL_STARTUP_S if self.rehearsal else STARTUP_S) + 0.1 * budget
        return hard if self.rehearsal else min(hard, self.deadline + FINAL_RESERVE_S / 2)

    def _ingest(self, step_name: str, offsets: dict, status: dict) -> bool:
        changed = False
        for records in offsets:
            with open(records, "rb") as f:
                f.seek(offsets[records])
                chunk = f.read()
            complete = chunk[:chunk.rfind(b"\n") + 1]  # a line still being written waits for the next poll
            offsets[records] += len(complete)
            for line in complete.decode("utf-8", "replace").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                kind = entry.pop("kind")
                entry["step"] = step_name
                changed = True
                if kind == "row":
                    self.data["rows"].append(entry)
                elif kind == "test":
                    self.data["tests"].append(entry)
                elif kind == "warm":
                    self.data["warm"].append(entry)
                elif kind == "collected":
                    status["collected"] = status.get("collected", 0) + entry["count"]
                elif kind == "budget":
                    status["stopped_by_budget"] = True
        if changed:
            from .harness import add_speedups

            add_speedups(self.data["rows"])
        return changed

    def stop_children(self) -> None:
        _kill(self.children)

    # -- steps -------------------------------------------------------------------------------------
    def commands(self, step: Step, budget: float) -> list[tuple[list[str], dict, str]]:
        py = sys.executable
        me = [py, "-m", "clipfast.benchmarks.suite"]
        if step.kind == "warm":
            n = self.workers if step.name == "warm" else 1 if self.rehearsal else 2  # whole-model compiles: one each
            return [([*me, "--worker", "warm", "--step", step.name, "--share", f"{i}/{n}", "--records", rec],
                     self._child_env(budget, rec), rec)
                    for i in range(n) for rec in [os.path.join(self.tmp, f"{step.name}_{i}.jsonl")]]
        if step.kind == "bench":
            rec = os.path.join(self.tmp, f"{step.name}.jsonl")
            return [([*me, "--worker", "bench", "--step", step.name, "--records", rec],
                     self._child_env(budget, rec), rec)]
        n = self.workers
        out = []
        for i in range(n):
            rec = os.path.join(self.tmp, f"{step.name}_{i}.jsonl")
            junit = os.path.join(self.tmp, f"junit_{step.name}_{i}.xml")
            argv = [py, "-m", "pytest", *step.args, "-q", "-p", "no:cacheprovider", "-p",
                    "clipfast.benchmarks._pytest_budget", f"--junitxml={junit}", "-o", "junit_suite_name=" + step.name]
            out.append((argv, self._child_env(budget, rec, f"{i}/{n}"), rec))
        return out

    def run_step(self, step: Step, last: bool) -> None:
        now = time.time()
        left = self.deadline - FINAL_RESERVE_S - now
        budget = left if last else min(left, step.share * (self.deadline - self.started))
        if self.rehearsal:  # every step runs at least its first item, however slow the machine
            budget = max(budget, REHEARSAL_MIN_STEP_S)
        self.current = {"name": step.name, "budget_s": round(budget, 1)}
        self.data["steps"].append(self.current)
        if step.kind == "pytest" and importlib.util.find_spec("pytest") is None:
            self.current["status"] = "skipped: pytest is not installed"
            self.say(f"== {step.name}: skipped, pytest is not installed")
            self.write()
            return
        if budget < 3:
            self.current["status"] = "skipped: no time left"
            self.say(f"== {step.name}: skipped, no time left")
            self.write()
            return
        if step.name == "warm":
            self.start_background(budget)
        if step.kind == "bench":
            self.stop_background()  # nothing else runs on the GPU while anything is timed
        self.say(f"== {step.name} (budget {budget:.0f}s)")
        group = self.start(step.name, self.commands(step, budget), self.current)
        result = self.finish(group, self.hard_stop(budget), also=(self.background,) if self.background else ())
        self.current["seconds"] = round(time.time() - now, 1)
        ok = (0, 1, 2, 5) if step.kind == "pytest" else (0,)  # pytest: 1 failures, 2 interrupted, 5 none selected
        bad = [rc for rc in result["returncodes"] if rc not in ok]
        self.current["status"] = ("killed at the budget" if result["killed"] else
                                  "stopped at the budget" if self.current.get("stopped_by_budget") else
                                  f"child exit codes {bad}" if bad else "done")
        if step.kind == "pytest":
            self.merge_junit()
        self.say(f"   {step.name}: {self.current['status']} in {self.current['seconds']}s")
        self.write()

    def start_background(self, warm_budget: float) -> None:
        """The whole-model torch.compiles of the timed step, compiled once (inductor's and Triton's on-disk
        caches) in the background of the compile and correctness steps; stopped before any timing."""
        budget = warm_budget + BACKGROUND_SHARE * (self.deadline - self.started)
        status = {"name": BACKGROUND_STEP.name, "budget_s": round(budget, 1), "background": True}
        self.data["steps"].append(status)
        self.say(f"== {BACKGROUND_STEP.name} in the background (budget {budget:.0f}s)")
        self.background = self.start(BACKGROUND_STEP.name, self.commands(BACKGROUND_STEP, budget), status)
        self.background_started = time.time()

    def stop_background(self) -> None:
        group, self.background = self.background, None
        if group is None:
            return
        running = any(p.poll() is None for p in group["procs"])
        self.finish(group, hard=0)  # kills what still runs
        group["status"]["seconds"] = round(time.time() - self.background_started, 1)
        group["status"]["status"] = "stopped before the timed steps" if running else "done"
        self.say(f"   {group['name']}: {group['status']['status']}")
        self.write()

    def merge_junit(self) -> None:
        merged = ET.Element("testsuites")
        for name in sorted(os.listdir(self.tmp)):
            if name.startswith("junit_") and name.endswith(".xml"):
                try:
                    root = ET.parse(os.path.join(self.tmp, name)).getroot()
                except ET.ParseError:
                    continue
                merged.extend(root.iter("testsuite"))
        ET.ElementTree(merged).write(os.path.join(self.out, "junit.xml"), encoding="unicode")

    def plots(self) -> None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:  # noted at the start
            return
        from .cli import plot, plot_loss_scaling

        rows = [r for r in self.data["rows"] if not r.get("error") and r.get("mode") != "-"]
        headline = [r for r in rows if r["step"].startswith("headline") and r["mode"] != "host"]
        rest = [r for r in rows if r["step"] == "rest_bench" and r["mode"] != "host"]
        for name, picked in (("plot_headline.png", headline), ("plot_rest.png", rest)):
            if picked:
                try:
                    plot(picked, os.path.join(self.out, name))
                except Exception as exc:  # a plot must not cost the results
                    self.data["notes"].append(f"{name}: {type(exc).__name__}: {exc}")
        try:
            plot_loss_scaling(rows, os.path.join(self.out, "plot_loss_scaling.png"))
        except Exception as exc:
            self.data["notes"].append(f"plot_loss_scaling.png: {type(exc).__name__}: {exc}")


def main_run(out: str, budget_s: float | None) -> int:
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        if name in OUTPUT_FILES:
            os.unlink(os.path.join(out, name))
    import torch

    budget_s = budget_s or float(os.environ.get("CLIPFAST_SUITE_BUDGET_S", 0)) or (
        GPU_BUDGET_S if torch.cuda.is_available() else REHEARSAL_BUDGET_S)
    run = Run(out, budget_s)

    def stop(signum, frame):
        run.stop_children()
        run.data["notes"].append(f"stopped by signal {signum}")
        run.write()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    run.say(f"clipfast GPU check -> {out} ({'CPU rehearsal' if run.rehearsal else run.data['environment']['gpu']}, "
            f"budget {budget_s:.0f}s, {run.workers} workers)")
    run.write()
    for i, step in enumerate(STEPS):
        run.run_step(step, last=i == len(STEPS) - 1)
    run.stop_background()
    run.plots()
    run.write()
    failed = [t for t in run.data["tests"] if t["outcome"] in ("failed", "error")]
    broken = [r for r in run.data["rows"] if r.get("error") and r["impl"] in ("clipfast", "eager")]
    run.say(f"done in {time.time() - run.started:.0f}s: {len(run.data['tests'])} test outcomes "
            f"({len(failed)} failed), {len(run.data['rows'])} benchmark rows ({len(broken)} clipfast/eager errors)")
    return 1 if failed or broken else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m clipfast.benchmarks.suite", description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", help="output folder (created; its result files are replaced)")
    p.add_argument("--budget-s", type=float, default=None, help="seconds for all steps (default: "
                   f"{GPU_BUDGET_S} on a GPU, {REHEARSAL_BUDGET_S} for the CPU rehearsal; or CLIPFAST_SUITE_BUDGET_S)")
    p.add_argument("--worker", choices=["warm", "bench"], help=argparse.SUPPRESS)
    p.add_argument("--share", default="0/1", help=argparse.SUPPRESS)
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)
    p.add_argument("--records", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == "warm":
        share, workers = (int(v) for v in args.share.split("/"))
        return worker_warm(share, workers, args.records, args.step or "warm")
    if args.worker == "bench":
        return worker_bench(args.step, args.records)
    if not args.out:
        p.error("give the output folder")
    return main_run(args.out, args.budget_s)


if __name__ == "__main__":
    sys.exit(main())
