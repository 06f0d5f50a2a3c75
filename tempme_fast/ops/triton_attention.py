"""Triton backend of proportional attention: launchers, custom ops, the autograd function.

Layering (as ``triton_ops`` for the merge ops): the kernels live in ``tempme_kernels.attention``;
here are the launchers ``attention_forward`` / ``attention_backward``, the custom ops
``tempme::attention_fwd`` and ``tempme::attention_bwd`` (with fake implementations, so
``torch.compile(fullgraph=True)`` traces through them), ``AttentionFunction``, and
``attention(q, k, v, bias)``, which ``tempme_fast.ops.attention_impl`` dispatches to (inputs are
validated at ``tempme_fast.ops.attention``). The encoder's self-attention, where a gradient is
wanted, takes the packed q | k | v projection whole (``self_attention``, ``SelfAttentionFunction``,
``tempme::self_attention_fwd`` / ``_bwd``): the backward writes the projection's gradient in one
buffer, where views of the heads would leave autograd to transpose them and stack their gradients.

The output is written in ``[B', N, H, d]`` memory order and returned as a ``[B', H, N, d]`` view:
the encoder's next step (``out.transpose(1, 2).reshape(B', N, H * d)``) is then free.
``python -m benchmarks.codegen`` compiles every variant the launchers make at open_clip's shapes.
"""
import math
import os
from typing import NamedTuple, Optional, Tuple

import torch
import triton

from tempme_kernels.attention import _attention_bwd_kernel, _attention_fwd_kernel

from .eager import cast, custom_op_or, needs_grad, refuse_second_order, use_custom_ops
from .launch import Launcher
from .memo import forget_on_assign, remembered
from .triton_ops import _cdiv

