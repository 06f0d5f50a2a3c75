"""Best cosine match of every set-A token in set B, without writing the A x B score matrix; and,
in the same launch, the merge plan.

Twin: ``tempme_fast.ops.reference.best_match`` (and ``reference.match`` with ``PLAN``). Tokens are
addressed by position: A token ``i`` sits at ``A_START + 2 * i`` and B token ``j`` at
``B_START + 2 * j`` of its clip, so the kernel reads the metric in place through its strides (no
split, no normalised copy). With ``GROUP > 1`` the clip is the join of ``GROUP`` input clips, read
through ``_joined_token`` without copying. With ``HEADS > 1`` the metric is the mean of ``HEADS``
groups of ``C`` channels each (a multi-head attention's keys, token-major: the groups ``C`` channels
apart), taken as the tiles are loaded, so the averaged keys are never written.

Work split: a clip's A tokens are cut into blocks and its B tokens into ``SPLITS`` ranges, one
program per (A block, B range), so a single clip at a late layer still fills many SMs. Each
program writes its partial (best, argmax) to ``part``. The last program of a clip to finish
(counted in ``count``; which program that is varies, what it computes does not) combines the
ranges in increasing B order, so ties keep the lowest B index as in the reference, and with
``PLAN`` goes on to write the clip's merge plan (``_plan_row``). It then resets its counter, so
``count`` stays zero between launches and needs no clearing. With ``PLAN`` that program also
writes the plan's merged tokens grouped by destination (``src``, ``offsets``), which the merge
reads instead of grouping them in every one of its programs.
"""
import triton
import triton.language as tl

from .match import _plan_row
from .tokens import _bf16_nearest, _joined_token


@triton.jit
def _dot_tile(a, b, DOT_MODE: tl.constexpr, ACC: tl.constexpr):
    """``a [BA, BC] @ b [BB, BC]^T`` accumulated in ``ACC``."""
    if DOT_MODE == 0:
        # fp16/bf16 products are exact in fp32 and the tensor cores accumulate in fp32.
        return tl.dot(a, tl.trans(b))
    elif DOT_MODE == 1:
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
    elif DOT_MODE == 3:
        # Three TF32 products (the operands split into high and low parts) on the tensor cores: close
        # to float32 products; float32 metrics on a GPU (triton_ops.FP32_PRODUCTS).
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="tf32x3")
    else:
        return tl.sum(a.to(ACC)[:, None, :] * b.to(ACC)[None, :, :], axis=2)


@triton.jit
def _metric_tile(ptrs, mask, head_stride, HEADS: tl.constexpr, ACC: tl.constexpr, HEAD_STEP: tl.constexpr):
    """The metric at ``ptrs`` (0 where not ``mask``), in its dtype. With ``HEADS > 1``: the mean of the
    ``HEADS`` tiles ``head_stride`` elements apart, summed in ``ACC`` and scaled by ``1 / HEADS`` before
    rounding to the metric's dtype, as torch's mean over heads (``reference.head_mean``)."""
    if HEADS == 1:
        m = tl.load(ptrs, mask=mask, other=0.0)
    else:
        total = tl.zeros(ptrs.shape, ACC)
        # HEAD_STEP (a divisor of HEADS) heads' loads issued together, a loop over such steps.
        for h0 in range(0, HEADS, HEAD_STEP):
            for h in tl.static_range(HEAD_STEP):
                total += tl.load(ptrs + (h0 + h) * head_stride, mask=mask, other=0.0).to(ACC)
        mean = total * (1.0 / HEADS)
        if ptrs.dtype.element_ty == tl.bfloat16:
            # Rounded to the nearest bfloat16 by hand, then converted exactly: torch's mean on both.
            mean = _bf16_nearest(mean)
        m = mean.to(ptrs.dtype.element_ty)
    return m


