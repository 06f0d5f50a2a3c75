"""The merge plan from best-match scores: which A tokens merge, where to, which stay.

Twin: ``tempme_fast.ops.reference.match`` (a stable descending sort). Here each A token finds its
rank by counting, ``rank_i = #{j : s_j > s_i or (s_j == s_i and j < i)}``, which is that sort's
position of ``i``; no sort, no host round trip, one program per clip.
"""
import triton
import triton.language as tl

from .rank import _stable_rank


@triton.jit(do_not_specialize=["NA", "R"])
def _match_plan_kernel(
    scores_ptr,  # [B', Na] float32/float64 contiguous: best-match score of every A token
    dst_ptr,  # [B', Na] int64 contiguous: best B token of every A token
    merged_ptr,  # [B', r] int64 out: merged A tokens, highest score first
    merged_dst_ptr,  # [B', r] int64 out: their B tokens
    kept_ptr,  # [B', Na - r] int64 out: kept A tokens, increasing
    NA,
    R,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    scores_row = scores_ptr + row * NA
    kept_base = 0
    # Blocks of i go in increasing order so that the kept tokens come out increasing: each block
    # writes its kept tokens after the ones the earlier blocks wrote.
    for i0 in range(0, NA, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        mask_i = offs_i < NA
        s_i = tl.load(scores_row + offs_i, mask=mask_i, other=0.0)
        rank = _stable_rank(scores_row, NA, s_i, offs_i, BLOCK_J, True)
        is_merged = (rank < R) & mask_i
        is_kept = (rank >= R) & mask_i
        dst = tl.load(dst_ptr + row * NA + offs_i, mask=is_merged, other=0)
        tl.store(merged_ptr + row * R + rank, offs_i.to(tl.int64), mask=is_merged)
        tl.store(merged_dst_ptr + row * R + rank, dst, mask=is_merged)
        kept_pos = kept_base + tl.cumsum(is_kept.to(tl.int32), axis=0) - 1
        tl.store(kept_ptr + row * (NA - R) + kept_pos, offs_i.to(tl.int64), mask=is_kept)
        kept_base += tl.sum(is_kept.to(tl.int32), axis=0)
