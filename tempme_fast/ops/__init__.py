"""The op boundary: every merge op the model uses, each with a ``backend`` argument.

``backend`` is ``"torch"`` (the reference in ``reference.py``), ``"triton"`` (the kernels in
``tempme_kernels``) or ``"auto"`` (Triton for CUDA tensors, torch otherwise). The model calls these
functions and never branches on the backend itself.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from . import reference
from .reference import MergePlan, max_r, split_positions, split_sizes

BACKENDS = ("torch", "triton", "auto")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

__all__ = ["BACKENDS", "MergePlan", "attention", "best_match", "join_clips", "match", "max_r",
           "merge", "resolve_backend", "split_positions", "split_sizes", "triton_available"]


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
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package; install it or use backend='torch'")
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' got a tensor on {tensor.device}: Triton runs on CUDA tensors, or on "
                f"the CPU only in interpreter mode (TRITON_INTERPRET=1 set before triton is imported); "
                f"use backend='torch' or 'auto' for CPU tensors")
    return backend


def _triton_ops():
    # Imported lazily: importing triton compiles nothing, but it is slow and absent on some platforms.
    from . import triton_ops
    return triton_ops


def _check_tokens(name: str, t: torch.Tensor, protected: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name} must have shape [B', N, C] (3 dims), got {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; valid: float32, float16, bfloat16, float64")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(t.shape)}); give at least one clip")
    if isinstance(protected, bool) or not isinstance(protected, int):
        raise TypeError(f"protected must be an int, got {protected!r}")
    if not 0 <= protected <= t.shape[1] - 2:
        raise ValueError(f"protected={protected} must be in [0, N - 2] = [0, {t.shape[1] - 2}] for "
                         f"{name} with N={t.shape[1]} tokens (at least one A and one B token)")


def best_match(metric: torch.Tensor, protected: int, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Best cosine match in set B for every token of set A.

    Args:
        metric: ``[B', N, C]`` float tensor.
        protected: class tokens at the front, never matched.
    Returns:
        ``scores [B', Na]`` float32 (float64 for float64 input) and ``dst [B', Na]`` int64.
    """
    _check_tokens("metric", metric, protected)
    if resolve_backend(backend, metric) == "triton":
        return _triton_ops().best_match(metric, protected)
    return reference.best_match(metric, protected)


def match(metric: torch.Tensor, r: int, protected: int, backend: str = "auto") -> MergePlan:
    """Plan one bipartite merge that removes ``r`` tokens (no gradient flows through it).

    Args:
        metric: ``[B', N, C]`` float tensor.
        r: tokens to remove, ``0 <= r <= (N - protected) // 2``.
        protected: class tokens at the front, never merged.
    """
    _check_tokens("metric", metric, protected)
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int, got {r!r}")
    limit = max_r(metric.shape[1], protected)
    if not 0 <= r <= limit:
        raise ValueError(f"r={r} must be in [0, (N - protected) // 2] = [0, {limit}] for N={metric.shape[1]}, "
                         f"protected={protected}")
    if resolve_backend(backend, metric) == "triton":
        return _triton_ops().match(metric, r, protected)
    return reference.match(metric, r, protected)


def merge(x: torch.Tensor, size: torch.Tensor, plan: MergePlan,
          backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge of ``x`` by ``plan``, differentiable in ``x``.

    Args:
        x: ``[B', N, D]``.
        size: ``[B', N]`` or ``[B', N, 1]``; no gradient.
        plan: from :func:`match` on the same ``B'`` and ``N``.
    Returns:
        ``(x [B', N - r, D], size)`` with ``size`` in the layout it came in.
    """
    _check_tokens("x", x, plan.protected)
    if size.shape[:2] != x.shape[:2] or size.dim() not in (2, 3) or (size.dim() == 3 and size.shape[2] != 1):
        raise ValueError(f"size must have shape [B', N] or [B', N, 1] matching x {tuple(x.shape)}, "
                         f"got {tuple(size.shape)}")
    if x.shape[1] != plan.tokens or plan.merged.shape[0] != x.shape[0]:
        raise ValueError(f"plan was made for [B'={plan.merged.shape[0]}, N={plan.tokens}] but x has "
                         f"shape {tuple(x.shape)}")
    if size.device != x.device or plan.merged.device != x.device:
        raise ValueError(f"x ({x.device}), size ({size.device}) and plan ({plan.merged.device}) must be "
                         f"on one device")
    if plan.r == 0:
        return x, size
    if resolve_backend(backend, x) == "triton":
        return _triton_ops().merge(x, size, plan)
    return reference.merge(x, size, plan)


def join_clips(x: torch.Tensor, group: int, protected: int, frame_pos: Optional[torch.Tensor] = None,
               backend: str = "auto") -> torch.Tensor:
    """Join every ``group`` adjacent clips into one (see :func:`reference.join_clips`)."""
    if x.shape[0] % group:
        raise ValueError(f"cannot join groups of {group} clips: the batch holds {x.shape[0]} clips")
    resolve_backend(backend, x)
    return reference.join_clips(x, group, protected, frame_pos)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: Optional[torch.Tensor] = None,
              impl: str = "sdpa") -> torch.Tensor:
    """Proportional attention on ``[B', H, N, d]`` (see :func:`reference.attention`)."""
    return reference.attention(q, k, v, size, impl)
