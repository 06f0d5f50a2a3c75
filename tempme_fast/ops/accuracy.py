"""What the merge ops promise against the float64 reference, and checks that measure it.

Both backends compute in float32 (float64 input: float64) and round once to the input dtype, so:

- a cosine score is within :data:`SCORE_TOL` of the float64 score of the same (rounded) metric; a metric
  averaged over heads is rounded once, after a float32 sum whose order is the backend's (and, for torch,
  the device's): rarely an element lands one unit in the last place apart, which moves a score by up to
  about 1e-4, so a score is held to the nearer of those roundings (:func:`head_means`);
- a plan is the float64 plan wherever no near-tie decides it: each merged token joins a B token whose
  float64 score is within ``SCORE_TOL`` of its best, every merged token scores at least every kept one
  less ``SCORE_TOL``, and merged tokens come highest score first to within ``SCORE_TOL``; on a metric
  without near-ties the indices are the float64 reference's exactly;
- a merged value (or its gradient) is within ``atol + rtol * |expected|`` (:data:`VALUE_TOL`) of the
  float64 merge by the same plan;
- a LayerNorm written by the merge is within :data:`NORM_TOL` of :func:`reference.layer_norm` of the
  merged tokens it came with;
- an attention output or gradient is within :data:`ATTENTION_TOL` times the largest float64 value of
  that tensor (at least 0.1) of the float64 attention (:func:`scaled_error_ratio`);
- a video embedding of the encoder on the Triton backend is within :data:`EMBEDDING_TOL` (relative L2
  error) of the torch backend's in the same dtype, and the gradient of each parameter after one forward
  and backward within :data:`GRADIENT_TOL` (:func:`relative_error`).

The tests hold the fast paths to these bounds, and every benchmark row applies them to what it timed
(``benchmarks.oracle``). Each check returns what it found instead of raising, so a caller can record it.

    report = plan_agreement(plan, metric, r, protected)   # {"agrees": ..., "near_ties": ..., ...}
    ratio = tolerance_ratio(out, want, x.dtype)             # <= 1 within VALUE_TOL
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from . import reference
from .reference import MergePlan, group_sources, split_slices

# (atol, rtol) of a merged value or gradient against float64: one rounding to the dtype on store, plus
# the float32 sums of many sources into one token in a different order (which decides the float32 bound).
VALUE_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3),
             torch.float64: (1e-12, 1e-12)}
# Cosine scores accumulate in float32 whatever the input dtype (float64 stays float64).
SCORE_TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5, torch.float64: 1e-12}
# (atol, rtol) of a LayerNorm against reference.layer_norm of the same merged tokens: both compute in
# float32 and round once; their sums may associate differently (a last-place flip).
NORM_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2),
            torch.float64: (1e-12, 1e-12)}
# Max-abs error of attention (output and gradients) against float64, relative to the largest float64
# value of the same tensor: 16-bit probabilities enter the product with V, and the 16-bit reference rounds
# the log-size bias to the input dtype.
ATTENTION_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}

# Relative L2 error of a video embedding against the torch backend's in the same dtype (what the whole encoder
# promises on the Triton backend): the two backends round their sums in other orders, and a merge that a
# near-tie decides may go either way, so this is looser than float64 agreement.
EMBEDDING_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float64: 1e-10}
# Relative L2 error of each parameter's gradient after one forward and backward of the encoder on the Triton
# backend, against the torch backend's in the same dtype. The backward sums every token's contribution to a
# weight, in other orders on the two backends, and the 16-bit gradients are rounded once more; on the tiny
# test model the largest errors are 6e-7 (float32), 1.7e-3 (float16) and 2.9e-2 (bfloat16), so these bounds
# leave room for a deeper model while a wrong gradient (a missing or doubled contribution) still fails.
GRADIENT_TOL = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 2e-1, torch.float64: 1e-8}

__all__ = ["ATTENTION_TOL", "EMBEDDING_TOL", "GRADIENT_TOL", "NORM_TOL", "SCORE_TOL", "VALUE_TOL", "cosine_scores",
           "head_means", "plan_agreement", "relative_error", "scaled_error_ratio", "tolerance_ratio"]


def head_means(metric: torch.Tensor, heads: int) -> Tuple[torch.Tensor, ...]:
    """The roundings of ``reference.head_mean(metric, heads)`` that the backends compute: torch's mean (the
    torch backend; its summation order is the device's) and, for ``heads > 1``, the Triton kernels': a float32
    sum over the heads in order, times float32 ``1 / heads``, rounded once to the metric's dtype. For
    ``heads == 1``, or a metric already in float32 or float64 (no rounding after the sum), just torch's."""
    torch_mean = reference.head_mean(metric, heads)
    if heads == 1 or metric.dtype in (torch.float32, torch.float64):
        return (torch_mean,)
    per_head = metric.unflatten(-1, (heads, -1)).float()
    total = per_head[..., 0, :]
    for h in range(1, heads):
        total = total + per_head[..., h, :]
    return torch_mean, (total * torch.tensor(1.0 / heads, dtype=torch.float32)).to(metric.dtype)


def cosine_scores(metric: torch.Tensor, protected: int) -> torch.Tensor:
    """``[B', Na, Nb]`` float64 cosine similarities of set A against set B (the reference's, unrounded)."""
    a_set, b_set = split_slices(protected)
    m = metric.double()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return m[:, a_set] @ m[:, b_set].transpose(1, 2)


def _unmeasurable(actual: torch.Tensor, expected: torch.Tensor) -> Optional[float]:
    """The ratio of a comparison that needs no arithmetic: ``inf`` for a shape that differs or a NaN or Inf
    in ``actual``, 0 for empty tensors; None otherwise."""
    if actual.shape != expected.shape or not torch.isfinite(actual).all():
        return float("inf")
    return 0.0 if actual.numel() == 0 else None


