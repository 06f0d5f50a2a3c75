"""Whether what a benchmark timed computed the right thing: each merge op's output against the float64
reference, with the tolerances of ``tempme_fast.ops.accuracy``.

A timed row is only worth its number if the kernel behind it is right, and on a GPU the benchmarks
launch variants (tiles, plan paths, pipelined gathers) that no test there may have run. So every row of
``bench_ops`` calls its op once more after timing and records:

- ``agrees``: the plan is the float64 plan up to near-ties, its grouping by destination is exact, and
  every merged value, size, LayerNorm and gradient is within tolerance of the float64 merge by that
  plan (``accuracy.plan_agreement``, ``accuracy.tolerance_ratio``);
- ``tol_ratio``: the largest error of those values over its tolerance (at most 1 when it agrees);
- ``near_ties``: merged tokens whose index differs from the float64 plan's within ``SCORE_TOL``;
- ``disagreement``: what failed first, when it does not agree.

``bench_attention`` rows hold attention to ``accuracy.ATTENTION_TOL`` the same way. ``bench_model``'s
inference rows hold each Triton (or graph-replayed) encoder's embeddings to the torch backend's (or
open_clip's eager ones) with ``accuracy.EMBEDDING_TOL``, and its training rows (and ``bench_train``'s) the
gradient of every parameter with ``accuracy.GRADIENT_TOL`` (columns ``agrees``, ``rel_err``).

    columns = check_op("merge_fwd", s, metric, x, size, out, plan)
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from tempme_fast.ops import accuracy, reference
from tempme_fast.ops.reference import MergePlan

# The step_norm_fwd rows' LayerNorm epsilon (open_clip's).
NORM_EPS = 1e-5


def norm_inputs(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(residual, weight, bias)`` of a step_norm_fwd row: the attention output stands in as ``x`` rolled
    by one token; the LayerNorm's weight and bias are ones and zeros."""
    width = x.shape[-1]
    return (x.roll(1, dims=1), torch.ones(width, device=x.device, dtype=x.dtype),
            torch.zeros(width, device=x.device, dtype=x.dtype))


