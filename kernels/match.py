"""The merge plan from best-match scores: which A tokens merge, where to, which stay.

Twin: ``tempme_fast.ops.reference.match`` (a stable descending sort). Here each A token finds its
rank by counting, ``rank_i = #{j : s_j > s_i or (s_j == s_i and j < i)}``, which is that sort's
position of ``i``; no sort and no host round trip. ``_plan_row`` is the plan of one clip: the
best-match kernel runs it in the last program of each clip (so a merge step's match is one
launch); ``_match_plan_kernel`` runs it alone, one program per clip.
"""
import triton
import triton.language as tl

from .rank import _stable_rank


@triton.jit
def _plan_row(scores_row, dst_row, merged_row, merged_dst_row, kept_row, NA, R, BLOCK: tl.constexpr):
    """Plan of one clip from its ``NA`` scores and best B tokens (``dst_row``: any int or float
    dtype holding integers); writes ``R`` merged A tokens (rank order) with their B tokens and the
    ``NA - R`` kept A tokens (increasing), all int64."""
    kept_base = 0
    # Blocks of i go in increasing order so that the kept tokens come out increasing: each block
    # writes its kept tokens after the ones the earlier blocks wrote.
    for i0 in range(0, NA, BLOCK):
        offs_i = i0 + tl.arange(0, BLOCK)
        mask_i = offs_i < NA
        s_i = tl.load(scores_row + offs_i, mask=mask_i, other=0.0)
        rank = _stable_rank(scores_row, NA, s_i, offs_i, BLOCK, True)
        is_merged = (rank < R) & mask_i
        is_kept = (rank >= R) & mask_i
        dst = tl.load(dst_row + offs_i, mask=is_merged, other=0).to(tl.int64)
        tl.store(merged_row + rank, offs_i.to(tl.int64), mask=is_merged)
        tl.store(merged_dst_row + rank, dst, mask=is_merged)
        kept_pos = kept_base + tl.cumsum(is_kept.to(tl.int32), axis=0) - 1
        tl.store(kept_row + kept_pos, offs_i.to(tl.int64), mask=is_kept)
        kept_base += tl.sum(is_kept.to(tl.int32), axis=0)


@triton.jit(do_not_specialize=["NA", "R"])
def _match_plan_kernel(
    scores_ptr,  # [B', Na] float32/float64 contiguous: best-match score of every A token
    dst_ptr,  # [B', Na] int64 contiguous: best B token of every A token
    merged_ptr,  # [B', r] int64 out: merged A tokens, highest score first
    merged_dst_ptr,  # [B', r] int64 out: their B tokens
    kept_ptr,  # [B', Na - r] int64 out: kept A tokens, increasing
    NA,
    R,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    _plan_row(scores_ptr + row * NA, dst_ptr + row * NA, merged_ptr + row * R, merged_dst_ptr + row * R,
              kept_ptr + row * (NA - R), NA, R, BLOCK)
