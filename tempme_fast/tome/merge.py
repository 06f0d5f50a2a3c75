"""ToMe's merge functions (``tome/merge.py`` of facebookresearch/ToMe), on TempMe's kernels.

Same names, signatures and results as ToMe's, so that code written against ToMe switches with one
import (``from tempme_fast.tome import bipartite_soft_matching, merge_wavg, merge_source``). Each
function also takes a keyword-only ``backend`` (``"auto"``: Triton for CUDA tensors, PyTorch
otherwise; ``"torch"``; ``"triton"``).

What runs where:
- ``bipartite_soft_matching``: the best matches on the ``best_match`` kernel and, with a class
  token, the plan on the ``match`` plan kernel; without one, ToMe orders the kept tokens by
  score, so the plan is a PyTorch stable sort of the kernel's scores.
- ``kth_bipartite_soft_matching`` and ``random_bipartite_soft_matching``: the matching in PyTorch
  (their splits are not the alternation the kernels read); the merges on the kernels.
- ``merge(x, mode)``: ``"sum"`` and ``"mean"`` on the segment-reduce kernel (``tempme_kernels.segment``);
  ``"amax"``, ``"amin"``, ``"prod"`` in PyTorch (``scatter_reduce``, whose gradient splits ties).
- ``merge_wavg``: one fused launch for a merge from this module (the ``merge`` kernel of
  ``tempme_fast.ops`` where the layout is TempMe's, else the segment kernel); ToMe's own
  definition (two sums and a division) for any other merge callable.
- ``unmerge``: a gather (differentiable) on every backend.

Ties: the best match is the lowest B index among equal scores, and among equal scores the lower A
index merges first (ToMe's ``argsort`` leaves that order unspecified). Similarities are computed
in float32 (float64 stays float64) from L2-normalised metrics with the norm floored at the
smallest normal number, so an all-zero metric row scores 0 instead of NaN.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .. import ops
from ..ops.checks import check_heads
from ..ops.reference import MergePlan, split_positions
from . import reference
from .reference import TokenMerge

REDUCTIONS = ("mean", "sum", "amax", "amin", "prod")
KERNEL_REDUCTIONS = ("sum", "mean")


class Merge:
    """The ``merge(x, mode="mean")`` callable of a matching: ``[B', N, C]`` -> ``[B', N_out, C]``.

    ``plan`` is the :class:`~tempme_fast.ops.MergePlan` when the merge is TempMe's own layout
    (class tokens first, kept tokens increasing), so ``merge_wavg`` can run ``ops.merge`` on it.
    """

    def __init__(self, m: Optional[TokenMerge], backend: str, tokens: int = 0, plan: Optional[MergePlan] = None):
        self.token_merge, self.backend, self.tokens, self.plan = m, backend, tokens, plan

    def _check(self, name: str, x: torch.Tensor) -> None:
        m = self.token_merge
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[0] != m.out_pos.shape[0] or x.shape[1] != self.tokens:
            raise ValueError(f"{name} must have shape [B', N, C] = [{m.out_pos.shape[0]}, {self.tokens}, C] like "
                             f"the metric the merge was planned on, got {tuple(x.shape)}")
        if x.device != m.out_pos.device:
            raise ValueError(f"{name} is on {x.device} but the merge was planned on {m.out_pos.device}")

    def _triton(self, x: torch.Tensor) -> bool:
        return x.dtype in ops.FLOAT_DTYPES and ops.resolve_backend(self.backend, x) == "triton"

    def __call__(self, x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        if mode not in REDUCTIONS:
            raise ValueError(f"mode={mode!r} is not a reduction; valid: {REDUCTIONS}")
        if self.token_merge is None:
            return x
        self._check("x", x)
        if mode in KERNEL_REDUCTIONS and self._triton(x):
            from .segment_ops import segment_reduce
            return segment_reduce(x, self.token_merge, mode)
        return reference.segment_reduce(x, self.token_merge, mode)

    def wavg(self, x: torch.Tensor, size: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Size-weighted average (see :func:`merge_wavg`)."""
        if size is None:
            size = torch.ones_like(x[..., 0, None])
        if self.token_merge is None:
            return x, size
        self._check("x", x)
        if not isinstance(size, torch.Tensor) or tuple(size.shape) != (*x.shape[:2], 1):
            raise ValueError(f"size must have shape [B', N, 1] = [{x.shape[0]}, {x.shape[1]}, 1], got "
                             f"{tuple(size.shape) if isinstance(size, torch.Tensor) else type(size).__name__}")
        if not x.is_floating_point() or not size.is_floating_point():
            raise TypeError(f"x ({x.dtype}) and size ({size.dtype}) must be float tensors")
        if self._triton(x) and size.dtype in ops.FLOAT_DTYPES:
            if self.plan is not None:
                return ops.merge(x, size, self.plan, backend="triton")
            from .segment_ops import wavg
            return wavg(x, size, self.token_merge)
        return reference.wavg(x, size, self.token_merge)


