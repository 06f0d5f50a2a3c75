"""The released TempMe code's ``bipartite_soft_matching(metric, r, cls_num, r_f)`` (``module_tome_merge.py``).

Its split: the first ``cls_num`` tokens are never merged, and the patches after them alternate
into A and B starting with A when ``cls_num`` is even and with B when it is odd, which is TempMe's
``protected = cls_num`` layout here (a token is in A when its position is even). Output: the
``cls_num`` tokens, the kept A tokens increasing, then the B tokens. The release returns no
unmerge (``None``); neither does this.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .merge import Merge, _check_count, _check_metric, bipartite_plan


def bipartite_soft_matching(metric: torch.Tensor, r: int, cls_num: int, r_f: Optional[int] = None, *,
                            backend: str = "auto") -> Tuple[Merge, None]:
    """Plan removing ``r`` tokens of every row of ``metric [B', N, C]`` with ``cls_num`` class tokens.

    Args:
        r: ``r <= 0`` is a no-op; at most ``(N - cls_num) // 2`` (the release does not clamp, and
            fails or merges class tokens beyond that; this raises instead).
        cls_num: protected tokens at the front, ``0 <= cls_num <= N - 2``.
        r_f: accepted and unused, as in the release.
    Returns:
        ``(merge, None)``; ``merge(x, mode)`` and ``merge_wavg(merge, x, size)`` as in :mod:`tempme_fast.tome`.
    """
    _check_metric(metric, backend)
    _check_count("r", r)
    _check_count("cls_num", cls_num)
    tokens = metric.shape[1]
    if not 0 <= cls_num <= tokens - 2:
        raise ValueError(f"cls_num={cls_num} must be in [0, N - 2] = [0, {tokens - 2}] for metric with N={tokens}")
    limit = (tokens - cls_num) // 2
    if r > limit:
        raise ValueError(f"r={r} must be <= (N - cls_num) // 2 = {limit} for N={tokens}, cls_num={cls_num}")
    merge, _ = bipartite_plan(metric, r, cls_num, kept_by_score=False, backend=backend)
    return merge, None
