"""pytest plugin: one JSON line per finished test, written as it finishes, so a run stopped by a time
limit keeps every result it reached (a JUnit XML file is written only at the end).

    python -m pytest -p benchmarks.testlog --results-jsonl tests.jsonl tests/test_triton_cuda.py

Each line: ``nodeid``, ``outcome`` (passed, failed, skipped, error, xfailed, xpassed), ``when`` (the
phase that decided it), ``seconds`` and, for failures and skips, the reason (its first and last lines,
so both the test's own frame and the error survive a long traceback). The first line of a run records
its start, the last one its summary when pytest gets to write it. Several runs may append to one file:
each line is written whole, in one call.

``--shard I/N`` keeps every ``N``-th collected test from the ``I``-th (0-based) and deselects the rest,
so ``N`` processes split one collection between them (:mod:`benchmarks.shards` starts them).
"""
from __future__ import annotations

import json
import os
import time

import pytest

_REASON_HEAD_CHARS = 1000
_REASON_TAIL_CHARS = 2000


def pytest_addoption(parser):
    parser.addoption("--results-jsonl", default=None, metavar="PATH",
                     help="append one JSON line per finished test to PATH")
    parser.addoption("--shard", default=None, metavar="I/N",
                     help="run only every N-th collected test, starting from the I-th (0 <= I < N)")


def parse_shard(text: str):
    """``"I/N"`` as ``(I, N)``; a ValueError that names the option for anything else."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: give I/N with whole numbers, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {text!r}: need N >= 1 and 0 <= I < N")
    return index, count


def _reason(longrepr) -> str:
    text = str(longrepr)
    if len(text) <= _REASON_HEAD_CHARS + _REASON_TAIL_CHARS:
        return text
    return text[:_REASON_HEAD_CHARS] + "\n[...]\n" + text[-_REASON_TAIL_CHARS:]


def pytest_collection_modifyitems(config, items):
    text = config.getoption("shard")
    if not text:
        return
    try:
        index, count = parse_shard(text)
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    kept = [item for k, item in enumerate(items) if k % count == index]
    dropped = [item for k, item in enumerate(items) if k % count != index]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept


class _Log:
    def __init__(self, path: str):
        # O_APPEND and one write per line: lines of processes sharing the file never interleave.
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.counts: dict = {}

    def write(self, record: dict) -> None:
        os.write(self.fd, (json.dumps(record) + "\n").encode())
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


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
        record["reason"] = _reason(report.longrepr)
    log.counts[result] = log.counts.get(result, 0) + 1
    log.write(record)


def pytest_sessionfinish(session, exitstatus):
    log = getattr(session.config, "_results_jsonl", None)
    if log is not None:
        log.write({"event": "finish", "time": time.time(), "exitstatus": int(exitstatus), "counts": log.counts})
        log.close()