class Unmerge:
    """The ``unmerge(x)`` callable: ``[B', N_out, C]`` -> ``[B', tokens, C]``, a differentiable gather."""

    def __init__(self, m: Optional[TokenMerge]):
        self.token_merge = m
        self._inv = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.token_merge
        if m is None:
            return x
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[:2] != m.out_pos.shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape [B', N_out, C] = [{m.out_pos.shape[0]}, {m.n_out}, C], the "
                             f"merge's output, got {got}")
        if self._inv is None:
            self._inv = reference.inverse_rows(m)
        return reference.unmerge(x, m, self._inv)


def _nothing(backend: str) -> Tuple[Merge, Unmerge]:
    return Merge(None, backend), Unmerge(None)


def _check_metric(metric: torch.Tensor, backend: str) -> None:
    if not isinstance(metric, torch.Tensor):
        raise TypeError(f"metric must be a torch.Tensor, got {type(metric).__name__}")
    if metric.dim() != 3:
        raise ValueError(f"metric must have shape [B', N, C] (3 dims), got {tuple(metric.shape)}")
    if metric.dtype not in ops.FLOAT_DTYPES:
        raise TypeError(f"metric has dtype {metric.dtype}; valid: float32, float16, bfloat16, float64")
    if metric.shape[0] == 0 or metric.shape[2] == 0:
        raise ValueError(f"metric {tuple(metric.shape)} is empty; give at least one row and one channel")
    if backend not in ops.BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {ops.BACKENDS}")


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool = False, distill_token: bool = False,
                            *, backend: str = "auto", heads: int = 1) -> Tuple[Merge, Unmerge]:
    """ToMe's balanced bipartite matching: remove ``r`` tokens of every row.

    Args:
        metric: ``[B', N, C]`` float (float16, bfloat16, float32, float64).
        r: tokens to remove; clamped to ``(N - protected) // 2`` as ToMe does, ``r <= 0`` is a no-op.
        class_token: token 0 is never merged. distill_token: token 1 (after the class token) neither;
            needs ``class_token`` (ToMe's output order assumes a class token in front of it).
        heads: match on the mean of the metric's ``heads`` groups of ``C / heads`` channels. ToMe's
            metric is the keys averaged over heads: pass the keys token-major (``[B', N, heads * d]``,
            any strides) with ``heads`` instead of averaging them first, and on the Triton backend the
            match averages them as it reads them (no mean kernel, the averaged keys never written).
    Returns:
        ``(merge, unmerge)``: ``merge(x, mode)`` gives ToMe's order: without a class token the kept
        A tokens by decreasing score then every B token; with one, the class token (then the
        distillation token), the kept A tokens increasing, then the B tokens.
    """
    _check_metric(metric, backend)
    _check_count("r", r)
    check_heads(heads, metric.shape[2])  # here too: r <= 0 never reaches the match that checks it
    if distill_token and not class_token:
        raise ValueError("distill_token=True needs class_token=True: the distillation token is the one after "
                         "the class token (DeiT's layout)")
    protected = int(bool(class_token)) + int(bool(distill_token))
    return bipartite_plan(metric, min(r, (metric.shape[1] - protected) // 2), protected,
                          kept_by_score=protected == 0, backend=backend, heads=heads)


def bipartite_plan(metric: torch.Tensor, r: int, protected: int, kept_by_score: bool, backend: str,
                   heads: int = 1) -> Tuple[Merge, Unmerge]:
    """TempMe's split (``protected`` tokens first, then A at even positions, B at odd) removing ``r``.

    Output order: the protected tokens, the kept A tokens (by decreasing score when
    ``kept_by_score``, ToMe's order without a class token; else increasing), then the B tokens.
    ``r`` is already clamped; ``r <= 0`` is a no-op. The match is on the mean of ``heads`` channel
    groups of the metric (:func:`tempme_fast.ops.best_match`).
    """
    if r <= 0:
        return _nothing(backend)
    tokens = metric.shape[1]
    plan = None
    if not kept_by_score and ops.resolve_backend(backend, metric) == "triton":
        # Best match, plan and the grouping that the Triton merge reads: one launch.
        plan = ops.match(metric, r, protected, backend="triton", heads=heads)
        merged, merged_dst, kept = plan.merged, plan.dst, plan.kept
    else:
        scores, dst = ops.best_match(metric, protected, backend=backend, heads=heads)
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        merged, kept = order[:, :r], order[:, r:]
        merged_dst = dst.gather(1, merged)
        if not kept_by_score:
            kept = kept.sort(dim=-1).values
            plan = MergePlan(merged, merged_dst, kept, tokens, protected)
    a_pos, b_pos = split_positions(tokens, protected, metric.device)
    rows = metric.shape[0]
    out_pos = torch.cat([torch.arange(protected, device=metric.device).expand(rows, -1), a_pos[kept],
                         b_pos.expand(rows, -1)], dim=1)
    m = TokenMerge(out_pos, a_pos[merged], protected + kept.shape[1] + merged_dst, tokens)
    return Merge(m, backend, tokens, plan), Unmerge(m)


def _normalised(metric: torch.Tensor) -> torch.Tensor:
    metric = metric.to(reference.work_dtype(metric.dtype))
    return metric / metric.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(metric.dtype).tiny)


