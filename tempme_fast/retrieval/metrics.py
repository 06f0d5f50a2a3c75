"""Text-video retrieval metrics from a similarity matrix: R@K, median and mean rank, R-Sum, DSL.

Conventions (the field's, as in CLIP4Clip's ``compute_metrics``):

* ``sim [num_texts, num_videos]``, higher is more similar. On MSR-VTT 1k-A there is one caption per
  video and caption ``i`` belongs to video ``i``: the match is the diagonal.
* Text-to-video: each row is a query ranking all videos. Video-to-text: each column is a query
  ranking all texts (``sim.T``'s rows).
* The rank of a query is the 1-based position of its match when the candidates are sorted by
  decreasing similarity. R@K is the percentage of queries with rank <= K, MdR the median rank,
  MnR the mean rank, R-Sum = R@1 + R@5 + R@10.

**Ties.** The rank is *pessimistic*: ``rank = 1 + #{non-matching candidates j: sim[q, j] >= sim[q, match]}``,
so a match tied with k other candidates ranks behind all of them. Without ties this is exactly the
position CLIP4Clip's ``compute_metrics`` finds. With ties that code differs: it looks for the
match's value in the sorted row with ``np.where(sorted - diag == 0)`` and gets *every* tied
position, so a row with k ties contributes k ranks and the average runs over more entries than
there are queries. Pessimistic ranking avoids that and cannot flatter a degenerate model: an
encoder that maps every video to the same vector ranks every match last instead of first
(optimistic ranking, also available, would give such a model R@1 = 100).

**Several captions per video** (the generic layout): pass ``text_to_video[i]``, the column of
caption ``i``'s video. Text-to-video ranks that column; video-to-text ranks the video's
best-scoring caption among the *other* videos' captions (the rank of the first correct hit).
The square diagonal case is ``text_to_video = arange(n)``.

**DSL** (dual softmax, Cheng et al. 2021, "CAMoE"): an inference-time re-ranking that reweights
each similarity by a softmax over the *other* queries, so it uses the whole test set at once and
is not comparable with plain numbers; it is reported separately, labelled ``dsl``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

RECALL_KS = (1, 5, 10)
TIES = ("pessimistic", "optimistic")
# The dual softmax's temperature: CLIP's logit scale, as the re-ranking is usually run.
DSL_TEMPERATURE = 100.0


def _as_matrix(sim) -> np.ndarray:
    try:
        import torch
        if isinstance(sim, torch.Tensor):
            sim = sim.detach().float().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"sim must be a non-empty 2-D matrix [num_texts, num_videos], got shape {sim.shape}")
    if not np.all(np.isfinite(sim)):
        bad = np.argwhere(~np.isfinite(sim))[0]
        raise ValueError(f"sim has a non-finite entry at {tuple(int(i) for i in bad)}; every similarity "
                         f"must be a finite number")
    return sim


def _as_targets(text_to_video, sim: np.ndarray) -> np.ndarray:
    texts, videos = sim.shape
    if text_to_video is None:
        if texts != videos:
            raise ValueError(f"sim is {texts}x{videos}; without text_to_video the match is the diagonal, "
                             f"which needs a square matrix (one caption per video)")
        return np.arange(texts)
    targets = np.asarray(text_to_video)
    if targets.shape != (texts,) or not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"text_to_video must hold one int video column per text ({texts}), got "
                         f"shape {targets.shape} dtype {targets.dtype}")
    if targets.min() < 0 or targets.max() >= videos:
        raise ValueError(f"text_to_video values must lie in [0, {videos - 1}] (columns of sim), got "
                         f"[{targets.min()}, {targets.max()}]")
    missing = np.setdiff1d(np.arange(videos), targets)
    if missing.size:
        raise ValueError(f"video column {int(missing[0])} has no caption in text_to_video; every video "
                         f"needs at least one ({missing.size} without)")
    return targets.astype(np.int64)


def _check_ties(ties: str) -> None:
    if ties not in TIES:
        raise ValueError(f"ties={ties!r} is not one of {TIES}")


def _rank(scores: np.ndarray, match: np.ndarray, ties: str) -> np.ndarray:
    """1-based rank of the best matching candidate in each row.

    Args:
        scores: ``[Q, C]`` similarities.
        match: ``[Q, C]`` bool, the candidates that count as correct for each query.
    """
    best = np.where(match, scores, -np.inf).max(axis=1, keepdims=True)
    others = ~match
    ahead = (scores >= best) if ties == "pessimistic" else (scores > best)
    return 1 + (ahead & others).sum(axis=1)


def _matches(sim, text_to_video, ties: str):
    """``(sim, match)``: the checked similarity matrix and a bool matrix marking each caption's video."""
    _check_ties(ties)
    sim = _as_matrix(sim)
    match = np.zeros(sim.shape, dtype=bool)
    match[np.arange(sim.shape[0]), _as_targets(text_to_video, sim)] = True
    return sim, match