@triton.jit(do_not_specialize=["NA", "NB", "R", "A_START", "B_START", "N_IN", "B_PER", "SPLITS", "PLAN_STRIDE",
                               "ROWS"])
def _best_match_fwd_kernel(
    metric_ptr,  # [B' * GROUP, N_IN, HEADS * C] any float dtype, any strides (a clip of N = GROUP * N_IN tokens)
    part_ptr,  # [B', SPLITS, 2, Na] float32 (float64 for a float64 metric) scratch: per-range best, argmax
    scores_ptr,  # [B', Na] part's dtype, contiguous out: best cosine similarity (unused with PLAN)
    dst_ptr,  # [B', Na] int64 contiguous out: B index of the best match (unused with PLAN)
    plan_ptr,  # [B', PLAN_STRIDE] int64 out with PLAN, per row: merged A tokens, highest score first (R) |
    #            their B tokens (R) | kept A tokens, increasing (Na - R) | merged A tokens sorted by
    #            (B token, rank) (R) | offsets (NB + 1): src[offsets[j]:offsets[j + 1]] merge into B token j
    count_ptr,  # [>= B'] int32, zero on entry and on exit: finished programs per clip
    NA,
    NB,
    R,
    C,
    A_START,
    B_START,
    GROUP,
    C_IN,
    N_IN,
    B_PER,  # B tokens per range, a multiple of BLOCK_B
    SPLITS,  # B ranges per clip: programs along axis 0 = A blocks x SPLITS
    PLAN_STRIDE,  # >= 2 R + NA + NB + 1
    ROWS,  # clips, B': axes 1 and 2 of the grid hold them (axis 1 up to 65535), the programs past them return
    stride_mb,
    stride_mn,
    stride_mc,
    TINY: tl.constexpr,  # smallest normal number of the accumulation dtype: the norm's floor
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT_MODE: tl.constexpr,  # 0: tl.dot on the input dtype, 1: tl.dot in fp32, 2: broadcast-sum (fp64), 3: tf32x3
    PLAN: tl.constexpr,
    SORT_BLOCK: tl.constexpr,  # the plan's sort width, next_power_of_2(Na); 0: the plan counts (match.py)
    GROUP_BLOCK: tl.constexpr,  # the grouping's sort width, next_power_of_2(R); 0: it counts (group.py)
    GROUP_BINS: tl.constexpr,  # the grouping's histogram width, next_power_of_2(NB + 1)
    HEADS: tl.constexpr = 1,  # the metric is the mean of HEADS groups of C channels (C apart)
    C_STAGES: tl.constexpr = 3,  # software-pipelining stages of the loops over channel chunks
    A_KEPT: tl.constexpr = False,  # C <= BLOCK_C: the A tile is loaded once and kept for every B block
    HEAD_STEP: tl.constexpr = 1,  # with HEADS > 1: heads loaded together (a divisor of HEADS), a loop of such steps
    COMBINE_BLOCK: tl.constexpr = 64,  # A tokens a step of the last program's combine of the B ranges
):
    # Axis 0 runs fastest: the programs of one clip run side by side and share its B tokens in L2. The clips
    # take axes 1 and 2 (each holds at most 65535 programs).
    item = tl.program_id(0)
    split = item % SPLITS
    row = tl.program_id(1).to(tl.int64) + tl.program_id(2).to(tl.int64) * tl.num_programs(1)
    if row >= ROWS:
        return
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    offs_a = (item // SPLITS) * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_a = offs_a < NA
    a_clip, a_tok = _joined_token(row, A_START + 2 * offs_a, GROUP, C_IN, N_IN)
    a_rows = metric_ptr + a_clip * stride_mb + a_tok * stride_mn
    head_stride = C * stride_mc

    if A_KEPT:
        # One chunk: the A tile (averaged over heads once, not once per B block) stays in registers.
        offs_c = tl.arange(0, BLOCK_C)
        a_tile = _metric_tile(a_rows[:, None] + offs_c[None, :] * stride_mc, mask_a[:, None] & (offs_c[None, :] < C),
                              head_stride, HEADS, ACC, HEAD_STEP)
        sq_a = tl.sum(a_tile.to(ACC) * a_tile.to(ACC), axis=1)
    else:
        sq_a = tl.zeros([BLOCK_A], dtype=ACC)
        # Software-pipelined (the next chunks' loads issued while this one is reduced): a loop of plain
        # loads waits on memory once per chunk, 12 times over 768 channels before the first product,
        # on the critical path at one video. Summing the squares inside the first B block's product
        # loop instead took 64 -> 102 registers on sm_90 at the joins (4 -> 2 programs an SM).
        for c0 in tl.range(0, C, BLOCK_C, num_stages=C_STAGES):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            a = _metric_tile(a_rows[:, None] + offs_c[None, :] * stride_mc, mask_a[:, None] & (offs_c[None, :] < C),
                             head_stride, HEADS, ACC, HEAD_STEP).to(ACC)
            sq_a += tl.sum(a * a, axis=1)
    # max(norm, tiny) as the reference: a zero row scores 0 against everything instead of NaN.
    inv_a = 1.0 / tl.maximum(tl.sqrt(sq_a), TINY)

    best = tl.full([BLOCK_A], float("-inf"), dtype=ACC)
    best_j = tl.zeros([BLOCK_A], dtype=tl.int32)
    b_end = tl.minimum(split * B_PER + B_PER, NB)
    # (Only an innermost loop is software-pipelined: with A_KEPT this one, whose B tiles C_STAGES buffers.)
    for b0 in tl.range(split * B_PER, b_end, BLOCK_B, num_stages=C_STAGES):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < b_end
        b_clip, b_tok = _joined_token(row, B_START + 2 * offs_b, GROUP, C_IN, N_IN)
        b_rows = metric_ptr + b_clip * stride_mb + b_tok * stride_mn
        if A_KEPT:
            b = _metric_tile(b_rows[:, None] + offs_c[None, :] * stride_mc, mask_b[:, None] & (offs_c[None, :] < C),
                             head_stride, HEADS, ACC, HEAD_STEP)
            dots = _dot_tile(a_tile, b, DOT_MODE, ACC)
            sq_b = tl.sum(b.to(ACC) * b.to(ACC), axis=1)
        else:
            dots = tl.zeros([BLOCK_A, BLOCK_B], dtype=ACC)
            sq_b = tl.zeros([BLOCK_B], dtype=ACC)
            for c0 in tl.range(0, C, BLOCK_C, num_stages=C_STAGES):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                mask_c = offs_c[None, :] < C
                a = _metric_tile(a_rows[:, None] + offs_c[None, :] * stride_mc, mask_a[:, None] & mask_c,
                                 head_stride, HEADS, ACC, HEAD_STEP)
                b = _metric_tile(b_rows[:, None] + offs_c[None, :] * stride_mc, mask_b[:, None] & mask_c,
                                 head_stride, HEADS, ACC, HEAD_STEP)
                dots += _dot_tile(a, b, DOT_MODE, ACC)
                bf = b.to(ACC)
                sq_b += tl.sum(bf * bf, axis=1)
        inv_b = 1.0 / tl.maximum(tl.sqrt(sq_b), TINY)
        sim = dots * inv_a[:, None] * inv_b[None, :]
        sim = tl.where(mask_b[None, :], sim, float("-inf"))
        block_best = tl.max(sim, axis=1)
        block_j = tl.argmax(sim, axis=1, tie_break_left=True) + b0
        # Strictly greater: on a tie the earlier block, hence the lower B index, keeps the match.
        better = block_best > best
        best = tl.where(better, block_best, best)
        best_j = tl.where(better, block_j, best_j)

    if (SPLITS == 1) and (not PLAN):
        tl.store(scores_ptr + row * NA + offs_a, best, mask=mask_a)
        tl.store(dst_ptr + row * NA + offs_a, best_j.to(tl.int64), mask=mask_a)
    else:
        # The argmax travels as a float: exact for any B index below 2^24.
        part_row = part_ptr + row * SPLITS * 2 * NA
        tl.store(part_row + split * 2 * NA + offs_a, best, mask=mask_a)
        tl.store(part_row + split * 2 * NA + NA + offs_a, best_j.to(ACC), mask=mask_a)
        # Every thread's stores are done before one thread publishes them (release, GPU scope).
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr + row, 1, sem="acq_rel", scope="gpu")
        if done == tl.num_programs(0) - 1:
            tl.store(count_ptr + row, 0)
            _combine_ranges(part_row, scores_ptr + row * NA, dst_ptr + row * NA, NA, SPLITS, COMBINE_BLOCK, PLAN)
            if PLAN:
                tl.debug_barrier()  # the combined row is read back by every thread below
                plan_row = plan_ptr + row * PLAN_STRIDE
                _plan_row(part_row, part_row + NA, plan_row, plan_row + R, plan_row + 2 * R, plan_row + R + NA,
                          plan_row + 2 * R + NA, NA, NB, R, BLOCK_A, SORT_BLOCK, True, GROUP_BLOCK, GROUP_BINS)


