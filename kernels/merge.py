"""Size-weighted merge of a clip's tokens by a merge plan, forward and backward, without atomics.

Twin: ``tempme_fast.ops.reference.merge``. The reference scatter-adds the merged A tokens into
their B tokens; a scatter-add in parallel needs atomics and its float sums would change from run
to run. Instead the merged A tokens come grouped by destination (``group.py``: ``src`` sorted by
(destination, rank), ``offsets``; the match kernel writes them with the plan), so every B token
gathers its sources itself, in a fixed order.

Output order (as the spec): the ``c`` class tokens, the kept A tokens, then every B token.
A token ``i`` sits at position ``A_START + 2 * i`` of its clip, B token ``j`` at ``B_START + 2 * j``.

Both kernels give each program one tile of tokens and one ``BLOCK_D`` slice of the features (grid: clips
on axis 0, which holds any number of them, then feature slices, then token tiles, from the last in the forward
so that the B tokens, which gather the sources, start first), so the per-token work (indices, sizes, sources)
is done once per program, not once per feature chunk, and a single clip still spreads over many SMs. With ``NORM`` the forward also writes the LayerNorm of its output (the
block's ``ln_2``, twin ``reference.merge_norm``); its programs then span all features of a token.
With ``STATS`` as well, it writes that LayerNorm's mean and reciprocal standard deviation per token,
which the backward passes to aten's LayerNorm gradient instead of recomputing them.

With ``HAS_RES`` the forward merges ``x + residual`` (the block's residual add after attention),
reading both and rounding their sum to x's dtype as the add would, so the sum is never written.

A forward program sums each B token's sources one after another, ``SRC_CHUNK`` of them a step whose loads
are all issued before its first sum (a warp issues in order: a step waits out one chain of dependent loads,
not one a source), with scalars where a program has one token, which loads a step's source indices during the
step before (``SRC_STAGES`` pipelines that gather instead); or,
with ``SRC_BLOCK > 0``, it gathers its tile's sources ``SRC_BLOCK`` at a time, all loads of a chunk independent
of each other, and sums them into their destinations by one float32 product.
With ``SPLIT_T > 0`` it first copies its tile's tokens that nothing merges into, in x's dtype (with
``NORM``, and writes their LayerNorm), and then merges the B tokens that have sources ``SPLIT_T`` at a
time: the float32 sums are held for ``SPLIT_T`` tokens instead of the whole tile, so a program takes
fewer registers and more programs, each with its loads in flight, share an SM. Both paths write the same
merged tokens and sizes, bit for bit. The LayerNorm of ``NORM`` sums each row over a tile of another shape,
whose reduction order the compiler chooses per layout: on a GPU its last place may differ between the paths.

With ``GROUP > 1`` the clip being merged is the ClipMe join of ``GROUP`` input clips: the kernels
read (and the backward writes) the unjoined tensors through ``_joined_token`` and add the temporal
position embedding of each token's source clip on the fly, so the joined copy is never written.
"""
import triton
import triton.language as tl

from .group import _group_block
from .norm import _norm_rows, _store_stats
from .tokens import _joined_token, _token_rows


