"""The op boundary: every merge op the model uses, each with a ``backend`` argument.

``backend`` is ``"torch"`` (the reference in ``reference.py``), ``"triton"`` (the kernels in
``tempme_kernels``) or ``"auto"`` (Triton for CUDA tensors, torch otherwise). The model calls these
functions and never branches on the backend itself.

Every op checks its inputs here (with the functions of ``checks.py``), before either backend runs:
tensor types, ranks, shapes, dtypes, devices, empty batches and the valid range of every integer
argument; a wrong input raises a ``ValueError`` or ``TypeError`` that names the argument and the
valid range. These checks read shapes only, never values, so they cost no host synchronisation.
Non-finite values (NaN, Inf) are checked only on request (``check_finite=True``): that check reads
the tensor back to the host.
Any strides are accepted and give the same result as contiguous inputs.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from . import attention_impl, recording, reference
from .attention_impl import IMPLS as ATTENTION_IMPLS
from .checks import (FLOAT_DTYPES, assert_finite, check_add_norm, check_attention, check_embed_norm, check_join,
                     check_join_merge, check_linear_act, check_merge, check_metric, check_norm, check_query_attention,
                     check_r, check_residual, check_self_attention)
from .eager import needs_grad
from .reference import LINEAR_ACTIVATIONS, MergePlan, max_r, split_positions, split_sizes

BACKENDS = ("torch", "triton", "auto")

__all__ = ["ATTENTION_IMPLS", "BACKENDS", "FLOAT_DTYPES", "MergePlan", "add_norm", "assert_finite", "attention",
           "best_match", "embed_norm", "LINEAR_ACTIVATIONS", "linear_act",
           "join_clips", "join_merge", "join_merge_norm", "match", "max_r", "merge", "merge_norm", "query_attention",
           "resolve_backend", "self_attention", "split_positions", "split_sizes", "triton_available"]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """Turn ``backend`` into ``"torch"`` or ``"triton"`` for a tensor on ``tensor.device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        # (A meta tensor counts as CUDA while a model is recorded for compiling ahead: .recording.)
        return "triton" if (tensor.is_cuda or recording.META_AS_GPU and tensor.is_meta) and triton_available() \
            else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package; install it or use backend='torch'")
        if tensor.is_meta and not recording.META_AS_GPU:  # (the interpreter would read its absent data)
            raise ValueError("backend='triton' got a meta tensor, which has no data to run a kernel on; use "
                             "backend='torch' or 'auto' (or torch's FakeTensorMode) to infer shapes")
        if not (tensor.is_cuda or recording.META_AS_GPU and tensor.is_meta) and \
                os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' got a tensor on {tensor.device}: Triton runs on CUDA tensors, or on "
                f"the CPU only in interpreter mode (TRITON_INTERPRET=1 set before triton is imported); "
                f"use backend='torch' or 'auto' for CPU tensors")
    return backend


_TRITON_MODULES = {}


def _triton_ops():
    # Imported lazily: importing triton compiles nothing, but it is slow and absent on some platforms.
    # (Kept once imported: an import statement is several calls of host time at every op.)
    module = _TRITON_MODULES.get("ops")
    if module is None:
        from . import triton_ops as module
        _TRITON_MODULES["ops"] = module
    return module


def _triton_norm():
    module = _TRITON_MODULES.get("norm")
    if module is None:
        from . import triton_norm as module
        _TRITON_MODULES["norm"] = module
    return module


def _triton_linear():
    module = _TRITON_MODULES.get("linear")
    if module is None:
        from . import triton_linear as module
        _TRITON_MODULES["linear"] = module
    return module


