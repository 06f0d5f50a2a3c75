"""Run one pytest command as ``N`` processes at once, each with its share of the tests.

    python -m benchmarks.shards 4 -- -q -p benchmarks.testlog --results-jsonl tests.jsonl tests/test_triton_ops.py

Each process runs ``python -m pytest ARGS --shard I/N`` (:mod:`benchmarks.testlog`, which must be
among ARGS: it splits the collection and appends every result to the shared ``--results-jsonl``).
On a GPU machine a test's time is mostly the compiling of its Triton variants, one core each: ``N``
processes compile on ``N`` cores. Output lines carry their shard's number. The exit status is the
first non-zero one among the processes (0 when all passed; a shard left without tests, pytest's 5,
counts as passed unless every shard is). Stopped by SIGTERM or SIGINT, it stops
its processes first.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
from typing import List, Sequence

NO_TESTS = 5  # pytest's exit status when nothing was collected (or all deselected)


def shard_argv(pytest_args: Sequence[str], index: int, count: int, python: str = sys.executable) -> List[str]:
    return [python, "-m", "pytest", *pytest_args, "--shard", f"{index}/{count}"]


def _relay(pipe, prefix: bytes) -> None:
    for line in iter(pipe.readline, b""):
        sys.stdout.buffer.write(prefix + line)
        sys.stdout.flush()


def run(pytest_args: Sequence[str], count: int) -> int:
    if "benchmarks.testlog" not in pytest_args:
        raise ValueError("the pytest arguments must load the plugin that splits the tests: -p benchmarks.testlog")
    procs = [subprocess.Popen(shard_argv(pytest_args, i, count), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(count)]
    relays = [threading.Thread(target=_relay, args=(p.stdout, f"[{i}] ".encode()), daemon=True)
              for i, p in enumerate(procs)]
    for t in relays:
        t.start()

    def stop(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.terminate()
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for t in relays:
        t.join(timeout=5)
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