@triton.jit(do_not_specialize=["R", "NB"])
def _merge_index_kernel(
    merged_ptr,  # [B', r] int64 contiguous: merged A tokens
    dst_ptr,  # [B', r] int64 contiguous: their destinations (< NB)
    src_ptr,  # [B', r] int32/int64 out: merged A tokens sorted by (destination, rank)
    offsets_ptr,  # [B', NB + 1] src's dtype out: src[offsets[j]:offsets[j + 1]] merge into destination j
    R,
    NB,
    BLOCK_K: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """The grouping of merged tokens by destination on its own, for a plan that does not carry it
    (the match kernel writes it with the plan) and for ops that reduce by destination outside
    ``_merge_fwd_kernel``. One program per (``BLOCK_J`` destinations, row): each writes the
    offsets of its destinations and places their sources (grid: clips on axis 0, any number of them)."""
    row = tl.program_id(0).to(tl.int64)
    _group_block(merged_ptr + row * R, dst_ptr + row * R, src_ptr + row * R, offsets_ptr + row * (NB + 1), R, NB,
                 tl.program_id(1) * BLOCK_J, BLOCK_J, BLOCK_K)


@triton.jit
def _pos_rows(pos_ptr, row, clip, offs_d, mask, GROUP, CLIPS, stride_pc):
    """Feature slice ``offs_d`` of the temporal position embedding of input clips ``clip`` of joined clip
    ``row`` (0 where not ``mask``). A clip's place in its video is ``clip % CLIPS``; a join's ``GROUP`` clips
    are of one video (``check_join`` requires it), so that is ``(row * GROUP) % CLIPS``, one for the program,
    plus the clip's place in the join: no modulo a token (or a source) by a count known only at run time.
    ``clip`` is a column, ``[T, 1]``."""
    frame = (row * GROUP) % CLIPS + (clip - row * GROUP)
    return tl.load(pos_ptr + frame * stride_pc + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _index(src_at, k, limit):
    """Source ``k`` of ``src_at`` (pointers into ``src``: a column ``[T, 1]``, or one token's, a scalar) as int32,
    0 where ``k >= limit`` (the column's counts, or the token's)."""
    return tl.load(src_at + k, mask=k < limit, other=0).to(tl.int32)


@triton.jit
def _step_indices(src_at, t, limit, SRC_CHUNK: tl.constexpr):
    """The indices of a gather step's ``SRC_CHUNK`` sources ``t, t + 1, ...`` (:func:`_index`), four of them: those
    past the step's are the first again, not loaded."""
    i0 = _index(src_at, t, limit)
    i1, i2, i3 = i0, i0, i0
    if SRC_CHUNK >= 2:
        i1 = _index(src_at, t + 1, limit)
    if SRC_CHUNK >= 4:
        i2, i3 = _index(src_at, t + 2, limit), _index(src_at, t + 3, limit)
    return i0, i1, i2, i3


@triton.jit
def _source_rows(x_ptr, res_ptr, size_ptr, pos_ptr, a, has, row, offs_d, mask_d, A_START, GROUP, C_IN, N_IN, CLIPS,
                 stride_xb, stride_xn, stride_xd, stride_rb, stride_rn, stride_rd, stride_sb, stride_sn, stride_pc,
                 ACC: tl.constexpr, HAS_RES: tl.constexpr, HAS_POS: tl.constexpr):
    """The merged A tokens ``a`` (where ``has``), a column ``[T, 1]`` or one source (scalars): their sizes, of
    that shape, and feature slices ``offs_d`` (``[T, BLOCK_D]``, with the residual and the position embedding
    added), in ``ACC``; 0 where not ``has``."""
    a_clip, a_tok = _joined_token(row, A_START + 2 * a, GROUP, C_IN, N_IN)
    size = tl.load(size_ptr + a_clip * stride_sb + a_tok * stride_sn, mask=has, other=0).to(ACC)
    mask_a = has & mask_d[None, :]
    xa = _token_rows(x_ptr, res_ptr, a_clip, a_tok, offs_d, mask_a, stride_xb, stride_xn, stride_xd, stride_rb,
                     stride_rn, stride_rd, HAS_RES).to(ACC)
    if HAS_POS:
        xa += _pos_rows(pos_ptr, row, a_clip, offs_d, mask_a, GROUP, CLIPS, stride_pc).to(ACC)
    return size, xa


@triton.jit
def _added(acc, s_total, size, xa, ONE: tl.constexpr):
    """``acc`` and ``s_total`` with one source of each token added: ``size`` a column (or, ``ONE`` token,
    a scalar) and its rows ``xa``."""
    acc += xa * size
    if ONE:
        s_total += size
    else:
        s_total += tl.sum(size, axis=1)
    return acc, s_total


@triton.jit
def _step_sources(x_ptr, res_ptr, size_ptr, pos_ptr, i0, i1, i2, i3, t, limit, row, offs_d, mask_d, A_START, GROUP,
                  C_IN, N_IN, CLIPS, stride_xb, stride_xn, stride_xd, stride_rb, stride_rn, stride_rd, stride_sb,
                  stride_sn, stride_pc, ACC: tl.constexpr, HAS_RES: tl.constexpr, HAS_POS: tl.constexpr,
                  SRC_CHUNK: tl.constexpr):
    """:func:`_source_rows` of a gather step's sources ``t, t + 1, ...`` (indices ``i0``, ``i1``, ...; none past
    ``limit``), four of them at most (as :func:`_step_indices`: those past the step's are the first again, not
    loaded), their loads issued one after another before any is waited on: ``s0, x0, ..., s3, x3``."""
    s0, x0 = _source_rows(x_ptr, res_ptr, size_ptr, pos_ptr, i0, t < limit, row, offs_d, mask_d, A_START, GROUP, C_IN,
                          N_IN, CLIPS, stride_xb, stride_xn, stride_xd, stride_rb, stride_rn, stride_rd, stride_sb,
                          stride_sn, stride_pc, ACC, HAS_RES, HAS_POS)
    s1, x1, s2, x2, s3, x3 = s0, x0, s0, x0, s0, x0
    if SRC_CHUNK >= 2:
        s1, x1 = _source_rows(x_ptr, res_ptr, size_ptr, pos_ptr, i1, t + 1 < limit, row, offs_d, mask_d, A_START,
                              GROUP, C_IN, N_IN, CLIPS, stride_xb, stride_xn, stride_xd, stride_rb, stride_rn,
                              stride_rd, stride_sb, stride_sn, stride_pc, ACC, HAS_RES, HAS_POS)
    if SRC_CHUNK >= 4:
        s2, x2 = _source_rows(x_ptr, res_ptr, size_ptr, pos_ptr, i2, t + 2 < limit, row, offs_d, mask_d, A_START,
                              GROUP, C_IN, N_IN, CLIPS, stride_xb, stride_xn, stride_xd, stride_rb, stride_rn,
                              stride_rd, stride_sb, stride_sn, stride_pc, ACC, HAS_RES, HAS_POS)
        s3, x3 = _source_rows(x_ptr, res_ptr, size_ptr, pos_ptr, i3, t + 3 < limit, row, offs_d, mask_d, A_START,
                              GROUP, C_IN, N_IN, CLIPS, stride_xb, stride_xn, stride_xd, stride_rb, stride_rn,
                              stride_rd, stride_sb, stride_sn, stride_pc, ACC, HAS_RES, HAS_POS)
    return s0, x0, s1, x1, s2, x2, s3, x3


@triton.jit
def _step_added(acc, s_total, s0, x0, s1, x1, s2, x2, s3, x3, ONE: tl.constexpr, SRC_CHUNK: tl.constexpr):
    """:func:`_added` of a step's sources from :func:`_step_sources`, in rank order."""
    acc, s_total = _added(acc, s_total, s0, x0, ONE)
    if SRC_CHUNK >= 2:
        acc, s_total = _added(acc, s_total, s1, x1, ONE)
    if SRC_CHUNK >= 4:
        acc, s_total = _added(acc, s_total, s2, x2, ONE)
        acc, s_total = _added(acc, s_total, s3, x3, ONE)
    return acc, s_total


@triton.jit
def _merge_sums(x_ptr, res_ptr, size_ptr, pos_ptr, src_row, row, clip, tok, mask_t, lo, count, max_count, offs_d,
                mask_d, A_START, GROUP, C_IN, N_IN, CLIPS, stride_xb, stride_xn, stride_xd, stride_rb, stride_rn,
                stride_rd, stride_sb, stride_sn, stride_pc, ACC: tl.constexpr, HAS_RES: tl.constexpr,
                HAS_POS: tl.constexpr, SRC_STAGES: tl.constexpr, SRC_BLOCK: tl.constexpr,
                SRC_CHUNK: tl.constexpr):
    """Tokens ``(clip, tok)`` (where ``mask_t``), each with its sources ``src_row[lo:lo + count]``
    (``max_count``: the most of them): the size-weighted sums and the summed sizes, in ``ACC``, and
    the tokens' own rows (with the residual and the position embedding added). :func:`_merged` makes
    the mean of them."""
    mask = mask_t[:, None] & mask_d[None, :]
    s_self = tl.load(size_ptr + clip * stride_sb + tok * stride_sn, mask=mask_t, other=1).to(ACC)
    x_self = _token_rows(x_ptr, res_ptr, clip[:, None], tok[:, None], offs_d, mask, stride_xb, stride_xn, stride_xd,
                         stride_rb, stride_rn, stride_rd, HAS_RES).to(ACC)
    if HAS_POS:
        x_self += _pos_rows(pos_ptr, row, clip[:, None], offs_d, mask, GROUP, CLIPS, stride_pc).to(ACC)
    s_total = s_self
    acc = x_self * s_self[:, None]
    if SRC_BLOCK > 0:
        # The tile's sources sit together in src (sorted by destination): src[first:last]. Each chunk
        # of SRC_BLOCK is gathered in one go, with no load waiting on another source's, and summed into
        # its destinations by a product with the [BLOCK_T, SRC_BLOCK] matrix of their sizes (a source's
        # column holds its size in its destination's row, 0 elsewhere). The product runs on the FMA
        # units in float32 (ieee) and accumulates onto each token's own row times its size; where it
        # adds along the chunk in order (Triton's FMA product does), each destination adds its sources
        # in rank order, as the loop below does, and exact zeros for the others. An Inf in one source
        # would make the other sums of its chunk NaN (0 * Inf).
        has_src = count > 0
        last = tl.max(tl.where(has_src, lo + count, 0), axis=0)
        # A tile without sources runs no chunk: first == last == 0. (Not first = INT32_MAX: the
        # pipeliner's prologue issues the second chunk's loads where first + SRC_BLOCK < last, and
        # that sum wrapped negative, which read src before its start on the GPU.)
        first = tl.minimum(tl.min(tl.where(has_src, lo, 2147483647), axis=0), last)
        for k0 in range(first, last, SRC_BLOCK):
            k = k0 + tl.arange(0, SRC_BLOCK)
            s, xa = _source_rows(x_ptr, res_ptr, size_ptr, pos_ptr, _index(src_row, k[:, None], last),
                                 (k < last)[:, None], row, offs_d, mask_d, A_START, GROUP, C_IN, N_IN, CLIPS,
                                 stride_xb, stride_xn, stride_xd, stride_rb, stride_rn, stride_rd, stride_sb,
                                 stride_sn, stride_pc, ACC, HAS_RES, HAS_POS)
            into = has_src[:, None] & (k[None, :] >= lo[:, None]) & (k[None, :] < (lo + count)[:, None])
            w = tl.where(into, tl.sum(s, axis=1)[None, :], 0.0).to(ACC)
            acc = tl.dot(w, xa, acc, input_precision="ieee")
            s_total += tl.sum(w, axis=1)
    else:
        # (In tiles of several tokens, loading each source's index one step ahead by hand, to overlap it with
        # the previous source's rows, cost 14-28 registers on sm_90 and spilled 16-40 B in fp32 joins; one
        # token a program does it, below.) With SRC_STAGES > 1 Triton's pipeliner does it: the index and row
        # loads of the next sources become asynchronous copies into shared memory, issued while this source is
        # added.
        #
        # A warp issues in order, so a load it waits on stalls every instruction after it. With
        # SRC_CHUNK > 1 a step gathers that many sources of each token, every load of the step issued
        # before any sum waits on one: a step costs one chain of dependent loads (index, then size and
        # rows) where a source at a time costs one each; a destination with 75 sources (ViT-B/16's last
        # join, one video) waited out some 300 load latencies in turn. The sums are the same, in the same
        # order (benchmarks.codegen --loops counts the waits a step).
        #
        # One token a program (ONE) gathers with scalars. Gathered as a [T, 1] column, a source index
        # is loaded once for each layout it feeds (the rows', the sizes' sum), and ptxas waits on
        # each copy before loading the next (sm_90: three in turn a source at ViT-B/16's joins); a
        # scalar has no layout, so it is loaded once.
        tl.static_assert(SRC_CHUNK == 1 or SRC_CHUNK == 2 or SRC_CHUNK == 4 or SRC_CHUNK == 8,
                         "SRC_CHUNK: 1, 2, 4 or 8")
        ONE: tl.constexpr = lo.shape[0] == 1
        if ONE:  # (max_count is this token's count, 0 if it is not a B token)
            at, limit = src_row + tl.sum(lo, axis=0), max_count
        else:
            at, limit = (src_row + lo)[:, None], count[:, None]
        # One token a program (not pipelined) loads a step's indices during the step before, so a step waits on
        # its rows only, not on its indices first: with them loaded in the step, ptxas waited out 5-6 latencies
        # a step of 4 16-bit sources at the joins and 5 after attention (sm_90, triton 3.6), now 3.
        AHEAD: tl.constexpr = ONE and SRC_STAGES == 1
        # (SRC_CHUNK = 8: a second four, i4-i7, beside the first, each four gathered and added as 4 a step are.)
        if AHEAD:
            i0, i1, i2, i3 = _step_indices(at, 0, limit, SRC_CHUNK)
            if SRC_CHUNK == 8:
                i4, i5, i6, i7 = _step_indices(at, 4, limit, 4)
        for t in tl.range(0, max_count, SRC_CHUNK, num_stages=SRC_STAGES):
            if not AHEAD:
                i0, i1, i2, i3 = _step_indices(at, t, limit, SRC_CHUNK)
                if SRC_CHUNK == 8:
                    i4, i5, i6, i7 = _step_indices(at, t + 4, limit, 4)
            s0, x0, s1, x1, s2, x2, s3, x3 = _step_sources(
                x_ptr, res_ptr, size_ptr, pos_ptr, i0, i1, i2, i3, t, limit, row, offs_d, mask_d, A_START, GROUP,
                C_IN, N_IN, CLIPS, stride_xb, stride_xn, stride_xd, stride_rb, stride_rn, stride_rd, stride_sb,
                stride_sn, stride_pc, ACC, HAS_RES, HAS_POS, SRC_CHUNK)
            if SRC_CHUNK == 8:
                s4, x4, s5, x5, s6, x6, s7, x7 = _step_sources(
                    x_ptr, res_ptr, size_ptr, pos_ptr, i4, i5, i6, i7, t + 4, limit, row, offs_d, mask_d, A_START,
                    GROUP, C_IN, N_IN, CLIPS, stride_xb, stride_xn, stride_xd, stride_rb, stride_rn, stride_rd,
                    stride_sb, stride_sn, stride_pc, ACC, HAS_RES, HAS_POS, 4)
            if AHEAD:  # the next step's indices, loaded before this step's sums wait on its rows
                i0, i1, i2, i3 = _step_indices(at, t + SRC_CHUNK, limit, SRC_CHUNK)
                if SRC_CHUNK == 8:
                    i4, i5, i6, i7 = _step_indices(at, t + SRC_CHUNK + 4, limit, 4)
            acc, s_total = _step_added(acc, s_total, s0, x0, s1, x1, s2, x2, s3, x3, ONE, SRC_CHUNK)
            if SRC_CHUNK == 8:
                acc, s_total = _step_added(acc, s_total, s4, x4, s5, x5, s6, x6, s7, x7, ONE, 4)
    return acc, s_total, x_self


@triton.jit
def _merged(acc, s_total, x_self, count):
    """The size-weighted mean of the sums of :func:`_merge_sums`; tokens nothing merged into (class, kept,
    untouched B) are copied, not divided."""
    merged_into = count > 0
    return tl.where(merged_into[:, None], acc / tl.where(merged_into, s_total, 1.0)[:, None], x_self)


@triton.jit
def _store_norm(y, offs_t, mask_t, offs_d, mask_d, ln_w_ptr, ln_b_ptr, ln_ptr, stats_ptr, row, rows, N_OUT, D, EPS,
                ACC: tl.constexpr, STATS: tl.constexpr):
    """Writes the LayerNorm of merged tokens ``offs_t`` (where ``mask_t``), ``y`` as stored (every feature:
    ``BLOCK_D >= D``), and with ``STATS`` its statistics."""
    mask = mask_t[:, None] & mask_d[None, :]
    ln, mean, rstd = _norm_rows(y, mask, offs_d, mask_d, ln_w_ptr, ln_b_ptr, D, EPS, ACC)
    ln_rows = ln_ptr + row * N_OUT * D + offs_t.to(tl.int64) * D
    tl.store(ln_rows[:, None] + offs_d[None, :], ln.to(ln_ptr.dtype.element_ty), mask=mask)
    if STATS:
        _store_stats(stats_ptr, row * N_OUT + offs_t, mean, rstd, rows * N_OUT, mask_t)


# Only the counts that change from layer to layer are left unspecialised, and the size strides
# (sizes are read one per token, never as vectors): D and the x strides keep their divisibility
# by 16, which is what lets the compiler emit 128-bit loads and stores along the features. CLIPS
# too: specialised to 1 (one video, no position embedding), triton 3.6's sm_90 code for the
# 16-bit merge after attention spilled 16 B, where the unspecialised kernel does not.
@triton.jit(do_not_specialize=["N_OUT", "C", "NK", "NB", "A_START", "B_START", "N_IN", "CLIPS", "stride_sb",
                               "stride_kb", "stride_gb", "stride_ob"])
def _merge_fwd_kernel(
    x_ptr,  # [B' * GROUP, N_IN, D] any strides (a clip of N = GROUP * N_IN tokens)
    res_ptr,  # x's shape and dtype, any strides: added to x (read only if HAS_RES)
    size_ptr,  # [B' * GROUP, N_IN] or [B' * GROUP, N_IN, 1] any strides
    pos_ptr,  # [CLIPS, D] temporal position embedding added to x (read only if HAS_POS)
    kept_ptr,  # [B', Na - r] int64, row stride stride_kb: kept A tokens, increasing
    src_ptr,  # [B', r] int64, row stride stride_gb: merged A tokens sorted by (B token, rank)
    offsets_ptr,  # [B', Nb + 1] int64, row stride stride_ob: src[offsets[j]:offsets[j + 1]] merge into B token j
    out_ptr,  # [B', N - r, D] contiguous
    size_out_ptr,  # [B', N - r] contiguous, size's dtype
    b_size_ptr,  # [B', Nb] float32 (float64 for float64 x) out if B_SIZES: merged size of every B token, for the
    #              backward (without B_SIZES only its dtype is read: size_out is then the accumulation dtype)
    ln_w_ptr,  # [D] LayerNorm weight (read only if NORM)
    ln_b_ptr,  # [D] LayerNorm bias (read only if NORM)
    ln_ptr,  # [B', N - r, D] contiguous out if NORM: layer_norm(out)
    stats_ptr,  # [2, B' * (N - r)] ACC out if STATS: the LayerNorm's mean and 1 / std per token, for its backward
    EPS,
    N_OUT,
    C,
    NK,
    NB,
    D,
    A_START,
    B_START,
    GROUP,
    C_IN,
    N_IN,
    CLIPS,
    stride_xb,
    stride_xn,
    stride_xd,
    stride_rb,
    stride_rn,
    stride_rd,
    stride_sb,
    stride_sn,
    stride_pc,
    stride_kb,
    stride_gb,
    stride_ob,
    HAS_RES: tl.constexpr,
    HAS_POS: tl.constexpr,
    NORM: tl.constexpr,
    B_SIZES: tl.constexpr,  # write b_size; without it the backward reads the B tokens' sizes from size_out
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SRC_STAGES: tl.constexpr = 1,  # > 1: the gather of the sources software-pipelined over that many stages
    SRC_BLOCK: tl.constexpr = 0,  # > 0: the tile's sources gathered SRC_BLOCK at a time and summed by a product
    STATS: tl.constexpr = False,  # with NORM: write the LayerNorm's statistics (training)
    SPLIT_T: tl.constexpr = 0,  # > 0: the copied tokens first, then the merged ones SPLIT_T at a time
    SRC_CHUNK: tl.constexpr = 1,  # sources a step (1, 2, 4, 8), their loads issued together (not with SRC_BLOCK)
):
    tl.static_assert(SPLIT_T == 0 or SRC_BLOCK == 0, "SPLIT_T does not take SRC_BLOCK")
    tl.static_assert(SRC_CHUNK == 1 or SRC_BLOCK == 0, "SRC_CHUNK does not take SRC_BLOCK")
    # Grid: clips fastest (axis 0, which holds any number of them), then feature slices, then token tiles from
    # the last (the B tokens, which gather the sources, start first: a clip's longest chain of loads runs beside
    # the copies of later programs, not after them).
    row = tl.program_id(0).to(tl.int64)
    rows = tl.num_programs(0)
    first_slice = tl.program_id(1) == 0
    ACC = b_size_ptr.dtype.element_ty
    last = tl.num_programs(2) - 1 - tl.program_id(2)  # tiles from the last
    tl.assume(last >= 0)  # (not known to the compiler: without it, triton 3.8 waits once more a source on sm_90)
    tile = last * BLOCK_T
    offs_t = tile + tl.arange(0, BLOCK_T)
    mask_t = offs_t < N_OUT
    is_kept = (offs_t >= C) & (offs_t < C + NK)
    is_b = (offs_t >= C + NK) & mask_t
    j = offs_t - C - NK
    kept = tl.load(kept_ptr + row * stride_kb + (offs_t - C), mask=is_kept, other=0)
    pos = tl.where(offs_t < C, offs_t, tl.where(is_kept, A_START + 2 * kept, B_START + 2 * j))
    clip, tok = _joined_token(row, tl.where(mask_t, pos, 0), GROUP, C_IN, N_IN)
    # The sources of B token j: src[lo:lo + count], in rank order.
    offsets_row = offsets_ptr + row * stride_ob
    lo = tl.load(offsets_row + j, mask=is_b, other=0).to(tl.int32)
    count = tl.load(offsets_row + j + 1, mask=is_b, other=0).to(tl.int32) - lo
    max_count = tl.max(count, axis=0)
    src_row = src_ptr + row * stride_gb

    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    if SPLIT_T > 0:
        # First every token of the tile that nothing merges into, copied in x's dtype (and normalised):
        # no float32 sums of the tile are held, so a program needs fewer registers and more of them share
        # an SM, each with its bytes in flight. Then the tile's B tokens SPLIT_T at a time; a block with
        # sources merges them as the whole-tile path below does (the same sums in the same order).
        copy = mask_t & (count == 0)
        mask_c = copy[:, None] & mask_d[None, :]
        y = _token_rows(x_ptr, res_ptr, clip[:, None], tok[:, None], offs_d, mask_c, stride_xb, stride_xn, stride_xd,
                        stride_rb, stride_rn, stride_rd, HAS_RES)
        if HAS_POS:
            y = y.to(ACC) + _pos_rows(pos_ptr, row, clip[:, None], offs_d, mask_c, GROUP, CLIPS, stride_pc).to(ACC)
        y = y.to(out_ptr.dtype.element_ty)
        out_rows = out_ptr + row * N_OUT * D + offs_t.to(tl.int64) * D
        tl.store(out_rows[:, None] + offs_d[None, :], y, mask=mask_c)
        if NORM:
            _store_norm(y, offs_t, copy, offs_d, mask_d, ln_w_ptr, ln_b_ptr, ln_ptr, stats_ptr, row, rows, N_OUT, D,
                        EPS, ACC, STATS)
        if first_slice:
            s_self = tl.load(size_ptr + clip * stride_sb + tok * stride_sn, mask=copy, other=1).to(ACC)
            tl.store(size_out_ptr + row * N_OUT + offs_t, s_self.to(size_out_ptr.dtype.element_ty), mask=copy)
            if B_SIZES:
                tl.store(b_size_ptr + row * NB + j, s_self, mask=copy & is_b)
        end = tl.minimum(tile + BLOCK_T, N_OUT)
        for first in range(tl.maximum(tile, C + NK), end, SPLIT_T):
            # Whether a block has sources is read from the counts held (no wait on memory); only
            # then are its offsets loaded again, from L1.
            block_count = tl.max(tl.where((offs_t >= first) & (offs_t < first + SPLIT_T), count, 0), axis=0)
            if block_count > 0:
                offs_s = first + tl.arange(0, SPLIT_T)
                j_s = offs_s - C - NK
                in_tile = offs_s < end
                lo_s = tl.load(offsets_row + j_s, mask=in_tile, other=0).to(tl.int32)
                count_s = tl.load(offsets_row + j_s + 1, mask=in_tile, other=0).to(tl.int32) - lo_s
                into = count_s > 0
                clip_s, tok_s = _joined_token(row, tl.where(into, B_START + 2 * j_s, 0), GROUP, C_IN, N_IN)
                acc, s_total, x_self = _merge_sums(x_ptr, res_ptr, size_ptr, pos_ptr, src_row, row, clip_s, tok_s,
                                                   into, lo_s, count_s, block_count, offs_d, mask_d, A_START, GROUP,
                                                   C_IN, N_IN, CLIPS, stride_xb, stride_xn, stride_xd, stride_rb,
                                                   stride_rn, stride_rd, stride_sb, stride_sn, stride_pc, ACC,
                                                   HAS_RES, HAS_POS, SRC_STAGES, 0, SRC_CHUNK)
                y_s = _merged(acc, s_total, x_self, count_s).to(out_ptr.dtype.element_ty)
                rows_s = out_ptr + row * N_OUT * D + offs_s.to(tl.int64) * D
                tl.store(rows_s[:, None] + offs_d[None, :], y_s, mask=into[:, None] & mask_d[None, :])
                if NORM:
                    _store_norm(y_s, offs_s, into, offs_d, mask_d, ln_w_ptr, ln_b_ptr, ln_ptr, stats_ptr, row, rows,
                                N_OUT, D, EPS, ACC, STATS)
                if first_slice:
                    tl.store(size_out_ptr + row * N_OUT + offs_s, s_total.to(size_out_ptr.dtype.element_ty),
                             mask=into)
                    if B_SIZES:
                        tl.store(b_size_ptr + row * NB + j_s, s_total, mask=into)
    else:
        acc, s_total, x_self = _merge_sums(x_ptr, res_ptr, size_ptr, pos_ptr, src_row, row, clip, tok, mask_t, lo,
                                           count, max_count, offs_d, mask_d, A_START, GROUP, C_IN, N_IN, CLIPS,
                                           stride_xb, stride_xn, stride_xd, stride_rb, stride_rn, stride_rd,
                                           stride_sb, stride_sn, stride_pc, ACC, HAS_RES, HAS_POS, SRC_STAGES,
                                           SRC_BLOCK, SRC_CHUNK)
        if first_slice:
            tl.store(size_out_ptr + row * N_OUT + offs_t, s_total.to(size_out_ptr.dtype.element_ty), mask=mask_t)
            if B_SIZES:
                tl.store(b_size_ptr + row * NB + j, s_total, mask=is_b)
        y = _merged(acc, s_total, x_self, count)
        out_rows = out_ptr + row * N_OUT * D + offs_t.to(tl.int64) * D
        mask = mask_t[:, None] & mask_d[None, :]
        y = y.to(out_ptr.dtype.element_ty)
        tl.store(out_rows[:, None] + offs_d[None, :], y, mask=mask)
        if NORM:
            # The launcher gives a NORM program whole feature rows (BLOCK_D >= D, one feature slice), so
            # the LayerNorm of the merged tokens needs no second read of them. It normalises the rounded
            # output, as a LayerNorm reading it back would.
            _store_norm(y, offs_t, mask_t, offs_d, mask_d, ln_w_ptr, ln_b_ptr, ln_ptr, stats_ptr, row, rows, N_OUT,
                        D, EPS, ACC, STATS)


# b_size is read one value per token, never as a vector: its alignment is not specialised either
# (it is often a view into the forward's merged sizes at an odd offset, one variant per offset otherwise).
@triton.jit(do_not_specialize=["N", "C", "NK", "NB", "A_START", "B_START", "N_IN", "TILES", "stride_sb",
                               "stride_wb", "stride_mb", "stride_db", "stride_kb", "b_size_ptr"])
def _merge_bwd_kernel(
    grad_out_ptr,  # [B', N - r, D] any strides
    size_ptr,  # [B' * GROUP, N_IN] or [B' * GROUP, N_IN, 1] any strides
    merged_ptr,  # [B', r] int64, row stride stride_mb
    dst_ptr,  # [B', r] int64, row stride stride_db
    kept_ptr,  # [B', Na - r] int64, row stride stride_kb
    b_size_ptr,  # [B', Nb] float32/float64, row stride stride_wb: merged size of every B token (forward)
    grad_x_ptr,  # [B' * GROUP, N_IN, D] contiguous out
    pos_part_ptr,  # [B', TILES, GROUP, D] b_size's dtype out if POS_GRAD: grad_x summed per tile and clip
    N,
    C,
    NK,
    NB,
    D,
    A_START,
    B_START,
    GROUP,
    C_IN,
    N_IN,
    TILES,
    stride_gb,
    stride_gn,
    stride_gd,
    stride_sb,
    stride_sn,
    stride_wb,
    stride_mb,
    stride_db,
    stride_kb,
    POS_GRAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Work item q covers one input token, in the order class | kept | B | merged: the items are a
    # permutation of the N input tokens, so every grad_x row is written exactly once, by a gather.
    # Grid: clips (axis 0, any number of them), feature slices, token tiles.
    tile = tl.program_id(2)
    row = tl.program_id(0).to(tl.int64)
    ACC = b_size_ptr.dtype.element_ty
    offs_q = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_q = offs_q < N
    is_kept = (offs_q >= C) & (offs_q < C + NK)
    is_b = (offs_q >= C + NK) & (offs_q < C + NK + NB)
    is_merged = (offs_q >= C + NK + NB) & mask_q
    k = offs_q - C - NK - NB
    kept = tl.load(kept_ptr + row * stride_kb + (offs_q - C), mask=is_kept, other=0)
    merged = tl.load(merged_ptr + row * stride_mb + k, mask=is_merged, other=0)
    dst = tl.load(dst_ptr + row * stride_db + k, mask=is_merged, other=0)
    j = tl.where(is_merged, dst, offs_q - C - NK)  # the B token whose merged value the item feeds
    in_pos = tl.where(offs_q < C, offs_q,
                      tl.where(is_kept, A_START + 2 * kept,
                               tl.where(is_b, B_START + 2 * j, A_START + 2 * merged)))
    clip, tok = _joined_token(row, tl.where(mask_q, in_pos, 0), GROUP, C_IN, N_IN)
    out_pos = tl.where(is_merged, C + NK + dst, offs_q).to(tl.int64)
    weighted = is_b | is_merged
    s = tl.load(size_ptr + clip * stride_sb + tok * stride_sn, mask=weighted, other=1).to(ACC)
    s_total = tl.load(b_size_ptr + row * stride_wb + j, mask=weighted, other=1)
    # s / s_total is exactly 1 for a B token nothing merged into, matching the forward's copy.
    w = tl.where(weighted, s / tl.where(weighted, s_total, 1.0), 1.0)

    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask = mask_q[:, None] & mask_d[None, :]
    g = tl.load((grad_out_ptr + row * stride_gb + out_pos * stride_gn)[:, None] + offs_d[None, :] * stride_gd,
                mask=mask, other=0.0)
    g = tl.where(weighted[:, None], g.to(ACC) * w[:, None], g.to(ACC))
    gx_rows = grad_x_ptr + (clip * N_IN + tok) * D
    tl.store(gx_rows[:, None] + offs_d[None, :], g.to(grad_x_ptr.dtype.element_ty), mask=mask)
    if POS_GRAD:
        # The position embedding of clip k was added to every token of clip k: its gradient is the
        # sum of their gradients. A tile spans at most a few clips; each gets its partial sum here
        # and the host adds the partials (TILES x fewer rows than grad_x, no atomics).
        part = pos_part_ptr + ((row * TILES + tile) * GROUP) * D
        for k in range(0, GROUP):
            in_k = mask_q & (clip == row * GROUP + k)
            tl.store(part + k * D + offs_d, tl.sum(tl.where(in_k[:, None], g, 0.0), axis=0), mask=mask_d)
