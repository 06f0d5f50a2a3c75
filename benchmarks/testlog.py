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

After a test fails, the CUDA context is probed (where the process initialised CUDA): a lost one (a kernel
faulted) would fail every later test of the process, so the run stops there, writes a ``context_lost`` line
and exits with ``benchmarks.context.CONTEXT_LOST_EXIT``. ``--skip-logged`` deselects the tests that
``--results-jsonl`` already holds a result for: :mod:`benchmarks.shards` starts such a shard again with it, and
the rest of its tests run in a fresh process.
"""
from __future__ import annotations

import json
import os
import sys
import time

import pytest

from benchmarks.context import CONTEXT_LOST_EXIT, context_lost, exit_for_good
from benchmarks.rowlog import read_records

_REASON_HEAD_CHARS = 1000
_REASON_TAIL_CHARS = 2000


def pytest_addoption(parser):
    parser.addoption("--results-jsonl", default=None, metavar="PATH",
                     help="append one JSON line per finished test to PATH")
    parser.addoption("--shard", default=None, metavar="I/N",
                     help="run only every N-th collected test, starting from the I-th (0 <= I < N)")
    parser.addoption("--skip-logged", action="store_true",
                     help="deselect the tests that --results-jsonl already holds a result for (a shard started "
                          "again after a lost CUDA context)")


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


def logged_nodeids(path: str):
    """The tests that the results file ``path`` holds a result for (none if there is no such file)."""
    if not os.path.isfile(path):
        return set()
    return {record.get("nodeid") for record in read_records(path)} - {None}  # (a line cut off by a kill: left out)


def pytest_collection_modifyitems(config, items):
    text = config.getoption("shard")
    keep = [True] * len(items)
    if text:
        try:
            index, count = parse_shard(text)
        except ValueError as e:
            raise pytest.UsageError(str(e)) from None
        keep = [k % count == index for k in range(len(items))]
    if config.getoption("skip_logged"):
        path = config.getoption("results_jsonl")
        if not path:
            raise pytest.UsageError("--skip-logged reads the results of --results-jsonl: give --results-jsonl PATH")
        logged = logged_nodeids(path)
        keep = [kept and item.nodeid not in logged for kept, item in zip(keep, items)]
    dropped = [item for kept, item in zip(keep, items) if not kept]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for kept, item in zip(keep, items) if kept]


def _context_lost() -> bool:
    """Whether this process initialised CUDA and its context is lost (:func:`benchmarks.context.context_lost`)."""
    torch = sys.modules.get("torch")
    return torch is not None and context_lost(torch.device("cuda"))


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
    if report.failed and _context_lost():
        # Every later test of this process would fail with the same error: stop, and let a fresh one go on.
        item.config._context_lost = report.nodeid
        item.session.shouldstop = f"the CUDA context is lost after {report.nodeid}"
        log.write({"event": "context_lost", "nodeid": report.nodeid, "time": time.time()})


def pytest_sessionfinish(session, exitstatus):
    if getattr(session.config, "_context_lost", None):
        session.exitstatus = exitstatus = CONTEXT_LOST_EXIT
    log = getattr(session.config, "_results_jsonl", None)
    if log is not None:
        log.write({"event": "finish", "time": time.time(), "exitstatus": int(exitstatus), "counts": log.counts})
        log.close()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if getattr(config, "_context_lost", None):  # the results are written: end before the faulted context's teardown
        exit_for_good(CONTEXT_LOST_EXIT)