def tolerance_ratio(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                    table: Optional[Dict[torch.dtype, Tuple[float, float]]] = None) -> float:
    """Largest ``|actual - expected| / (atol + rtol * |expected|)`` with ``(atol, rtol)`` of ``dtype`` in
    ``table`` (default :data:`VALUE_TOL`): at most 1 within tolerance; ``inf`` for a NaN, an Inf where
    ``expected`` is finite, or a shape that differs."""
    early = _unmeasurable(actual, expected)
    if early is not None:
        return early
    atol, rtol = (table or VALUE_TOL)[dtype]
    a, e = actual.double(), expected.double()
    return ((a - e).abs() / (atol + rtol * e.abs())).max().item()


def relative_error(actual: torch.Tensor, expected: torch.Tensor, dim: Optional[int] = None) -> float:
    """Largest relative L2 error ``|actual - expected| / |expected|`` (over ``dim``'s slices, else of the
    whole tensor), in float64; 0 where both are zero; ``inf`` for a NaN or Inf, or a shape that differs."""
    early = _unmeasurable(actual, expected)
    if early is not None:
        return early
    a, e = actual.double(), expected.double()
    norms = (lambda t: t.norm()) if dim is None else (lambda t: t.norm(dim=dim))
    return (norms(a - e) / norms(e).clamp_min(torch.finfo(torch.float64).tiny)).max().item()


def scaled_error_ratio(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, floor: float = 0.1) -> float:
    """``max |actual - expected|`` over ``ATTENTION_TOL[dtype] * max(max |expected|, floor)``: at most 1
    within tolerance; ``inf`` for a NaN or Inf, or a shape that differs. ``floor``: where the true values
    are all near 0 (one token: its query's gradient), rounding still leaves a trace."""
    early = _unmeasurable(actual, expected)
    if early is not None:
        return early
    e = expected.double()
    err = (actual.double() - e).abs().max().item()
    return err / (ATTENTION_TOL[dtype] * max(e.abs().max().item(), floor))


def _increasing(t: torch.Tensor) -> bool:
    return bool((t[:, 1:] > t[:, :-1]).all()) if t.shape[1] > 1 else True


def plan_agreement(plan: MergePlan, metric: torch.Tensor, r: int, protected: int,
                   scores: Optional[torch.Tensor] = None) -> Dict[str, object]:
    """How ``plan`` (of either backend) for ``metric`` stands against the float64 reference.

    Returns ``agrees`` (every promise of the module docstring holds), ``near_ties`` (merged tokens
    whose index differs from the float64 plan's, within ``SCORE_TOL``: 0 on a metric without near-ties)
    and, when it does not agree, ``disagreement``: what failed first. ``scores`` (``[B', Na, Nb]`` from
    :func:`cosine_scores`) saves recomputing them. A plan that carries ``src`` and ``offsets`` (the
    Triton match's grouping by destination) must carry exactly :func:`reference.group_sources` of its own
    ``merged`` and ``dst``.
    """
    tol = SCORE_TOL[metric.dtype]
    sim = cosine_scores(metric, protected) if scores is None else scores
    rows, na, nb = sim.shape
    merged, dst, kept = plan.merged, plan.dst, plan.kept

    def result(problem: Optional[str], near: int = 0) -> Dict[str, object]:
        out: Dict[str, object] = {"agrees": problem is None, "near_ties": near}
        if problem:
            out["disagreement"] = problem
        return out

    want_shapes = ((rows, r), (rows, r), (rows, na - r))
    if tuple(tuple(t.shape) for t in (merged, dst, kept)) != want_shapes:
        return result(f"shapes merged/dst/kept {[tuple(t.shape) for t in (merged, dst, kept)]}, want {want_shapes}")
    merged, dst, kept = (t.to(sim.device, torch.int64) for t in (merged, dst, kept))
    every = torch.cat([merged, kept], dim=1).sort(dim=1).values
    if not torch.equal(every, torch.arange(na, device=sim.device).expand(rows, -1)):
        return result("merged and kept are not a partition of set A")
    if not _increasing(kept):
        return result("kept is not increasing")
    if r and ((dst < 0) | (dst >= nb)).any():
        return result(f"dst outside [0, {nb})")
    best, ref_dst = sim.max(dim=-1)
    if r:
        chosen = sim.gather(1, merged.unsqueeze(-1).expand(-1, -1, nb)).gather(2, dst.unsqueeze(-1)).squeeze(-1)
        lost = (best.gather(1, merged) - chosen).max().item()
        if lost > tol:
            return result(f"a merged token joins a B token {lost:.3g} below its best (SCORE_TOL {tol:g})")
        merged_best = best.gather(1, merged)
        if r < na:
            gap = (best.gather(1, kept).max(dim=1).values - merged_best.min(dim=1).values).max().item()
            if gap > tol:
                return result(f"a kept token scores {gap:.3g} above a merged one (SCORE_TOL {tol:g})")
        if r > 1:
            rise = (merged_best[:, 1:] - merged_best[:, :-1]).max().item()
            if rise > tol:
                return result(f"merged is not highest score first: a rise of {rise:.3g} (SCORE_TOL {tol:g})")
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    near = int(((merged != order[:, :r]) | (dst != ref_dst.gather(1, order[:, :r]))).sum().item())
    if plan.src is not None and plan.offsets is not None:
        src, offsets = group_sources(merged, dst, nb)
        if not (torch.equal(plan.src.to(src), src) and torch.equal(plan.offsets.to(offsets), offsets)):
            return result("src/offsets are not the grouping of merged by dst", near)
    return result(None, near)
