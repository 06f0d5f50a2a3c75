"""Input checks of the op boundary: one function per op, shared by both backends.

Each reads shapes, dtypes and devices only, never values, so it costs no host synchronisation;
:func:`assert_finite` is the one exception, run only on request. A wrong input raises a
``ValueError`` or ``TypeError`` that names the argument and the valid range.
"""
from __future__ import annotations

from typing import Optional

import torch

from .reference import MergePlan, max_r, split_sizes

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

__all__ = ["FLOAT_DTYPES", "assert_finite", "check_attention", "check_heads", "check_int", "check_join",
           "check_join_merge", "check_merge", "check_metric", "check_norm", "check_plan", "check_r",
           "check_self_attention", "check_size", "check_tokens"]


def check_int(name: str, value, low: int, high: Optional[int] = None, what: str = "") -> None:
    """``value`` is an int in ``[low, high]`` (no upper bound when ``high`` is None)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        valid = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}={value} must be {'in ' if high is not None else ''}{valid}{what}")


def _check_float_3d(name: str, t: torch.Tensor, shape: str) -> None:
    """``t`` a float tensor of 3 dims, named ``shape`` in the message (``"[B', N, C]"``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name} must have shape {shape} (3 dims), got {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; valid: float32, float16, bfloat16, float64")


def check_tokens(name: str, t: torch.Tensor, protected: int) -> None:
    _check_float_3d(name, t, "[B', N, C]")
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


def check_size(size: torch.Tensor, x: torch.Tensor, rows: str) -> None:
    """``size`` is a tensor of shape ``[rows, N]`` or ``[rows, N, 1]`` matching ``x [rows, N, D]``."""
    if not isinstance(size, torch.Tensor):
        raise TypeError(f"size must be a torch.Tensor, got {type(size).__name__}")
    if size.shape[:2] != x.shape[:2] or size.dim() not in (2, 3) or (size.dim() == 3 and size.shape[2] != 1):
        raise ValueError(f"size must have shape [{rows}, N] or [{rows}, N, 1] matching x {tuple(x.shape)}, "
                         f"got {tuple(size.shape)}")
    if size.requires_grad and torch.is_grad_enabled():  # (the Triton merge takes none, the reference one did)
        raise ValueError("size requires grad, but a merge carries no gradient to token sizes (counts of tokens): "
                         "pass size.detach()")


def check_plan(plan, rows: int, tokens: int) -> None:
    """``plan`` is a :class:`MergePlan` whose index tensors fit ``rows`` clips of ``tokens`` tokens.

    Shapes and dtypes only; the index values are trusted (checking them would read them back).
    """
    if not isinstance(plan, MergePlan):
        raise TypeError(f"plan must be a MergePlan from tempme_fast.ops.match, got {type(plan).__name__}")
    if plan.tokens != tokens or plan.merged.dim() != 2 or plan.merged.shape[0] != rows:
        raise ValueError(f"plan was made for [B'={plan.merged.shape[0]}, N={plan.tokens}] but x has "
                         f"B'={rows}, N={tokens}")
    check_int("plan.protected", plan.protected, 0, tokens - 2, f" for N={tokens}")
    na, nb = split_sizes(tokens, plan.protected)
    r = plan.merged.shape[1]
    fields = [("merged", plan.merged, (rows, r), "r"), ("dst", plan.dst, (rows, r), "r"),
              ("kept", plan.kept, (rows, na - r), "Na - r")]
    if (plan.src is None) != (plan.offsets is None):
        raise ValueError("plan.src and plan.offsets must both be given (the grouping of tempme_fast.ops.match) "
                         "or both be None")
    if plan.src is not None:
        fields += [("src", plan.src, (rows, r), "r"), ("offsets", plan.offsets, (rows, nb + 1), "Nb + 1")]
    # (torch.Size compares equal to a tuple: no conversion, this runs at every merge.)
    for field, t, shape, width in fields:
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.shape != shape:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"plan.{field} must be an int64 tensor of shape {list(shape)} (B', {width}) for "
                             f"N={tokens}, protected={plan.protected}; got {got}")


