"""pytest plugin for the GPU check (``-p clipfast.gpu_check.pytest_plugin``), driven by environment
variables the check sets, inert without them:

- ``CLIPFAST_SUITE_RECORDS``: append one JSON line per test outcome to this file as soon as it is known,
  so a run that is killed still reports every test it finished;
- ``CLIPFAST_SUITE_STEP_BUDGET_S`` / ``CLIPFAST_SUITE_DEADLINE``: seconds from the end of collection / a
  Unix time; no test starts after the earlier of the two (the session stops cleanly and writes its JUnit XML);
- ``CLIPFAST_SUITE_ORDER=bf16-first``: bf16 tests first (stable), before the split into shards;
- ``CLIPFAST_SUITE_SHARD``: ``i/n``: keep every n-th collected test starting at i, so n processes run
  disjoint shares in parallel (and compile their kernels in parallel);
- ``CLIPFAST_SUITE_SKIP_FILE`` / ``CLIPFAST_SUITE_ONLY_FILE``: node ids (one a line) to leave out (the tests a
  crashed process of this shard already started) / to run alone (the rerun of the test it crashed on);
- ``CLIPFAST_SUITE_CRASH``: a crash to inject (see ``child.crash_if_injected``), for the rehearsal's tests.

Each test's start is recorded (with this process's pid) before it runs, so a process that dies is pinned on
the test under way. After a test whose failure reads as a CUDA error, or after which the device no longer
synchronizes (a sticky error: every later test in this process would fail), the session stops with a
``cuda_error`` record; the check reruns that test alone and the rest of the shard in fresh processes.

Kept free of torch/triton imports of its own: it loads before ``tests/conftest.py`` sets ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import os
import time

import pytest

from .child import append, crash_if_injected, device_error, is_cuda_error, listed, step_deadline
from .steps import bf16_first


def _record(entry: dict) -> None:
    path = os.environ.get("CLIPFAST_SUITE_RECORDS")
    if path:
        append(path, entry)


def _is_bf16(item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(str(v) == "torch.bfloat16" for v in params.values()) or "bf16" in item.nodeid


@pytest.hookimpl(trylast=True)  # after -m/-k deselection and conftest's marks
def pytest_collection_modifyitems(config, items):
    selected = list(items)
    if os.environ.get("CLIPFAST_SUITE_ORDER") == "bf16-first":
        flags = {item.nodeid: _is_bf16(item) for item in selected}
        order = {nodeid: i for i, nodeid in enumerate(bf16_first([(n, flags[n]) for n in flags]))}
        selected.sort(key=lambda item: order[item.nodeid])
    only, skip, shard = listed("CLIPFAST_SUITE_ONLY_FILE"), listed("CLIPFAST_SUITE_SKIP_FILE"), \
        os.environ.get("CLIPFAST_SUITE_SHARD")
    if only is not None:
        selected = [item for item in selected if item.nodeid in only]
    elif shard:
        index, count = (int(v) for v in shard.split("/"))
        selected = selected[index::count]
    if skip:
        selected = [item for item in selected if item.nodeid not in skip]
    keep = {id(item) for item in selected}
    config.hook.pytest_deselected(items=[item for item in items if id(item) not in keep])
    items[:] = selected
    if os.environ.get("CLIPFAST_SUITE_RECORDS"):
        _record({"kind": "plan", "pid": os.getpid(), "cases": [item.nodeid for item in selected],
                 "bf16": [item.nodeid for item in selected if _is_bf16(item)]})


def pytest_runtest_logstart(nodeid, location):
    _record({"kind": "start", "case": nodeid, "pid": os.getpid(), "t": time.time()})


def pytest_runtest_call(item):
    crash_if_injected(f"{os.environ.get('CLIPFAST_SUITE_STEP', '')}/{item.nodeid}")


_CUDA_ERROR: list = []  # the test whose failure read as a CUDA error, and its text


def pytest_runtest_logreport(report):
    failed_setup = report.when == "setup" and not report.passed
    if report.when != "call" and not failed_setup and not (report.when == "teardown" and report.failed):
        return
    outcome = report.outcome if report.when == "call" or report.skipped else "error"
    entry = {"kind": "test", "nodeid": report.nodeid, "outcome": outcome, "when": report.when,
             "seconds": round(report.duration, 3), "pid": os.getpid()}
    if report.failed:
        entry["message"] = str(report.longrepr)[-2000:]
        if is_cuda_error(entry["message"]) and not _CUDA_ERROR:
            _CUDA_ERROR.append((report.nodeid, _error_line(entry["message"])))
    elif report.skipped and isinstance(report.longrepr, tuple):
        entry["message"] = str(report.longrepr[2])[:300]
    _record(entry)


def _error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if is_cuda_error(line)]
    return (lines[-1] if lines else text.strip().splitlines()[-1])[:500]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    yield
    if not _CUDA_ERROR:
        sticky = device_error()
        if sticky:
            _CUDA_ERROR.append((item.nodeid, f"device unusable after this test: {sticky}"))
    if _CUDA_ERROR:
        nodeid, error = _CUDA_ERROR[0]
        if len(_CUDA_ERROR) == 1:  # recorded once
            _CUDA_ERROR.append(None)
            _record({"kind": "cuda_error", "case": nodeid, "pid": os.getpid(), "error": error})
        item.session.shouldstop = "CUDA error: the rest of this shard runs in a fresh process"
        return
    if nextitem is not None and time.time() > step_deadline():
        item.session.shouldstop = "time budget of this step used up"
        _record({"kind": "budget", "stopped_before": nextitem.nodeid})


def pytest_collection_finish(session):
    step_deadline()  # the step's budget starts now
    _record({"kind": "ready", "pid": os.getpid(), "t": time.time()})
    _record({"kind": "collected", "count": len(session.items)})
