"""Triton backend of the merge ops: host launchers, the merge autograd function, torch custom ops.

Layering (as Liger-Kernel): the ``@triton.jit`` kernels live in ``tempme_kernels``; this module has
plain launchers (``best_match_forward``, ``match_plan_forward``, ``merge_index``, ``merge_forward``,
``merge_backward``), the custom ops ``tempme::best_match``, ``tempme::match``, ``tempme::merge_fwd``
and ``tempme::merge_bwd`` (each with a fake implementation, so ``torch.compile(fullgraph=True)``
traces through them), the ``MergeFunction`` autograd function, and the functions that
``tempme_fast.ops`` dispatches to: ``best_match``, ``match`` and ``merge`` (inputs validated at that
boundary), plus ``join_merge``, the ClipMe join and cross-clip merge in one pass.

Every launcher takes ``group``: with ``group = g > 1`` its token tensors are the unjoined clips
``[B' * g, N_in, ...]`` and it works on the joined clips ``[B', g * N_in, ...]`` of
``reference.join_clips`` without writing them (``protected`` then counts class tokens per unjoined
clip).

Nothing here reads a value back to the host: output shapes follow from ``N``, ``c`` and ``r``
alone, and every data-dependent loop bound is computed inside a kernel, so a forward made of
these ops can be captured in a CUDA graph.
"""
import os
from typing import Optional, Tuple

import torch
import triton

from tempme_kernels.best_match import _best_match_fwd_kernel
from tempme_kernels.match import _match_plan_kernel
from tempme_kernels.merge import _merge_bwd_kernel, _merge_fwd_kernel, _merge_index_kernel

from .reference import MergePlan, max_r, split_sizes

__all__ = ["MergeFunction", "best_match", "best_match_forward", "join_merge", "match", "match_plan_forward",
           "merge", "merge_backward", "merge_forward", "merge_index"]

# Largest tile (tokens, or channels) one program handles. The interpreter pays per program and
# per op, not per lane, so there a program takes a whole clip; on a GPU small tiles spread one
# clip over many SMs and keep the registers in check. Tests shrink INTERPRETER_BLOCK to walk the
# multi-tile loops.
INTERPRETER_BLOCK = 1024
GPU_BLOCK_TOKENS = 32
GPU_BLOCK_MATCH = 64
GPU_BLOCK_CHANNELS = 128


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block(n: int, gpu_cap: int, floor: int = 16) -> int:
    cap = INTERPRETER_BLOCK if _interpreting() else gpu_cap
    return max(floor, min(triton.next_power_of_2(max(n, 1)), max(cap, floor)))