def text_to_video_ranks(sim, text_to_video: Optional[Sequence[int]] = None,
                        ties: str = "pessimistic") -> np.ndarray:
    """``[num_texts]`` 1-based rank of each caption's video among all videos."""
    sim, match = _matches(sim, text_to_video, ties)
    return _rank(sim, match, ties)


def video_to_text_ranks(sim, text_to_video: Optional[Sequence[int]] = None,
                        ties: str = "pessimistic") -> np.ndarray:
    """``[num_videos]`` 1-based rank of each video's best-ranked caption among all captions."""
    sim, match = _matches(sim, text_to_video, ties)
    return _rank(sim.T, match.T, ties)


def rank_metrics(ranks) -> Dict[str, float]:
    """R@1, R@5, R@10 (percent), MdR, MnR and R-Sum of 1-based ranks."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D array, got shape {ranks.shape}")
    if ranks.min() < 1:
        raise ValueError(f"ranks are 1-based; got a rank of {ranks.min()}")
    out = {f"R@{k}": float(100.0 * np.mean(ranks <= k)) for k in RECALL_KS}
    out["MdR"] = float(np.median(ranks))
    out["MnR"] = float(np.mean(ranks))
    out["R-Sum"] = sum(out[f"R@{k}"] for k in RECALL_KS)
    return out


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def check_temperature(value, name: str = "temperature") -> None:
    """Refuse a dual-softmax temperature that is not a positive finite number, in a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive finite number (100 is standard)")


def dual_softmax(sim, temperature: float = DSL_TEMPERATURE) -> Dict[str, np.ndarray]:
    """Dual-softmax re-ranked matrices, one per direction, both ``[queries, candidates]``.

    For text-to-video, ``sim[t, v] * softmax_t(temperature * sim[:, v])``: each video's scores are
    normalised over all texts before the texts rank the videos. Video-to-text is the same on
    ``sim.T``. ``temperature`` 100 is CLIP's logit scale, the value the CLIP4Clip family uses.

    Returns:
        ``{"t2v": [num_texts, num_videos], "v2t": [num_videos, num_texts]}``.
    """
    check_temperature(temperature)
    sim = _as_matrix(sim)
    t2v = sim * _softmax(temperature * sim, axis=0)
    v2t = sim.T * _softmax(temperature * sim.T, axis=0)
    return {"t2v": t2v, "v2t": v2t}


def retrieval_metrics(sim, text_to_video: Optional[Sequence[int]] = None, ties: str = "pessimistic",
                      dsl: bool = False, dsl_temperature: float = DSL_TEMPERATURE) -> Dict[str, Dict[str, float]]:
    """All metrics of a text-video similarity matrix.

    Args:
        sim: ``[num_texts, num_videos]`` similarities (numpy or torch).
        text_to_video: video column of each text; ``None`` means the diagonal (square ``sim``).
        ties: ``"pessimistic"`` (default, see the module docstring) or ``"optimistic"``.
        dsl: also report the dual-softmax re-ranked metrics, under ``"dsl_t2v"`` / ``"dsl_v2t"``.
    Returns:
        ``{"t2v": {...}, "v2t": {...}}`` (plus ``"dsl_t2v"``, ``"dsl_v2t"`` with ``dsl``), each with
        ``R@1, R@5, R@10, MdR, MnR, R-Sum``.
    """
    out = {"t2v": rank_metrics(text_to_video_ranks(sim, text_to_video, ties)),
           "v2t": rank_metrics(video_to_text_ranks(sim, text_to_video, ties))}
    if dsl:
        reranked = dual_softmax(sim, dsl_temperature)
        out["dsl_t2v"] = rank_metrics(text_to_video_ranks(reranked["t2v"], text_to_video, ties))
        out["dsl_v2t"] = rank_metrics(video_to_text_ranks(reranked["v2t"].T, text_to_video, ties))
    return out