# B ranges that one step of the combine reads: a [RANGES_PER_STEP, BLOCK_A] tile of partial results.
RANGES_PER_STEP = tl.constexpr(8)


@triton.jit
def _combine_ranges(part_row, scores_row, dst_row, NA, SPLITS, BLOCK: tl.constexpr, IN_PLACE: tl.constexpr):
    """Best over the ``SPLITS`` B ranges of one clip, lower range first on ties. Written to range
    0's slot of ``part_row`` (``IN_PLACE``, for the plan) or to ``scores_row`` / ``dst_row``.

    It runs in one program after the clip's last range is done, so its steps are on the critical
    path: each step loads ``RANGES_PER_STEP`` ranges of ``BLOCK`` A tokens at once and reduces them
    (the best value, then the lowest range holding it): ``(Na / BLOCK) x (SPLITS / RANGES_PER_STEP)``
    steps."""
    ACC: tl.constexpr = part_row.dtype.element_ty
    for i0 in range(0, NA, BLOCK):
        offs_i = i0 + tl.arange(0, BLOCK)
        mask_i = offs_i < NA
        best = tl.full([BLOCK], float("-inf"), dtype=ACC)
        best_j = tl.zeros([BLOCK], dtype=ACC)
        for s0 in range(0, SPLITS, RANGES_PER_STEP):
            offs_s = s0 + tl.arange(0, RANGES_PER_STEP)
            mask = (offs_s[:, None] < SPLITS) & mask_i[None, :]
            ptrs = part_row + offs_s[:, None] * 2 * NA + offs_i[None, :]
            v = tl.load(ptrs, mask=mask, other=float("-inf"), cache_modifier=".cg")
            j = tl.load(ptrs + NA, mask=mask, other=0.0, cache_modifier=".cg")
            top = tl.max(v, axis=0)
            first = tl.min(tl.where(v == top[None, :], offs_s[:, None], SPLITS + RANGES_PER_STEP), axis=0)
            top_j = tl.sum(tl.where(offs_s[:, None] == first[None, :], j, 0.0), axis=0)
            # Strictly greater: on a tie the earlier ranges, hence the lower B index, keep the match.
            better = top > best
            best = tl.where(better, top, best)
            best_j = tl.where(better, top_j, best_j)
        if IN_PLACE:
            tl.store(part_row + offs_i, best, mask=mask_i)
            tl.store(part_row + NA + offs_i, best_j, mask=mask_i)
        else:
            tl.store(scores_row + offs_i, best, mask=mask_i)
            tl.store(dst_row + offs_i, best_j.to(tl.int64), mask=mask_i)
