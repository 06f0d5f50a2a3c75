"""Rows kept as they are measured: one JSON line each, flushed and synced before the next measurement.

No torch import here, so a process that only writes or reads rows starts in a fraction of a second.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Dict, List, Optional


class RowLog:
    """Appends rows to a JSON-lines file the moment they are measured, so a run cut short keeps them.

    The first line a process writes holds the environment and its command line; every row after it
    carries ``bench`` (which script) and ``tag`` (which part of a suite run) so several benchmarks can
    share one file. Each line is flushed and synced to disk before the next measurement starts.
    """

    def __init__(self, path: Optional[str], bench: str, env: Dict[str, object], tag: str = ""):
        self.bench, self.tag, self.rows = bench, tag, []
        self._benches: List[str] = []  # (the bench each row of self.rows was logged under)
        self._file = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._file = open_for_append(path)
            self._append({"bench": bench, "tag": tag, "environment": env, "argv": sys.argv})

    def _append(self, record: Dict[str, object]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def __call__(self, row: Dict[str, object], bench: Optional[str] = None) -> Dict[str, object]:
        """Keep ``row`` (and append it to the file, if there is one); returns it."""
        self.rows.append(row)
        self._benches.append(bench or self.bench)
        if self._file:
            self._append({"bench": bench or self.bench, "tag": self.tag, **row})
        return row

    def rows_of(self, bench: Optional[str] = None) -> List[Dict[str, object]]:
        """The rows kept so far under ``bench`` (default: this log's own)."""
        return [row for row, b in zip(self.rows, self._benches) if b == (bench or self.bench)]


def open_for_append(path: str):
    """``open(path, "a")``, after ending a last line that a killed writer left without its line end: the
    next line then starts a line of its own, instead of joining the broken one."""
    try:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            broken = f.read(1) != b"\n"
    except OSError:  # no such file, or an empty one
        broken = False
    f = open(path, "a")
    if broken:
        f.write("\n")
    return f


def add_row_log_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jsonl", default=None, metavar="PATH",
                        help="append every row to this JSON-lines file as soon as it is measured")
    parser.add_argument("--tag", default="", help="label stored in every JSON-lines row (e.g. a suite stage)")


def read_records(path: str) -> List[Dict[str, object]]:
    """Every line of a JSON-lines file written by ``RowLog``. A last line cut off by a killed process (no line
    end) is skipped quietly; any other line that is not JSON is skipped with a warning naming it."""
    records = []
    with open(path) as f:
        lines = f.readlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if line.endswith("\n") or number < len(lines):
                warnings.warn(f"{path}:{number}: not a JSON line, skipped: {line.strip()[:80]!r}", stacklevel=2)
    return records


def read_rows(path: str, bench: Optional[str] = None) -> List[Dict[str, object]]:
    """Rows of a ``RowLog`` file (environment lines left out), optionally of one bench only."""
    return [r for r in read_records(path) if "environment" not in r and (bench is None or r.get("bench") == bench)]