def best_match(metric: torch.Tensor, protected: int, backend: str = "auto", *, heads: int = 1,
               check_finite: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Best cosine match in set B for every token of set A.

    Args:
        metric: ``[B', N, C]`` float tensor (float16, bfloat16, float32, float64), any strides.
        protected: class tokens at the front, never matched, ``0 <= protected <= N - 2``.
        heads: match on the mean of the metric's ``heads`` groups of ``C / heads`` channels
            (``reference.head_mean``): pass a multi-head attention's keys, token-major
            (``[B', N, heads * d]``, any strides), and the Triton kernel averages them as it reads
            them, so the averaged keys are never written. ``C`` must be divisible by it.
        check_finite: also refuse a metric holding NaN or Inf (a host synchronisation).
    Returns:
        ``scores [B', Na]`` float32 (float64 for float64 input) and ``dst [B', Na]`` int64; neither carries a
        gradient, on either backend (the scores order a plan: the Triton kernel writes them without a graph).
    """
    check_metric(metric, protected, check_finite, heads)
    if resolve_backend(backend, metric) == "triton":
        return _triton_ops().best_match(metric, protected, heads)
    scores, dst = reference.best_match(metric, protected, heads)
    return scores.detach(), dst


def match(metric: torch.Tensor, r: int, protected: int, backend: str = "auto", *, heads: int = 1,
          check_finite: bool = False) -> MergePlan:
    """Plan one bipartite merge that removes ``r`` tokens (no gradient flows through it).

    Args:
        metric: ``[B', N, C]`` float tensor (float16, bfloat16, float32, float64), any strides.
        r: tokens to remove, ``0 <= r <= (N - protected) // 2``.
        protected: class tokens at the front, never merged, ``0 <= protected <= N - 2``.
        heads: match on the mean of the metric's ``heads`` channel groups, as :func:`best_match`.
        check_finite: also refuse a metric holding NaN or Inf (a host synchronisation). A NaN
            metric has no well-defined ranking, so the two backends may plan differently.
    Returns:
        A :class:`MergePlan`. The Triton backend's also carries ``src`` and ``offsets``, the merged
        tokens grouped by destination, written in the same launch; its Triton merge then reads them
        instead of grouping the tokens itself. Its index tensors are row views of one buffer.
    """
    check_metric(metric, protected, check_finite, heads)
    check_r(r, metric.shape[1], protected)
    if resolve_backend(backend, metric) == "triton":
        return _triton_ops().match(metric, r, protected, heads)
    return reference.match(metric, r, protected, heads)


def merge(x: torch.Tensor, size: torch.Tensor, plan: MergePlan, backend: str = "auto", *,
          check_finite: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge of ``x`` by ``plan``, differentiable in ``x``.

    Args:
        x: ``[B', N, D]`` float tensor, any strides.
        size: ``[B', N]`` or ``[B', N, 1]`` float tensor of positive sizes, no gradient. Keep sizes
            in float32 (the model does): float16 holds integers exactly only up to 2048 and
            bfloat16 only up to 256.
        plan: from :func:`match` on the same ``B'`` and ``N``.
        check_finite: also refuse ``x`` or ``size`` holding NaN or Inf, and sizes that are not
            positive (a host synchronisation).
    Returns:
        ``(x [B', N - r, D], size)`` with ``size`` in the layout it came in.
    """
    check_merge(x, size, plan, check_finite)
    if plan.r == 0:
        return x, size
    if resolve_backend(backend, x) == "triton":
        return _triton_ops().merge(x, size, plan)
    return reference.merge(x, size, plan)


def merge_norm(x: torch.Tensor, size: torch.Tensor, plan: MergePlan, weight: torch.Tensor, bias: torch.Tensor,
               eps: float, backend: str = "auto", *, residual: Optional[torch.Tensor] = None,
               check_finite: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`merge`, then the LayerNorm of the merged tokens (the block's ``ln_2``), one op.

    Args:
        x, size, plan, check_finite: as :func:`merge`.
        weight, bias: ``[D]`` float LayerNorm parameters on x's device; eps: its epsilon, ``> 0``.
        residual: optional tensor of x's shape, dtype and device, any strides: merge
            ``x + residual`` (the block's residual add after attention, ``x + attn(ln_1(x))``).
    Returns:
        ``(x [B', N - r, D], size, ln [B', N - r, D])``: ``ln`` is ``layer_norm(x)`` computed in
        float32 (float64 for float64 ``x``) and rounded to x's dtype (see
        :func:`reference.layer_norm`). Differentiable in ``x``, ``weight``, ``bias`` and ``residual``.

    The Triton backend writes ``ln`` from the merge kernel's output stage, so the merged tokens are
    not read back by a separate LayerNorm; it reads ``x`` and ``residual`` and adds them as it
    merges, so their sum is not written either.
    """
    check_merge(x, size, plan, check_finite)
    check_norm(weight, bias, eps, x)
    check_residual(residual, x, check_finite)
    triton = resolve_backend(backend, x) == "triton"
    if plan.r == 0:
        if residual is not None:
            x = x + residual
        return x, size, reference.layer_norm(x, weight, bias, eps)
    if triton:
        return _triton_ops().merge_norm(x, size, plan, weight, bias, eps, residual)
    return reference.merge_norm(x, size, plan, weight, bias, eps, residual)


def add_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
             backend: str = "auto", *, check_finite: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """A residual add and the LayerNorm after it, one op: ``(x + residual, layer_norm(x + residual))``.

    Where the model uses it: a block's output ``x + mlp(ln_2(x))`` and the next block's ``ln_1`` of
    it (when that block joins no clips), and the trimmed last block's class tokens into its ``ln_2``
    and into ``ln_post``.

    Args:
        x: ``[B', N, D]`` float tensor, any strides; residual: x's shape, dtype and device, any strides.
        weight, bias: ``[D]`` float LayerNorm parameters on x's device; eps: its epsilon, ``> 0``.
        check_finite: also refuse ``x`` or ``residual`` holding NaN or Inf (a host synchronisation).
    Returns:
        ``(sum, ln)``, both ``[B', N, D]`` in x's dtype: the sum as ``x + residual`` gives it, ``ln``
        as :func:`reference.layer_norm` (float32 arithmetic, float64 for float64 ``x``, one
        rounding). Differentiable in ``x``, ``residual``, ``weight`` and ``bias``.

    The Triton backend reads ``x`` and ``residual`` once and writes both outputs, in one launch;
    the sum is not read back by a separate LayerNorm.
    """
    check_add_norm(x, residual, weight, bias, eps, check_finite)
    if resolve_backend(backend, x) == "triton":
        return _triton_norm().add_norm(x, residual, weight, bias, eps)
    return reference.add_norm(x, residual, weight, bias, eps)


def embed_norm(patches: torch.Tensor, class_embedding: torch.Tensor, positional_embedding: torch.Tensor,
               weight: torch.Tensor, bias: torch.Tensor, eps: float, backend: str = "auto", *,
               next_norm: Optional[Tuple[torch.Tensor, torch.Tensor, float]] = None, check_finite: bool = False):
    """The start of a ViT's residual stream, one op: ``layer_norm(cat([class_embedding, patches]) +
    positional_embedding)`` per frame (open_clip's class token, position embedding and ``ln_pre``).

    Args:
        patches: ``[M, P, D]`` float tensor, any strides: each frame's patch embeddings.
        class_embedding: ``[D]``; positional_embedding: ``[P + 1, D]``; float, on the patches' device, cast
            to their dtype first.
        weight, bias: ``[D]`` float LayerNorm parameters; eps: its epsilon, ``> 0``.
        next_norm: ``(weight, bias, eps)`` of the LayerNorm that reads the result next (the first block's
            ``ln_1``), or None.
        check_finite: also refuse ``patches`` holding NaN or Inf (a host synchronisation).
    Returns:
        ``[M, P + 1, D]`` in the patches' dtype, as :func:`reference.embed_norm` (the sum rounded as torch's
        add rounds it, the LayerNorm in float32 arithmetic, float64 for float64 patches, one rounding); with
        ``next_norm``, the pair of it and its next LayerNorm.

    The Triton backend reads the patches once and writes the LayerNorm alone (with ``next_norm``, the next
    LayerNorm too), in one launch, where torch writes the concatenation and the sum and reads each back (and
    reads the result back for the next LayerNorm). It has no backward: where a gradient can flow to any
    argument, both backends run the torch ops.
    """
    check_embed_norm(patches, class_embedding, positional_embedding, weight, bias, eps)
    if next_norm is not None:
        if not isinstance(next_norm, (tuple, list)) or len(next_norm) != 3:
            raise TypeError(f"next_norm must be (weight, bias, eps) of a LayerNorm or None, got {next_norm!r}")
        check_norm(*next_norm, patches)
    if check_finite:
        assert_finite("patches", patches)
    grads = needs_grad(patches, class_embedding, positional_embedding, weight, bias,
                       *(next_norm[:2] if next_norm is not None else ()))
    if resolve_backend(backend, patches) == "triton" and not grads:
        outs = _triton_norm().embed_norm(patches, class_embedding, positional_embedding, weight, bias, eps,
                                         *(next_norm if next_norm is not None else ()))
        return outs[0] if next_norm is None else tuple(outs)
    return reference.embed_norm(patches, class_embedding, positional_embedding, weight, bias, eps, next_norm)


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: str = "gelu",
               backend: str = "auto") -> torch.Tensor:
    """A linear layer and the activation after it, one op: ``act(F.linear(x, weight, bias))`` (the first half
    of a transformer block's MLP: open_clip's ``c_fc`` and its activation module).

    Args:
        x: ``[..., K]`` float tensor, any strides.
        weight: ``[N, K]``; bias: ``[N]`` or None; float, on x's device, cast to x's dtype first.
        act: ``"none"``, ``"gelu"`` (``nn.GELU()``), ``"gelu_tanh"`` (``nn.GELU(approximate="tanh")``) or
            ``"quick_gelu"`` (open_clip's ``QuickGELU``).
    Returns:
        ``[..., N]`` in x's dtype, as :func:`reference.linear_act` (the product plus bias rounded once, the
        activation computed from that in float32, float64 for float64 ``x``, and rounded as torch rounds it).

    The Triton backend applies the activation to each output tile before writing it, in one launch, where
    torch writes the product, reads it back and writes the activation. It has no backward: where a gradient
    can flow to any argument, both backends run the torch ops.
    """
    check_linear_act(x, weight, bias, act, LINEAR_ACTIVATIONS)
    if resolve_backend(backend, x) == "triton" and not needs_grad(x, weight, bias):
        return _triton_linear().linear_act(x, weight, bias, act)
    return reference.linear_act(x, weight, bias, act)


def join_clips(x: torch.Tensor, group: int, protected: int, frame_pos: Optional[torch.Tensor] = None,
               backend: str = "auto") -> torch.Tensor:
    """Join every ``group`` adjacent clips into one (see :func:`reference.join_clips`).

    Args:
        x: ``[B * F, N, ...]`` (tokens ``[B * F, N, D]``, sizes ``[B * F, N]`` or ``[B * F, N, 1]``).
        group: clips per join, ``>= 1``, dividing the ``B * F`` clips.
        protected: class tokens per clip, ``0 <= protected <= N``.
        frame_pos: optional ``[1, F, 1, D]`` with ``F`` (clips per video) a multiple of ``group``
            that divides ``B * F``; needs ``x`` of shape ``[B * F, N, D]`` on the same device.
    """
    check_join(x, group, protected, frame_pos)
    resolve_backend(backend, x)
    return reference.join_clips(x, group, protected, frame_pos)


def join_merge(x: torch.Tensor, size: torch.Tensor, group: int, protected: int, r: int,
               frame_pos: Optional[torch.Tensor] = None, backend: str = "auto", *,
               check_finite: bool = False) -> Tuple[torch.Tensor, torch.Tensor, MergePlan]:
    """ClipMe's join and its cross-clip merge: join ``group`` adjacent clips, add ``frame_pos``, and
    remove ``r`` tokens of every joined clip with the hidden states (before ``frame_pos``) as metric.

    Args:
        x: ``[B * F, N, D]`` hidden states, clips of a video adjacent.
        size: ``[B * F, N]`` or ``[B * F, N, 1]``.
        group: clips per join, ``>= 1``, dividing the ``B * F`` clips.
        protected: class tokens per clip before the join.
        r: ``0 <= r <= (N - protected) * group // 2``.
        frame_pos: optional ``[1, F, 1, D]`` temporal position embedding.
    Returns:
        ``(x [B * F / g, g * N - r, D], size, plan)``: ``plan`` is the merge on the joined clips
        (``tokens = g * N``, ``protected = g * protected``), for source tracking.

    The Triton backend reads the unjoined ``x`` through index arithmetic and adds ``frame_pos`` in
    the kernel, so the joined clips and the joined metric are never written.
    """
    check_join_merge(x, size, group, protected, r, frame_pos, check_finite)
    triton = resolve_backend(backend, x) == "triton"
    # r = 0 is a plain join: no merge, so no reordering into the merge's output order either.
    if r > 0 and triton:
        return _triton_ops().join_merge(x, size, group, protected, r, frame_pos)
    return reference.join_merge(x, size, group, protected, r, frame_pos)


def join_merge_norm(x: torch.Tensor, size: torch.Tensor, group: int, protected: int, r: int, weight: torch.Tensor,
                    bias: torch.Tensor, eps: float, frame_pos: Optional[torch.Tensor] = None, backend: str = "auto",
                    *, check_finite: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, MergePlan]:
    """:func:`join_merge`, then the LayerNorm of its output (the block's ``ln_1``), one op.

    Args:
        x, size, group, protected, r, frame_pos, check_finite: as :func:`join_merge`.
        weight, bias: ``[D]`` float LayerNorm parameters on x's device; eps: its epsilon, ``> 0``.
    Returns:
        ``(x, size, ln, plan)``: ``ln`` as :func:`merge_norm` computes it. Differentiable in ``x``,
        ``frame_pos``, ``weight`` and ``bias``. On the Triton backend (``r > 0``) the merge launch
        writes ``ln`` too.
    """
    check_join_merge(x, size, group, protected, r, frame_pos, check_finite)
    check_norm(weight, bias, eps, x)
    if r > 0 and resolve_backend(backend, x) == "triton":
        out, size_out, ln, plan = _triton_ops().join_merge_norm(x, size, group, protected, r, frame_pos,
                                                                (weight, bias, eps))
        return out, size_out, ln, plan
    return reference.join_merge_norm(x, size, group, protected, r, weight, bias, eps, frame_pos)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: Optional[torch.Tensor] = None,
              impl: str = "auto", backend: str = "auto") -> torch.Tensor:
    """Proportional attention: ``q [B', H, M, d]`` over ``k, v [B', H, N, d]`` (``M`` may differ from ``N``)
    -> ``[B', H, M, d]`` (see :func:`reference.attention`).

    ``size`` is ``[B', N]`` or ``[B', N, 1]`` of the keys' positive sizes, or None for plain attention (pass
    None where every size is 1: no bias lets SDPA use its flash kernel). ``impl`` is one of
    ``ATTENTION_IMPLS`` (see :mod:`.attention_impl`); ``"auto"`` follows ``backend``.
    """
    check_attention(q, k, v, size)
    _check_attention_impl(impl, (q.dtype, k.dtype, v.dtype), "q, k, v")
    on_triton = resolve_backend("triton" if impl == "triton" else backend, q) == "triton"
    # "auto" takes the kernel on a GPU only: in the interpreter it is right but slow.
    on_gpu = q.is_cuda or recording.META_AS_GPU and q.is_meta
    return attention_impl.attention(q, k, v, size, impl, on_triton and on_gpu)


def self_attention(qkv: torch.Tensor, heads: int, size: Optional[torch.Tensor] = None, impl: str = "auto",
                   backend: str = "auto", *, keys: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Multi-head proportional self-attention from a packed ``q | k | v`` projection.

    Args:
        qkv: ``[B', N, 3 * D]``, as ``nn.MultiheadAttention``'s ``in_proj`` writes it (``heads``
            heads of ``d = D / heads`` channels in each of q, k and v).
        size, impl, backend: as :func:`attention`.
        keys: also return the keys averaged over heads (the merge metric). To match on them without
            writing the average, pass the keys ``qkv[..., D:2 * D]`` to :func:`match` with ``heads``
            instead, as the encoder does: the Triton match averages them as it reads them.
    Returns:
        ``(out [B', N, D], keys [B', N, d] or None)``: ``out`` is :func:`attention` of the heads,
        concatenated in head order. Equal to splitting ``qkv`` into ``[B', H, N, d]`` tensors and
        calling :func:`attention`; on the Triton kernel the split and the concatenation are free.
    """
    check_self_attention(qkv, heads, size)
    _check_attention_impl(impl, (qkv.dtype,), "qkv")
    on_triton = resolve_backend("triton" if impl == "triton" else backend, qkv) == "triton"
    on_gpu = qkv.is_cuda or recording.META_AS_GPU and qkv.is_meta
    return attention_impl.self_attention(qkv, heads, size, impl, on_triton and on_gpu, keys)


def query_attention(q: torch.Tensor, kv: torch.Tensor, heads: int, size: Optional[torch.Tensor] = None,
                    impl: str = "auto", backend: str = "auto") -> torch.Tensor:
    """Multi-head proportional attention of ``M`` queries over ``N`` tokens' packed keys and values.

    Args:
        q: ``[B', M, D]``, the queries' projection (``heads`` heads of ``d = D / heads`` channels).
        kv: ``[B', N, 2 * D]``, the keys' and values' projection packed as ``k | v`` (rows ``D:`` of
            ``nn.MultiheadAttention``'s ``in_proj``), q's dtype.
        size, impl, backend: as :func:`attention` (``size`` of the ``N`` keys).
    Returns:
        ``[B', M, D]``: :func:`attention` of the heads, concatenated in head order. On the Triton
        kernel the head split and the concatenation are free. The encoder's trimmed last block
        (only the class tokens query) calls it.
    """
    check_query_attention(q, kv, heads, size)
    _check_attention_impl(impl, (q.dtype,), "q and kv")
    on_triton = resolve_backend("triton" if impl == "triton" else backend, q) == "triton"
    on_gpu = q.is_cuda or recording.META_AS_GPU and q.is_meta
    return attention_impl.query_attention(q, kv, heads, size, impl, on_triton and on_gpu)


def _check_attention_impl(impl: str, dtypes, names: str) -> None:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"impl={impl!r} is not an attention implementation; valid: {ATTENTION_IMPLS}")
    if impl == "triton" and (dtypes[0] not in (torch.float16, torch.bfloat16, torch.float32)
                             or any(d != dtypes[0] for d in dtypes)):
        raise TypeError(f"impl='triton' needs {names} of one dtype among float16, bfloat16, float32; got "
                        f"{', '.join(map(str, dtypes))} (use impl='sdpa' or 'fold')")
