"""Segment reduce: every output token reduces its own input token with the tokens merged into it.

Twin: ``tempme_fast.tome.reference.segment_reduce``. The ToMe-style merges (``tempme_fast.tome``)
describe a merge by token positions rather than by the A/B alternation of ``merge.py``: output row
``o`` starts from input token ``out_pos[o]`` and absorbs the input tokens
``src[offsets[o]:offsets[o + 1]]`` (grouped by ``_merge_index_kernel`` beforehand, so every row
gathers its own sources in a fixed order: no atomics, the same sums on every run). That covers
ToMe's bipartite, k-th and random splits and any output order.

MODE 0 sums, MODE 1 averages (the row's own token counts once, as ``scatter_reduce(include_self=True)``),
MODE 2 is the size-weighted average with its sizes: ``sum(size * x) / sum(size)``; a row nothing
merged into is copied, not divided.

Compiled for sm_90 (triton 3.8, fp16 rows, BLOCK_T=32, BLOCK_D=128, D and the token strides divisible
by 16): 96 registers for the sum and mean, 128 for the weighted average, no spills, and the feature
rows load as ``ld.global.v4``. A row's own index, size and divisor are loaded once per tile, outside
the feature loop; the sources' indices (and sizes, for the weighted average) are reread by every
feature tile (6 tiles at D=768), small cached loads next to the feature rows.
"""
import triton
import triton.language as tl

SUM = 0
MEAN = 1
WAVG = 2


@triton.jit(do_not_specialize=["N_OUT", "R", "D", "stride_xb", "stride_sb"])
def _segment_reduce_fwd_kernel(
    x_ptr,  # [B', N, D] any float dtype, any strides
    size_ptr,  # [B', N] (a [B', N, 1] tensor's strides) float: token sizes, read only in MODE 2
    out_pos_ptr,  # [B', N_OUT] int64 contiguous: the input token each output row starts from
    src_ptr,  # [B', R] int32 contiguous: merged input tokens grouped by output row
    offsets_ptr,  # [B', N_OUT + 1] int32 contiguous: src[offsets[o]:offsets[o + 1]] merge into row o
    out_ptr,  # [B', N_OUT, D] contiguous out, x's dtype
    size_out_ptr,  # [B', N_OUT] contiguous out, size's dtype (written only in MODE 2)
    N_OUT,
    R,
    D,
    stride_xb,
    stride_xn,
    stride_xd,
    stride_sb,
    stride_sn,
    MODE: tl.constexpr,
    ACC: tl.constexpr,  # accumulation dtype: fp32, or fp64 for fp64 input
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < N_OUT
    tok = tl.load(out_pos_ptr + row * N_OUT + offs_t, mask=mask_t, other=0)
    lo = tl.load(offsets_ptr + row * (N_OUT + 1) + offs_t, mask=mask_t, other=0)
    count = tl.load(offsets_ptr + row * (N_OUT + 1) + offs_t + 1, mask=mask_t, other=0) - lo
    max_count = tl.max(count, axis=0)
    src_row = src_ptr + row * R + lo

    # Sizes (and with them the divisor) are loop invariants of the feature loop: computed once.
    s_self = tl.full([BLOCK_T], 1.0, dtype=ACC)
    if MODE == 2:
        s_self = tl.load(size_ptr + row * stride_sb + tok * stride_sn, mask=mask_t, other=1).to(ACC)
    s_total = s_self
    if MODE == 2:
        for t in range(0, max_count):
            has = t < count
            a = tl.load(src_row + t, mask=has, other=0).to(tl.int64)
            s_total += tl.load(size_ptr + row * stride_sb + a * stride_sn, mask=has, other=0).to(ACC)
        tl.store(size_out_ptr + row * N_OUT + offs_t, s_total.to(size_out_ptr.dtype.element_ty), mask=mask_t)
    merged_into = count > 0
    if MODE == 1:
        divisor = tl.where(merged_into, (count + 1).to(ACC), 1.0)
    else:
        divisor = tl.where(merged_into, s_total, 1.0)

    x_rows = x_ptr + row * stride_xb + tok * stride_xn
    out_rows = out_ptr + row * N_OUT * D + offs_t.to(tl.int64) * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        mask = mask_t[:, None] & mask_d[None, :]
        x_self = tl.load(x_rows[:, None] + offs_d[None, :] * stride_xd, mask=mask, other=0.0).to(ACC)
        acc = x_self * s_self[:, None]
        for t in range(0, max_count):
            has = t < count
            a = tl.load(src_row + t, mask=has, other=0).to(tl.int64)
            xa = tl.load(x_ptr + row * stride_xb + (a * stride_xn)[:, None] + offs_d[None, :] * stride_xd,
                         mask=has[:, None] & mask_d[None, :], other=0.0).to(ACC)
            if MODE == 2:
                s = tl.load(size_ptr + row * stride_sb + a * stride_sn, mask=has, other=0).to(ACC)
                xa = xa * s[:, None]
            acc += xa
        if MODE == 0:
            y = acc
        else:
            y = tl.where(merged_into[:, None], acc / divisor[:, None], x_self)
        tl.store(out_rows[:, None] + offs_d[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
