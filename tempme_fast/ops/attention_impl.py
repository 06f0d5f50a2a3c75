"""Proportional attention: the candidate implementations and the choice between them.

``softmax(q k^T / sqrt(d) + log(size)) v`` (reference: :func:`reference.attention`). Giving
``scaled_dot_product_attention`` the bias as ``attn_mask`` rules out its FlashAttention backend on
CUDA, so every merging layer would fall back to the memory-efficient or math kernel. The
candidates here avoid the mask:

- ``"triton"``: a flash-attention kernel that reads the bias as a ``[B', N]`` vector
  (``tempme_kernels.attention``, launched by :mod:`.triton_attention`); without a gradient to
  track it reads the sizes and takes their log itself.
- ``"fold"``: the bias folded into the dot product. ``q`` gets extra channels of ones and ``k`` the
  bias times ``sqrt(d)``, so ``q' k'^T / sqrt(d) = q k^T / sqrt(d) + bias`` with the scale passed
  explicitly; the head dim is padded with zeros to a multiple of 8, and ``v`` with it, so SDPA's
  flash and cuDNN kernels accept the call. The bias takes two channels, a 16-bit value and its
  16-bit remainder, so it keeps about float32 precision in float16/bfloat16 (the padding has room).
- ``"sdpa"`` (the bias as a float mask) and ``"eager"`` (explicit softmax, as the released code):
  the reference paths.

``"auto"`` (the default) takes ``"triton"`` for CUDA tensors where the merge backend resolves to
Triton, in float16/bfloat16/float32, and ``"sdpa"`` otherwise (also in the interpreter, where the
kernel is right but slow; ``impl="triton"`` runs it there). This default is provisional, chosen without a GPU timing: see ``BENCHMARKS.md``.
Without sizes (every size 1: the first layer, or before any merge) no bias is passed at all, and
``"auto"``, ``"sdpa"`` and ``"fold"`` run plain SDPA, whose flash kernel is then allowed.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import reference
from .eager import needs_grad, use_custom_ops

IMPLS = ("auto", "sdpa", "eager", "fold", "triton")
# What "auto" runs with a bias on the Triton backend (provisional until the GPU suite times both).
FAST_IMPL = "triton"
BIAS_CHANNELS = 2  # 16-bit value + 16-bit remainder of the bias


def folded_width(head_dim: int) -> int:
    """Head dim after folding: ``d`` plus the bias channels, rounded up to a multiple of 8."""
    return -(-(head_dim + BIAS_CHANNELS) // 8) * 8


def folded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Proportional attention as plain SDPA on ``[B', H, *, folded_width(d)]`` inputs.

    Args:
        q: ``[B', H, M, d]``; k, v: ``[B', H, N, d]``; any float dtype.
        size: ``[B', N]`` or ``[B', N, 1]`` positive sizes of the keys, any float dtype.
    Returns:
        ``[B', H, M, d]`` in q's dtype; differentiable in ``q``, ``k``, ``v`` and ``size``.
    """
    rows, heads, queries, head_dim = q.shape
    keys = k.shape[2]
    width = folded_width(head_dim)
    bias = size.reshape(rows, 1, keys, 1).to(torch.float32 if q.dtype != torch.float64 else q.dtype)
    bias = bias.log() * math.sqrt(head_dim)
    high = bias.to(q.dtype)
    # Differentiable on purpose: d(low)/d(bias) = 0, so the bias gradient flows through `high` once.
    low = (bias - high.to(bias.dtype)).to(q.dtype)
    pad = width - head_dim - BIAS_CHANNELS
    q_shape, k_shape = (rows, heads, queries), (rows, heads, keys)
    q_f = torch.cat([q, q.new_ones(1, 1, 1, 1).expand(*q_shape, BIAS_CHANNELS),
                     q.new_zeros(1, 1, 1, 1).expand(*q_shape, pad)], dim=-1)
    k_f = torch.cat([k, high.expand(*k_shape, 1), low.expand(*k_shape, 1),
                     k.new_zeros(1, 1, 1, 1).expand(*k_shape, pad)], dim=-1)
    v_f = F.pad(v, (0, width - head_dim))
    out = F.scaled_dot_product_attention(q_f, k_f, v_f, scale=1.0 / math.sqrt(head_dim))
    return out[..., :head_dim]


