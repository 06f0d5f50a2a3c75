"""LayerNorm over whole feature rows, and the residual add before it fused with it.

Twin: ``tempme_fast.ops.reference.add_norm`` (and ``reference.layer_norm``). A transformer block
ends with ``x + mlp(ln_2(x))`` and the next block starts with ``ln_1`` of that sum: as two ops the
sum is written, then read back by the LayerNorm. ``_add_norm_fwd_kernel`` reads ``x`` and the
residual once and writes both the sum and its LayerNorm, and with ``STATS`` the LayerNorm's
statistics for its backward. ``_norm_rows`` is the LayerNorm itself, shared with the merge kernel's
output stage (``kernels/merge.py``, ``NORM``).

``_embed_norm_fwd_kernel`` (twin ``reference.embed_norm``) is the start of the vision tower: the class
embedding before each frame's patch embeddings, the position embedding added, and ``ln_pre``. As torch
ops that is a concatenation, an add and a LayerNorm, each writing a frame-sized tensor that the next reads
back; the kernel reads the patch embeddings once and writes only the LayerNorm, the residual stream's start.
"""
import triton
import triton.language as tl

from .tokens import _rounded_sum, _token_rows


@triton.jit
def _norm_rows(y, mask, offs_d, mask_d, w_ptr, b_ptr, D, EPS, ACC: tl.constexpr):
    """LayerNorm of the rows of ``y [BLOCK_T, BLOCK_D]`` (every feature of each row, ``BLOCK_D >= D``),
    in ``ACC``: it normalises ``y`` as given (already rounded to the stored dtype, as a LayerNorm
    reading it back would). Returns ``(ln, mean, rstd)``, the statistics per row in ``ACC``."""
    yf = tl.where(mask, y.to(ACC), 0.0)
    mean = tl.sum(yf, axis=1) / D
    centred = tl.where(mask, yf - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / D + EPS)
    w = tl.load(w_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    b = tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    return centred * rstd[:, None] * w[None, :] + b[None, :], mean, rstd


@triton.jit
def _store_stats(stats_ptr, rows_at, mean, rstd, ROWS, mask):
    """Writes a LayerNorm's statistics for its backward: ``mean`` at ``stats_ptr[rows_at]`` and
    ``rstd`` at ``stats_ptr[ROWS + rows_at]`` (the ``[2, ROWS]`` layout of ``native_layer_norm``'s
    two statistics outputs, side by side)."""
    tl.store(stats_ptr + rows_at, mean, mask=mask)
    tl.store(stats_ptr + ROWS + rows_at, rstd, mask=mask)


# The row count and the tokens per clip change from layer to layer; D and the strides keep their
# divisibility by 16, which lets the compiler emit 128-bit loads and stores along the features.
@triton.jit(do_not_specialize=["ROWS", "N"])
def _add_norm_fwd_kernel(
    x_ptr,  # [B', N, D] any strides
    res_ptr,  # [B', N, D] any strides: added to x
    w_ptr,  # [D] LayerNorm weight
    b_ptr,  # [D] LayerNorm bias
    sum_ptr,  # [B', N, D] contiguous out: x + residual, rounded to x's dtype
    ln_ptr,  # [B', N, D] contiguous out: layer_norm(sum)
    stats_ptr,  # [2, B' * N] ACC out if STATS: the LayerNorm's mean and 1 / std per token, for its backward
    ROWS,  # B' * N
    N,
    D,
    stride_xb,
    stride_xn,
    stride_xd,
    stride_rb,
    stride_rn,
    stride_rd,
    EPS,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STATS: tl.constexpr = False,
):
    """One program per ``BLOCK_T`` tokens (of all clips, in order), each with all ``D`` features."""
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask = (offs_t < ROWS)[:, None] & mask_d[None, :]
    clip, tok = offs_t // N, offs_t % N
    y = _token_rows(x_ptr, res_ptr, clip[:, None], tok[:, None], offs_d, mask, stride_xb, stride_xn, stride_xd,
                    stride_rb, stride_rn, stride_rd, True)
    out = (offs_t * D)[:, None] + offs_d[None, :]
    tl.store(sum_ptr + out, y, mask=mask)
    ln, mean, rstd = _norm_rows(y, mask, offs_d, mask_d, w_ptr, b_ptr, D, EPS, ACC)
    tl.store(ln_ptr + out, ln.to(ln_ptr.dtype.element_ty), mask=mask)
    if STATS:
        _store_stats(stats_ptr, offs_t, mean, rstd, ROWS, offs_t < ROWS)


@triton.jit(do_not_specialize=["ROWS", "N"])
def _embed_norm_fwd_kernel(
    patch_ptr,  # [M, N - 1, D] any strides: each frame's patch embeddings
    cls_ptr,  # [D] contiguous, the patches' dtype: the class embedding
    pos_ptr,  # [N, D] contiguous, the patches' dtype: the position embedding
    w_ptr,  # [D] LayerNorm weight
    b_ptr,  # [D] LayerNorm bias
    ln_ptr,  # [M, N, D] contiguous out: layer_norm(cat([cls, patches]) + pos)
    w2_ptr,  # [D] the next LayerNorm's weight (read only if NEXT)
    b2_ptr,  # [D] the next LayerNorm's bias (read only if NEXT)
    next_ptr,  # [M, N, D] contiguous out if NEXT: that LayerNorm of ln as stored
    ROWS,  # M * N
    N,
    D,
    stride_pb,
    stride_pn,
    stride_pd,
    EPS,
    EPS2,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NEXT: tl.constexpr = False,
):
    """One program per ``BLOCK_T`` tokens (of all frames, in order), each with all ``D`` features. Token 0
    of a frame is the class embedding, token ``t > 0`` the frame's patch ``t - 1``; the position embedding
    is added and rounded to the patches' dtype (as the add of torch tensors), then normalised. With ``NEXT``
    the LayerNorm that reads the result next (the first block's ``ln_1``) is applied to it as stored."""
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask = (offs_t < ROWS)[:, None] & mask_d[None, :]
    frame, tok = offs_t // N, offs_t % N
    is_patch = (tok > 0)[:, None]
    patch = tl.load((patch_ptr + frame * stride_pb + (tok - 1) * stride_pn)[:, None] + offs_d[None, :] * stride_pd,
                    mask=mask & is_patch, other=0.0)
    cls = tl.load(cls_ptr + offs_d, mask=mask_d, other=0.0)
    pos = tl.load(pos_ptr + (tok * D)[:, None] + offs_d[None, :], mask=mask, other=0.0)
    y = _rounded_sum(tl.where(is_patch, patch, cls[None, :]), pos)
    ln, _, _ = _norm_rows(y, mask, offs_d, mask_d, w_ptr, b_ptr, D, EPS, ACC)
    ln = ln.to(ln_ptr.dtype.element_ty)
    out = (offs_t * D)[:, None] + offs_d[None, :]
    tl.store(ln_ptr + out, ln, mask=mask)
    if NEXT:
        h, _, _ = _norm_rows(ln, mask, offs_d, mask_d, w2_ptr, b2_ptr, D, EPS2, ACC)
        tl.store(next_ptr + out, h.to(next_ptr.dtype.element_ty), mask=mask)