def _new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every output buffer comes from here (tests fill it with NaN to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _positions(tokens: int, protected: int) -> Tuple[int, int, int, int]:
    """``(Na, Nb, A_START, B_START)``: A token ``i`` sits at ``A_START + 2 i``, B token ``j`` at ``B_START + 2 j``."""
    na, nb = split_sizes(tokens, protected)
    return na, nb, protected + protected % 2, protected + 1 - protected % 2


def _joined_shape(t: torch.Tensor, protected: int, group: int) -> Tuple[int, int, int]:
    """``(B', N, c)`` of the joined clips that ``t [B' * group, N_in, ...]`` is read as."""
    return t.shape[0] // group, t.shape[1] * group, protected * group


# ---------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------

def best_match_forward(metric: torch.Tensor, protected: int, group: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Best cosine match in B for every A token.

    Args:
        metric: ``[B' * group, N_in, C]`` float16/bfloat16/float32/float64, any strides.
        protected: class tokens at the front of each of those clips.
        group: clips joined into one before matching (1: no join).
    Returns:
        ``scores [B', Na]`` float32 (float64 for float64 input), ``dst [B', Na]`` int64, for the
        joined clips of ``N = group * N_in`` tokens.
    """
    rows, tokens, c = _joined_shape(metric, protected, group)
    channels = metric.shape[2]
    na, nb, a_start, b_start = _positions(tokens, c)
    acc = _accumulation_dtype(metric.dtype)
    scores = _new_output((rows, na), acc, metric.device)
    dst = _new_output((rows, na), torch.int64, metric.device)
    if acc == torch.float64:
        dot_mode, cap = 2, 16  # no tl.dot: a broadcast-sum over small tiles
    elif metric.dtype == torch.float32 or _interpreting():
        dot_mode, cap = 1, GPU_BLOCK_MATCH  # the interpreter's bf16 tl.dot is wrong (triton 3.8): fp32
    else:
        dot_mode, cap = 0, GPU_BLOCK_MATCH
    block_a, block_b = _block(na, cap), _block(nb, cap)
    block_c = min(_block(channels, cap), 16 if dot_mode == 2 else 64)
    _best_match_fwd_kernel[(rows, triton.cdiv(na, block_a))](
        metric, scores, dst, na, nb, channels, a_start, b_start, group, protected, metric.shape[1],
        metric.stride(0), metric.stride(1), metric.stride(2),
        TINY=torch.finfo(acc).tiny, BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_C=block_c, DOT_MODE=dot_mode,
    )
    return scores, dst


def match_plan_forward(scores: torch.Tensor, dst: torch.Tensor, r: int
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The merge plan from best-match scores.

    Args:
        scores: ``[B', Na]`` float32/float64; dst: ``[B', Na]`` int64; r: ``0 <= r <= Na``.
    Returns:
        ``merged [B', r]`` (highest score first, lower index first on ties), ``merged_dst [B', r]``,
        ``kept [B', Na - r]`` (increasing), all int64.
    """
    scores, dst = scores.contiguous(), dst.contiguous()
    rows, na = scores.shape
    merged = _new_output((rows, r), torch.int64, scores.device)
    merged_dst = _new_output((rows, r), torch.int64, scores.device)
    kept = _new_output((rows, na - r), torch.int64, scores.device)
    block = _block(na, GPU_BLOCK_MATCH)
    _match_plan_kernel[(rows,)](scores, dst, merged, merged_dst, kept, na, r, BLOCK_I=block, BLOCK_J=block)
    return merged, merged_dst, kept


def merge_index(merged: torch.Tensor, dst: torch.Tensor, nb: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Group merged A tokens by destination: ``src [B', r]`` int32 and ``offsets [B', Nb + 1]`` int32.

    ``src[b, offsets[b, j]:offsets[b, j + 1]]`` are the A tokens merging into B token ``j``, in rank order.
    """
    merged, dst = merged.contiguous(), dst.contiguous()
    rows, r = merged.shape
    src = _new_output((rows, r), torch.int32, merged.device)
    offsets = _new_output((rows, nb + 1), torch.int32, merged.device)
    _merge_index_kernel[(rows,)](
        merged, dst, src, offsets, r, nb,
        BLOCK_K=_block(r, GPU_BLOCK_MATCH), BLOCK_J=_block(nb + 1, GPU_BLOCK_MATCH),
    )
    return src, offsets


def merge_forward(x: torch.Tensor, size: torch.Tensor, merged: torch.Tensor, dst: torch.Tensor,
                  kept: torch.Tensor, protected: int, group: int = 1, frame_pos: Optional[torch.Tensor] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Size-weighted merge (of the joined clips when ``group > 1``).

    Args:
        x: ``[B' * group, N_in, D]`` any float dtype and strides.
        size: ``[B' * group, N_in]`` or ``[B' * group, N_in, 1]``, any dtype and strides.
        merged, dst: ``[B', r]`` int64; kept: ``[B', Na - r]`` int64 (a plan for the joined clips).
        protected: class tokens per clip of ``x``.
        frame_pos: optional ``[1, F, 1, D]`` temporal position embedding, added to every token of
            clip ``k`` of its video (``F`` clips per video in ``x``) before merging.
    Returns:
        ``x [B', N - r, D]`` (x's dtype), ``size`` (size's layout and dtype) and ``b_size [B', Nb]``
        float32 (float64 for float64 x), the merged size of every B token, for the backward.
    """
    rows, tokens, c = _joined_shape(x, protected, group)
    width = x.shape[2]
    r, nk = merged.shape[1], kept.shape[1]
    _, nb, a_start, b_start = _positions(tokens, c)
    n_out = tokens - r
    kept = kept.contiguous()
    src, offsets = merge_index(merged, dst, nb)
    out = _new_output((rows, n_out, width), x.dtype, x.device)
    size_out = _new_output((rows, n_out) + tuple(size.shape[2:]), size.dtype, x.device)
    b_size = _new_output((rows, nb), _accumulation_dtype(x.dtype), x.device)
    pos = x if frame_pos is None else frame_pos.reshape(frame_pos.shape[1], width).contiguous()
    block_t = _block(n_out, GPU_BLOCK_TOKENS, floor=1)
    block_d = _block(width, GPU_BLOCK_CHANNELS, floor=1)
    _merge_fwd_kernel[(rows, triton.cdiv(n_out, block_t))](
        x, size, pos, kept, src, offsets, out, size_out, b_size,
        n_out, c, nk, r, nb, width, a_start, b_start, group, protected, x.shape[1], pos.shape[0],
        x.stride(0), x.stride(1), x.stride(2), size.stride(0), size.stride(1), pos.stride(0),
        HAS_POS=frame_pos is not None, BLOCK_T=block_t, BLOCK_D=block_d,
    )
    return out, size_out, b_size


def merge_backward(grad_out: torch.Tensor, size: torch.Tensor, b_size: torch.Tensor, merged: torch.Tensor,
                   dst: torch.Tensor, kept: torch.Tensor, protected: int, tokens_in: int, group: int = 1
                   ) -> torch.Tensor:
    """Gradient of :func:`merge_forward` with respect to ``x``: ``[B' * group, tokens_in, D]``, grad_out's dtype."""
    rows, _, width = grad_out.shape
    tokens, c = tokens_in * group, protected * group
    r, nk = merged.shape[1], kept.shape[1]
    _, nb, a_start, b_start = _positions(tokens, c)
    merged, dst, kept = merged.contiguous(), dst.contiguous(), kept.contiguous()
    grad_x = _new_output((rows * group, tokens_in, width), grad_out.dtype, grad_out.device)
    block_t = _block(tokens, GPU_BLOCK_TOKENS, floor=1)
    block_d = _block(width, GPU_BLOCK_CHANNELS, floor=1)
    _merge_bwd_kernel[(rows, triton.cdiv(tokens, block_t))](
        grad_out, size, merged, dst, kept, b_size, grad_x,
        tokens, c, nk, r, nb, width, a_start, b_start, group, protected, tokens_in,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), size.stride(0), size.stride(1),
        BLOCK_T=block_t, BLOCK_D=block_d,
    )
    return grad_x


# ---------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, described to it by their fake implementations
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("tempme::best_match", mutates_args=())
def _best_match_op(metric: torch.Tensor, protected: int, group: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    return best_match_forward(metric, protected, group)


@_best_match_op.register_fake
def _(metric, protected, group=1):
    rows, tokens, c = _joined_shape(metric, protected, group)
    na, _ = split_sizes(tokens, c)
    return (metric.new_empty((rows, na), dtype=_accumulation_dtype(metric.dtype)),
            metric.new_empty((rows, na), dtype=torch.int64))


@torch.library.custom_op("tempme::match", mutates_args=())
def _match_op(metric: torch.Tensor, r: int, protected: int, group: int = 1
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scores, dst = best_match_forward(metric, protected, group)
    return match_plan_forward(scores, dst, r)


@_match_op.register_fake
def _(metric, r, protected, group=1):
    rows, tokens, c = _joined_shape(metric, protected, group)
    na, _ = split_sizes(tokens, c)
    return (metric.new_empty((rows, r), dtype=torch.int64), metric.new_empty((rows, r), dtype=torch.int64),
            metric.new_empty((rows, na - r), dtype=torch.int64))


@torch.library.custom_op("tempme::merge_fwd", mutates_args=())
def _merge_fwd_op(x: torch.Tensor, size: torch.Tensor, merged: torch.Tensor, dst: torch.Tensor,
                  kept: torch.Tensor, protected: int, group: int = 1, frame_pos: Optional[torch.Tensor] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return merge_forward(x, size, merged, dst, kept, protected, group, frame_pos)


@_merge_fwd_op.register_fake
def _(x, size, merged, dst, kept, protected, group=1, frame_pos=None):
    rows, tokens, c = _joined_shape(x, protected, group)
    n_out = tokens - merged.shape[1]
    _, nb = split_sizes(tokens, c)
    return (x.new_empty((rows, n_out, x.shape[2])), size.new_empty((rows, n_out) + tuple(size.shape[2:])),
            x.new_empty((rows, nb), dtype=_accumulation_dtype(x.dtype)))


@torch.library.custom_op("tempme::merge_bwd", mutates_args=())
def _merge_bwd_op(grad_out: torch.Tensor, size: torch.Tensor, b_size: torch.Tensor, merged: torch.Tensor,
                  dst: torch.Tensor, kept: torch.Tensor, protected: int, tokens_in: int, group: int = 1
                  ) -> torch.Tensor:
    return merge_backward(grad_out, size, b_size, merged, dst, kept, protected, tokens_in, group)


@_merge_bwd_op.register_fake
def _(grad_out, size, b_size, merged, dst, kept, protected, tokens_in, group=1):
    return grad_out.new_empty((grad_out.shape[0] * group, tokens_in, grad_out.shape[2]))


# ---------------------------------------------------------------------------------------------
# Autograd and the functions tempme_fast.ops dispatches to
# ---------------------------------------------------------------------------------------------

class MergeFunction(torch.autograd.Function):
    """Size-weighted merge (optionally of joined clips plus a position embedding).

    Differentiable in ``x`` and ``frame_pos``; sizes and the plan carry no gradient.
    """

    @staticmethod
    def forward(ctx, x, size, merged, dst, kept, protected: int, group: int, frame_pos):
        out, size_out, b_size = torch.ops.tempme.merge_fwd(x, size, merged, dst, kept, protected, group, frame_pos)
        ctx.save_for_backward(size, b_size, merged, dst, kept)
        ctx.protected, ctx.group, ctx.tokens_in = protected, group, x.shape[1]
        ctx.pos_shape = None if frame_pos is None else (frame_pos.shape, frame_pos.dtype)
        ctx.mark_non_differentiable(size_out)
        return out, size_out

    @staticmethod
    def backward(ctx, grad_out, grad_size_out):
        size, b_size, merged, dst, kept = ctx.saved_tensors
        grad_x = torch.ops.tempme.merge_bwd(grad_out, size, b_size, merged, dst, kept, ctx.protected,
                                            ctx.tokens_in, ctx.group)
        grad_pos = None
        if ctx.pos_shape is not None and ctx.needs_input_grad[7]:
            shape, dtype = ctx.pos_shape
            # Every token of clip k got E[k] added, so E[k]'s gradient sums those tokens' gradients
            # (torch's reduction: deterministic, no atomics).
            grad_pos = grad_x.reshape(-1, shape[1], ctx.tokens_in, grad_x.shape[-1]).sum(
                dim=(0, 2), dtype=torch.float32).to(dtype).reshape(shape)
        return grad_x, None, None, None, None, None, None, grad_pos


def best_match(metric: torch.Tensor, protected: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``scores [B', Na]`` float32 (float64 for float64 metric), ``dst [B', Na]`` int64."""
    return torch.ops.tempme.best_match(metric, protected)


def match(metric: torch.Tensor, r: int, protected: int) -> MergePlan:
    """The :class:`MergePlan` that removes ``r`` tokens, index for index equal to ``reference.match``."""
    merged, dst, kept = torch.ops.tempme.match(metric.detach(), r, protected)
    return MergePlan(merged, dst, kept, metric.shape[1], protected)


def merge(x: torch.Tensor, size: torch.Tensor, plan: MergePlan) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x [B', N - r, D], size)`` merged by ``plan``; differentiable in ``x``."""
    return MergeFunction.apply(x, size.detach(), plan.merged, plan.dst, plan.kept, plan.protected, 1, None)


def join_merge(x: torch.Tensor, size: torch.Tensor, group: int, protected: int, r: int,
               frame_pos: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, MergePlan]:
    """ClipMe's join and cross-clip merge in one pass, never writing the joined clips.

    Equal to ``reference.merge(join_clips(x, group, protected, frame_pos), join_clips(size, ...),
    reference.match(join_clips(x.detach(), group, protected), r, group * protected))``.

    Args:
        x: ``[B * F, N, D]`` hidden states, the ``F`` clips of a video adjacent; also the metric
            (detached, without ``frame_pos``), as the spec's cross-clip merge uses.
        size: ``[B * F, N]`` or ``[B * F, N, 1]``.
        group: ``g``, clips per join (``F`` divisible by it); protected: class tokens per clip of ``x``.
        r: tokens removed from each joined clip, ``0 <= r <= (N - protected) * g // 2``.
        frame_pos: optional ``[1, F, 1, D]`` temporal position embedding.
    Returns:
        ``x [B * F / g, g * N - r, D]`` in x's dtype (also when ``frame_pos`` has another dtype),
        ``size`` in its layout and dtype, and the :class:`MergePlan` on the joined clips (as
        ``reference.match`` would give it). Differentiable in ``x`` and ``frame_pos``.
    """
    _check_join(x, size, group, protected, r, frame_pos)
    merged, dst, kept = torch.ops.tempme.match(x.detach(), r, protected, group)
    out, size_out = MergeFunction.apply(x, size.detach(), merged, dst, kept, protected, group, frame_pos)
    return out, size_out, MergePlan(merged, dst, kept, x.shape[1] * group, protected * group)


def _check_join(x, size, group, protected, r, frame_pos) -> None:
    """Shape checks only: nothing is read back from the device."""
    if x.dim() != 3 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"x must be a float tensor [B * F, N, D], got {x.dtype} {tuple(x.shape)}")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or x.shape[0] % group:
        raise ValueError(f"group={group!r} must be a positive int dividing the {x.shape[0]} clips of x")
    if not 0 <= protected <= x.shape[1] - 2:
        raise ValueError(f"protected={protected} must be in [0, N - 2] = [0, {x.shape[1] - 2}] for N={x.shape[1]}")
    limit = max_r(x.shape[1] * group, protected * group)
    if not 0 <= r <= limit:
        raise ValueError(f"r={r} must be in [0, {limit}]: half the unprotected tokens of a joined clip of "
                         f"{group} x {x.shape[1]} tokens")
    if size.shape[:2] != x.shape[:2] or size.dim() not in (2, 3) or (size.dim() == 3 and size.shape[2] != 1):
        raise ValueError(f"size must have shape [B * F, N] or [B * F, N, 1] matching x {tuple(x.shape)}, "
                         f"got {tuple(size.shape)}")
    if frame_pos is not None:
        clips = frame_pos.shape[1] if frame_pos.dim() == 4 else 0
        if (frame_pos.dim() != 4 or frame_pos.shape[0] != 1 or frame_pos.shape[2] != 1
                or frame_pos.shape[3] != x.shape[2] or clips % group or x.shape[0] % max(clips, 1)):
            raise ValueError(f"frame_pos must have shape [1, F, 1, {x.shape[2]}] with F clips per video, F "
                             f"divisible by group={group} and dividing the {x.shape[0]} clips of x; got "
                             f"{tuple(frame_pos.shape)}")
    devices = {x.device, size.device} | ({frame_pos.device} if frame_pos is not None else set())
    if len(devices) > 1:
        raise ValueError(f"x, size and frame_pos must be on one device, got {sorted(map(str, devices))}")