def check_join(x: torch.Tensor, group: int, protected: int, frame_pos: Optional[torch.Tensor]) -> None:
    """Shape checks of a clip join (nothing is read from the device)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape [B * F, N, ...] (at least 2 dims), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"x is an empty batch (shape {tuple(x.shape)}); give at least one clip")
    check_int("group", group, 1)
    if x.shape[0] % group:
        raise ValueError(f"cannot join groups of {group} clips: the batch holds {x.shape[0]} clips "
                         f"(group must divide it)")
    check_int("protected", protected, 0, x.shape[1], f" for x with N={x.shape[1]} tokens")
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
        if frame_pos.dtype != x.dtype:  # (else the result's dtype would depend on the backend)
            raise ValueError(f"frame_pos is {frame_pos.dtype} but x is {x.dtype}: pass frame_pos.to(x.dtype), as "
                             f"the patched model does")


def check_heads(heads, channels: int) -> None:
    """``heads`` an int >= 1 that divides a metric's ``channels``: the heads a match averages it over."""
    check_int("heads", heads, 1)
    if channels % heads:
        raise ValueError(f"heads={heads} must divide the metric's {channels} channels: the metric is averaged "
                         f"over heads groups of equal width")


def check_metric(metric: torch.Tensor, protected: int, check_finite: bool, heads: int = 1) -> None:
    """The metric of a match, averaged over ``heads`` groups of its channels; with ``check_finite``
    also its values."""
    check_tokens("metric", metric, protected)
    if heads.__class__ is not int or heads < 1 or metric.shape[2] % heads:  # (no call on the hot path)
        check_heads(heads, metric.shape[2])
    if check_finite:
        assert_finite("metric", metric)


def check_r(r, tokens: int, protected: int) -> None:
    """``r`` is an int in ``[0, (N - protected) // 2]``: one merge removes at most half the patches."""
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int, got {r!r}")
    limit = max_r(tokens, protected)
    if not 0 <= r <= limit:
        raise ValueError(f"r={r} must be in [0, (N - protected) // 2] = [0, {limit}] for N={tokens}, "
                         f"protected={protected}")


def check_merge(x: torch.Tensor, size: torch.Tensor, plan: MergePlan, check_finite: bool) -> None:
    """Inputs of :func:`tempme_fast.ops.merge`; with ``check_finite`` also their values."""
    if not isinstance(plan, MergePlan):
        raise TypeError(f"plan must be a MergePlan from tempme_fast.ops.match, got {type(plan).__name__}")
    check_tokens("x", x, plan.protected)
    check_size(size, x, "B'")
    if size.dtype not in FLOAT_DTYPES:
        raise TypeError(f"size has dtype {size.dtype}; valid: float32 (recommended), float64, float16, bfloat16")
    check_plan(plan, x.shape[0], x.shape[1])
    device = x.device
    on_device = device == size.device == plan.merged.device == plan.dst.device == plan.kept.device
    if not on_device or (plan.src is not None and not device == plan.src.device == plan.offsets.device):
        raise ValueError(f"x ({x.device}), size ({size.device}) and plan ({plan.merged.device}) must be "
                         f"on one device")
    if check_finite:
        assert_finite("x", x)
        assert_finite("size", size)
        if not bool((size > 0).all()):
            raise ValueError(f"size holds {int((size <= 0).sum())} value(s) <= 0; every size (original "
                             f"tokens a token stands for) must be positive")


def check_norm(weight: torch.Tensor, bias: torch.Tensor, eps: float, x: torch.Tensor) -> None:
    """LayerNorm parameters for ``x [B', N, D]``: ``weight`` and ``bias`` float ``[D]`` on x's device, ``eps > 0``."""
    width = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [D] = [{width}], got {type(t).__name__}")
        if tuple(t.shape) != (width,):
            raise ValueError(f"{name} must have shape [D] = [{width}] (the features of x), got {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; valid: float32, float16, bfloat16, float64")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; both must be on one device")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps={eps!r} must be a positive float (LayerNorm's variance epsilon, e.g. 1e-5)")


