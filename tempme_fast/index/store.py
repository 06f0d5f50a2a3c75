"""The on-disk index: a header, then shards of fp16 embeddings, each committed by its manifest.

Layout of ``INDEX_DIR``::

    index.json                       format, version, the encoder (IndexSpec), embedding width
    shards/r0000-000000.npy          [n_ok, D] float16, L2-normalised video embeddings
    shards/r0000-000000.jsonl        one line per video of the shard, in order:
                                     {"path", "status": "ok"|"error", "row", "duration", "frames", "reason",
                                      "size", "mtime_ns", "indexed_at"}

``r0000`` is the writing process's rank, ``000000`` its shard counter. Every file is written under a
temporary name and renamed into place (atomic on one file system); the manifest is renamed last,
so a shard exists only once its manifest does. A run killed at any point leaves at most an orphan
``.npy`` or temporary file, which readers ignore and the next run overwrites or removes: nothing
half-written is ever read. A video whose manifest line exists, readable or not, is not encoded again
unless its file has changed since (its size or modification time); the newest record of a path is the
one that counts (``indexed_at``; records of earlier releases, without it, count as oldest).
A writer holds ``shards/.r0000.lock`` (:func:`writing`) while it runs: a second writer of the same rank
would number its shards as the first does and replace them.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import ContextManager, Dict, Iterable, List, Optional, Tuple

import numpy as np

from ..checkpoint import atomic_write
from ..errors import ConfigError
from ..outputs import exclusive, make_folders
from .spec import GROW_ADVICE, IndexSpec, SpecMismatch, check_same_encoder

FORMAT = "tempme-video-index"
VERSION = 1
HEADER = "index.json"
SHARDS = "shards"
SEARCH = "search"  # built search indexes, kept by search_cache_path
_SHARD_RE = re.compile(r"^r(\d{4})-(\d{6})\.jsonl$")


def _atomic_write(path: str, write) -> None:
    # One place to patch in tests that simulate a kill between two files.
    atomic_write(path, write)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def prepare_dir(path: str) -> None:
    """Create ``path/shards`` and prove it writable, or raise a ValueError that names ``--out``."""
    shards = os.path.join(path, SHARDS)
    try:
        make_folders(shards)  # removed again, while empty, when the command fails
        probe = os.path.join(shards, f".write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as exc:
        raise ConfigError(f"--out {path}: cannot write the index there ({exc.strerror or exc}); choose a "
                         f"writable folder") from None


def writing(path: str, rank: int) -> ContextManager[None]:
    """Hold rank ``rank``'s writer lock of the index at ``path`` (made by :func:`prepare_dir`) while the block runs.

    Two writers of one rank would both number their shards from the same count and each replace the other's
    (a second ``tempme index`` into the same ``--out`` while one runs, or two torchrun launches): the second
    is refused, naming the first's process (:func:`~tempme_fast.outputs.exclusive` on ``shards/.r0000.lock``).
    """
    return exclusive(os.path.join(path, SHARDS, f".r{rank:04d}.lock"), lambda holder: (
        f"--out {path}: {holder} is writing this index as rank {rank}, and a second writer would replace its "
        f"shards; wait for it to end (then --resume adds what it lacks), or index all the videos in one run or as "
        f"the ranks of one torchrun launch"))


def index_file_at(path: str, file: str) -> Optional[str]:
    """What of the index folder ``path`` the file ``file`` would replace (``"its header index.json"``, ...),
    or None where it is none of the index's own files. Links are followed; neither needs to exist."""
    folder, target = os.path.realpath(path), os.path.realpath(file)
    if target == os.path.join(folder, HEADER):
        return f"its header {HEADER}"
    for sub, what in ((SHARDS, "its shards"), (SEARCH, "its built search indexes")):
        if target.startswith(os.path.join(folder, sub) + os.sep):
            return f"{what} ({sub}/)"
    return None


