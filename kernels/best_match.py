"""Best cosine match of every set-A token in set B, without writing the A x B score matrix.

Twin: ``tempme_fast.ops.reference.best_match``. Tokens are addressed by position: A token ``i``
sits at ``A_START + 2 * i`` and B token ``j`` at ``B_START + 2 * j`` of its clip, so the kernel
reads the metric in place through its strides (no split, no normalised copy). With ``GROUP > 1``
the clip is the join of ``GROUP`` input clips, read through ``_joined_token`` without copying.
"""
import triton
import triton.language as tl

from .tokens import _joined_token


@triton.jit(do_not_specialize=["NA", "NB", "C", "A_START", "B_START", "GROUP", "C_IN", "N_IN", "stride_mb"])
def _best_match_fwd_kernel(
    metric_ptr,  # [B' * GROUP, N_IN, C] any float dtype, any strides (a clip of N = GROUP * N_IN tokens)
    scores_ptr,  # [B', Na] float32 (float64 for a float64 metric) contiguous out: best cosine similarity
    dst_ptr,  # [B', Na] int64 contiguous out: B index of the best match
    NA,
    NB,
    C,
    A_START,
    B_START,
    GROUP,
    C_IN,
    N_IN,
    stride_mb,
    stride_mn,
    stride_mc,
    TINY: tl.constexpr,  # smallest normal number of the accumulation dtype: the norm's floor
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DOT_MODE: tl.constexpr,  # 0: tl.dot on the input dtype, 1: tl.dot in fp32, 2: broadcast-sum (fp64)
):
    row = tl.program_id(0).to(tl.int64)
    ACC = scores_ptr.dtype.element_ty
    offs_a = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_a = offs_a < NA
    a_clip, a_tok = _joined_token(row, A_START + 2 * offs_a, GROUP, C_IN, N_IN)
    a_rows = metric_ptr + a_clip * stride_mb + a_tok * stride_mn

    sq_a = tl.zeros([BLOCK_A], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        a = tl.load(a_rows[:, None] + offs_c[None, :] * stride_mc,
                    mask=mask_a[:, None] & (offs_c[None, :] < C), other=0.0).to(ACC)
        sq_a += tl.sum(a * a, axis=1)
    # max(norm, tiny) as the reference: a zero row scores 0 against everything instead of NaN.
    inv_a = 1.0 / tl.maximum(tl.sqrt(sq_a), TINY)

    best = tl.full([BLOCK_A], float("-inf"), dtype=ACC)
    best_j = tl.zeros([BLOCK_A], dtype=tl.int32)
    for b0 in range(0, NB, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < NB
        b_clip, b_tok = _joined_token(row, B_START + 2 * offs_b, GROUP, C_IN, N_IN)
        b_rows = metric_ptr + b_clip * stride_mb + b_tok * stride_mn
        dots = tl.zeros([BLOCK_A, BLOCK_B], dtype=ACC)
        sq_b = tl.zeros([BLOCK_B], dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c[None, :] < C
            a = tl.load(a_rows[:, None] + offs_c[None, :] * stride_mc, mask=mask_a[:, None] & mask_c, other=0.0)
            b = tl.load(b_rows[:, None] + offs_c[None, :] * stride_mc, mask=mask_b[:, None] & mask_c, other=0.0)
            if DOT_MODE == 0:
                # fp16/bf16 products are exact in fp32 and the tensor cores accumulate in fp32.
                dots += tl.dot(a, tl.trans(b))
            elif DOT_MODE == 1:
                dots += tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
            else:
                dots += tl.sum(a.to(ACC)[:, None, :] * b.to(ACC)[None, :, :], axis=2)
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

    tl.store(scores_ptr + row * NA + offs_a, best, mask=mask_a)
    tl.store(dst_ptr + row * NA + offs_a, best_j.to(tl.int64), mask=mask_a)