def join_inputs(s, metric: torch.Tensor, size: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, size, frame_pos, weight, bias)`` of a join_norm_fwd row at join shape ``s``: the clips before the
    join (``[rows * group, tokens / group, D]``) whose join is ``metric`` (a join matches on its joined hidden
    states, so the plan is ``metric``'s), their sizes likewise, a seeded temporal position embedding
    ``[1, F, 1, D]`` (``F`` clips a video before the join) in x's dtype, and the LayerNorm's ones and zeros."""
    group, protected = s.group, s.protected // s.group

    def unjoin(t: torch.Tensor) -> torch.Tensor:  # the inverse of reference.join_clips
        cls = t[:, :s.protected].reshape(t.shape[0], group, protected, *t.shape[2:])
        patches = t[:, s.protected:].reshape(t.shape[0], group, -1, *t.shape[2:])
        return torch.cat([cls, patches], dim=2).reshape(t.shape[0] * group, -1, *t.shape[2:])
    g = torch.Generator(device=metric.device).manual_seed(11)
    frame_pos = 0.02 * torch.randn(1, s.rows * group // s.batch, 1, metric.shape[-1], device=metric.device,
                                   generator=g)
    _, weight, bias = norm_inputs(metric)
    return unjoin(metric), unjoin(size), frame_pos.to(metric.dtype), weight, bias


def join_grads(s, metric: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The gradients of a join_norm_fwdbwd row's merged tokens and of their LayerNorm (:func:`upstream_grad`,
    seeded apart), at join shape ``s`` whose join is ``metric``."""
    tokens_out = s.tokens - s.r
    return upstream_grad(metric, tokens_out), upstream_grad(metric, tokens_out, seed=8)


def _joined(s, clips: torch.Tensor, frame_pos: torch.Tensor) -> Sequence[torch.Tensor]:
    """The clips joined with their position embedding two ways: added in x's dtype (the torch backend, as TempMe's
    code) or exactly (the Triton kernel adds it in float32 as it merges); the oracle holds a merge of them to the
    nearer of the two."""
    return [reference.join_clips(c, s.group, s.protected // s.group, p) for c, p in
            ((clips, frame_pos), (clips.double(), frame_pos.double()))]


def upstream_grad(x: torch.Tensor, tokens_out: int, seed: int = 7) -> torch.Tensor:
    """The gradient of the merged tokens that the backward rows feed in: ``[B', tokens_out, D]``, seeded."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    return torch.randn(x.shape[0], tokens_out, x.shape[-1], device=x.device, dtype=x.dtype, generator=g)


class _Verdict:
    """Collects the checks of one row: the first failure, the largest tolerance ratio and, where plans
    are compared (``ties``), the near-ties."""

    def __init__(self, ties: bool = True):
        self.problem: Optional[str] = None
        self.ratio = 0.0
        self.near_ties: Optional[int] = 0 if ties else None

    def fail(self, problem: str) -> None:
        """Record ``problem`` unless an earlier one is recorded already."""
        if self.problem is None:
            self.problem = problem

    def plan(self, report: Dict[str, object]) -> None:
        self.near_ties += int(report["near_ties"])
        if not report["agrees"]:
            self.fail(f"plan: {report['disagreement']}")

    def record(self, what: str, ratio: float) -> None:
        """An error of ``ratio`` times its tolerance in ``what``."""
        self.ratio = max(self.ratio, ratio)
        if ratio > 1:
            self.fail(f"{what}: {ratio:.3g}x its tolerance")

    def values(self, what: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
               table=None) -> None:
        self.record(what, accuracy.tolerance_ratio(actual, expected, dtype, table))

    def nearest(self, what: str, actual: torch.Tensor, wants: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                dtype: torch.dtype) -> None:
        """``actual`` held to the nearest of the merged tokens of ``wants`` (``reference.merge``'s outputs, one for
        each way of making what is merged)."""
        self.record(what, min(accuracy.tolerance_ratio(actual, want, dtype) for want, _ in wants))

    def gradient(self, what: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
        """``accuracy.VALUE_TOL[dtype]`` with its absolute part times the largest ``|expected|``: a gradient
        through a LayerNorm is a difference of terms several times its size, each rounded to ``dtype``."""
        atol, rtol = accuracy.VALUE_TOL[dtype]
        scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
        self.values(what, actual, expected, dtype, {dtype: (atol * scale, rtol)})

    def columns(self) -> Dict[str, object]:
        out: Dict[str, object] = {"agrees": self.problem is None, "tol_ratio": self.ratio}
        if self.near_ties is not None:
            out["near_ties"] = self.near_ties
        if self.problem:
            out["disagreement"] = self.problem
        return out


def check_op(op: str, s, metric: torch.Tensor, x: torch.Tensor, size: torch.Tensor, out: Sequence[torch.Tensor],
             plan: Optional[MergePlan] = None) -> Dict[str, object]:
    """The ``agrees``, ``tol_ratio``, ``near_ties`` (and ``disagreement``) columns of ``op``'s output ``out``
    on shape ``s`` (``benchmarks.common.MergeShape``) and inputs ``metric``, ``x``, ``size``.

    ``out`` as the op returns it: ``best_match`` ``(scores, dst)``; ``match`` a plan (or its first three
    fields); ``merge_fwd`` and ``step_fwd`` ``(x, size)``; ``step_norm_fwd`` ``(x, size, ln)`` of the
    inputs of :func:`norm_inputs`; ``join_norm_fwd`` ``(x, size, ln)`` of the inputs of :func:`join_inputs`;
    ``merge_bwd`` and ``step_fwdbwd`` ``(grad_x,)`` for :func:`upstream_grad`; ``join_norm_fwdbwd``
    ``(grad_x, grad_frame_pos, x_merged)`` of :func:`join_inputs` for :func:`join_grads`, the backward held to
    float64's from the merged tokens the op wrote (themselves held as ``join_norm_fwd``'s). ``plan``: the plan
    the merge ops ran on (the same backend's, on ``metric``). The ops match on ``metric`` averaged over ``s.heads``
    (``reference.head_mean``), and so does the check; best-match scores are held to the nearer of that mean's
    roundings (``accuracy.head_means``).
    """
    verdict = _Verdict()
    means = accuracy.head_means(metric, s.heads)
    metric = means[0]
    scores = accuracy.cosine_scores(metric, s.protected)
    if op == "best_match":
        got, dst = out
        best, best_dst = scores.max(dim=-1)
        # Each score, and the loss of each chosen B token, against the nearer of the head mean's roundings.
        want, lost = best, best - scores.gather(2, dst.unsqueeze(-1)).squeeze(-1)
        for other in means[1:]:
            other_scores = accuracy.cosine_scores(other, s.protected)
            other_best = other_scores.max(dim=-1).values
            want = torch.where((got.double() - other_best).abs() < (got.double() - want).abs(), other_best, want)
            lost = torch.minimum(lost, other_best - other_scores.gather(2, dst.unsqueeze(-1)).squeeze(-1))
        verdict.values("scores", got, want, metric.dtype, {metric.dtype: (accuracy.SCORE_TOL[metric.dtype], 0.0)})
        lost = lost.max().item() if dst.numel() else 0.0
        if lost > accuracy.SCORE_TOL[metric.dtype]:
            verdict.fail(f"dst: a B token {lost:.3g} below the best")
        verdict.near_ties += int((dst != best_dst).sum().item())
        return verdict.columns()
    if op == "match":
        plan = out if isinstance(out, MergePlan) else MergePlan(*out[:3], s.tokens, s.protected)
    if plan is None:
        raise ValueError(f"check_op({op!r}): give the plan the merge ran on")
    verdict.plan(accuracy.plan_agreement(plan, metric, s.r, s.protected, scores))
    if op == "match" or verdict.problem:
        return verdict.columns()
    if op in ("merge_fwd", "step_fwd", "step_norm_fwd", "join_norm_fwd"):
        sources, ln = [x], ()  # what is merged, and the weight and bias of the LayerNorm the op writes
        if op == "step_norm_fwd":
            residual, *ln = norm_inputs(x)
            sources = [x + residual]  # the residual add, in x's dtype
        elif op == "join_norm_fwd":
            clips, _, frame_pos, *ln = join_inputs(s, metric, size)
            sources = _joined(s, clips, frame_pos)
        wants = [reference.merge(src.double(), size.double(), plan) for src in sources]
        verdict.nearest("x", out[0], wants, x.dtype)
        verdict.values("size", out[1], wants[0][1], torch.float32)
        if ln:
            verdict.values("ln", out[2], reference.layer_norm(out[0], *ln, NORM_EPS), x.dtype, accuracy.NORM_TOL)
        return verdict.columns()
    if op == "join_norm_fwdbwd":
        grad_x, grad_pos, merged = out
        clips, _, frame_pos, weight, bias = join_inputs(s, metric, size)
        verdict.nearest("x", merged, [reference.merge(src.double(), size.double(), plan)
                                      for src in _joined(s, clips, frame_pos)], x.dtype)
        # The LayerNorm's gradient at the merged tokens the op wrote, added to theirs, through the float64 merge.
        grad_out, grad_ln = (g.double() for g in join_grads(s, metric))
        at = merged.double().requires_grad_(True)
        (via_ln,) = torch.autograd.grad(reference.layer_norm(at, weight.double(), bias.double(), NORM_EPS), at,
                                        grad_ln)
        leaves = [clips.double().requires_grad_(True), frame_pos.double().requires_grad_(True)]
        joined = reference.join_clips(leaves[0], s.group, s.protected // s.group, leaves[1])
        wants = torch.autograd.grad(reference.merge(joined, size.double(), plan)[0], leaves, grad_out + via_ln)
        verdict.gradient("grad x", grad_x, wants[0], x.dtype)
        verdict.gradient("grad frame_pos", grad_pos, wants[1], x.dtype)
        return verdict.columns()
    if op in ("merge_bwd", "step_fwdbwd"):
        xd = x.double().requires_grad_(True)
        merged, _ = reference.merge(xd, size.double(), plan)
        (want,) = torch.autograd.grad(merged, xd, upstream_grad(x, s.tokens - s.r).double())
        verdict.values("grad x", out[0], want, x.dtype)
        return verdict.columns()
    raise ValueError(f"check_op: unknown op {op!r}")


def check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: Optional[torch.Tensor],
                    out: torch.Tensor, upstream: Optional[torch.Tensor] = None,
                    grads: Optional[Sequence[torch.Tensor]] = None) -> Dict[str, object]:
    """The ``agrees`` and ``tol_ratio`` (and ``disagreement``) columns of an attention row: ``out`` (and,
    given ``upstream``, the ``grads`` of q, k and v) against the float64 attention of ``q``, ``k``, ``v``
    with the log-size bias of ``size`` (None: no bias), with ``accuracy.ATTENTION_TOL``."""
    verdict = _Verdict(ties=False)
    leaves = [t.detach().double().requires_grad_(upstream is not None) for t in (q, k, v)]
    want = reference.attention(*leaves, None if size is None else size.double(), "eager")
    checks = [("out", out, want.detach())]
    if upstream is not None:
        checks += zip(("dq", "dk", "dv"), grads, torch.autograd.grad(want, leaves, upstream.double()))
    for name, got, expected in checks:
        verdict.record(name, accuracy.scaled_error_ratio(got, expected, q.dtype))
    return verdict.columns()


def check_raised(e: Exception) -> Dict[str, object]:
    """The columns of a row whose check raised ``e``: it does not agree, and says why (the timing stands)."""
    return {"agrees": False, "disagreement": f"the check raised {type(e).__name__}: {e}"[:300]}


def parameter_grads(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Every parameter's gradient (those that have one), by name, as copies: :func:`check_gradients`' input."""
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _relative_verdict(err: float, tol: float, what: str, table: str) -> Dict[str, object]:
    out: Dict[str, object] = {"agrees": err <= tol, "rel_err": err}
    if err > tol:
        out["disagreement"] = f"{what}: relative error {err:.3g} ({table} {tol:g})"
    return out


def check_embedding(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> Dict[str, object]:
    """The ``agrees``, ``rel_err`` (and ``disagreement``) columns of an encoder row: the largest relative L2
    error of a video's embedding ``got [B, E]`` against ``want``, within ``accuracy.EMBEDDING_TOL[dtype]``."""
    err = accuracy.relative_error(got, want, dim=-1)
    return _relative_verdict(err, accuracy.EMBEDDING_TOL[dtype], "embedding", "EMBEDDING_TOL")


def check_gradients(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], dtype: torch.dtype
                    ) -> Dict[str, object]:
    """The same columns for a training row: ``got`` and ``want`` map parameter names to their gradients after
    one forward and backward; ``rel_err`` is the largest relative L2 error of one parameter's gradient, held to
    ``accuracy.GRADIENT_TOL[dtype]``, and ``disagreement`` names that parameter. A parameter that has a
    gradient on one side only fails the row."""
    if got.keys() != want.keys():
        odd = sorted(set(got) ^ set(want))
        return {"agrees": False, "rel_err": float("inf"),
                "disagreement": f"gradients: {len(odd)} parameters have one on one side only, e.g. {odd[0]}"}
    worst, name = 0.0, None
    for n, w in want.items():
        err = accuracy.relative_error(got[n], w)
        if name is None or err > worst:
            worst, name = err, n
    return _relative_verdict(worst, accuracy.GRADIENT_TOL[dtype], f"gradient of {name}", "GRADIENT_TOL")