__all__ = ["AttentionFunction", "DTYPES", "SelfAttentionFunction", "attention", "attention_backward",
           "attention_forward", "block_config", "gpu_warps", "self_attention", "self_attention_backward",
           "self_attention_forward", "sized_attention"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634

# Tile sizes (queries, keys) on a GPU per padded head dim, chosen so that no variant spills on
# sm_80/sm_90 (ptxas -v; see benchmarks/codegen.py). Fixed, not autotuned: N changes at every layer,
# and a tuner keyed on it would re-tune per layer. Head dim 64: on the H200 (ViT-B/16, 16 videos, fp16,
# with the sizes) 64 x 32 ran 1.11x the 64 x 64 tiles over layers 1 and 8-10, and was faster at each
# (1.19x at layer 1, 1.03-1.08x at the others); 128 x 64 won at the late layers by 1-2% but lost at layer 1.
GPU_FWD_BLOCKS = {16: (64, 64), 32: (64, 64), 64: (64, 32), 128: (64, 32)}
GPU_BWD_BLOCKS = {16: (64, 64), 32: (64, 64), 64: (64, 64), 128: (32, 32)}
# The dK/dV pass holds a key tile and walks the queries in tiles of at most this many: with 64, its
# fp16/bf16 program at 64 channels sits at 255 registers and spills 12 B on sm_80 (triton 3.6's ptxas).
DKDV_QUERY_BLOCK = 32


def gpu_warps(block_d: int, fp32: bool = False) -> int:
    """Warps per program: 8 at 128 channels and for float32 inputs, 4 elsewhere. At 4 warps, ptxas
    spills (``python -m benchmarks.codegen``): the backward at 128 channels on sm_80 (its two
    ``[32, 128]`` float32 accumulators, dK and dV), the 16-bit forward at head dims 72, 88 and 104
    on sm_80 (255 registers), and with triton 3.6 the float32 dK/dV pass (about 1 KB, sm_80 and
    sm_90) and the float32 forward at 64 channels (sm_90)."""
    return 8 if block_d == 128 or fp32 else 4


GPU_STAGES = 2
FP32_BLOCK = 32
# The interpreter pays per program and per op, not per lane: one tile covers up to this many
# tokens. Tests shrink it to walk the multi-tile loops.
INTERPRETER_BLOCK = 128


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def block_config(head_dim: int, tokens: int, backward: bool = False, fp32: bool = False) -> Tuple[int, int, int]:
    """``(BLOCK_D, BLOCK_M, BLOCK_N)``: head dim padded to a power of two (at least 16, ``tl.dot``'s
    smallest tile), and the query and key tile sizes (at most 32, or 16 at 128 channels, for float32
    inputs, whose full-precision products take more registers: 64 x 64 spills on sm_90)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if _interpreting():
        block = max(16, min(triton.next_power_of_2(max(tokens, 1)), INTERPRETER_BLOCK))
        return block_d, block, block
    block_m, block_n = (GPU_BWD_BLOCKS if backward else GPU_FWD_BLOCKS)[block_d]
    if fp32:
        cap = FP32_BLOCK if block_d < 128 else FP32_BLOCK // 2
        block_m, block_n = min(block_m, cap), min(block_n, cap)
    return block_d, block_m, block_n


def _constexprs(q: torch.Tensor) -> dict:
    # Full-precision products for float32 inputs (the reference does not use TF32 either). FAST_LOG: the
    # sizes' log by NVIDIA's lg2.approx instruction (inline PTX), not on ROCm and not in the interpreter.
    return {"DOT_FP32": _interpreting() and q.dtype != torch.float32,
            "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
            "FAST_LOG": not _interpreting() and torch.version.hip is None}


def _launch_options(block_d: int, fp32: bool) -> dict:
    return {} if _interpreting() else {"num_warps": gpu_warps(block_d, fp32), "num_stages": GPU_STAGES}


def _new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every output buffer comes from here (tests fill it with NaN to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _unit_channel_stride(t: torch.Tensor) -> torch.Tensor:
    # Vector loads need contiguous channels; the encoder's q/k/v (views of one q|k|v projection) have them.
    return t if t.stride(-1) == 1 else t.contiguous()


def _bias_args(bias: Optional[torch.Tensor], q: torch.Tensor):
    if bias is None:
        return q, 0, 0  # never read (HAS_BIAS=False); any pointer will do
    return bias, bias.stride(0), bias.stride(1)


def _head_align(*head_strides: int) -> int:
    """``HEAD_ALIGN``: the largest power of two up to 16 that divides every head stride."""
    return math.gcd(16, *head_strides)


def _heads_first_strides(t: torch.Tensor, token_major: bool) -> Tuple[int, int, int]:
    """(batch, head, token) strides of ``t``, given as ``[B', H, N, d]`` or (``token_major``) ``[B', N, H, d]``."""
    return (t.stride(0), t.stride(2), t.stride(1)) if token_major else (t.stride(0), t.stride(1), t.stride(2))


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                      token_major: bool = False, log_bias: bool = False, keep_lse: bool = True
                      ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``softmax(q k^T / sqrt(d) + bias) v``.

    Args:
        q: ``[B', H, M, d]``; k, v: ``[B', H, N, d]`` (``M`` queries, ``N`` keys); float16/bfloat16/float32,
            one dtype, any strides; with ``token_major``, ``[B', M, H, d]`` and ``[B', N, H, d]`` (as the
            views of a packed q | k | v projection).
        bias: ``[B', N]`` or ``[B', N, 1]`` float32 (``log(size)`` of every key), or None for plain attention.
        log_bias: ``bias`` holds the sizes themselves (any float dtype, positive): the kernel takes
            their log.
        keep_lse: write the log-sum-exp the backward needs; False (inference) neither allocates
            nor writes it.
    Returns:
        ``out [B', H, M, d]`` in q's dtype (a view of a ``[B', M, H, d]`` buffer), or with
        ``token_major`` that buffer as ``[B', M, H * d]`` (the heads concatenated, as the output
        projection takes them); and ``lse [B', H, M]`` float32, each query's log-sum-exp in log2
        units (for the backward), or None without ``keep_lse``.
    """
    q, k, v = _unit_channel_stride(q), _unit_channel_stride(k), _unit_channel_stride(v)
    key = ("attention_fwd", q.shape, q.stride(), k.shape, k.stride(), v.stride(), q.dtype,
           None if bias is None else bias.stride(), token_major, log_bias, keep_lse)
    d = remembered(key, lambda: _forward_launch(q, k, v, bias, token_major, log_bias, keep_lse))
    out = _new_output(d.out_shape, q.dtype, q.device)
    lse = _new_output(d.lse_shape, torch.float32, q.device) if keep_lse else None
    d.launch(q, k, v, q if bias is None else bias, out, out if lse is None else lse)
    return (out if token_major else out.transpose(1, 2)), lse


class _AttentionLaunch(NamedTuple):
    """What an attention launch needs beyond its tensors, from their signature (:mod:`.memo`)."""

    out_shape: Tuple[int, ...]
    lse_shape: Tuple[int, int, int]
    launch: Launcher  # takes the kernel's six tensors


def _forward_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                    token_major: bool, log_bias: bool, keep_lse: bool) -> _AttentionLaunch:
    if token_major:
        rows, queries, heads, head_dim = q.shape
        keys = k.shape[1]
    else:
        rows, heads, queries, head_dim = q.shape
        keys = k.shape[2]
    block_d, block_m, block_n = block_config(head_dim, max(queries, keys), fp32=q.dtype == torch.float32)
    scale = 1.0 / math.sqrt(head_dim)
    _, stride_bb, stride_bn = _bias_args(bias, q)
    strides = [_heads_first_strides(t, token_major) for t in (q, k, v)]
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=bias is not None,
                LOG_BIAS=log_bias, STORE_LSE=keep_lse, HEAD_ALIGN=_head_align(*(s[1] for s in strides)),
                **_constexprs(q), **_launch_options(block_d, q.dtype == torch.float32))
    return _AttentionLaunch(
        (rows, queries, heads * head_dim) if token_major else (rows, queries, heads, head_dim),
        (rows, heads, queries),
        Launcher(_attention_fwd_kernel, (_cdiv(queries, block_m) * rows * heads,),
                 (queries, keys, heads, *strides[0], *strides[1], *strides[2], stride_bb, stride_bn, scale * LOG2E),
                 meta))


