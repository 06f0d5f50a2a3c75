"""The op boundary: every merge op the model uses, each with a ``backend`` argument.

``backend`` is ``"torch"`` (the reference in ``reference.py``), ``"triton"`` (the kernels in
``tempme_kernels``) or ``"auto"`` (Triton for CUDA tensors, torch otherwise). The model calls these
functions and never branches on the backend itself.

Every op checks its inputs here, before either backend runs: tensor types, ranks, shapes, dtypes,
devices, empty batches and the valid range of every integer argument; a wrong input raises a
``ValueError`` or ``TypeError`` that names the argument and the valid range. These checks read
shapes only, never values, so they cost no host synchronisation. Non-finite values (NaN, Inf) are
checked only on request (``check_finite=True``): that check reads the tensor back to the host.
Any strides are accepted and give the same result as contiguous inputs.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from . import attention_impl, reference
from .attention_impl import IMPLS as ATTENTION_IMPLS
from .reference import MergePlan, max_r, split_positions, split_sizes

BACKENDS = ("torch", "triton", "auto")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

__all__ = ["ATTENTION_IMPLS", "BACKENDS", "MergePlan", "assert_finite", "attention", "best_match", "join_clips", "join_merge", "match",
           "max_r",
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


def _check_int(name: str, value, low: int, high: Optional[int] = None, what: str = "") -> None:
    """``value`` is an int in ``[low, high]`` (no upper bound when ``high`` is None)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        valid = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}={value} must be {'in ' if high is not None else ''}{valid}{what}")


def _check_tokens(name: str, t: torch.Tensor, protected: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name} must have shape [B', N, C] (3 dims), got {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; valid: float32, float16, bfloat16, float64")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(t.shape)}); give at least one clip")
    if t.shape[2] == 0:
        raise ValueError(f"{name} has no channels (shape {tuple(t.shape)}); give C >= 1")
    if isinstance(protected, bool) or not isinstance(protected, int):
        raise TypeError(f"protected must be an int, got {protected!r}")
    if not 0 <= protected <= t.shape[1] - 2:
        raise ValueError(f"protected={protected} must be in [0, N - 2] = [0, {t.shape[1] - 2}] for "
                         f"{name} with N={t.shape[1]} tokens (at least one A and one B token)")


def assert_finite(name: str, t: torch.Tensor) -> None:
    """Raise ``ValueError`` if ``t`` holds a NaN or an infinity, naming ``name`` and the first bad index.

    Reads a flag back to the host (a synchronisation on CUDA): call it when debugging or validating
    data, not on the hot path. The ops and ``encode_video`` call it with ``check_finite=True``.
    """
    if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()):
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        count = int(bad.sum())
        first = tuple(int(i) for i in bad.nonzero()[0])
        value = t[first].item()
        raise ValueError(f"{name} holds {count} non-finite value(s) (NaN or Inf), the first {value} at "
                         f"{name}[{', '.join(map(str, first))}]; every value must be finite")


def _check_size(size: torch.Tensor, x: torch.Tensor, rows: str) -> None:
    """``size`` is a tensor of shape ``[rows, N]`` or ``[rows, N, 1]`` matching ``x [rows, N, D]``."""
    if not isinstance(size, torch.Tensor):
        raise TypeError(f"size must be a torch.Tensor, got {type(size).__name__}")
    if size.shape[:2] != x.shape[:2] or size.dim() not in (2, 3) or (size.dim() == 3 and size.shape[2] != 1):
        raise ValueError(f"size must have shape [{rows}, N] or [{rows}, N, 1] matching x {tuple(x.shape)}, "
                         f"got {tuple(size.shape)}")


def _check_plan(plan, rows: int, tokens: int) -> None:
    """``plan`` is a :class:`MergePlan` whose index tensors fit ``rows`` clips of ``tokens`` tokens.

    Shapes and dtypes only; the index values are trusted (checking them would read them back).
    """
    if not isinstance(plan, MergePlan):
        raise TypeError(f"plan must be a MergePlan from tempme_fast.ops.match, got {type(plan).__name__}")
    if plan.tokens != tokens or plan.merged.dim() != 2 or plan.merged.shape[0] != rows:
        raise ValueError(f"plan was made for [B'={plan.merged.shape[0]}, N={plan.tokens}] but x has "
                         f"B'={rows}, N={tokens}")
    _check_int("plan.protected", plan.protected, 0, tokens - 2, f" for N={tokens}")
    na, _ = split_sizes(tokens, plan.protected)
    r = plan.merged.shape[1]
    expected = {"merged": (rows, r), "dst": (rows, r), "kept": (rows, na - r)}
    for field, shape in expected.items():
        t = getattr(plan, field)
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or tuple(t.shape) != shape:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"plan.{field} must be an int64 tensor of shape {list(shape)} (B', "
                             f"{'r' if field != 'kept' else 'Na - r'}) for N={tokens}, "
                             f"protected={plan.protected}; got {got}")


