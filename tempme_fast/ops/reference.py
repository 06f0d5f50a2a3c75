"""Pure-PyTorch TempMe ops: the oracle every fast path is checked against.

Written to be read next to ``TEMPME_SPEC.md``: one function per step, no fusion, no tricks.
Shapes: ``B'`` is clips in the batch (videos x clips per video), ``N`` tokens per clip,
``c`` protected (class) tokens at the front of every clip.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F


class MergePlan(NamedTuple):
    """Which tokens one bipartite merge removes, and where they go.

    Indices count inside set A (``merged``, ``kept``) or set B (``dst``); ``split_positions``
    maps them to token positions. All index tensors are int64.

    Attributes:
        merged: ``[B', r]`` A tokens merged away, highest score first.
        dst: ``[B', r]`` the B token each merged A token joins.
        kept: ``[B', Na - r]`` A tokens kept, increasing.
        tokens: ``N``, tokens per clip before the merge.
        protected: ``c``, class tokens at the front, never merged.
        src, offsets: optional ``[B', r]`` and ``[B', Nb + 1]`` int64, the merged tokens grouped by
            destination (:func:`group_sources`), written by the Triton match in the same launch as
            the plan so that the Triton merge need not group them itself; None otherwise (the
            reference merge never reads them).
    """

    merged: torch.Tensor
    dst: torch.Tensor
    kept: torch.Tensor
    tokens: int
    protected: int
    src: Optional[torch.Tensor] = None
    offsets: Optional[torch.Tensor] = None

    @property
    def r(self) -> int:
        return self.merged.shape[-1]


def split_starts(protected: int) -> Tuple[int, int]:
    """``(a_start, b_start)``: the positions of the first A and the first B token; each set then
    takes every second position. A starts at the first even position past the class tokens."""
    a_first = protected % 2
    return protected + a_first, protected + 1 - a_first


def split_sizes(tokens: int, protected: int) -> Tuple[int, int]:
    """``(Na, Nb)``: A holds the unprotected tokens at even positions, B those at odd positions."""
    a_start, _ = split_starts(protected)
    na = (tokens - a_start + 1) // 2
    return na, tokens - protected - na


def split_positions(tokens: int, protected: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token positions of set A and set B (class tokens included in the count).

    The spec splits the patches by alternation starting from the patches' own index 0; that is
    the same as putting a token in A when its position in the whole sequence is even.
    """
    a_start, b_start = split_starts(protected)
    return (torch.arange(a_start, tokens, 2, device=device),
            torch.arange(b_start, tokens, 2, device=device))


def split_slices(protected: int) -> Tuple[slice, slice]:
    """Sets A and B as slices of the token axis: ``x[:, a]`` is ``x[:, split_positions(...)[0]]`` as a
    strided view (no gather, and direct indexing for a compiler: torch.compile's inductor (torch 2.11,
    CUDA) failed on the wrapped gather indices that the index tensors give inside a concatenation)."""
    a_start, b_start = split_starts(protected)
    return slice(a_start, None, 2), slice(b_start, None, 2)


def max_r(tokens: int, protected: int) -> int:
    """The most tokens one merge may remove: half of the unprotected tokens."""
    return (tokens - protected) // 2


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops compute in for inputs of ``dtype``: float64 stays float64, the rest float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def head_mean(metric: torch.Tensor, heads: int) -> torch.Tensor:
    """``metric [B', N, heads * d]`` averaged over its ``heads`` groups of ``d`` channels: ``[B', N, d]``
    (the metric itself for one head). The merge metric after attention is the keys of a multi-head
    attention averaged over heads; token-major keys hold head ``h`` in channels ``h d .. (h + 1) d``."""
    return metric if heads == 1 else metric.unflatten(-1, (heads, -1)).mean(dim=2)


def best_match(metric: torch.Tensor, protected: int, heads: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """For every A token, its best cosine similarity to a B token and that B token's index.

    Args:
        metric: ``[B', N, C]`` any float dtype; compared in float32 (float64 stays float64).
        protected: ``c``, class tokens at the front that take no part.
        heads: compare :func:`head_mean` of the metric (``C`` divisible by it).
    Returns:
        ``scores [B', Na]`` (float32, or float64 for float64 input) and ``dst [B', Na]`` int64;
        on ties the lowest B index wins.
    """
    a_set, b_set = split_slices(protected)
    metric = head_mean(metric, heads).to(accumulation_dtype(metric.dtype))
    # Dividing by max(norm, tiny) equals plain division for every non-zero vector and keeps an
    # all-zero metric row finite (score 0) instead of NaN.
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(metric.dtype).tiny)
    scores = metric[:, a_set] @ metric[:, b_set].transpose(1, 2)
    best, dst = scores.max(dim=-1)  # torch.max returns the first maximal index on ties
    return best, dst


def match(metric: torch.Tensor, r: int, protected: int, heads: int = 1) -> MergePlan:
    """Bipartite soft matching: choose the ``r`` A tokens to merge and their destinations.

    Args:
        metric: ``[B', N, C]``.
        r: tokens to remove, ``0 <= r <= (N - c) // 2``.
        protected: ``c``.
        heads: match on :func:`head_mean` of the metric.
    """
    with torch.no_grad():
        scores, dst = best_match(metric, protected, heads)
        # Highest score first; a stable sort keeps the lower A index first on ties.
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        merged = order[:, :r]
        kept = order[:, r:].sort(dim=-1).values
        return MergePlan(merged, dst.gather(1, merged), kept, metric.shape[1], protected)


def group_sources(merged: torch.Tensor, dst: torch.Tensor, nb: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The merged tokens grouped by destination: ``(src [B', r], offsets [B', nb + 1])``, int64.

    ``src[b, offsets[b, j]:offsets[b, j + 1]]`` are the A tokens merging into B token ``j``, in
    rank order (the order of ``merged``).
    """
    order = torch.sort(dst, dim=-1, stable=True).indices
    counts = torch.zeros(dst.shape[0], nb, dtype=torch.int64, device=dst.device)
    counts.scatter_add_(1, dst, torch.ones_like(dst))
    offsets = F.pad(counts.cumsum(dim=-1), (1, 0))
    return merged.gather(1, order), offsets


def merge(x: torch.Tensor, size: torch.Tensor, plan: MergePlan) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge of ``x`` by ``plan``; differentiable in ``x``.

    Args:
        x: ``[B', N, D]``.
        size: ``[B', N]`` or ``[B', N, 1]``, tokens each token stands for.
    Returns:
        ``x [B', N - r, D]`` in ``x``'s dtype and ``size`` in ``size``'s layout and dtype. Output
        order: class tokens, kept A tokens (increasing), then every B token in order.
    """
    squeeze = size.dim() == 2
    size3 = size.unsqueeze(-1) if squeeze else size
    c, d = plan.protected, x.shape[-1]
    a_set, b_set = split_slices(c)
    work = accumulation_dtype(x.dtype)
    xw, sw = x.to(work), size3.to(work)
    xa, xb = xw[:, a_set], xw[:, b_set]
    sa, sb = sw[:, a_set], sw[:, b_set]

    def take(t, idx):
        return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

    kept_x = take(xa, plan.kept)
    src_s = take(sa, plan.merged)
    dst_idx = plan.dst.unsqueeze(-1)
    b_sum = (xb * sb).scatter_add(1, dst_idx.expand(-1, -1, d), take(xa, plan.merged) * src_s)
    b_size = sb.scatter_add(1, dst_idx, src_s)
    # A B token nothing merged into keeps its value exactly (not (size * x) / size, one rounding off).
    b_new = torch.where(b_size > sb, b_sum / b_size, xb)
    out_x = torch.cat([xw[:, :c], kept_x, b_new], dim=1).to(x.dtype)
    out_s = torch.cat([sw[:, :c], take(sa, plan.kept), b_size], dim=1).to(size.dtype)
    return out_x, (out_s.squeeze(-1) if squeeze else out_s)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim, computed in the accumulation dtype and rounded once to ``x``'s dtype.

    ``x [..., D]``; ``weight``, ``bias`` ``[D]`` of any float dtype. Equal to open_clip's
    ``LayerNormFp32``, and to its ``LayerNorm`` up to the last rounding of 16-bit inputs.
    """
    work = accumulation_dtype(x.dtype)
    return F.layer_norm(x.to(work), (x.shape[-1],), weight.to(work), bias.to(work), eps).to(x.dtype)


def add_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The block's residual add and the LayerNorm after it: ``(x + residual, layer_norm(x + residual))``,
    both in ``x``'s dtype (see :func:`layer_norm`); differentiable in every tensor argument."""
    x = x + residual
    return x, layer_norm(x, weight, bias, eps)


def embed_norm(patches: torch.Tensor, class_embedding: torch.Tensor, positional_embedding: torch.Tensor,
               weight: torch.Tensor, bias: torch.Tensor, eps: float,
               next_norm: Optional[Tuple[torch.Tensor, torch.Tensor, float]] = None):
    """The start of a ViT's residual stream: ``layer_norm(cat([class_embedding, patches]) + positional_embedding)``
    per frame (open_clip's class token, position embedding and ``ln_pre``; see :func:`layer_norm`).

    ``patches [M, P, D]``; ``class_embedding [D]`` and ``positional_embedding [P + 1, D]``, cast to the
    patches' dtype first; returns ``[M, P + 1, D]`` in that dtype, and with ``next_norm`` (``(weight, bias,
    eps)`` of the LayerNorm that reads it next: the first block's ``ln_1``) the pair ``(x, layer_norm(x))``.
    Differentiable in every tensor argument.
    """
    cls = class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
    x = layer_norm(torch.cat([cls, patches], dim=1) + positional_embedding.to(patches.dtype), weight, bias, eps)
    return x if next_norm is None else (x, layer_norm(x, *next_norm))


# The activations of linear_act, by name; the Triton kernel numbers them in this order (its ACT constexpr).
LINEAR_ACTIVATIONS = ("none", "gelu", "gelu_tanh", "quick_gelu")


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: str) -> torch.Tensor:
    """``act(F.linear(x, weight, bias))`` as open_clip's MLP computes its hidden activations (``c_fc`` and the
    activation module): ``act`` is ``"none"``, ``"gelu"`` (``nn.GELU()``), ``"gelu_tanh"``
    (``nn.GELU(approximate="tanh")``) or ``"quick_gelu"`` (open_clip's ``QuickGELU``, ``x * sigmoid(1.702 x)``).
    ``weight`` and ``bias`` are cast to x's dtype first. Differentiable in every tensor argument."""
    y = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    if act == "gelu":
        return F.gelu(y)
    if act == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if act == "quick_gelu":
        return y * torch.sigmoid(1.702 * y)
    if act == "none":
        return y
    raise ValueError(f"act={act!r}: valid: {', '.join(repr(a) for a in LINEAR_ACTIVATIONS)}")


def merge_norm(x: torch.Tensor, size: torch.Tensor, plan: MergePlan, weight: torch.Tensor, bias: torch.Tensor,
               eps: float, residual: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`merge` (of ``x + residual`` with a residual: the block's residual add before it),
    then :func:`layer_norm` of the merged tokens (the block's ``ln_2``).

    Returns ``(x [B', N - r, D], size, ln [B', N - r, D])``, ``ln`` in ``x``'s dtype; differentiable
    in ``x``, ``weight``, ``bias`` and ``residual``.
    """
    if residual is not None:
        x = x + residual
    x, size = merge(x, size, plan)
    return x, size, layer_norm(x, weight, bias, eps)


def join_clips(x: torch.Tensor, group: int, protected: int,
               frame_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Join every ``group`` adjacent clips of a video into one clip.

    Args:
        x: ``[B * F, N, ...]``, clips of the same video adjacent; any trailing shape (tokens,
            sizes or metric all join the same way).
        group: ``g``, clips per join; ``F`` must be divisible by it.
        protected: ``c``, class tokens per clip before the join.
        frame_pos: optional ``[1, F, 1, D]`` temporal position embedding; token of clip ``k`` (of
            its video, before joining) gets ``frame_pos[0, k]``. Needs ``x`` of shape ``[B*F, N, D]``.
    Returns:
        ``[B * F / g, g * N, ...]``: the ``g * c`` class tokens (in clip order), then clip 0's
        patches, clip 1's patches, ...
    """
    n, rest = x.shape[1], x.shape[2:]
    if frame_pos is not None:
        clips = frame_pos.shape[1]
        x = (x.reshape(-1, clips, n, *rest) + frame_pos).reshape(-1, n, *rest)
    x = x.reshape(-1, group, n, *rest)
    cls = x[:, :, :protected].reshape(x.shape[0], group * protected, *rest)
    patches = x[:, :, protected:].reshape(x.shape[0], group * (n - protected), *rest)
    return torch.cat([cls, patches], dim=1)


def join_merge(x: torch.Tensor, size: torch.Tensor, group: int, protected: int, r: int,
               frame_pos: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, MergePlan]:
    """ClipMe's join and cross-clip merge: :func:`join_clips` of ``x`` (with ``frame_pos``) and
    ``size``, then :func:`merge` by :func:`match` on the joined hidden states without ``frame_pos``.

    Returns ``(x [B * F / g, g * N - r, D], size, plan)``; ``r = 0`` is the plain join.
    """
    joined = join_clips(x, group, protected, frame_pos)
    joined_size = join_clips(size, group, protected)
    plan = match(join_clips(x.detach(), group, protected), r, protected * group)
    if r == 0:
        return joined, joined_size, plan
    return (*merge(joined, joined_size, plan), plan)


def join_merge_norm(x: torch.Tensor, size: torch.Tensor, group: int, protected: int, r: int,
                    weight: torch.Tensor, bias: torch.Tensor, eps: float, frame_pos: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, MergePlan]:
    """:func:`join_merge`, then :func:`layer_norm` of its output (the block's ``ln_1``):
    ``(x, size, ln, plan)``."""
    x, size, plan = join_merge(x, size, group, protected, r, frame_pos)
    return x, size, layer_norm(x, weight, bias, eps), plan


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: Optional[torch.Tensor],
              impl: str = "sdpa") -> torch.Tensor:
    """(Proportional) attention ``softmax(q k^T / sqrt(d) + log(size)) v``.

    Args:
        q: ``[B', H, M, d]``; k, v: ``[B', H, N, d]``.
        size: ``[B', N]`` or ``[B', N, 1]``, the keys' sizes, or None (plain attention).
        impl: ``"sdpa"`` runs ``scaled_dot_product_attention`` with the log-size bias as its float
            mask, so PyTorch's fused kernels stay in use; ``"eager"`` writes out the softmax as the
            released TempMe code does (kept for benchmarks).
    """
    bias = None
    if size is not None:
        bias = size.reshape(size.shape[0], 1, 1, -1).log().to(q.dtype)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    if impl == "eager":
        logits = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        return logits.softmax(dim=-1) @ v
    raise ValueError(f"impl={impl!r} is not an attention implementation; valid: 'sdpa', 'eager'")
