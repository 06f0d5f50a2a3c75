"""The merge plan from best-match scores: which A tokens merge, where to, which stay.

Twin: ``tempme_fast.ops.reference.match`` (a stable descending sort). ``_plan_row`` is the plan of
one clip: the best-match kernel runs it in the last program of each clip (so a merge step's match
is one launch, and there also groups the merged tokens by destination for the merge, ``group.py``);
``_match_plan_kernel`` runs it alone, one program per clip.

The plan of a clip is a sort of its ``Na`` scores, and it runs in one program after the clip's
last score is known, so its length is on the critical path of the match. ``_plan_row`` sorts
the whole row in registers (``tl.sort``, a bitonic network: ``O(log^2 Na)`` stages): each A token
becomes one int64 key, its score's bits made order-preserving above ``2^16 - 1 - i`` and its best B
token, so the keys are distinct and their descending order is the reference's order (higher score
first, lower index first on ties), and a sorted key names both tokens. Float64 scores do not fit
such a key next to an index, and a short row is ranked in a few steps anyway: those take
``_plan_row_counting``, where each A token finds its rank by counting,
``rank_i = #{j : s_j > s_i or (s_j == s_i and j < i)}`` (``(Na / BLOCK)^2`` steps, each loading and
reducing a ``BLOCK x BLOCK`` tile). The launcher picks the path
(``tempme_fast.ops.triton_ops.PLAN_SORT_MIN``).
"""
import triton
import triton.language as tl

from .group import _group_row
from .rank import _stable_rank


@triton.jit
def _plan_row_counting(scores_row, dst_row, merged_row, merged_dst_row, kept_row, NA, R, BLOCK: tl.constexpr):
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
        # Loaded with the scores for every token of the block, not after the ranks for the merged ones:
        # its wait is then the scores', not one more after the counting.
        dst = tl.load(dst_row + offs_i, mask=mask_i, other=0).to(tl.int64)
        rank = _stable_rank(scores_row, NA, s_i, offs_i, BLOCK)
        is_merged = (rank < R) & mask_i
        is_kept = (rank >= R) & mask_i
        tl.store(merged_row + rank, offs_i.to(tl.int64), mask=is_merged)
        tl.store(merged_dst_row + rank, dst, mask=is_merged)
        kept_pos = kept_base + tl.cumsum(is_kept.to(tl.int32), axis=0) - 1
        tl.store(kept_row + kept_pos, offs_i.to(tl.int64), mask=is_kept)
        kept_base += tl.sum(is_kept.to(tl.int32), axis=0)


@triton.jit
def _descending_key(s, i, d):
    """int64 key of score ``s`` (float32) at index ``i`` whose best B token is ``d`` (both below
    ``2^16``; ``d`` may be 0 for all): larger for a higher score, and for a lower index among equal
    scores. ``-0.0`` counts as ``0.0``, as in a float comparison. ``d`` rides in the lowest 16 bits,
    below the index: the keys are distinct without it, so it changes no order, and a sorted key
    names both tokens."""
    bits = tl.where(s == 0.0, 0.0, s).to(tl.int32, bitcast=True)
    # A negative float's magnitude bits grow as it falls: flipped, its bits order as signed ints.
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return ordered.to(tl.int64) * 4294967296 + (65535 - i.to(tl.int64)) * 65536 + d


@triton.jit
def _plan_row_sorted(scores_row, dst_row, merged_row, merged_dst_row, kept_row, NA, R, SORT_BLOCK: tl.constexpr,
                     DST_IN_KEY: tl.constexpr):
    """``_plan_row`` for float32 scores by sorting the row's keys in registers (``Na <= SORT_BLOCK``,
    at most ``2^16``). With ``DST_IN_KEY`` (best B tokens below ``2^16``, as a best-match row's are)
    the best B tokens are loaded with the scores and sorted inside the keys, not gathered at the
    sorted indices after the sort: the plan waits on memory once, not twice in turn."""
    offs = tl.arange(0, SORT_BLOCK)
    valid = offs < NA
    is_merged = offs < R
    s = tl.load(scores_row + offs, mask=valid, other=0.0)
    if DST_IN_KEY:
        d = tl.load(dst_row + offs, mask=valid, other=0).to(tl.int64)
    else:
        d = offs.to(tl.int64) * 0
    unsorted = _descending_key(s, offs, d)
    # Padding sorts last: the smallest int64, below every real key.
    key = tl.sort(tl.where(valid, unsorted, -4611686018427387904 * 2), descending=True)
    idx = 65535 - ((key >> 16) & 65535)
    if DST_IN_KEY:
        dst = key & 65535
    else:
        dst = tl.load(dst_row + idx, mask=is_merged, other=0).to(tl.int64)
    tl.store(merged_row + offs, idx, mask=is_merged)
    tl.store(merged_dst_row + offs, dst, mask=is_merged)
    # The kept tokens, wanted in increasing index, need no second sort: the keys are distinct, so
    # an A token is kept exactly when its key is below the R-th highest, and a prefix sum over the
    # row in index order places them.
    threshold = tl.max(tl.where(offs == R - 1, key, -4611686018427387904 * 2), axis=0)
    is_kept = valid & ((unsorted < threshold) | (R == 0))
    place = tl.cumsum(is_kept.to(tl.int32), axis=0) - 1
    tl.store(kept_row + place, offs.to(tl.int64), mask=is_kept)


@triton.jit
def _plan_row(scores_row, dst_row, merged_row, merged_dst_row, kept_row, src_row, offsets_row, NA, NB, R,
              BLOCK: tl.constexpr, SORT_BLOCK: tl.constexpr, GROUPING: tl.constexpr, GROUP_BLOCK: tl.constexpr,
              GROUP_BINS: tl.constexpr):
    """Plan of one clip from its ``NA`` scores and best B tokens (``dst_row``: any int or float
    dtype holding integers); writes ``R`` merged A tokens (rank order) with their B tokens and the
    ``NA - R`` kept A tokens (increasing), all int64. Sorted in registers when ``SORT_BLOCK > 0``,
    else counted in ``BLOCK``-wide steps. With ``GROUPING`` (the best-match kernel's, whose ``NB``
    B tokens are below ``2^16`` where it sorts) it then writes the merged tokens grouped by
    destination (``group._group_row``: ``src_row [R]``, ``offsets_row [NB + 1]``)."""
    if SORT_BLOCK > 0:
        _plan_row_sorted(scores_row, dst_row, merged_row, merged_dst_row, kept_row, NA, R, SORT_BLOCK, GROUPING)
    else:
        _plan_row_counting(scores_row, dst_row, merged_row, merged_dst_row, kept_row, NA, R, BLOCK)
    if GROUPING:
        tl.debug_barrier()  # the plan written above is read back by other threads of this program
        _group_row(merged_row, merged_dst_row, src_row, offsets_row, R, NB, GROUP_BLOCK, GROUP_BINS, BLOCK, BLOCK)


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
    SORT_BLOCK: tl.constexpr,  # sort width, next_power_of_2(Na); 0: count (float64, short or very long rows)
):
    row = tl.program_id(0).to(tl.int64)
    _plan_row(scores_ptr + row * NA, dst_ptr + row * NA, merged_ptr + row * R, merged_dst_ptr + row * R,
              kept_ptr + row * (NA - R), merged_ptr, merged_ptr, NA, 0, R, BLOCK, SORT_BLOCK, False, 0, 0)
