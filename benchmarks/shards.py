"""Run one pytest command as ``N`` processes at once, each with its share of the tests.

    python -m benchmarks.shards 4 -- -q -p benchmarks.testlog --results-jsonl tests.jsonl tests/test_triton_ops.py

Each process runs ``python -m pytest ARGS --shard I/N`` (:mod:`benchmarks.testlog`, which must be
among ARGS: it splits the collection and appends every result to the shared ``--results-jsonl``).
On a GPU machine a test's time is mostly the compiling of its Triton variants, one core each: ``N``
processes compile on ``N`` cores. Output lines carry their shard's number. The exit status is the
first non-zero one among the processes (0 when all passed; a shard left without tests, pytest's 5,
counts as passed unless every shard is). Stopped by SIGTERM or SIGINT, it stops
its processes first.

A shard whose process lost its CUDA context (exit ``CONTEXT_LOST_EXIT``: a kernel faulted, and every later
test there would fail with it) starts again with ``--skip-logged``, up to ``MAX_RESTARTS`` times: its tests
without a result yet run in a fresh process (:mod:`benchmarks.context`). Such a shard counts as failed.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
from typing import Dict, List, Sequence

from .context import CONTEXT_LOST_EXIT, MAX_RESTARTS

NO_TESTS = 5  # pytest's exit status when nothing was collected (or all deselected)
TESTS_FAILED = 1
INTERNAL_ERROR = 3  # (pytest's): a shard whose process could not be started or followed


def shard_argv(pytest_args: Sequence[str], index: int, count: int, python: str = sys.executable) -> List[str]:
    return [python, "-m", "pytest", *pytest_args, "--shard", f"{index}/{count}"]


def _relay(pipe, prefix: bytes) -> None:
    for line in iter(pipe.readline, b""):
        sys.stdout.buffer.write(prefix + line)
        sys.stdout.flush()


class _Shard(threading.Thread):
    """One shard's processes in turn: the first, then one more with ``--skip-logged`` after each that lost its
    CUDA context (at most ``MAX_RESTARTS``); ``code`` is the shard's exit status when it is done."""

    def __init__(self, pytest_args: Sequence[str], index: int, count: int):
        super().__init__(daemon=True)
        self.argv, self.index, self.count = shard_argv(pytest_args, index, count), index, count
        self.proc = None
        self.code = INTERNAL_ERROR  # until run() sets it
        self.stopping = False

    def run(self) -> None:
        prefix, argv = f"[{self.index}] ".encode(), self.argv
        for attempt in range(MAX_RESTARTS + 1):
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            _relay(self.proc.stdout, prefix)
            code = self.proc.wait()
            if code != CONTEXT_LOST_EXIT or self.stopping or attempt == MAX_RESTARTS:
                break
            _relay_line(prefix, f"the CUDA context is lost: this shard's tests without a result go on in a new "
                                f"process ({attempt + 1} of at most {MAX_RESTARTS})")
            argv = [*self.argv, "--skip-logged"]
        # A shard that lost its context had a test fail (the one after which it was lost).
        self.code = TESTS_FAILED if attempt and code in (0, NO_TESTS) else code

    def stop(self) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _relay_line(prefix: bytes, text: str) -> None:
    sys.stdout.buffer.write(prefix + text.encode() + b"\n")
    sys.stdout.flush()


def run(pytest_args: Sequence[str], count: int) -> int:
    if "benchmarks.testlog" not in pytest_args:
        raise ValueError("the pytest arguments must load the plugin that splits the tests: -p benchmarks.testlog")
    shards = [_Shard(pytest_args, i, count) for i in range(count)]
    for shard in shards:
        shard.start()

    def stop(signum, frame):
        for shard in shards:
            shard.stop()
        raise SystemExit(128 + signum)

    previous: Dict[int, object] = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for shard in shards:
            while shard.is_alive():  # (a join with a timeout: the signal handler runs in between)
                shard.join(timeout=0.5)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for shard in shards:
            shard.kill()
    codes = [shard.code for shard in shards]
    if all(code == NO_TESTS for code in codes):
        return NO_TESTS
    return next((code for code in codes if code not in (0, NO_TESTS)), 0)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", type=int, help="processes to run at once (>= 1)")
    args = parser.parse_args(argv[:split])
    if args.shards < 1:
        parser.error(f"shards={args.shards}: give a whole number >= 1")
    try:
        return run(argv[split + 1:], args.shards)
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    raise SystemExit(main())
