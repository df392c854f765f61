"""pytest plugin for the GPU check (``-p clipfast.benchmarks._pytest_budget``), driven by environment
variables the check sets, inert without them:

- ``CLIPFAST_SUITE_RECORDS``: append one JSON line per test outcome to this file as soon as it is known,
  so a run that is killed still reports every test it finished;
- ``CLIPFAST_SUITE_STEP_BUDGET_S`` / ``CLIPFAST_SUITE_DEADLINE``: seconds from the end of collection / a
  Unix time; no test starts after the earlier of the two (the session stops cleanly and writes its JUnit XML);
- ``CLIPFAST_SUITE_SHARD``: ``i/n``: keep every n-th collected test starting at i, so n processes run
  disjoint shares in parallel (and compile their kernels in parallel).

Kept free of torch/triton imports: it loads before ``tests/conftest.py`` sets ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import json
import os
import time

import pytest


_DEADLINE: list = []


def _deadline() -> float | None:
    """The step budget (``CLIPFAST_SUITE_STEP_BUDGET_S``) counted from the end of collection, capped by
    the run's deadline (``CLIPFAST_SUITE_DEADLINE``); None without either."""
    if not _DEADLINE:
        budget = os.environ.get("CLIPFAST_SUITE_STEP_BUDGET_S")
        run = os.environ.get("CLIPFAST_SUITE_DEADLINE")
        found = [float(v) for v in (run,) if v] + ([time.time() + float(budget)] if budget else [])
        _DEADLINE.append(min(found) if found else None)
    return _DEADLINE[0]


def _record(entry: dict) -> None:
    path = os.environ.get("CLIPFAST_SUITE_RECORDS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def pytest_collection_modifyitems(config, items):
    shard = os.environ.get("CLIPFAST_SUITE_SHARD")
    if not shard:
        return
    index, count = (int(v) for v in shard.split("/"))
    keep = [item for i, item in enumerate(items) if i % count == index]
    config.hook.pytest_deselected(items=[item for i, item in enumerate(items) if i % count != index])
    items[:] = keep


def pytest_runtest_logreport(report):
    failed_setup = report.when == "setup" and not report.passed
    if report.when != "call" and not failed_setup and not (report.when == "teardown" and report.failed):
        return
    outcome = report.outcome if report.when == "call" or report.skipped else "error"
    entry = {"kind": "test", "nodeid": report.nodeid, "outcome": outcome, "when": report.when,
             "seconds": round(report.duration, 3)}
    if report.failed:
        entry["message"] = str(report.longrepr)[-2000:]
    elif report.skipped and isinstance(report.longrepr, tuple):
        entry["message"] = str(report.longrepr[2])[:300]
    _record(entry)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    yield
    deadline = _deadline()
    if deadline is not None and nextitem is not None and time.time() > deadline:
        item.session.shouldstop = "time budget of this step used up"
        _record({"kind": "budget", "stopped_before": nextitem.nodeid})


def pytest_collection_finish(session):
    _deadline()  # the step's budget starts now
    _record({"kind": "collected", "count": len(session.items)})
