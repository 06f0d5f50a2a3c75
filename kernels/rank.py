"""Positions in a stable descending sort, found by counting instead of sorting (one program per row).

The merge plan of a short row, or of float64 scores (A tokens by descending score,
``match._plan_row_counting``), needs each element's place in a stable sort of the row; counting
the elements that come first costs ``n^2 / BLOCK`` vector steps and no synchronisation.
"""
import triton
import triton.language as tl


@triton.jit
def _stable_rank(row_ptr, n, values, offs, BLOCK: tl.constexpr):
    """For each ``values[k]`` (the row's element at index ``offs[k]``), how many of the row's ``n``
    elements come before it in a stable descending sort: larger values, and equal values at a lower
    index. int32, the shape of ``offs``."""
    rank = offs * 0
    for j0 in range(0, n, BLOCK):
        offs_j = j0 + tl.arange(0, BLOCK)
        mask_j = offs_j < n
        other = tl.load(row_ptr + offs_j, mask=mask_j, other=0)
        first = other[None, :] > values[:, None]
        tie = (other[None, :] == values[:, None]) & (offs_j[None, :] < offs[:, None])
        rank += tl.sum(((first | tie) & mask_j[None, :]).to(tl.int32), axis=1)
    return rank