def read_header(path: str) -> dict:
    """The parsed ``index.json`` of the index at ``path``; a clear error when there is none."""
    header = os.path.join(path, HEADER)
    if not os.path.isfile(header):
        raise ConfigError(f"{path} is not a video index (no {HEADER}); build one with `tempme index`")
    damaged = (f"{header}: the index's header is damaged or was edited (it is written whole, by one rename), so "
               f"its encoder is unknown; restore the file, or build the index again")
    try:
        with open(header, "rb") as f:
            data = json.loads(f.read().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{damaged} (not JSON: {err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{damaged} (not a JSON object)")
    if data.get("format") != FORMAT:
        raise ConfigError(f"{header}: format {data.get('format')!r} is not {FORMAT!r}")
    if data.get("version") != VERSION:
        raise ConfigError(f"{header}: version {data.get('version')} is not supported (this library reads "
                         f"version {VERSION})")
    dim, spec = data.get("embed_dim"), data.get("spec")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"{damaged} (embed_dim={dim!r}, not a positive int)")
    if not isinstance(spec, dict):
        raise ConfigError(f"{damaged} (spec={spec!r}, not a JSON object)")
    try:
        IndexSpec.from_json(spec).tempme_config()
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{damaged} (its schedule: {err})") from None
    return data


def write_header(path: str, spec: IndexSpec, dim: int) -> None:
    """Write ``index.json``, or check that an existing one describes the same encoder.

    Every rank of a multi-process run calls this; all write identical content, so whichever rename
    lands last changes nothing.
    """
    spec = spec.resolved()
    if os.path.isfile(os.path.join(path, HEADER)):
        old = read_header(path)
        check_same_encoder(IndexSpec.from_json(old["spec"]), spec, f"the index at {path}", advice=GROW_ADVICE)
        if old["embed_dim"] != dim:
            raise SpecMismatch(f"the index at {path} holds {old['embed_dim']}-d embeddings, the model makes "
                               f"{dim}-d ones")
        return
    data = {"format": FORMAT, "version": VERSION, "spec": spec.to_json(), "embed_dim": int(dim),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _atomic_write(os.path.join(path, HEADER), lambda f: f.write(_json_bytes(data)))


def manifests(path: str, rank: Optional[int] = None) -> List[str]:
    """Committed shard manifests of the index at ``path`` (of one writer ``rank`` only when given), in
    name order (rank, then counter)."""
    found = glob.glob(os.path.join(path, SHARDS, "r*-*.jsonl" if rank is None else f"r{rank:04d}-*.jsonl"))
    return sorted(p for p in found if _SHARD_RE.match(os.path.basename(p)))


def _redo_shard(manifest: str) -> str:
    """What to do about a damaged shard."""
    return (f"restore the shard, or delete {os.path.basename(manifest)} and its .npy and run tempme index with "
            f"--resume to encode its videos again")


def read_manifest(manifest: str) -> List[dict]:
    """The records of a committed shard, or a ConfigError naming the line that is not one (a manifest is
    written whole, by one rename: such a line was edited or damaged by something else)."""
    rows = []
    with open(manifest, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode())
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                row, why = None, f"not JSON: {err}"
            else:
                why = "" if isinstance(row, dict) and isinstance(row.get("path"), str) and \
                    row.get("status") in ("ok", "error") else "not a record with a path and an ok/error status"
            if why:
                raise ConfigError(f"{manifest}:{number}: the shard's manifest is damaged or was edited ({why}); "
                                  f"{_redo_shard(manifest)}")
            rows.append(row)
    return rows


def _newer(record: dict, order: int, than: Optional[tuple]) -> Optional[tuple]:
    """The key that makes ``record`` (of the ``order``-th manifest) the newest of its path, or None where
    ``than`` (the newest so far, its key first) stays: the later ``indexed_at``, then the earlier manifest."""
    key = (record.get("indexed_at") or 0.0, -order)
    return key if than is None or key > than[0] else None


def newest_records(path: str) -> Dict[str, dict]:
    """``video path -> record`` of every video in a committed shard: its newest record."""
    newest: Dict[str, Tuple[tuple, dict]] = {}
    for order, manifest in enumerate(manifests(path)):
        for row in read_manifest(manifest):
            key = _newer(row, order, newest.get(row["path"]))
            if key is not None:
                newest[row["path"]] = (key, row)
    return {p: row for p, (_, row) in newest.items()}


def file_state(path: str) -> Tuple[Optional[int], Optional[int]]:
    """``(size, mtime_ns)`` of the file at ``path``, ``(None, None)`` where there is none: what a record keeps
    to tell, at a later ``--resume``, whether the file was replaced since it was indexed."""
    try:
        st = os.stat(path)
    except OSError:
        return None, None
    return st.st_size, st.st_mtime_ns


def changed_since(record: dict, path: str) -> bool:
    """Whether the file at ``path`` differs from the one ``record`` was made from (never for records of
    earlier releases, which kept no file state)."""
    return "size" in record and file_state(path) != (record["size"], record.get("mtime_ns"))


def remove_stale_temporaries(path: str) -> int:
    """Delete the temporary files of writers that no longer run (killed mid-write); returns how many."""
    removed = 0
    for tmp in glob.glob(os.path.join(path, SHARDS, ".*.*.tmp")):
        pid = tmp[:-len(".tmp")].rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            os.remove(tmp)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShardWriter:
    """Collects ``(record, embedding)`` pairs of one rank and commits them ``shard_size`` videos at a time."""

    def __init__(self, path: str, rank: int = 0, shard_size: int = 1000):
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ConfigError(f"shard_size={shard_size!r} must be a positive int (videos per shard)")
        self.path, self.rank, self.shard_size = path, rank, shard_size
        own = [int(_SHARD_RE.match(os.path.basename(m)).group(2)) for m in manifests(path, rank)]
        self.next_shard = max(own, default=-1) + 1
        self.records: List[dict] = []
        self.vectors: List[np.ndarray] = []
        self.written: List[str] = []

    def add(self, records: Iterable[dict], vectors: Optional[np.ndarray]) -> None:
        """Queue a batch: ``records`` in order; ``vectors [n_ok, D]`` for those with status ``ok``."""
        records = list(records)
        ok = sum(r["status"] == "ok" for r in records)
        if ok != (0 if vectors is None else len(vectors)):
            raise ConfigError(f"{ok} readable video(s) but {0 if vectors is None else len(vectors)} embeddings")
        self.records.extend(records)
        if ok:
            self.vectors.append(np.asarray(vectors, dtype=np.float16))
        if len(self.records) >= self.shard_size:
            self.flush()

    def flush(self) -> Optional[str]:
        """Commit what is queued as one shard; returns its manifest path (None when nothing is queued)."""
        if not self.records:
            return None
        name = os.path.join(self.path, SHARDS, f"r{self.rank:04d}-{self.next_shard:06d}")
        vectors = np.concatenate(self.vectors) if self.vectors else None
        rows, row = [], 0
        for record in self.records:
            record = dict(record)
            record["row"] = row if record["status"] == "ok" else None
            row += record["status"] == "ok"
            rows.append(record)
        if vectors is not None:
            _atomic_write(name + ".npy", lambda f: np.save(f, vectors))
        lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()
        _atomic_write(name + ".jsonl", lambda f: f.write(lines))  # the commit point
        self.records, self.vectors = [], []
        self.next_shard += 1
        self.written.append(name + ".jsonl")
        return name + ".jsonl"


@dataclass
class IndexContents:
    """Every readable video of an index: ``vectors [N, D] float16`` and one record per row."""

    header: dict
    vectors: np.ndarray
    records: List[dict]
    failed: List[dict]

    @property
    def spec(self) -> IndexSpec:
        return IndexSpec.from_json(self.header["spec"])


def load_contents(path: str) -> IndexContents:
    """Read the header and every committed shard; each path counts once, by its newest record (a video
    encoded again after its file changed), in manifest order."""
    header = read_header(path)
    dim = header["embed_dim"]
    chunks: List[np.ndarray] = []
    # path -> (key, record, (shard, row of its vectors)), the newest record of each path
    newest: Dict[str, Tuple[tuple, dict, Tuple[int, int]]] = {}
    for order, manifest in enumerate(manifests(path)):
        rows = read_manifest(manifest)
        ok = [r for r in rows if r["status"] == "ok"]
        vectors = np.zeros((0, dim), np.float16)
        if ok:
            npy = manifest[:-len(".jsonl")] + ".npy"
            try:
                vectors = np.load(npy, allow_pickle=False)
            except (OSError, ValueError) as err:  # missing, cut short, or not an array file
                raise ConfigError(f"{manifest}: {len(ok)} readable videos but their vectors {npy} cannot be read "
                                  f"({err}); the index is damaged: {_redo_shard(manifest)}") from None
        if vectors.shape != (len(ok), dim):
            raise ConfigError(f"{manifest}: {len(ok)} readable videos but the shard holds vectors of shape "
                             f"{vectors.shape} (expected ({len(ok)}, {dim})); the index is damaged: "
                             f"{_redo_shard(manifest)}")
        chunks.append(vectors)
        row = iter(range(len(ok)))
        for r in rows:
            where = (order, next(row) if r["status"] == "ok" else -1)
            key = _newer(r, order, newest.get(r["path"]))
            if key is not None:
                newest[r["path"]] = (key, r, where)
    kept = sorted(newest.values(), key=lambda entry: entry[2])  # (manifest order)
    records = [r for _, r, _ in kept if r["status"] == "ok"]
    failed = [r for _, r, _ in kept if r["status"] != "ok"]
    rows_of: List[List[int]] = [[] for _ in chunks]  # (one pass: a scan per shard would be shards x videos)
    for _, r, (shard, i) in kept:
        if r["status"] == "ok":
            rows_of[shard].append(i)
    picked = [chunk[rows] for chunk, rows in zip(chunks, rows_of)]
    vectors = np.concatenate(picked) if picked else np.zeros((0, dim), np.float16)
    return IndexContents(header, vectors, records, failed)


def index_size_bytes(path: str) -> Tuple[int, int]:
    """``(bytes of embeddings, bytes of manifests)`` of the committed shards."""
    emb = man = 0
    for manifest in manifests(path):
        man += os.path.getsize(manifest)
        npy = manifest[:-len(".jsonl")] + ".npy"
        if os.path.exists(npy):
            emb += os.path.getsize(npy)
    return emb, man


def search_cache_path(path: str, kind: str, options: dict, vectors: np.ndarray) -> Optional[str]:
    """Where the built ``kind`` search index of ``vectors`` (the index's, as loaded) and ``options`` is kept.

    The name hashes the vectors' bytes and the options, so an index that grew, was built again with other
    weights or videos (its manifests alike), or other options, get a new file; older files of the same kind
    are removed.
    """
    digest = hashlib.blake2b(np.ascontiguousarray(vectors).data, digest_size=16).hexdigest()
    key = json.dumps([digest, list(vectors.shape), str(vectors.dtype), kind, options], sort_keys=True, default=str)
    folder = os.path.join(path, SEARCH)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:  # a read-only index is still searchable; the index is then rebuilt per query
        return None
    name = os.path.join(folder, f"{kind}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.faiss")
    for old in glob.glob(os.path.join(folder, f"{kind}-*.faiss")):
        if old != name:
            os.remove(old)
    return name