def best_match(metric: torch.Tensor, protected: int, backend: str = "auto", *,
               check_finite: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Best cosine match in set B for every token of set A.

    Args:
        metric: ``[B', N, C]`` float tensor (float16, bfloat16, float32, float64), any strides.
        protected: class tokens at the front, never matched, ``0 <= protected <= N - 2``.
        check_finite: also refuse a metric holding NaN or Inf (a host synchronisation).
    Returns:
        ``scores [B', Na]`` float32 (float64 for float64 input) and ``dst [B', Na]`` int64.
    """
    _check_tokens("metric", metric, protected)
    if check_finite:
        assert_finite("metric", metric)
    if resolve_backend(backend, metric) == "triton":
        return _triton_ops().best_match(metric, protected)
    return reference.best_match(metric, protected)


def match(metric: torch.Tensor, r: int, protected: int, backend: str = "auto", *,
          check_finite: bool = False) -> MergePlan:
    """Plan one bipartite merge that removes ``r`` tokens (no gradient flows through it).

    Args:
        metric: ``[B', N, C]`` float tensor (float16, bfloat16, float32, float64), any strides.
        r: tokens to remove, ``0 <= r <= (N - protected) // 2``.
        protected: class tokens at the front, never merged, ``0 <= protected <= N - 2``.
        check_finite: also refuse a metric holding NaN or Inf (a host synchronisation). A NaN
            metric has no well-defined ranking, so the two backends may plan differently.
    """
    _check_tokens("metric", metric, protected)
    if check_finite:
        assert_finite("metric", metric)
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int, got {r!r}")
    limit = max_r(metric.shape[1], protected)
    if not 0 <= r <= limit:
        raise ValueError(f"r={r} must be in [0, (N - protected) // 2] = [0, {limit}] for N={metric.shape[1]}, "
                         f"protected={protected}")
    if resolve_backend(backend, metric) == "triton":
        return _triton_ops().match(metric, r, protected)
    return reference.match(metric, r, protected)


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
    if not isinstance(plan, MergePlan):
        raise TypeError(f"plan must be a MergePlan from tempme_fast.ops.match, got {type(plan).__name__}")
    _check_tokens("x", x, plan.protected)
    _check_size(size, x, "B'")
    if size.dtype not in FLOAT_DTYPES:
        raise TypeError(f"size has dtype {size.dtype}; valid: float32 (recommended), float64, float16, bfloat16")
    _check_plan(plan, x.shape[0], x.shape[1])
    devices = {x.device, size.device, plan.merged.device, plan.dst.device, plan.kept.device}
    if len(devices) > 1:
        raise ValueError(f"x ({x.device}), size ({size.device}) and plan ({plan.merged.device}) must be "
                         f"on one device")
    if check_finite:
        assert_finite("x", x)
        assert_finite("size", size)
        if not bool((size > 0).all()):
            raise ValueError(f"size holds {int((size <= 0).sum())} value(s) <= 0; every size (original "
                             f"tokens a token stands for) must be positive")
    if plan.r == 0:
        return x, size
    if resolve_backend(backend, x) == "triton":
        return _triton_ops().merge(x, size, plan)
    return reference.merge(x, size, plan)


def _check_join(x: torch.Tensor, group: int, protected: int, frame_pos: Optional[torch.Tensor]) -> None:
    """Shape checks of a clip join (nothing is read from the device)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape [B * F, N, ...] (at least 2 dims), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"x is an empty batch (shape {tuple(x.shape)}); give at least one clip")
    _check_int("group", group, 1)
    if x.shape[0] % group:
        raise ValueError(f"cannot join groups of {group} clips: the batch holds {x.shape[0]} clips "
                         f"(group must divide it)")
    _check_int("protected", protected, 0, x.shape[1], f" for x with N={x.shape[1]} tokens")
    if frame_pos is not None:
        if not isinstance(frame_pos, torch.Tensor):
            raise TypeError(f"frame_pos must be a torch.Tensor or None, got {type(frame_pos).__name__}")
        clips = frame_pos.shape[1] if frame_pos.dim() == 4 else 0
        if (x.dim() != 3 or frame_pos.dim() != 4 or frame_pos.shape[0] != 1 or frame_pos.shape[2] != 1
                or frame_pos.shape[3] != x.shape[2] or clips == 0 or clips % group or x.shape[0] % clips):
            raise ValueError(f"frame_pos must have shape [1, F, 1, D] for x [B * F, N, D] = "
                             f"{list(x.shape)}, with F clips per video a multiple of group={group} that "
                             f"divides the {x.shape[0]} clips; got {tuple(frame_pos.shape)}")
        if frame_pos.device != x.device:
            raise ValueError(f"frame_pos is on {frame_pos.device} but x is on {x.device}")


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
    _check_join(x, group, protected, frame_pos)
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
    _check_tokens("x", x, 0)  # protected is checked against the joined clip below (by _check_join and r)
    _check_size(size, x, "B * F")
    _check_int("group", group, 1)
    _check_int("r", r, 0, max_r(x.shape[1] * group, protected * group),
               f" (half the unprotected tokens of a joined clip of {group} x {x.shape[1]} tokens)")
    if check_finite:
        assert_finite("x", x)
    _check_join(x, group, protected, frame_pos)
    triton = resolve_backend(backend, x) == "triton"
    # r = 0 is a plain join: no merge, so no reordering into the merge's output order either.
    if r > 0 and triton:
        return _triton_ops().join_merge(x, size, group, protected, r, frame_pos)
    joined = reference.join_clips(x, group, protected, frame_pos)
    joined_size = reference.join_clips(size, group, protected)
    # The metric of the cross-clip merge is the hidden states without frame_pos.
    plan = reference.match(reference.join_clips(x.detach(), group, protected), r, protected * group)
    if r == 0:
        return joined, joined_size, plan
    return (*reference.merge(joined, joined_size, plan), plan)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: Optional[torch.Tensor] = None,
              impl: str = "auto", backend: str = "auto") -> torch.Tensor:
    """Proportional attention on ``[B', H, N, d]`` (see :func:`reference.attention`).

    ``size`` is ``[B', N]`` or ``[B', N, 1]`` of positive sizes, or None for plain attention (pass
    None where every size is 1: no bias lets SDPA use its flash kernel). ``impl`` is one of
    ``ATTENTION_IMPLS`` (see :mod:`.attention_impl`); ``"auto"`` follows ``backend``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B', H, N, d] (4 dims), got {tuple(t.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must agree: "
                         f"[B', H, N, d] with k and v sharing N and q and k sharing d")
    if size is not None:
        if not isinstance(size, torch.Tensor):
            raise TypeError(f"size must be a torch.Tensor or None, got {type(size).__name__}")
        if (size.dim() not in (2, 3) or size.shape[:2] != (k.shape[0], k.shape[2])
                or (size.dim() == 3 and size.shape[2] != 1)):
            raise ValueError(f"size must have shape [B', N] or [B', N, 1] = [{k.shape[0]}, {k.shape[2]}(, 1)] "
                             f"for k {tuple(k.shape)}, got {tuple(size.shape)}")
    devices = {t.device for t in (q, k, v) + ((size,) if size is not None else ())}
    if len(devices) > 1:
        raise ValueError(f"q, k, v and size must be on one device, got {sorted(map(str, devices))}")
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"impl={impl!r} is not an attention implementation; valid: {ATTENTION_IMPLS}")
    if impl == "triton" and (q.dtype not in (torch.float16, torch.bfloat16, torch.float32)
                             or k.dtype != q.dtype or v.dtype != q.dtype):
        raise TypeError(f"impl='triton' needs q, k, v of one dtype among float16, bfloat16, float32; got "
                        f"{q.dtype}, {k.dtype}, {v.dtype} (use impl='sdpa' or 'fold')")
    on_triton = resolve_backend("triton" if impl == "triton" else backend, q) == "triton"
    # "auto" takes the kernel on a GPU only: in the interpreter it is right but slow.
    return attention_impl.attention(q, k, v, size, impl, on_triton and q.is_cuda)
