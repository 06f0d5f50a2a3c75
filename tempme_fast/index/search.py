"""Query a video index by text or by an example video; results come back as records.

    from tempme_fast.index import VideoIndex
    index = VideoIndex.open("my_index")                    # loads every shard, builds the search index
    hits = index.search_text("a dog catches a frisbee", k=10)
    hits = index.search_video("clips/frisbee.mp4", k=10)   # videos like this one
    hits[0].path, hits[0].score, hits[0].rank

The query is encoded by the model the index records (``index.json``); a caller that names another
model, weights or checkpoint is refused (:class:`~tempme_fast.index.spec.SpecMismatch`), because
its embeddings would live in another space.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from . import store
from .spec import TEXT_FIELDS, IndexSpec, SpecMismatch, check_same_encoder, embed_dim, load_encoder
from .vectors import VectorSearch


@dataclass(frozen=True)
class SearchHit:
    """One result: 1-based ``rank``, cosine ``score``, the video ``path``, its ``duration`` (s) and the
    number of ``frames`` encoded."""

    rank: int
    score: float
    path: str
    duration: Optional[float]
    frames: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class VideoIndex:
    """A loaded index: its vectors in a :class:`VectorSearch` and, on first query, its encoder."""

    def __init__(self, path: str, contents: store.IndexContents, searcher: VectorSearch,
                 backend: str = "auto", device: str = "auto", dtype: Optional[str] = None):
        self.path, self.contents, self.searcher = path, contents, searcher
        self.backend, self.device, self.dtype = backend, device, dtype
        self._model = None
        # What builds the query encoder: the index's own spec, or the caller's that matched it (the files
        # the caller named, which may lie elsewhere than those the index was built from).
        self.encoder_spec = contents.spec

    @classmethod
    def open(cls, path: str, kind: str = "exact", *, query_spec: Optional[IndexSpec] = None,
             model: Optional[torch.nn.Module] = None, backend: str = "auto", device: str = "auto",
             dtype: Optional[str] = None, **search_options) -> "VideoIndex":
        """Load the index at ``path``.

        Args:
            kind: ``exact``, ``ivf`` or ``hnsw`` (see :mod:`tempme_fast.index.vectors`);
                ``search_options`` go to :class:`VectorSearch` (``nlist``, ``nprobe``, ...).
            query_spec: the encoder the caller means to query with; refused unless it matches the
                index's for text queries (model, weights, checkpoint, text length).
            model: an already built encoder to use for queries (its embedding width is checked).
            backend, device, dtype: how to run the encoder.
        """
        contents = store.load_contents(path)
        if query_spec is not None:
            check_same_encoder(contents.spec, query_spec, f"the index at {path}", TEXT_FIELDS)
        if not contents.records:
            raise ConfigError(f"the index at {path} holds no readable video ({len(contents.failed)} failed); "
                             f"nothing to search")
        if kind != "exact":
            search_options.setdefault("cache", store.search_cache_path(path, kind, search_options, contents.vectors))
        index = cls(path, contents, VectorSearch(contents.vectors, kind, **search_options), backend, device,
                    dtype)
        if query_spec is not None:
            index.encoder_spec = query_spec
        if model is not None:
            index.use_model(model)
        return index

    def __len__(self) -> int:
        return len(self.contents.records)

    @property
    def spec(self) -> IndexSpec:
        return self.contents.spec

    def use_model(self, model: torch.nn.Module) -> None:
        """Query with ``model`` (already built for this index's spec) instead of building one."""
        dim = self.contents.header["embed_dim"]
        if embed_dim(model) != dim:
            raise SpecMismatch(f"the model makes {embed_dim(model)}-d embeddings but the index at {self.path} "
                               f"holds {dim}-d ones: it was built with another model ({self.spec.model})")
        self._model = model

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            self.use_model(load_encoder(self.encoder_spec, self.backend, self.device, self.dtype))
        return self._model

    def search_vectors(self, queries, k: int = 10) -> List[List[SearchHit]]:
        """Results for each query of ``queries [Q, D]`` (L2-normalised; a NumPy array or a tensor of any float
        dtype and device, e.g. ``model.encode_text``'s), best first."""
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().float().cpu().numpy()
        scores, ids = self.searcher.search(queries, k)
        out = []
        for row_scores, row_ids in zip(scores, ids):
            hits = []
            for score, i in zip(row_scores, row_ids):
                if i < 0:  # FAISS pads with -1 when an approximate index finds fewer than k
                    continue
                r = self.contents.records[i]
                hits.append(SearchHit(len(hits) + 1, float(score), r["path"], r.get("duration"), r["frames"]))
            out.append(hits)
        return out

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """``[Q, D]`` float32 L2-normalised text embeddings from the index's model."""
        from ..retrieval.cli import model_tokenizer
        from ..retrieval.evaluate import encode_texts

        model = self.model  # (built first: building a JSON-configured model registers its tokenizer's config)
        tokenizer = model_tokenizer(self.encoder_spec.model)
        return encode_texts(model, list(texts), tokenizer, self.spec.context_length, progress=False).numpy()

    @torch.no_grad()
    def encode_video(self, path: str) -> np.ndarray:
        """``[1, D]`` float32 L2-normalised embedding of the video file at ``path`` (decoded as at indexing)."""
        from ..retrieval.video import VideoProcessor

        model = self.model
        weight = model.visual.conv1.weight
        video, mask = VideoProcessor.for_model(model, self.spec.frames, self.spec.fps)(path)
        emb = model.encode_video(video[None].to(weight.device, weight.dtype), mask[None].to(weight.device))
        return F.normalize(emb.float(), dim=-1).cpu().numpy()

    def search_text(self, text: str, k: int = 10) -> List[SearchHit]:
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"text={text!r} must be a non-empty string")
        return self.search_vectors(self.encode_text([text]), k)[0]

    def search_video(self, path: str, k: int = 10) -> List[SearchHit]:
        return self.search_vectors(self.encode_video(path), k)[0]


def search_index(path: str, text: Optional[str] = None, *, like: Optional[str] = None, k: int = 10,
                 kind: str = "exact", **options) -> List[SearchHit]:
    """One query on the index at ``path``: by ``text`` or by the video file ``like`` (exactly one)."""
    if (text is None) == (like is None):
        raise ConfigError("pass exactly one of text (a description) and like (a video file)")
    index = VideoIndex.open(path, kind, **options)
    return index.search_text(text, k) if text is not None else index.search_video(like, k)