def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       bias: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, bias_grad: bool
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of :func:`attention_forward`.

    Args:
        grad_out: ``[B', H, M, d]`` any strides; out, lse: what the forward returned.
        bias_grad: also compute the bias gradient.
    Returns:
        ``dq`` (``[B', H, M, d]``), ``dk, dv`` (``[B', H, N, d]``), contiguous, q's dtype, and
        ``dbias [B', H, N]`` float32, each head's share of the bias gradient (sum over dim 1 for
        ``[B', N]``), or None when ``bias_grad`` is False (the custom op returns an empty tensor).
    """
    rows, heads, queries, head_dim = q.shape
    keys = k.shape[2]
    dq = _new_output((rows, heads, queries, head_dim), q.dtype, q.device)
    dk, dv = (_new_output((rows, heads, keys, head_dim), q.dtype, q.device) for _ in range(2))
    # out: the [B', M, H, d] buffer the forward wrote
    dbias = _backward_launches(grad_out, q, k, v, bias, out.transpose(1, 2), lse, bias_grad, dq, dk, dv, False)
    return dq, dk, dv, dbias


def self_attention_forward(qkv: torch.Tensor, heads: int, bias: Optional[torch.Tensor], log_bias: bool = False
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_forward` of the heads of a packed ``qkv [B', N, 3 D]`` projection (q | k | v,
    each ``H`` heads of ``d``), for a backward: ``(out [B', N, D], lse [B', H, N])``. ``log_bias``:
    ``bias`` holds the sizes, whose log the kernels take (the backward must be told the same)."""
    rows, tokens, width = qkv.shape
    q, k, v = qkv.view(rows, tokens, 3, heads, width // 3 // heads).unbind(2)
    return attention_forward(q, k, v, bias, token_major=True, log_bias=log_bias)


def self_attention_backward(grad_out: torch.Tensor, qkv: torch.Tensor, heads: int, bias: Optional[torch.Tensor],
                            out: torch.Tensor, lse: torch.Tensor, bias_grad: bool, log_bias: bool = False
                            ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of :func:`self_attention_forward` from ``grad_out [B', N, D]`` (any strides):
    ``dqkv [B', N, 3 D]`` in qkv's dtype, the packed projection's gradient, which the kernels write
    in place (no per-head gradients to transpose and stack), and ``dbias`` as :func:`attention_backward`
    (not with ``log_bias``: the sizes' gradient is not computed)."""
    rows, tokens, width = qkv.shape
    head_dim = width // 3 // heads
    q, k, v = qkv.view(rows, tokens, 3, heads, head_dim).unbind(2)
    dqkv = _new_output((rows, tokens, 3, heads, head_dim), qkv.dtype, qkv.device)
    dq, dk, dv = dqkv.unbind(2)
    do = _unit_channel_stride(grad_out).view(rows, tokens, heads, head_dim)
    dbias = _backward_launches(do, q, k, v, bias, out, lse, bias_grad, dq, dk, dv, True, log_bias)
    return dqkv.view(rows, tokens, width), dbias


def query_attention_forward(q: torch.Tensor, kv: torch.Tensor, heads: int, bias: Optional[torch.Tensor],
                            log_bias: bool = False, keep_lse: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`attention_forward` of the heads of ``q [B', M, D]`` over a packed ``kv [B', N, 2 D]``
    projection (k | v, each ``H`` heads of ``d``): ``(out [B', M, D], lse [B', H, M])`` (lse None
    without ``keep_lse``). ``log_bias``: ``bias`` holds the sizes, whose log the kernels take."""
    rows, queries, width = q.shape
    k, v = kv.view(rows, kv.shape[1], 2, heads, width // heads).unbind(2)
    return attention_forward(q.view(rows, queries, heads, width // heads), k, v, bias, token_major=True,
                             log_bias=log_bias, keep_lse=keep_lse)


def query_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, heads: int,
                             bias: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, bias_grad: bool,
                             log_bias: bool = False) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of :func:`query_attention_forward` from ``grad_out [B', M, D]`` (any strides):
    ``dq [B', M, D]`` and ``dkv [B', N, 2 D]`` in q's dtype, the latter the packed projection's
    gradient, which the kernels write in place, and ``dbias`` as :func:`attention_backward` (not
    with ``log_bias``)."""
    rows, queries, width = q.shape
    tokens, head_dim = kv.shape[1], width // heads
    k, v = kv.view(rows, tokens, 2, heads, head_dim).unbind(2)
    dq = _new_output((rows, queries, heads, head_dim), q.dtype, q.device)
    dkv = _new_output((rows, tokens, 2, heads, head_dim), kv.dtype, kv.device)
    dk, dv = dkv.unbind(2)
    do = _unit_channel_stride(grad_out).view(rows, queries, heads, head_dim)
    dbias = _backward_launches(do, q.view(rows, queries, heads, head_dim), k, v, bias, out, lse, bias_grad, dq, dk,
                               dv, True, log_bias)
    return dq.view(rows, queries, width), dkv.view(rows, tokens, 2 * width), dbias


def _backward_launches(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       bias: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, bias_grad: bool,
                       dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, token_major: bool,
                       log_bias: bool = False) -> Optional[torch.Tensor]:
    """The backward's two launches, writing ``dq``, ``dk`` and ``dv`` (any strides, unit channel
    stride, laid out as q, k and v: ``[B', H, N, d]``, or ``[B', N, H, d]`` with ``token_major``;
    dk and dv with the same strides). ``out`` is the ``[B', M, H * d]`` buffer the forward wrote.
    Returns the per-head bias gradient ``[B', H, N]`` float32, or None without ``bias_grad``."""
    if log_bias and bias_grad:
        raise ValueError("bias_grad=True needs the bias itself (log_bias=False): the sizes' gradient is not computed")
    q, k, v = _unit_channel_stride(q), _unit_channel_stride(k), _unit_channel_stride(v)
    grad_out = _unit_channel_stride(grad_out)
    key = ("attention_bwd", q.shape, q.stride(), k.shape, k.stride(), v.stride(), grad_out.stride(), dq.stride(),
           dk.stride(), q.dtype, None if bias is None else bias.stride(), bias_grad, token_major, log_bias)
    d = remembered(key, lambda: _backward_launch(q, k, v, grad_out, bias, bias_grad, dq, dk, token_major, log_bias))
    delta = _new_output(d.delta_shape, torch.float32, q.device)
    dbias = _new_output(d.dbias_shape, torch.float32, q.device) if bias_grad else None
    tensors = (q, k, v, q if bias is None else bias, out, grad_out, lse, delta, dq, dk, dv,
               delta if dbias is None else dbias)
    # The dQ pass writes delta, which the dK/dV pass reads: two launches in stream order.
    d.launch_dq(*tensors)
    d.launch_dkdv(*tensors)
    return dbias


class _AttentionBackwardLaunch(NamedTuple):
    """What the backward's two launches need beyond their tensors, from their signature (:mod:`.memo`)."""

    delta_shape: Tuple[int, int, int]
    dbias_shape: Tuple[int, int, int]
    launch_dq: Launcher  # the dQ pass (it writes delta); takes the kernel's twelve tensors
    launch_dkdv: Launcher  # the dK/dV pass, after it


def _backward_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
                     bias: Optional[torch.Tensor], bias_grad: bool, dq: torch.Tensor, dk: torch.Tensor,
                     token_major: bool, log_bias: bool) -> _AttentionBackwardLaunch:
    token_axis, head_axis = (1, 2) if token_major else (2, 1)
    rows, heads, head_dim = q.shape[0], q.shape[head_axis], q.shape[3]
    queries, keys = q.shape[token_axis], k.shape[token_axis]
    block_d, block_m, block_n = block_config(head_dim, max(queries, keys), backward=True,
                                             fp32=q.dtype == torch.float32)
    scale = 1.0 / math.sqrt(head_dim)
    _, stride_bb, stride_bn = _bias_args(bias, q)
    strides = [_heads_first_strides(t, token_major) for t in (q, k, v, grad_out, dq, dk)]
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=bias is not None,
                  LOG_BIAS=log_bias, BIAS_GRAD=bias_grad, HEAD_ALIGN=_head_align(*(s[1] for s in strides)),
                  **_constexprs(q), **_launch_options(block_d, q.dtype == torch.float32))
    scalars = (queries, keys, heads, *strides[0], *strides[1], *strides[2], stride_bb, stride_bn, *strides[3],
               *strides[4], *strides[5], scale * LOG2E, scale)
    return _AttentionBackwardLaunch(
        (rows, heads, queries), (rows, heads, keys),
        Launcher(_attention_bwd_kernel, (_cdiv(queries, block_m) * rows * heads,), scalars, dict(common, DKDV=False)),
        Launcher(_attention_bwd_kernel, (_cdiv(keys, block_n) * rows * heads,), scalars,
                 dict(common, DKDV=True, BLOCK_M=min(block_m, DKDV_QUERY_BLOCK))))


# ---------------------------------------------------------------------------------------------
# Custom ops and autograd
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("tempme::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor]
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, bias)


@_attention_fwd_op.register_fake
def _(q, k, v, bias):
    rows, heads, tokens, head_dim = q.shape
    return (q.new_empty((rows, tokens, heads, head_dim)).transpose(1, 2),
            q.new_empty((rows, heads, tokens), dtype=torch.float32))


@torch.library.custom_op("tempme::attention_bwd", mutates_args=())
def _attention_bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      bias: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, bias_grad: bool
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, dbias = attention_backward(grad_out, q, k, v, bias, out, lse, bias_grad)
    return dq, dk, dv, q.new_empty((0,), dtype=torch.float32) if dbias is None else dbias


@_attention_bwd_op.register_fake
def _(grad_out, q, k, v, bias, out, lse, bias_grad):
    rows, heads, keys, _ = k.shape
    return (q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(k.shape),
            q.new_empty((rows, heads, keys) if bias_grad else (0,), dtype=torch.float32))


@torch.library.custom_op("tempme::self_attention_fwd", mutates_args=())
def _self_attention_fwd_op(qkv: torch.Tensor, heads: int, bias: Optional[torch.Tensor], log_bias: bool = False
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    return self_attention_forward(qkv, heads, bias, log_bias)


@_self_attention_fwd_op.register_fake
def _(qkv, heads, bias, log_bias=False):
    rows, tokens, width = qkv.shape
    return qkv.new_empty((rows, tokens, width // 3)), qkv.new_empty((rows, heads, tokens), dtype=torch.float32)


@torch.library.custom_op("tempme::self_attention_bwd", mutates_args=())
def _self_attention_bwd_op(grad_out: torch.Tensor, qkv: torch.Tensor, heads: int, bias: Optional[torch.Tensor],
                           out: torch.Tensor, lse: torch.Tensor, bias_grad: bool, log_bias: bool = False
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    dqkv, dbias = self_attention_backward(grad_out, qkv, heads, bias, out, lse, bias_grad, log_bias)
    return dqkv, qkv.new_empty((0,), dtype=torch.float32) if dbias is None else dbias


@_self_attention_bwd_op.register_fake
def _(grad_out, qkv, heads, bias, out, lse, bias_grad, log_bias=False):
    rows, tokens, _ = qkv.shape
    return qkv.new_empty(qkv.shape), qkv.new_empty((rows, heads, tokens) if bias_grad else (0,), dtype=torch.float32)


@torch.library.custom_op("tempme::query_attention_fwd", mutates_args=())
def _query_attention_fwd_op(q: torch.Tensor, kv: torch.Tensor, heads: int, bias: Optional[torch.Tensor],
                            log_bias: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    return query_attention_forward(q, kv, heads, bias, log_bias)


@_query_attention_fwd_op.register_fake
def _(q, kv, heads, bias, log_bias=False):
    rows, queries, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((rows, heads, queries), dtype=torch.float32)


@torch.library.custom_op("tempme::query_attention_bwd", mutates_args=())
def _query_attention_bwd_op(grad_out: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, heads: int,
                            bias: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, bias_grad: bool,
                            log_bias: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dkv, dbias = query_attention_backward(grad_out, q, kv, heads, bias, out, lse, bias_grad, log_bias)
    return dq, dkv, q.new_empty((0,), dtype=torch.float32) if dbias is None else dbias


@_query_attention_bwd_op.register_fake
def _(grad_out, q, kv, heads, bias, out, lse, bias_grad, log_bias=False):
    rows, tokens, _ = kv.shape
    return (q.new_empty(q.shape), q.new_empty(kv.shape),
            q.new_empty((rows, heads, tokens) if bias_grad else (0,), dtype=torch.float32))


_attention_fwd = custom_op_or(attention_forward, "attention_fwd")
_attention_bwd = custom_op_or(attention_backward, "attention_bwd")
_self_attention_fwd = custom_op_or(self_attention_forward, "self_attention_fwd")
_self_attention_bwd = custom_op_or(self_attention_backward, "self_attention_bwd")
_query_attention_fwd = custom_op_or(query_attention_forward, "query_attention_fwd")
_query_attention_bwd = custom_op_or(query_attention_backward, "query_attention_bwd")


class AttentionFunction(torch.autograd.Function):
    """Attention with a per-key bias, differentiable in ``q``, ``k``, ``v`` and ``bias``."""

    @staticmethod
    def forward(ctx, q, k, v, bias):
        out, lse = _attention_fwd(q, k, v, bias)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, bias, out, lse = ctx.saved_tensors
        if torch.is_grad_enabled() and needs_grad(grad_out, q, k, v, bias):
            refuse_second_order("attention")
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = _attention_bwd(grad_out, q, k, v, bias, out, lse, bias_grad)
        # Summing the heads' shares here (torch's reduction) keeps the kernels free of atomics.
        return dq, dk, dv, (dbias.sum(dim=1).view(bias.shape) if bias_grad else None)


class SelfAttentionFunction(torch.autograd.Function):
    """Attention of the heads of a packed ``qkv [B', N, 3 D]`` projection with a per-key bias,
    differentiable in ``qkv`` and ``bias``: its gradient is written into one ``[B', N, 3 D]`` buffer
    by the kernels, where :class:`AttentionFunction` on views of the heads would leave autograd to
    transpose q, k and v and stack their gradients (a copy of the whole projection's gradient)."""

    @staticmethod
    def forward(ctx, qkv, bias, heads: int, log_bias: bool):
        out, lse = _self_attention_fwd(qkv, heads, bias, log_bias)
        ctx.save_for_backward(qkv, bias, out, lse)
        ctx.heads, ctx.log_bias = heads, log_bias
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, bias, out, lse = ctx.saved_tensors
        if torch.is_grad_enabled() and needs_grad(grad_out, qkv, bias):
            refuse_second_order("self_attention")
        bias_grad = bias is not None and not ctx.log_bias and ctx.needs_input_grad[1]
        dqkv, dbias = _self_attention_bwd(grad_out, qkv, ctx.heads, bias, out, lse, bias_grad, ctx.log_bias)
        return dqkv, (dbias.sum(dim=1).view(bias.shape) if bias_grad else None), None, None


class QueryAttentionFunction(torch.autograd.Function):
    """Attention of the heads of ``q [B', M, D]`` over a packed ``kv [B', N, 2 D]`` projection with a
    per-key bias, differentiable in ``q``, ``kv`` and ``bias``: the keys' and values' gradient is
    written into one ``[B', N, 2 D]`` buffer by the kernels (as :class:`SelfAttentionFunction` does
    for a packed ``q | k | v``), where :class:`AttentionFunction` on views of the heads would leave
    autograd to transpose k and v and stack their gradients."""

    @staticmethod
    def forward(ctx, q, kv, bias, heads: int, log_bias: bool):
        out, lse = _query_attention_fwd(q, kv, heads, bias, log_bias)
        ctx.save_for_backward(q, kv, bias, out, lse)
        ctx.heads, ctx.log_bias = heads, log_bias
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, kv, bias, out, lse = ctx.saved_tensors
        if torch.is_grad_enabled() and needs_grad(grad_out, q, kv, bias):
            refuse_second_order("query_attention")
        bias_grad = bias is not None and not ctx.log_bias and ctx.needs_input_grad[2]
        dq, dkv, dbias = _query_attention_bwd(grad_out, q, kv, ctx.heads, bias, out, lse, bias_grad, ctx.log_bias)
        return dq, dkv, (dbias.sum(dim=1).view(bias.shape) if bias_grad else None), None, None


def query_attention(q: torch.Tensor, kv: torch.Tensor, heads: int, size: Optional[torch.Tensor]) -> torch.Tensor:
    """Proportional attention of the ``heads`` heads of ``q [B', M, D]`` over a packed ``kv [B', N, 2 D]``
    projection (``bias = log(size)``, or none for ``size=None``): ``[B', M, D]``, the heads
    concatenated, differentiable in ``q`` and ``kv`` (and ``size``) through
    :class:`QueryAttentionFunction` where a gradient can flow, as :func:`self_attention` is for a
    packed ``q | k | v``. Sizes that take no gradient go to the kernels as they are; an eager call
    without a gradient writes no log-sum-exp."""
    log_bias = size is not None and not size.requires_grad
    bias = size if log_bias or size is None else cast(size, torch.float32).log()
    if needs_grad(q, kv, bias):
        return QueryAttentionFunction.apply(q, kv, bias, heads, log_bias)
    if use_custom_ops():
        return torch.ops.tempme.query_attention_fwd(q, kv, heads, bias, log_bias)[0]
    return query_attention_forward(q, kv, heads, bias, log_bias, keep_lse=False)[0]


def self_attention(qkv: torch.Tensor, heads: int, size: Optional[torch.Tensor]) -> torch.Tensor:
    """Proportional attention of the ``heads`` heads of a packed ``qkv [B', N, 3 D]`` projection
    (``bias = log(size)``, or none for ``size=None``): ``[B', N, D]``, the heads concatenated, as
    :func:`sized_attention` of its token-major views, and differentiable in ``qkv`` (and ``size``)
    through :class:`SelfAttentionFunction` where a gradient can flow. Sizes that take no gradient (the
    encoder's) go to the kernels as they are, forward and backward, which take their log as they
    read them (as in inference): no ``log`` op, no bias tensor. The encoder calls it where a gradient
    can flow or the custom ops are taken; its eager inference calls :func:`sized_attention` on the
    views it has already split (a call here without a gradient writes the log-sum-exp too)."""
    log_bias = size is not None and not size.requires_grad
    bias = size if log_bias or size is None else cast(size, torch.float32).log()
    if needs_grad(qkv, bias):
        return SelfAttentionFunction.apply(qkv, bias, heads, log_bias)
    return _self_attention_fwd(qkv, heads, bias, log_bias)[0]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
              token_major: bool = False) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + bias) v`` with ``bias [B', N]`` or ``[B', N, 1]`` float32, or None.

    ``q [B', H, M, d]``, ``k, v [B', H, N, d]``, returning ``[B', H, M, d]``; or with ``token_major``
    ``[B', M, H, d]`` and ``[B', N, H, d]``, returning ``[B', M, H * d]``. Without a gradient to track, an eager call is
    the launcher alone (no autograd node, no custom-op dispatch, no layout changes).
    """
    grad = needs_grad(q, k, v, bias)
    if token_major and (grad or use_custom_ops()):
        # The autograd function and the custom ops take [B', H, N, d].
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias)
        return out.transpose(1, 2).flatten(2)
    if grad:
        return AttentionFunction.apply(q, k, v, bias)
    if use_custom_ops():
        return torch.ops.tempme.attention_fwd(q, k, v, bias)[0]
    return attention_forward(q, k, v, bias, token_major, keep_lse=False)[0]


def sized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: Optional[torch.Tensor],
                    token_major: bool = False) -> torch.Tensor:
    """Proportional attention: :func:`attention` with ``bias = log(size)`` (``size [B', N]`` or
    ``[B', N, 1]``, any float dtype), or plain attention for ``size=None``.

    An eager call without a gradient to track hands the sizes to the kernel, which takes their log
    as it reads them: no ``log`` kernel and no bias tensor per layer. Otherwise (autograd, custom
    ops) the bias is ``log(size)`` in float32, in size's own shape (read through its strides).
    """
    if size is None:
        return attention(q, k, v, None, token_major)
    if not needs_grad(q, k, v, size) and not use_custom_ops():
        return attention_forward(q, k, v, size, token_major, log_bias=True, keep_lse=False)[0]
    return attention(q, k, v, cast(size, torch.float32).log(), token_major)


# Assigning a tunable (GPU_FWD_BLOCKS, ...) or a function forgets the launch descriptions.
forget_on_assign(__name__)