def choose(impl: str, q: torch.Tensor, size: Optional[torch.Tensor], triton_backend: bool) -> str:
    """The implementation ``impl`` stands for: ``"auto"`` resolved as the module docstring says."""
    if impl != "auto":
        return impl
    if size is not None and triton_backend and q.dtype != torch.float64:
        return FAST_IMPL
    return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: Optional[torch.Tensor], impl: str,
              triton_backend: bool) -> torch.Tensor:
    """Run ``impl`` (one of :data:`IMPLS`) on validated inputs (``tempme_fast.ops.attention`` checks them).

    ``triton_backend``: whether the merge backend resolved to Triton for these tensors on a GPU.
    """
    impl = choose(impl, q, size, triton_backend)
    if impl in ("sdpa", "eager"):
        return reference.attention(q, k, v, size, impl)
    if impl == "fold":
        return F.scaled_dot_product_attention(q, k, v) if size is None else folded_attention(q, k, v, size)
    from . import triton_attention  # lazily: importing triton is slow and it is absent on some platforms

    return triton_attention.sized_attention(q, k, v, size)


def self_attention(qkv: torch.Tensor, heads: int, size: Optional[torch.Tensor], impl: str, triton_backend: bool,
                   keys: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Multi-head attention from the packed projection, on validated inputs (see
    ``tempme_fast.ops.self_attention``): ``(out [B', N, D], keys averaged over heads [B', N, d] or None)``.

    The Triton kernel reads q, k and v as token-major views of ``qkv`` and writes the heads
    concatenated, so the layout changes around the other implementations are not needed there.
    """
    rows, tokens, width = qkv.shape
    width //= 3
    if choose(impl, qkv, size, triton_backend) == "triton":
        from . import triton_attention

        q, k, v = qkv.view(rows, tokens, 3, heads, width // heads).unbind(2)  # [B', N, H, d] each
        if needs_grad(qkv, size) or use_custom_ops():
            out = triton_attention.self_attention(qkv, heads, size)  # the gradient written packed
        else:
            out = triton_attention.sized_attention(q, k, v, size, token_major=True)
        return out, (k.mean(dim=2) if keys else None)
    q, k, v = qkv.view(rows, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)  # [B', H, N, d]
    out = attention(q, k, v, size, impl, triton_backend)
    return out.transpose(1, 2).reshape(rows, tokens, width), (k.mean(dim=1) if keys else None)


def query_attention(q: torch.Tensor, kv: torch.Tensor, heads: int, size: Optional[torch.Tensor], impl: str,
                    triton_backend: bool) -> torch.Tensor:
    """Multi-head attention of ``q [B', M, D]`` over the packed ``kv [B', N, 2 * D]``, on validated inputs
    (see ``tempme_fast.ops.query_attention``): ``[B', M, D]``, the heads concatenated. The Triton kernel
    reads token-major views of both and writes that layout itself, and in training writes the gradients
    of ``q`` and of the packed ``kv`` whole."""
    rows, queries, width = q.shape
    tokens, head_dim = kv.shape[1], width // heads
    if choose(impl, q, size, triton_backend) == "triton":
        from . import triton_attention

        return triton_attention.query_attention(q, kv, heads, size)
    k, v = kv.view(rows, tokens, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # [B', H, N, d]
    out = attention(q.view(rows, queries, heads, head_dim).transpose(1, 2), k, v, size, impl, triton_backend)
    return out.transpose(1, 2).reshape(rows, queries, width)
