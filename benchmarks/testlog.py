"""pytest plugin: one JSON line per finished test, written as it finishes, so a run stopped by a time
limit keeps every result it reached (a JUnit XML file is written only at the end).

    python -m pytest -p benchmarks.testlog --results-jsonl tests.jsonl tests/test_triton_cuda.py

Each line: ``nodeid``, ``outcome`` (passed, failed, skipped, error, xfailed, xpassed), ``when`` (the
phase that decided it), ``seconds`` and, for failures and skips, the first lines of the reason. The
first line of a run records its start, the last one its summary when pytest gets to write it.
"""
from __future__ import annotations

import json
import os
import time

import pytest

_REASON_CHARS = 2000


def pytest_addoption(parser):
    parser.addoption("--results-jsonl", default=None, metavar="PATH",
                     help="append one JSON line per finished test to PATH")


class _Log:
    def __init__(self, path: str):
        self.file = open(path, "a")
        self.counts: dict = {}

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())


def _outcome(report) -> str:
    if hasattr(report, "wasxfail"):
        return "xpassed" if report.passed else "xfailed"
    if report.failed and report.when != "call":
        return "error"
    return report.outcome


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    path = config.getoption("results_jsonl")
    if path:
        config._results_jsonl = _Log(path)
        config._results_jsonl.write({"event": "start", "time": time.time(), "args": list(config.args)})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    log = getattr(item.config, "_results_jsonl", None)
    if log is None:
        return
    # One line per test: the phase that decided it (a failing setup, the call, or a failing teardown).
    decided = report.when == "call" or (report.when == "setup" and not report.passed) or \
        (report.when == "teardown" and report.failed)
    if not decided:
        return
    result = _outcome(report)
    record = {"nodeid": report.nodeid, "outcome": result, "when": report.when,
              "seconds": round(report.duration, 4)}
    if not report.passed:
        record["reason"] = str(report.longrepr)[-_REASON_CHARS:]
    log.counts[result] = log.counts.get(result, 0) + 1
    log.write(record)


def pytest_sessionfinish(session, exitstatus):
    log = getattr(session.config, "_results_jsonl", None)
    if log is not None:
        log.write({"event": "finish", "time": time.time(), "exitstatus": int(exitstatus), "counts": log.counts})
        log.file.close()
