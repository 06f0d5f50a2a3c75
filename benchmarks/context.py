"""A lost CUDA context costs a benchmark stage the row that lost it, not every row after it.

A kernel that faults (an illegal address, a misaligned access, a device-side assert) leaves its process's
CUDA context unusable: every later CUDA call there fails with the same error. One faulty tile candidate
would then fail each row after it in the same process, as one did in the H200's third run (the merge sweep
stopped after its first shape). So the benchmarks probe the context after each row (:func:`context_lost`).
When it is lost, the row is kept with ``context_lost: true`` and the process exits with
:data:`CONTEXT_LOST_EXIT`; :mod:`benchmarks.suite` then starts the stage again with ``--resume``, and the new
process skips what its tag already logged (:class:`Resume`): the rows measured, and every candidate that lost
the context, at all later shapes. The test shards do the same for pytest (:mod:`benchmarks.testlog`,
:mod:`benchmarks.shards`).

No torch import at module level: the suite and the shard runner only read the exit status.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .rowlog import read_rows

# EX_TEMPFAIL (sysexits.h): the work is not done, and a new attempt may finish it.
CONTEXT_LOST_EXIT = 75
# Attempts after the first of one stage (or test shard) whose processes keep losing their context.
MAX_RESTARTS = 3


class ContextLost(RuntimeError):
    """The CUDA context of the process is lost: nothing more can run in it."""


def context_lost(device) -> bool:
    """Whether ``device``'s CUDA context can no longer run work: a synchronisation, or a one-element op read
    back, raises. False on any other device and where CUDA was never initialised in this process."""
    if getattr(device, "type", device) != "cuda":
        return False
    import torch

    if not torch.cuda.is_initialized():
        return False
    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1).item()
    except Exception:  # noqa: BLE001 (any error here means the context is gone)
        return True
    return False


def log_probed(device, log: Callable[[Dict[str, object]], object], rows: Sequence[Dict[str, object]],
               what: Callable[[], str]) -> None:
    """Passes ``rows`` (one measurement's) to ``log``, after probing ``device``'s context: where it is lost, the last
    row goes with ``context_lost: true`` and :class:`ContextLost` is raised after it, with ``what()`` (the
    measurement, named for the message) and the row's error."""
    lost = context_lost(device)
    for k, row in enumerate(rows):
        log({**row, "context_lost": True} if lost and k == len(rows) - 1 else row)
    if lost:
        raise ContextLost(f"{what()}: {rows[-1].get('error', 'no error raised')}")


def add_resume_argument(parser, skipped: str = "rows", candidate: str = "candidate") -> None:
    """A benchmark's ``--resume``: what the suite adds to its command to start it again after a lost context."""
    parser.add_argument("--resume", action="store_true",
                        help=f"skip the {skipped} that --jsonl already holds under --tag, and every {candidate} there "
                             "that lost the CUDA context (a stage started again after a lost context: "
                             "benchmarks.context)")


def resume_from(parser, args, bench: Optional[str], keys: Sequence[str],
                group: Sequence[str]) -> Optional["Resume"]:
    """The :class:`Resume` that ``args.resume`` asks for, of ``args.jsonl`` under ``args.tag`` (None without it);
    ``--resume`` without ``--jsonl`` is refused through ``parser``."""
    if not args.resume:
        return None
    if not args.jsonl:
        parser.error("--resume reads the rows of --jsonl: give --jsonl PATH")
    return Resume(args.jsonl, bench, args.tag, keys, group)


def stopped(error: ContextLost, jsonl: Optional[str] = None, written: Sequence[str] = ()) -> int:
    """The exit status of a benchmark that ``error`` stopped, after saying on stderr where the rows measured before
    it are (the ``jsonl`` row log, and the outputs ``written``, each named by its option) and how to go on."""
    kept = ([f"--jsonl {jsonl}"] if jsonl else []) + list(written)
    where = f"every row before it is kept ({', '.join(kept)})" if kept else \
        "no row is kept (--jsonl keeps each row as it is measured)"
    go_on = "run again with --resume to go on" if jsonl else "run again (with --jsonl, --resume goes on from a stop)"
    print(f"# the CUDA context is lost after {error}; {where}: {go_on} (exit {CONTEXT_LOST_EXIT})", file=sys.stderr)
    return CONTEXT_LOST_EXIT


def keep_rows(error: BaseException, jsonl: Optional[str], write: Callable[[], Optional[str]]) -> int:
    """After ``error`` stopped a benchmark: write the rows measured so far where the run writes its results at the
    end (``write``, which returns the option that names them, or None), then the exit status of a lost context
    (:func:`stopped`), or ``error`` raised again, said where its rows went."""
    written = write()
    if isinstance(error, ContextLost):
        return stopped(error, jsonl, [written] if written else [])
    if written:
        print(f"# {type(error).__name__} stopped the run; the rows measured before it are in {written}",
              file=sys.stderr)
    raise error


def exit_for_good(code: int) -> None:
    """Ends a benchmark's process with ``code``. After a lost context, at once (``os._exit``, output flushed): the
    rows are on disk, and tearing down a faulted context (freeing its memory, its streams) may abort and turn
    the status into a signal's, which would not tell the suite to go on."""
    if code == CONTEXT_LOST_EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


class Resume:
    """What earlier processes of one stage logged under its ``tag`` in the JSON-lines file ``path`` (the rows of
    ``bench``, or of every bench with None: then ``bench`` is a field like the others): a row is done when a row
    of the same ``keys`` is there, and skipped as well when a row of the same ``group`` (for example op and
    impl: one candidate) lost the CUDA context."""

    def __init__(self, path: str, bench: Optional[str], tag: str, keys: Sequence[str], group: Sequence[str]):
        self.keys, self.group = tuple(keys), tuple(group)
        try:
            self.rows: List[Dict[str, object]] = [r for r in read_rows(path, bench) if r.get("tag", "") == tag]
        except FileNotFoundError:
            self.rows = []
        self.done = {self._key(r, self.keys) for r in self.rows}
        self.lost = {self._key(r, self.group) for r in self.rows if r.get("context_lost")}

    @staticmethod
    def _key(row: Dict[str, object], fields: Iterable[str]) -> Tuple[object, ...]:
        return tuple(row.get(f) for f in fields)

    def skip(self, row: Dict[str, object]) -> bool:
        """Whether ``row`` (its key fields filled) was measured already, or its candidate lost the context."""
        return self._key(row, self.keys) in self.done or self.lost_by(row)

    def lost_by(self, row: Dict[str, object]) -> bool:
        """Whether ``row``'s candidate (its group fields filled) lost the context in an earlier process."""
        return self._key(row, self.group) in self.lost

    def logged(self, row: Dict[str, object]) -> Optional[Dict[str, object]]:
        """The last logged row of ``row``'s keys (None if there is none)."""
        key = self._key(row, self.keys)
        found = [r for r in self.rows if self._key(r, self.keys) == key]
        return found[-1] if found else None

    def has(self, **match) -> bool:
        """Whether a logged row's fields equal ``match``."""
        return any(all(r.get(k) == v for k, v in match.items()) for r in self.rows)

    def value(self, field: str, **match) -> Optional[object]:
        """``field`` of the last logged row whose fields equal ``match`` (None if there is none)."""
        found = [r[field] for r in self.rows if field in r and all(r.get(k) == v for k, v in match.items())]
        return found[-1] if found else None