def check_residual(residual: Optional[torch.Tensor], x: torch.Tensor, check_finite: bool) -> None:
    """An optional ``residual`` added to ``x``: a tensor of x's shape, dtype and device."""
    if residual is None:
        return
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual must be None or a torch.Tensor of x's shape {tuple(x.shape)}, got "
                        f"{type(residual).__name__}")
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if residual.dtype != x.dtype:
        raise TypeError(f"residual has dtype {residual.dtype} but x has {x.dtype}; both must have one dtype")
    if residual.device != x.device:
        raise ValueError(f"residual is on {residual.device} but x is on {x.device}; both must be on one device")
    if check_finite:
        assert_finite("residual", residual)


def check_add_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   check_finite: bool) -> None:
    """Inputs of :func:`tempme_fast.ops.add_norm`: ``x [B', N, D]`` float with at least one token and
    one feature, ``residual`` of x's shape, dtype and device, LayerNorm parameters for ``D``."""
    _check_float_3d("x", x, "[B', N, D]")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}); give B', N and D >= 1")
    if residual is None:
        raise TypeError(f"residual must be a torch.Tensor of x's shape {tuple(x.shape)}, got None")
    check_residual(residual, x, check_finite)
    check_norm(weight, bias, eps, x)
    if check_finite:
        assert_finite("x", x)


def check_embed_norm(patches: torch.Tensor, class_embedding: torch.Tensor, positional_embedding: torch.Tensor,
                     weight: torch.Tensor, bias: torch.Tensor, eps: float) -> None:
    """Inputs of :func:`tempme_fast.ops.embed_norm`: ``patches [M, P, D]`` float with at least one frame and one
    feature, ``class_embedding [D]`` and ``positional_embedding [P + 1, D]`` float on its device, LayerNorm
    parameters for ``D``."""
    _check_float_3d("patches", patches, "[M, P, D]")
    if patches.shape[0] == 0 or patches.shape[2] == 0:
        raise ValueError(f"patches is empty (shape {tuple(patches.shape)}); give M and D >= 1")
    frames, count, width = patches.shape
    for name, t, shape in (("class_embedding", class_embedding, (width,)),
                           ("positional_embedding", positional_embedding, (count + 1, width))):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {list(shape)}, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)} (the class token and {count} patches of "
                             f"{width} features), got {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; valid: float32, float16, bfloat16, float64")
        if t.device != patches.device:
            raise ValueError(f"{name} is on {t.device} but patches is on {patches.device}; both must be on one "
                             f"device")
    check_norm(weight, bias, eps, patches)


