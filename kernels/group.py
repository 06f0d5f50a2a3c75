"""Merged tokens grouped by destination: ``src`` sorted by (destination, rank) and ``offsets``.

Twin: ``tempme_fast.ops.reference.group_sources``. A merge reduces every B token ``j`` with the
merged A tokens ``src[offsets[j]:offsets[j + 1]]``, in rank order; with this grouping written
once per clip, each reducing program finds its sources in two loads instead of scanning all the
clip's destinations, and sums them in a fixed order (no atomics, the same sums on every run).

Two ways to write it for one clip:
- ``_group_row_sorted``: one sort in registers of the ``R`` merged tokens by (destination, rank),
  which is ``src``, and one histogram of their destinations, whose exclusive prefix sum is
  ``offsets``. ``log2(w) (log2(w) + 1) / 2`` register stages for ``w = next_power_of_2(R)``.
- ``_group_rows_counted``: counting in ``BLOCK_J x BLOCK_K`` tiles (``_tile_counts``,
  ``_tile_sources``), for rows too wide to sort in registers, and for ``_merge_index_kernel``,
  which spreads the destination blocks over programs.
"""
import triton
import triton.language as tl


@triton.jit
def _tile_counts(dst_row, R, j, j_first, BLOCK_K: tl.constexpr):
    """``(lo, count)`` per B token ``j`` of one tile (``j_first`` is the tile's first B index, ``j``
    increasing by one along the tile, entries that are no B token may hold anything that no
    destination equals): its sources sit at ``src[lo:lo + count]`` of the merged tokens sorted by
    (destination, rank). One pass over the ``R`` destinations, ``R / BLOCK_K`` steps of
    ``BLOCK_J x BLOCK_K``: each tile counts only its own tokens, and ``lo`` is the count of
    destinations below the tile plus a prefix sum along the tile."""
    count = j * 0
    below = tl.sum(count, axis=0)
    for k0 in range(0, R, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        valid = offs_k < R
        d_k = tl.load(dst_row + offs_k, mask=valid, other=0)
        below += tl.sum((valid & (d_k < j_first)).to(tl.int32), axis=0)
        count += tl.sum(((d_k[None, :] == j[:, None]) & valid[None, :]).to(tl.int32), axis=1)
    lo = below + tl.cumsum(count, axis=0) - count
    return lo, count


@triton.jit
def _tile_sources(dst_row, merged_row, src_row, R, j, lo, BLOCK_K: tl.constexpr):
    """Writes the merged A tokens whose destination is one of this tile's B tokens ``j`` to
    ``src_row[lo_j + t]`` (``lo`` from ``_tile_counts``; ``t``: the source's place among those of
    ``j`` in rank order, i.e. in the order of ``merged_row``), as ints of ``src_row``'s dtype.
    A second pass of ``R / BLOCK_K`` steps: a running count along the merged tokens numbers each
    destination's sources."""
    seen = j * 0
    for k0 in range(0, R, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        valid = offs_k < R
        d_k = tl.load(dst_row + offs_k, mask=valid, other=-1)
        hit = (d_k[None, :] == j[:, None]) & valid[None, :]
        hits = hit.to(tl.int32)
        slot = lo[:, None] + seen[:, None] + tl.cumsum(hits, axis=1) - 1
        # Each merged token has one destination, so at most one row of its column is set: the
        # column sums are its slot and whether it belongs to the tile (one store per token).
        slot_k = tl.sum(tl.where(hit, slot, 0), axis=0)
        mine = tl.sum(hits, axis=0) > 0
        a = tl.load(merged_row + offs_k, mask=mine, other=0)
        tl.store(src_row + slot_k, a.to(src_row.dtype.element_ty), mask=mine)
        seen += tl.sum(hits, axis=1)


@triton.jit
def _group_block(merged_row, dst_row, src_row, offsets_row, R, NB, j_first, BLOCK_J: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Offsets of destinations ``j_first .. j_first + BLOCK_J - 1`` (up to ``NB``, whose offset is
    ``R``) and the slots of their sources."""
    offs_j = j_first + tl.arange(0, BLOCK_J)
    lo, _ = _tile_counts(dst_row, R, offs_j, j_first, BLOCK_K)
    tl.store(offsets_row + offs_j, lo.to(offsets_row.dtype.element_ty), mask=offs_j < NB + 1)
    _tile_sources(dst_row, merged_row, src_row, R, offs_j, lo, BLOCK_K)


@triton.jit
def _group_rows_counted(merged_row, dst_row, src_row, offsets_row, R, NB, BLOCK_J: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """The grouping of one clip by counting, one destination block after another."""
    for j0 in range(0, NB + 1, BLOCK_J):
        _group_block(merged_row, dst_row, src_row, offsets_row, R, NB, j0, BLOCK_J, BLOCK_K)


@triton.jit
def _group_row_sorted(merged_row, dst_row, src_row, offsets_row, R, NB, GROUP_BLOCK: tl.constexpr,
                      GROUP_BINS: tl.constexpr):
    """The grouping of one clip by one sort of its ``R <= GROUP_BLOCK`` merged tokens and one
    histogram of their destinations over ``NB + 1 <= GROUP_BINS`` bins.

    A source (rank ``k``, destination ``d``, A token ``a``) sorts as the key ``(d, k, a)``, its
    fields ``GROUP_BINS``, ``GROUP_BLOCK`` and ``GROUP_BINS`` wide (the launcher makes ``GROUP_BINS``
    exceed every A token too): the keys are distinct, so the order is the same on every run, and
    ``a`` rides in the key, loaded with ``d`` instead of gathered at the sorted ranks after the sort
    (one wait on memory, not two in turn). int32 keys where the three fields fit, int64 otherwise.
    ``offsets`` is the exclusive prefix sum of the destinations' counts (integer counts: exact in
    any order)."""
    offs = tl.arange(0, GROUP_BLOCK)
    is_src = offs < R
    d = tl.load(dst_row + offs, mask=is_src, other=0).to(tl.int32)
    a = tl.load(merged_row + offs, mask=is_src, other=0)
    KEYS: tl.constexpr = GROUP_BINS * GROUP_BLOCK * GROUP_BINS  # one past the largest key: the padding's
    KEY: tl.constexpr = tl.int32 if KEYS < 2147483648 else tl.int64
    key = (d.to(KEY) * GROUP_BLOCK + offs) * GROUP_BINS + a.to(KEY)
    key = tl.sort(tl.where(is_src, key, KEYS), descending=False)  # padding sorts last
    tl.store(src_row + offs, (key & (GROUP_BINS - 1)).to(src_row.dtype.element_ty), mask=is_src)
    count = tl.histogram(d, GROUP_BINS, mask=is_src)
    bins = tl.arange(0, GROUP_BINS)
    tl.store(offsets_row + bins, (tl.cumsum(count, axis=0) - count).to(offsets_row.dtype.element_ty),
             mask=bins < NB + 1)


@triton.jit
def _group_row(merged_row, dst_row, src_row, offsets_row, R, NB, GROUP_BLOCK: tl.constexpr, GROUP_BINS: tl.constexpr,
               BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    """The grouping of one clip's ``R`` merged tokens (``merged_row``, rank order) by destination
    (``dst_row``, each below ``NB``): ``src_row [R]`` and ``offsets_row [NB + 1]``. Sorted in
    registers when ``GROUP_BLOCK > 0``, else counted in ``BLOCK_J x BLOCK_K`` tiles."""
    if GROUP_BLOCK > 0:
        _group_row_sorted(merged_row, dst_row, src_row, offsets_row, R, NB, GROUP_BLOCK, GROUP_BINS)
    else:
        _group_rows_counted(merged_row, dst_row, src_row, offsets_row, R, NB, BLOCK_J, BLOCK_K)
