"""Triton backend of the position-described merges: launcher and autograd function.

Forward: ``tempme_kernels.segment`` (one launch after ``merge_index`` groups the sources by output
row). Backward: a gather written in PyTorch: every input token feeds exactly one output row, with a
weight known from the forward (1 for a sum, ``1 / (count + 1)`` for a mean, ``size / total`` for the
weighted average), so ``grad_x`` is that row's gradient times the weight, written once per token
(no atomics). Twin: :mod:`tempme_fast.tome.reference`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton

from tempme_kernels.segment import MEAN, SUM, WAVG, _segment_reduce_fwd_kernel

from ..ops import triton_ops
from ..ops.launch import launch
from ..ops.triton_ops import _block, merge_index
from .reference import TokenMerge, work_dtype

MODES = {"sum": SUM, "mean": MEAN}


def segment_reduce_forward(x: torch.Tensor, size: Optional[torch.Tensor], m: TokenMerge, mode: int
                           ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Launch the segment reduce.

    Args:
        x: ``[B', N, D]`` float, any strides; size: ``[B', N]`` or ``[B', N, 1]`` (``WAVG`` only).
        m: the merge; mode: ``SUM``, ``MEAN`` or ``WAVG``.
    Returns:
        ``out [B', N_out, D]`` (x's dtype), ``size_out [B', N_out, 1]`` (size's dtype; None unless
        ``WAVG``) and ``offsets [B', N_out + 1]`` int32, the sources per output row.
    """
    rows, n_out, width = x.shape[0], m.n_out, x.shape[2]
    src, offsets = merge_index(m.src_pos, m.dst_row, n_out)
    # Buffers from the ops' allocator, which the tests fill with NaN to catch unwritten elements.
    out = triton_ops._new_output((rows, n_out, width), x.dtype, x.device)
    size_out = None
    if mode == WAVG:
        size_out = triton_ops._new_output((rows, n_out, 1), size.dtype, x.device)
        s_arg, s_strides = size, (size.stride(0), size.stride(1))
    else:
        s_arg, s_strides = x, (0, 0)
    block_t = _block(n_out, triton_ops.GPU_BLOCK_TOKENS, floor=1)
    block_d = _block(width, triton_ops.GPU_BLOCK_CHANNELS, floor=1)
    acc = triton.language.float64 if x.dtype == torch.float64 else triton.language.float32
    launch(_segment_reduce_fwd_kernel, (rows, triton.cdiv(n_out, block_t)),
        x, s_arg, m.out_pos.contiguous(), src, offsets, out, out if size_out is None else size_out,
        n_out, m.r, width, x.stride(0), x.stride(1), x.stride(2), *s_strides,
        MODE=mode, ACC=acc, BLOCK_T=block_t, BLOCK_D=block_d,
    )
    return out, size_out, offsets


def _weights(size: Optional[torch.Tensor], size_out: Optional[torch.Tensor], offsets: torch.Tensor,
             m: TokenMerge, mode: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(w_own [B', N_out], w_src [B', r])``: d out[o] / d x[token] for a row's own token and its sources."""
    count = (offsets[:, 1:] - offsets[:, :-1]).to(dtype)
    if mode == SUM:
        return torch.ones_like(count), torch.ones(m.src_pos.shape, dtype=dtype, device=count.device)
    if mode == MEAN:
        w = 1.0 / (count + 1.0)
        return w, w.gather(1, m.dst_row)
    s = size.detach().reshape(size.shape[0], size.shape[1]).to(dtype)
    total = size_out.reshape(size_out.shape[0], -1).to(dtype)
    own = s.gather(1, m.out_pos)
    # A row nothing merged into was copied: weight exactly 1.
    w_own = torch.where(count > 0, own / total, torch.ones_like(own))
    return w_own, s.gather(1, m.src_pos) / total.gather(1, m.dst_row)


class SegmentReduceFunction(torch.autograd.Function):
    """Sum, mean or size-weighted average by a :class:`TokenMerge`; differentiable in ``x`` only."""

    @staticmethod
    def forward(ctx, x, size, out_pos, src_pos, dst_row, tokens: int, mode: int):
        m = TokenMerge(out_pos, src_pos, dst_row, tokens)
        out, size_out, offsets = segment_reduce_forward(x, size, m, mode)
        ctx.save_for_backward(size if size is not None else out_pos, size_out if size_out is not None else out_pos,
                              offsets, out_pos, src_pos, dst_row)
        ctx.mode, ctx.tokens, ctx.n_in = mode, tokens, x.shape[1]
        if size_out is not None:
            ctx.mark_non_differentiable(size_out)
        return out, size_out

    @staticmethod
    def backward(ctx, grad_out, grad_size_out):
        size, size_out, offsets, out_pos, src_pos, dst_row = ctx.saved_tensors
        m = TokenMerge(out_pos, src_pos, dst_row, ctx.tokens)
        work = work_dtype(grad_out.dtype)
        w_own, w_src = _weights(size, size_out, offsets, m, ctx.mode, work)
        g = grad_out.to(work)
        width = g.shape[-1]
        # Input tokens outside the merge (ToMe's k-th split drops a tail) get zero gradient.
        grad_x = g.new_zeros(g.shape[0], ctx.n_in, width)
        grad_x.scatter_(1, out_pos.unsqueeze(-1).expand(-1, -1, width), g * w_own.unsqueeze(-1))
        if m.r:
            g_src = g.gather(1, dst_row.unsqueeze(-1).expand(-1, -1, width)) * w_src.unsqueeze(-1)
            grad_x.scatter_(1, src_pos.unsqueeze(-1).expand(-1, -1, width), g_src)
        return grad_x.to(grad_out.dtype), None, None, None, None, None, None


def segment_reduce(x: torch.Tensor, m: TokenMerge, mode: str) -> torch.Tensor:
    """``mode`` ``"sum"`` or ``"mean"`` of ``x [B', N, D]`` by ``m`` on the Triton kernel."""
    return SegmentReduceFunction.apply(x, None, m.out_pos, m.src_pos, m.dst_row, m.tokens, MODES[mode])[0]


def wavg(x: torch.Tensor, size: torch.Tensor, m: TokenMerge) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average in one launch: ``(x [B', N_out, D], size [B', N_out, 1])``."""
    return SegmentReduceFunction.apply(x, size.detach(), m.out_pos, m.src_pos, m.dst_row, m.tokens, WAVG)
