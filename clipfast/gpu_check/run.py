"""The GPU check's parent process: the preflight, then every step of ``steps.STEPS`` in lanes of child
processes (``workers``, or pytest shards with ``pytest_plugin``), their records merged into ``OUT`` as they
come, crashes rerun alone with ``CUDA_LAUNCH_BLOCKING=1``, and ``summary.md`` and the plots written as it goes
(the package's docstring has the steps and the crash handling).

    python -m clipfast.gpu_check OUT [--budget-s S]     # what bench/gpu_suite.sh runs
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET

from .steps import BACKGROUND_SHARE, BACKGROUND_STEP, STEPS, Step

GPU_BUDGET_S = 420        # all steps; with the install, start-up and overruns the command stays under 8 minutes
REHEARSAL_BUDGET_S = 100  # the CPU rehearsal (each step also gets its start-up and one item: see run_step)
REHEARSAL_MIN_STEP_S = 3  # pays, on 2 cores, for the preflight and the crash the rehearsal's test injects
REHEARSAL_MIN_ATTEMPT_S = 1  # a process started after a crash runs at least its first case (rehearsal, reruns)
FINAL_RESERVE_S = 8       # kept for the plots and the last write
STARTUP_S = 20            # allowed per step for a child's start-up (imports, pytest collection) on the GPU machine
REHEARSAL_STARTUP_S = 90  # the same on a small, shared CPU machine
MAX_WORKERS = 16
MAX_ATTEMPTS = 8          # processes per lane of a step (the first, reruns and respawns together)
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

        from ..benchmarks.harness import environment

        self.out, self.started = out, time.time()
        self.deadline = self.started + budget_s
        self.rehearsal = not torch.cuda.is_available()
        # one process per core on the GPU machine; a small CPU machine runs the rehearsal one at a time
        cores = os.cpu_count() or 1
        self.workers = max(1, min(MAX_WORKERS, cores if not self.rehearsal else cores // 2))
        env = environment()
        env["nvidia_smi"] = _nvidia_smi() if not self.rehearsal else None
        self.data = {"rehearsal": self.rehearsal, "environment": env, "budget_s": budget_s,
                     "workers": self.workers, "preflight": None, "steps": [], "tests": [], "warm": [], "rows": [],
                     "crashes": [], "processes": [], "correctness_plan": {}, "autotune_table": None, "notes": []}
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

    # -- preflight ---------------------------------------------------------------------------------
    def preflight(self) -> bool:
        """``preflight.run_preflight`` (compiler, Python.h, GPU visibility, libcuda, one tiny kernel launch);
        on a failure the one-line reason is in results.json and summary.md before anything else runs."""
        from .preflight import run_preflight

        t0 = time.time()
        self.say("== preflight")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **({"TRITON_INTERPRET": "1"} if self.rehearsal else {}))
        result = run_preflight(self.rehearsal, [sys.executable, "-m", "clipfast.gpu_check.preflight", "--launch"],
                               env, on_check=lambda c: self.say(f"   {c.line()}"))
        result["seconds"] = round(time.time() - t0, 1)
        self.data["preflight"] = result
        if not result["ok"]:
            self.data["stopped"] = result["reason"]
            self.say(f"STOPPED: {result['reason']}")
        self.write()
        return result["ok"]

    # -- children ----------------------------------------------------------------------------------
    # Each step runs in lanes (one per worker or pytest shard), each lane one process at a time. A lane's
    # process runs its cases in order until one crashes it: a CUDA error (recorded by the child, which then
    # exits) or any other abnormal exit (pinned on the case it had started last). The lane then reruns that
    # case alone with CUDA_LAUNCH_BLOCKING=1 (so the error names the launch that failed) and goes on with the
    # cases not yet started in a fresh process: a crash never poisons a later case, and the start-up cost
    # (torch + triton imports, pytest collection) is paid again only after a crash.
    def _child_env(self, budget: float, shard: str | None = None, step: str = "") -> dict:
        env = dict(os.environ, CLIPFAST_SUITE_DEADLINE=str(self.deadline), CLIPFAST_SUITE_STEP_BUDGET_S=str(budget),
                   CLIPFAST_SUITE_STEP=step, PYTHONUNBUFFERED="1")
        for name in ("CLIPFAST_SUITE_RECORDS", "CLIPFAST_SUITE_SKIP_FILE", "CLIPFAST_SUITE_ONLY_FILE",
                     "CLIPFAST_SUITE_ORDER", "CLIPFAST_SUITE_SHARD", "CUDA_LAUNCH_BLOCKING"):
            env.pop(name, None)
        if self.rehearsal:
            env["TRITON_INTERPRET"] = "1"
            del env["CLIPFAST_SUITE_DEADLINE"]  # the step budget alone: every step gets its turn
        if step == "correctness":
            env["CLIPFAST_SUITE_ORDER"] = "bf16-first"
        if shard:
            env["CLIPFAST_SUITE_SHARD"] = shard
        return env

    def _pump(self, proc: subprocess.Popen, prefix: str, tail) -> None:
        for line in proc.stdout:
            tail.append(line.rstrip())
            self.write_log(f"{prefix}{line}")

    def start(self, name: str, commands: list[tuple[list[str], dict]], status: dict, budget: float = 0.0,
              kind: str = "bench") -> dict:
        """Start one lane per command (``{records}`` and ``{junit}`` in its argv stand for the paths of each
        of its processes); ``finish`` supervises them."""
        group = {"name": name, "kind": kind, "status": status, "budget": budget, "lanes": [], "offsets": {},
                 "owners": {}, "hard": float("inf")}
        for i, (argv, env) in enumerate(commands):
            lane = {"index": i, "argv": argv, "env": env, "attempts": [], "started": [], "planned": None,
                    "used_s": 0.0, "pending": [("run", None)], "proc": None, "crashes": {}}
            group["lanes"].append(lane)
            self._spawn(group, lane)
        return group

    def _write_list(self, name: str, items) -> str:
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            f.writelines(f"{item}\n" for item in items)
        return path

    def _spawn(self, group: dict, lane: dict) -> None:
        role, case = lane["pending"].pop(0)
        n, name = len(lane["attempts"]), group["name"]
        tag = f"{name}_{lane['index']}_{n}"
        records = os.path.join(self.tmp, f"{tag}.jsonl")
        junit = os.path.join(self.tmp, f"{'rerun_' if role == 'rerun' else ''}junit_{tag}.xml")
        env = dict(lane["env"], CLIPFAST_SUITE_RECORDS=records)
        if n:  # what the lane's earlier processes left of the step's budget (their start-up not counted)
            left = group["budget"] - lane["used_s"]
            floor = REHEARSAL_MIN_ATTEMPT_S if self.rehearsal or role == "rerun" else 0.0
            env["CLIPFAST_SUITE_STEP_BUDGET_S"] = str(max(left, floor))
            cap = float("inf") if self.rehearsal else self.deadline + FINAL_RESERVE_S / 2
            group["hard"] = min(group["hard"] + (REHEARSAL_STARTUP_S if self.rehearsal else STARTUP_S), cap)
        if role == "rerun":
            env["CUDA_LAUNCH_BLOCKING"] = "1"
            env["CLIPFAST_SUITE_ONLY_FILE"] = self._write_list(f"{tag}.only", [case])
        elif role == "respawn":
            env["CLIPFAST_SUITE_SKIP_FILE"] = self._write_list(f"{tag}.skip", lane["started"])
        argv = [a.replace("{records}", records).replace("{junit}", junit) for a in lane["argv"]]
        open(records, "a").close()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        self.children.append(proc)
        entry = {"step": name, "lane": lane["index"], "attempt": n, "role": role, "pid": proc.pid}
        if role == "rerun":
            entry.update(case=case, env="CUDA_LAUNCH_BLOCKING=1")
        self.data["processes"].append(entry)
        attempt = {"role": role, "case": case, "pid": proc.pid, "t0": time.time(), "ready_t": None, "started": [],
                   "cuda_error": None, "errors": [], "tail": collections.deque(maxlen=20), "entry": entry,
                   "crash": lane["crashes"].get(case)}
        thread = threading.Thread(target=self._pump, args=(proc, f"  {name}[{lane['index']}{f'.{n}' if n else ''}] ",
                                                            attempt["tail"]), daemon=True)
        thread.start()
        attempt["thread"] = thread
        lane["attempts"].append(attempt)
        lane["proc"] = proc
        group["offsets"][records] = 0
        group["owners"][records] = (lane, attempt)
        if role == "rerun":
            self.say(f"   {name}[{lane['index']}]: rerunning {case} alone with CUDA_LAUNCH_BLOCKING=1 (pid {proc.pid})")
        elif role == "respawn":
            self.say(f"   {name}[{lane['index']}]: the rest in a fresh process (pid {proc.pid}), "
                     "respawned after a crash")

    def _supervise(self, group: dict, killed: bool = False) -> None:
        for lane in group["lanes"]:
            if lane["proc"] is not None and lane["proc"].poll() is not None:
                self._ended(group, lane, killed)
            if lane["proc"] is None and lane["pending"] and not killed:
                self._spawn(group, lane)

    @staticmethod
    def _died(proc: subprocess.Popen, attempt: dict) -> str:
        rc = proc.returncode
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 and -rc in signal.valid_signals() else f"exit code {rc}"
        tail = " | ".join([line.strip() for line in attempt["tail"] if line.strip()][-3:])
        return f"process {proc.pid} died ({how}) during this case" + (f": {tail}" if tail else "")[:600]

    def _record_death(self, group: dict, case: str, error: str, pid: int) -> None:
        """The failure of a case whose process died before it could report one."""
        if group["kind"] == "pytest":
            self.data["tests"].append({"nodeid": case, "outcome": "error", "when": "call", "message": error,
                                       "pid": pid, "step": group["name"]})
            return
        family, _, name = case.partition(": ")
        entry = {"family": family, "case": name, "impl": "clipfast", "mode": "-", "error": error, "pid": pid,
                 "step": group["name"]}
        if group["kind"] == "warm":
            self.data["warm"].append({**entry, "impl": "-", "seconds": 0})
        else:
            self.data["rows"].append({**entry, "dtype": "-"})

    def _ended(self, group: dict, lane: dict, killed: bool) -> None:
        proc, attempt = lane["proc"], lane["attempts"][-1]
        proc.wait()
        attempt["thread"].join(timeout=5)
        self.poll(group)  # its last records
        lane["proc"] = None
        end, rc = time.time(), proc.returncode
        lane["used_s"] += end - (attempt["ready_t"] or end)
        attempt["entry"].update(returncode=rc, cases=len(attempt["started"]), seconds=round(end - attempt["t0"], 1))
        ok = rc in ((0, 1, 2, 5) if group["kind"] == "pytest" else (0,)) and attempt["cuda_error"] is None
        name = f"{group['name']}[{lane['index']}]"
        if attempt["role"] == "rerun":
            error = (attempt["cuda_error"] or {}).get("error") or (None if ok else self._died(proc, attempt)) or \
                (attempt["errors"][0] if attempt["errors"] else None)
            attempt["crash"]["rerun"] = {"pid": proc.pid, "env": "CUDA_LAUNCH_BLOCKING=1", "returncode": rc,
                                         "error": error}
            self.say(f"   {name}: rerun of {attempt['case']} with CUDA_LAUNCH_BLOCKING=1: {error or 'no error'}"[:400])
            self.write()
            return
        if ok or killed:
            return
        case = attempt["cuda_error"]["case"] if attempt["cuda_error"] else (attempt["started"] or [None])[-1]
        error = attempt["cuda_error"]["error"] if attempt["cuda_error"] else self._died(proc, attempt)
        crash = {"step": group["name"], "lane": lane["index"], "case": case, "pid": proc.pid, "returncode": rc,
                 "error": error, "rerun": None, "respawned": False}
        self.data["crashes"].append(crash)
        self.say(f"   {name}: {case or 'start-up'} crashed process {proc.pid}: {error}"[:400])
        if case is None:
            crash["note"] = "died before its first case: not restarted"
            self.write()
            return
        if attempt["cuda_error"] is None:
            self._record_death(group, case, error, proc.pid)
        lane["crashes"][case] = crash
        room = MAX_ATTEMPTS - len(lane["attempts"])
        if room > 0 and not any(a["role"] == "rerun" and a["case"] == case for a in lane["attempts"]):
            lane["pending"].append(("rerun", case))
            room -= 1
        remaining = None if lane["planned"] is None else [c for c in lane["planned"] if c not in lane["started"]]
        left = group["budget"] - lane["used_s"]
        if room > 0 and remaining != [] and (left > 0 or self.rehearsal):
            lane["pending"].append(("respawn", None))
            crash["respawned"] = True
        else:
            crash["note"] = ("nothing left to run" if remaining == [] else "no budget left" if left <= 0 else
                             f"{MAX_ATTEMPTS} processes used: not restarted")
        self.write()

    def poll(self, group: dict) -> None:
        if self._ingest(group["name"], group["offsets"], group["status"], group["owners"]):
            self.write()

    def finish(self, group: dict, hard: float, also: tuple = ()) -> dict:
        """Supervise ``group``'s lanes (reruns and respawns after a crash) until all end, killing them at
        ``hard`` (moved on by a start-up allowance for each process started after a crash); ``also``: other
        groups running meanwhile, supervised and merged too."""
        group["hard"] = hard
        killed = False
        while True:
            if time.time() > group["hard"] and not killed:
                killed = True
                for lane in group["lanes"]:
                    lane["pending"].clear()
                _kill([lane["proc"] for lane in group["lanes"] if lane["proc"] is not None])
            self._supervise(group, killed)
            for other in also:
                self._supervise(other)
            if all(lane["proc"] is None for lane in group["lanes"]):
                break
            time.sleep(0.5)
            for g in (group, *also):
                self.poll(g)
        self.poll(group)
        return {"returncodes": [a["entry"].get("returncode") for lane in group["lanes"] for a in lane["attempts"]],
                "killed": killed}

    def hard_stop(self, budget: float) -> float:
        """When a step's children are killed: its budget, plus start-up (a child counts its budget from the
        end of its start-up and checks it between items) and a margin for the item under way."""
        hard = time.time() + budget + (REHEARSAL_STARTUP_S if self.rehearsal else STARTUP_S) + 0.1 * budget
        return hard if self.rehearsal else min(hard, self.deadline + FINAL_RESERVE_S / 2)

    def _ingest(self, step_name: str, offsets: dict, status: dict, owners: dict | None = None) -> bool:
        changed = False
        for records in offsets:
            lane, attempt = (owners or {}).get(records, (None, None))
            rerun = attempt is not None and attempt["role"] == "rerun"
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
                if rerun and kind in ("row", "test", "warm"):  # the CUDA_LAUNCH_BLOCKING=1 rerun: its errors only
                    error = entry.get("error") or (entry.get("message") if entry.get("outcome") in
                                                   ("failed", "error") else None)
                    if error:
                        attempt["errors"].append(str(error).strip().splitlines()[-1][:500])
                elif kind == "row":
                    self.data["rows"].append(entry)
                elif kind == "test":
                    self.data["tests"].append(entry)
                elif kind == "warm":
                    self.data["warm"].append(entry)
                elif kind == "autotune_table":
                    self.data["autotune_table"] = entry
                elif kind == "collected":
                    if attempt is None or attempt is lane["attempts"][0]:
                        status["collected"] = status.get("collected", 0) + entry["count"]
                elif kind == "budget":
                    status["stopped_by_budget"] = True
                elif attempt is None:
                    continue
                elif kind == "ready":
                    attempt["ready_t"] = entry["t"]
                elif kind == "start":
                    attempt["started"].append(entry["case"])
                    lane["started"].append(entry["case"])
                elif kind == "cuda_error":
                    attempt["cuda_error"] = entry
                elif kind == "plan" and lane["planned"] is None:
                    lane["planned"] = entry["cases"]
                    if step_name == "correctness":
                        self.data["correctness_plan"][str(lane["index"])] = entry["cases"]
                        bf16 = set(entry.get("bf16") or ())
                        self.say(f"   correctness[{lane['index']}]: {len(entry['cases'])} tests, the {len(bf16)} "
                                 "bf16 ones first" + (" (skipped without a GPU)" if self.rehearsal else ""))
        if changed:
            from ..benchmarks.harness import add_speedups

            add_speedups(self.data["rows"])
        return changed

    def stop_children(self) -> None:
        _kill(self.children)

    # -- steps -------------------------------------------------------------------------------------
    def commands(self, step: Step, budget: float) -> list[tuple[list[str], dict]]:
        """One ``(argv, env)`` per lane; ``{records}`` / ``{junit}`` are filled in per process."""
        py = sys.executable
        me = [py, "-m", "clipfast.gpu_check.workers"]
        if step.kind == "warm":
            n = self.workers if step.name == "warm" else 1 if self.rehearsal else 2  # whole-model compiles: one each
            lanes = [([*me, "warm", "--step", step.name, "--share", f"{i}/{n}", "--records", "{records}"],
                      self._child_env(budget, step=step.name)) for i in range(n)]
            if step.name == "warm":  # the headline model through `clipfast warm`, beside the kernel cases
                lanes.insert(0, ([*me, "model_warm", "--share", f"0/{n}", "--records", "{records}"],
                                 self._child_env(budget, step=step.name)))
            return lanes
        if step.kind == "bench":
            return [([*me, "bench", "--step", step.name, "--records", "{records}"],
                     self._child_env(budget, step=step.name))]
        if step.kind == "tune":
            env = self._child_env(budget, step=step.name)
            env.pop("TRITON_INTERPRET", None)  # on CPU the command only says there is nothing to time
            return [([*me, "tune_kernels", "--records", "{records}"], env)]
        n = self.workers
        argv = [py, "-m", "pytest", *step.args, "-q", "-p", "no:cacheprovider", "-p",
                "clipfast.gpu_check.pytest_plugin", "--junitxml={junit}", "-o", "junit_suite_name=" + step.name]
        return [(argv, self._child_env(budget, f"{i}/{n}", step.name)) for i in range(n)]

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
        if step.kind in ("bench", "tune"):
            self.stop_background()  # nothing else runs on the GPU while anything is timed
        self.say(f"== {step.name} (budget {budget:.0f}s)")
        group = self.start(step.name, self.commands(step, budget), self.current, budget, step.kind)
        result = self.finish(group, self.hard_stop(budget), also=(self.background,) if self.background else ())
        self.current["seconds"] = round(time.time() - now, 1)
        crashes = [c for c in self.data["crashes"] if c["step"] == step.name]
        self.current["status"] = ("killed at the budget" if result["killed"] else
                                  "stopped at the budget" if self.current.get("stopped_by_budget") else "done")
        if crashes:
            self.current["status"] += (f"; {len(crashes)} crash(es): each case rerun alone with "
                                       "CUDA_LAUNCH_BLOCKING=1, the rest in a fresh process")
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
        self.background = self.start(BACKGROUND_STEP.name, self.commands(BACKGROUND_STEP, budget), status, budget,
                                     "warm")
        self.background_started = time.time()

    def stop_background(self) -> None:
        group, self.background = self.background, None
        if group is None:
            return
        running = any(lane["proc"] is not None and lane["proc"].poll() is None for lane in group["lanes"])
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
        from ..benchmarks.cli import plot, plot_loss_scaling

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
    if not run.preflight():
        return 3
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
    p = argparse.ArgumentParser(prog="python -m clipfast.gpu_check", description="The GPU check: where clipfast "
                                "stands on a GPU within a short lease (a CPU rehearsal without CUDA).")
    p.add_argument("out", help="output folder (created; its result files are replaced)")
    p.add_argument("--budget-s", type=float, default=None, help="seconds for all steps (default: "
                   f"{GPU_BUDGET_S} on a GPU, {REHEARSAL_BUDGET_S} for the CPU rehearsal; or CLIPFAST_SUITE_BUDGET_S)")
    args = p.parse_args(argv)
    return main_run(args.out, args.budget_s)


if __name__ == "__main__":
    sys.exit(main())
