"""Top-k inner-product search over L2-normalised vectors: FAISS when installed, NumPy for exact search.

Kinds:
- ``exact``: every vector scored (``faiss.IndexFlatIP``, or a NumPy matrix product without FAISS).
  Scores are the exact inner products, i.e. cosine similarities of normalised vectors.
- ``ivf``: ``faiss.IndexIVFFlat`` - k-means cells (``nlist``, default about ``4 sqrt(N)``), a query
  scans the ``nprobe`` nearest cells. Approximate; ``nprobe = nlist`` is exact.
- ``hnsw``: ``faiss.IndexHNSWFlat`` - a navigable small-world graph (``M`` links per vector),
  searched with beam width ``ef_search``. Approximate; no training.

IVF and HNSW need FAISS (``pip install faiss-cpu``, or ``pip install tempme-fast[search]``).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import numpy as np

from ..checkpoint import atomic_write
from ..errors import ConfigError, check_int

KINDS = ("exact", "ivf", "hnsw")
FAISS_HINT = "pip install faiss-cpu (or: pip install 'tempme-fast[search]')"


class FaissMissing(ImportError):
    """An IVF or HNSW index was asked for but FAISS is not installed."""


def faiss_module():
    """The ``faiss`` module, or None when it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def default_nlist(count: int) -> int:
    """IVF cells for ``count`` vectors: about ``4 sqrt(N)``, with at least 39 training vectors per cell
    (FAISS's k-means warns below that)."""
    return max(1, min(int(round(4 * math.sqrt(count))), count // 39))


class VectorSearch:
    """A searchable set of ``vectors [N, D]`` (float16 or float32, L2-normalised).

    Args:
        kind: ``exact``, ``ivf`` or ``hnsw`` (see the module docstring).
        nlist, nprobe: IVF cells and cells scanned per query (defaults: :func:`default_nlist`, 16).
        train_size: vectors the IVF k-means trains on, drawn at random (default: all, at most
            ``64 * nlist``; k-means costs ``train_size * nlist * D`` per iteration).
        hnsw_m, ef_search: HNSW links per vector and search beam width.
        use_faiss: False forces the NumPy path for exact search (None: FAISS when installed).
        cache: a file for the built IVF/HNSW index: read when it exists, else written after the
            build (the caller names it so that it changes when the vectors or options do).
    """

    def __init__(self, vectors: np.ndarray, kind: str = "exact", *, nlist: Optional[int] = None,
                 nprobe: int = 16, train_size: Optional[int] = None, hnsw_m: int = 32, ef_search: int = 128,
                 use_faiss: Optional[bool] = None, seed: int = 0, cache: Optional[str] = None):
        if kind not in KINDS:
            raise ConfigError(f"kind={kind!r} is not one of {KINDS}")
        # Checked here: FAISS aborts the process on hnsw_m=0 and fails at the first query on nprobe=0.
        for name, value in (("nprobe", nprobe), ("hnsw_m", hnsw_m), ("ef_search", ef_search)):
            check_int(name, value)
        for name, value in (("nlist", nlist), ("train_size", train_size)):  # None: chosen from N
            if value is not None:
                check_int(name, value)
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ConfigError(f"vectors must be a non-empty [N, D] array, got shape {vectors.shape}")
        self.kind, self.dim = kind, vectors.shape[1]
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        faiss = faiss_module() if use_faiss is not False else None
        if use_faiss and faiss is None:
            raise FaissMissing(f"use_faiss=True but FAISS is not installed: {FAISS_HINT}")
        if kind != "exact" and faiss is None:
            raise FaissMissing(f"a {kind.upper()} index needs FAISS, which is not installed: {FAISS_HINT}. "
                               f"Exact search (kind='exact', --index exact) works without it")
        self.faiss = faiss
        self.index = None
        if faiss is not None and kind != "exact" and cache and os.path.isfile(cache):
            self.index = faiss.deserialize_index(np.fromfile(cache, dtype=np.uint8))
        elif faiss is not None:
            self.index = self._build(faiss, kind, nlist, nprobe, train_size, hnsw_m, ef_search, seed)
            if kind != "exact" and cache:
                atomic_write(cache, lambda f: f.write(faiss.serialize_index(self.index).tobytes()))
        if self.index is not None and self.index.ntotal != len(self.vectors):
            raise ConfigError(f"cached index {cache} holds {self.index.ntotal} vectors, not {len(self.vectors)}; "
                             f"delete it")

    @property
    def backend(self) -> str:
        return "numpy" if self.index is None else f"faiss {type(self.index).__name__}"

    def _build(self, faiss, kind, nlist, nprobe, train_size, hnsw_m, ef_search, seed):
        n, d = self.vectors.shape
        if kind == "exact":
            index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = ef_search
        else:
            nlist = nlist or default_nlist(n)
            if not 1 <= nlist <= n:
                raise ConfigError(f"nlist={nlist} must be between 1 and the number of vectors ({n})")
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            train_size = min(n, train_size or 64 * nlist)
            sample = np.random.default_rng(seed).choice(n, train_size, replace=False) if train_size < n else slice(None)
            index.train(self.vectors[sample])
            index.nprobe = min(nprobe, nlist)
            self._quantizer = quantizer  # the IVF index only borrows its quantizer: keep it alive
        index.add(self.vectors)
        return index

    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(scores [Q, k'], ids [Q, k'])`` best first, ``k' = min(k, N)``; ids index the vectors."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k={k!r} must be a positive int (results per query)")
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ConfigError(f"queries have shape {queries.shape}; the index holds {self.dim}-d vectors")
        finite = np.isfinite(queries).all(axis=1)
        if not finite.all():  # no result would be right: FAISS returns none, the exact scores are all NaN
            raise ConfigError(f"queries hold NaN or Inf (query {int(np.argmin(finite))} of {len(queries)})")
        k = min(k, len(self.vectors))
        if self.index is None:
            return brute_force(self.vectors, queries, k)
        scores, ids = self.index.search(queries, k)
        return scores, ids


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner products, best first; ties by lower id. The reference every kind is tested against."""
    # asarray, not astype: float32 vectors (the VectorSearch copy) must not be copied at every query.
    scores = np.asarray(queries, dtype=np.float32) @ np.asarray(vectors, dtype=np.float32).T  # [Q, N]
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.lexsort((top, -top_scores), axis=1)
    ids = np.take_along_axis(top, order, axis=1)
    return np.take_along_axis(scores, ids, axis=1), ids
