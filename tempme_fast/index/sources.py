"""Which videos to index, and which of them each process of a multi-process run takes."""
from __future__ import annotations

import json
import os
from typing import List, Sequence, Tuple

from ..errors import ConfigError, as_config_error
from ..retrieval.data import VIDEO_EXTENSIONS, read_csv

LIST_SUFFIXES = (".txt", ".lst", ".csv", ".jsonl", ".ndjson")


def _from_folder(folder: str) -> List[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(os.path.join(root, f) for f in files
                     if f.lower().endswith(VIDEO_EXTENSIONS) and not f.startswith("."))
    return sorted(found)


def _from_list(path: str) -> List[str]:
    base = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".csv":  # as tempme eval reads one
        with as_config_error(""):
            entries = [row["video_path"] for row in read_csv(path, ("video_path",))]
    elif suffix in (".jsonl", ".ndjson"):
        entries = []
        with open(path, encoding="utf-8-sig") as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError as err:
                        raise ConfigError(f"{path}:{line_no}: not valid JSON ({err})") from None
                    if not isinstance(row, dict) or not isinstance(row.get("video_path"), str):
                        raise ConfigError(f"{path}:{line_no}: each line must be an object with a 'video_path' "
                                          f"string")
                    entries.append(row["video_path"])
    else:
        with open(path, encoding="utf-8-sig") as f:
            entries = [line for line in f if not line.lstrip().startswith("#")]
    entries = [os.path.expanduser(e.strip()) for e in entries if e and e.strip()]
    return [e if os.path.isabs(e) else os.path.join(base, e) for e in entries]


def list_videos(source: str) -> List[str]:
    """Absolute paths of the videos named by ``source``, without repeats, in a fixed order.

    ``source`` is a folder (searched recursively for ``.mp4 .webm .avi .mkv .mov`` files, sorted by
    path) or a list file: ``.txt``/``.lst`` with one path per line (``#`` starts a comment line),
    ``.csv`` with a ``video_path`` column, ``.jsonl`` with ``{"video_path": ...}`` lines. Relative
    paths in a list are relative to the list's folder. Listed files that do not exist are kept: the
    indexer records them as unreadable. A file reached by two paths (a link) is listed once.
    """
    source = os.fspath(source)
    if os.path.isdir(source):
        paths = _from_folder(source)
        what = f"folder {source} holds no video files (looked for {', '.join(VIDEO_EXTENSIONS)}, recursively)"
    elif os.path.isfile(source):
        if not source.lower().endswith(LIST_SUFFIXES):
            raise ConfigError(f"{source} is neither a folder nor a video list ({', '.join(LIST_SUFFIXES)})")
        paths = _from_list(source)
        what = f"list {source} names no videos"
    else:
        raise ConfigError(f"{source} does not exist; pass a folder of videos or a list file "
                         f"({', '.join(LIST_SUFFIXES)})")
    paths = unique_videos(paths)
    if not paths:
        raise ConfigError(what)
    return paths


def unique_videos(paths) -> List[str]:
    """Absolute ``paths`` in order, each file once: a path that reaches an earlier one's file (through a link,
    or spelt another way) is left out, else the index would hold that video twice and return it twice."""
    seen, unique = set(), []
    for path in paths:
        path = os.path.abspath(os.fspath(path))
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            unique.append(path)
    return unique


def rank_share(paths: Sequence[str], rank: int, world_size: int) -> List[str]:
    """The videos process ``rank`` of ``world_size`` indexes: every ``world_size``-th from ``rank`` on.

    The share depends only on the full list, never on what is already indexed, so processes that
    start at different moments of a resumed run still split the work without overlap or gap.
    """
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank={rank}, world_size={world_size}: need world_size >= 1 and 0 <= rank < "
                         f"world_size")
    return list(paths[rank::world_size])


def launch_rank() -> Tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the variables ``torchrun`` sets; ``(0, 1, 0)`` without them."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    rank_share([], rank, world)  # validates the pair
    return rank, world, local