def check_linear_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: str,
                     activations) -> None:
    """Inputs of :func:`tempme_fast.ops.linear_act`: ``x [..., K]`` float with at least one row, ``weight [N, K]``
    and ``bias [N]`` (or None) float on x's device, ``act`` one of ``activations``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [..., K], got {type(x).__name__}")
    if x.dim() < 2 or x.numel() == 0:
        raise ValueError(f"x must be [..., K] with at least one row and one feature, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; valid: float32, float16, bfloat16, float64")
    k = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; valid: float32, float16, bfloat16, float64")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; both must be on one device")
    if weight.dim() != 2 or weight.shape[1] != k or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape [N, {k}] (N >= 1; x has {k} features), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}] (one per output feature) or be None, "
                         f"got {tuple(bias.shape)}")
    if act not in activations:
        raise ValueError(f"act={act!r}: valid: {', '.join(repr(a) for a in activations)}")


def check_join_merge(x: torch.Tensor, size: torch.Tensor, group: int, protected: int, r: int,
                     frame_pos: Optional[torch.Tensor], check_finite: bool) -> None:
    """Inputs of :func:`tempme_fast.ops.join_merge`; with ``check_finite`` also the values of ``x``."""
    check_tokens("x", x, 0)  # protected is checked against the joined clip below (by check_join and r)
    check_size(size, x, "B * F")
    check_int("group", group, 1)
    check_int("r", r, 0, max_r(x.shape[1] * group, protected * group),
              f" (half the unprotected tokens of a joined clip of {group} x {x.shape[1]} tokens)")
    if check_finite:
        assert_finite("x", x)
    check_join(x, group, protected, frame_pos)


def check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: Optional[torch.Tensor]) -> None:
    """``q, k, v [B', H, N, d]`` that agree, and ``size`` ``[B', N]`` / ``[B', N, 1]`` or None, on one device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B', H, N, d] (4 dims), got {tuple(t.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or not q.shape[3] == k.shape[3] == v.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must agree: "
                         f"[B', H, N, d] with k and v sharing N and all three sharing d")
    _check_attention_size(size, k.shape[0], k.shape[2], f"k {tuple(k.shape)}")
    devices = {t.device for t in (q, k, v) + ((size,) if size is not None else ())}
    if len(devices) > 1:
        raise ValueError(f"q, k, v and size must be on one device, got {sorted(map(str, devices))}")


def _check_attention_size(size: Optional[torch.Tensor], rows: int, tokens: int, of: str) -> None:
    if size is None:
        return
    if not isinstance(size, torch.Tensor):
        raise TypeError(f"size must be a torch.Tensor or None, got {type(size).__name__}")
    if size.dim() not in (2, 3) or size.shape[:2] != (rows, tokens) or (size.dim() == 3 and size.shape[2] != 1):
        raise ValueError(f"size must have shape [B', N] or [B', N, 1] = [{rows}, {tokens}(, 1)] for {of}, "
                         f"got {tuple(size.shape)}")


def check_self_attention(qkv: torch.Tensor, heads: int, size: Optional[torch.Tensor]) -> None:
    """``qkv [B', N, 3 * D]`` (the packed q | k | v projection, ``D`` divisible by ``heads``) and
    ``size`` ``[B', N]`` / ``[B', N, 1]`` or None, on one device."""
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    check_int("heads", heads, 1)
    if qkv.dim() != 3 or qkv.shape[2] % (3 * heads):
        raise ValueError(f"qkv must have shape [B', N, 3 * D] with D divisible by heads={heads}, got "
                         f"{tuple(qkv.shape)}")
    _check_attention_size(size, qkv.shape[0], qkv.shape[1], f"qkv {tuple(qkv.shape)}")
    if size is not None and size.device != qkv.device:
        raise ValueError(f"size is on {size.device} but qkv is on {qkv.device}; both must be on one device")


def check_query_attention(q: torch.Tensor, kv: torch.Tensor, heads: int, size: Optional[torch.Tensor]) -> None:
    """``q [B', M, D]`` (``D`` divisible by ``heads``), ``kv [B', N, 2 * D]`` (the packed k | v projection)
    of q's dtype, and ``size`` ``[B', N]`` / ``[B', N, 1]`` or None, on one device."""
    for name, t in (("q", q), ("kv", kv)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_int("heads", heads, 1)
    if q.dim() != 3 or q.shape[2] % heads:
        raise ValueError(f"q must have shape [B', M, D] with D divisible by heads={heads}, got {tuple(q.shape)}")
    if kv.dim() != 3 or kv.shape[0] != q.shape[0] or kv.shape[2] != 2 * q.shape[2]:
        raise ValueError(f"kv must have shape [B', N, 2 * D] = [{q.shape[0]}, N, {2 * q.shape[2]}] for q "
                         f"{tuple(q.shape)}, got {tuple(kv.shape)}")
    if kv.dtype != q.dtype:
        raise TypeError(f"kv has dtype {kv.dtype} but q has {q.dtype}; both must have one dtype")
    _check_attention_size(size, kv.shape[0], kv.shape[1], f"kv {tuple(kv.shape)}")
    devices = {t.device for t in (q, kv) + ((size,) if size is not None else ())}
    if len(devices) > 1:
        raise ValueError(f"q, kv and size must be on one device, got {sorted(map(str, devices))}")