def _split_merge(metric: torch.Tensor, a_pos: torch.Tensor, b_pos: torch.Tensor, used: int,
                 backend: str) -> Tuple[Merge, Unmerge]:
    """Every A token (``a_pos [B', Na]``) merges into its best B token (``b_pos [B', Nb]``); output = B."""
    with torch.no_grad():
        width = metric.shape[-1]
        unit = _normalised(metric)
        a = unit.gather(1, a_pos.unsqueeze(-1).expand(-1, -1, width))
        b = unit.gather(1, b_pos.unsqueeze(-1).expand(-1, -1, width))
        dst = (a @ b.transpose(1, 2)).max(dim=-1).indices  # first maximum: lowest B index on ties
    m = TokenMerge(b_pos, a_pos, dst, used)
    return Merge(m, backend, metric.shape[1]), Unmerge(m)


def kth_bipartite_soft_matching(metric: torch.Tensor, k: int, *, backend: str = "auto") -> Tuple[Merge, Unmerge]:
    """ToMe's split into (every ``k``-th token, the rest): each group of ``k`` tokens keeps its last.

    ``metric [B', N, C]``; the last ``N % k`` tokens are dropped, as ToMe does, so the merge leaves
    ``N // k`` tokens and ``unmerge`` gives ``(N // k) * k``. ``k <= 1`` is a no-op; ``k <= N``.
    """
    _check_metric(metric, backend)
    _check_count("k", k)
    if k <= 1:
        return _nothing(backend)
    tokens = metric.shape[1]
    if k > tokens:
        raise ValueError(f"k={k} must be <= N={tokens}: every group of k tokens keeps one")
    used = (tokens // k) * k
    pos = torch.arange(used, device=metric.device).view(-1, k)
    a_pos = pos[:, :-1].reshape(1, -1).expand(metric.shape[0], -1)
    b_pos = pos[:, -1].reshape(1, -1).expand(metric.shape[0], -1)
    return _split_merge(metric, a_pos, b_pos, used, backend)


def random_bipartite_soft_matching(metric: torch.Tensor, r: int, *, backend: str = "auto"
                                   ) -> Tuple[Merge, Unmerge]:
    """ToMe's random split: ``r`` random tokens merge into their best match among the rest.

    ``metric [B', N, C]``, ``0 <= r < N`` (``r <= 0`` is a no-op). Draws ``torch.rand(B', N, 1)`` on
    the metric's device and argsorts it, as ToMe does, so a seeded run picks the same tokens.
    The output is the other ``N - r`` tokens in that random order.
    """
    _check_metric(metric, backend)
    _check_count("r", r)
    if r <= 0:
        return _nothing(backend)
    rows, tokens, _ = metric.shape
    if r >= tokens:
        raise ValueError(f"r={r} must be < N={tokens}: at least one token must stay to merge into")
    order = torch.rand(rows, tokens, 1, device=metric.device).argsort(dim=1)[..., 0]
    return _split_merge(metric, order[:, :r], order[:, r:], tokens, backend)


def merge_wavg(merge: Callable, x: torch.Tensor, size: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of the tokens each merge joins: ``(x [B', N_out, C], size [B', N_out, 1])``.

    ``size [B', N, 1]`` (default ones in ``x``'s dtype); no gradient flows into it. With a ``merge``
    from this module it is one fused kernel launch on the Triton backend (a token nothing merged
    into keeps its value exactly); any other callable gets ToMe's definition.
    """
    if isinstance(merge, Merge):
        return merge.wavg(x, size)
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def merge_source(merge: Callable, x: torch.Tensor, source: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Source tracking: ``source [B', N, N0]`` 0/1, which original tokens each token holds.

    ``source=None`` starts from the identity over ``x``'s ``N`` tokens. Merged with ``"amax"``.
    """
    if source is None:
        n, t, _ = x.shape
        source = torch.eye(t, device=x.device)[None, ...].expand(n, t, t)
    return merge(source, mode="amax")
