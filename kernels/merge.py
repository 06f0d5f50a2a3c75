"""Size-weighted merge of a clip's tokens by a merge plan, forward and backward, without atomics.

Twin: ``tempme_fast.ops.reference.merge``. The reference scatter-adds the merged A tokens into
their B tokens; a scatter-add in parallel needs atomics and its float sums would change from run
to run. Instead ``_merge_index_kernel`` groups the merged A tokens by destination (a counting
sort, ties kept in rank order), so every B token gathers its sources itself in a fixed order.

Output order (as the spec): the ``c`` class tokens, the kept A tokens, then every B token.
A token ``i`` sits at position ``A_START + 2 * i`` of its clip, B token ``j`` at ``B_START + 2 * j``.

With ``GROUP > 1`` the clip being merged is the ClipMe join of ``GROUP`` input clips: the kernels
read (and the backward writes) the unjoined tensors through ``_joined_token`` and add the temporal
position embedding of each token's source clip on the fly, so the joined copy is never written.
"""
import triton
import triton.language as tl

from .rank import _stable_rank
from .tokens import _joined_token


@triton.jit(do_not_specialize=["R", "NB"])
def _merge_index_kernel(
    merged_ptr,  # [B', r] int64 contiguous: merged A tokens
    dst_ptr,  # [B', r] int64 contiguous: their B tokens
    src_ptr,  # [B', r] int32 out: merged A tokens sorted by (B token, rank)
    offsets_ptr,  # [B', Nb + 1] int32 out: src[offsets[j]:offsets[j + 1]] merge into B token j
    R,
    NB,
    BLOCK_K: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dst_row = dst_ptr + row * R
    for k0 in range(0, R, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < R
        d_k = tl.load(dst_row + offs_k, mask=mask_k, other=0)
        pos = _stable_rank(dst_row, R, d_k, offs_k, BLOCK_K, False)
        a = tl.load(merged_ptr + row * R + offs_k, mask=mask_k, other=0)
        tl.store(src_ptr + row * R + pos, a.to(tl.int32), mask=mask_k)
    for j0 in range(0, NB + 1, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        before = tl.zeros([BLOCK_J], dtype=tl.int32)
        for k0 in range(0, R, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            d_k = tl.load(dst_row + offs_k, mask=offs_k < R, other=NB + 1)
            before += tl.sum((d_k[None, :] < offs_j[:, None]).to(tl.int32), axis=1)
        tl.store(offsets_ptr + row * (NB + 1) + offs_j, before, mask=offs_j < NB + 1)


@triton.jit(do_not_specialize=["N_OUT", "C", "NK", "R", "NB", "D", "A_START", "B_START", "GROUP", "C_IN",
                               "N_IN", "CLIPS", "stride_xb", "stride_sb"])
def _merge_fwd_kernel(
    x_ptr,  # [B' * GROUP, N_IN, D] any strides (a clip of N = GROUP * N_IN tokens)
    size_ptr,  # [B' * GROUP, N_IN] or [B' * GROUP, N_IN, 1] any strides
    pos_ptr,  # [CLIPS, D] temporal position embedding added to x (read only if HAS_POS)
    kept_ptr,  # [B', Na - r] int64 contiguous: kept A tokens, increasing
    src_ptr,  # [B', r] int32: merged A tokens grouped by B token (from _merge_index_kernel)
    offsets_ptr,  # [B', Nb + 1] int32: src[offsets[j]:offsets[j + 1]] merge into B token j
    out_ptr,  # [B', N - r, D] contiguous
    size_out_ptr,  # [B', N - r] contiguous, size's dtype
    b_size_ptr,  # [B', Nb] float32 (float64 for float64 x): merged size of every B token, for backward
    N_OUT,
    C,
    NK,
    R,
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
    stride_sb,
    stride_sn,
    stride_pc,
    HAS_POS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ACC = b_size_ptr.dtype.element_ty
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < N_OUT
    is_kept = (offs_t >= C) & (offs_t < C + NK)
    is_b = (offs_t >= C + NK) & mask_t
    j = offs_t - C - NK
    kept = tl.load(kept_ptr + row * NK + (offs_t - C), mask=is_kept, other=0)
    pos = tl.where(offs_t < C, offs_t, tl.where(is_kept, A_START + 2 * kept, B_START + 2 * j))
    clip, tok = _joined_token(row, tl.where(mask_t, pos, 0), GROUP, C_IN, N_IN)
    lo = tl.load(offsets_ptr + row * (NB + 1) + j, mask=is_b, other=0)
    count = tl.load(offsets_ptr + row * (NB + 1) + j + 1, mask=is_b, other=0) - lo
    max_count = tl.max(count, axis=0)
    src_row = src_ptr + row * R + lo

    s_self = tl.load(size_ptr + clip * stride_sb + tok * stride_sn, mask=mask_t, other=1).to(ACC)
    s_total = s_self
    for t in range(0, max_count):
        has = t < count
        a = tl.load(src_row + t, mask=has, other=0)
        a_clip, a_tok = _joined_token(row, A_START + 2 * a, GROUP, C_IN, N_IN)
        s_total += tl.load(size_ptr + a_clip * stride_sb + a_tok * stride_sn, mask=has, other=0).to(ACC)
    tl.store(size_out_ptr + row * N_OUT + offs_t, s_total.to(size_out_ptr.dtype.element_ty), mask=mask_t)
    tl.store(b_size_ptr + row * NB + j, s_total, mask=is_b)

    x_rows = x_ptr + clip * stride_xb + tok * stride_xn
    pos_rows = pos_ptr + (clip % CLIPS) * stride_pc
    out_rows = out_ptr + row * N_OUT * D + offs_t.to(tl.int64) * D
    merged_into = count > 0
    divisor = tl.where(merged_into, s_total, 1.0)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        mask = mask_t[:, None] & mask_d[None, :]
        x_self = tl.load(x_rows[:, None] + offs_d[None, :] * stride_xd, mask=mask, other=0.0).to(ACC)
        if HAS_POS:
            x_self += tl.load(pos_rows[:, None] + offs_d[None, :], mask=mask, other=0.0).to(ACC)
        acc = x_self * s_self[:, None]
        for t in range(0, max_count):
            has = t < count
            a = tl.load(src_row + t, mask=has, other=0)
            a_clip, a_tok = _joined_token(row, A_START + 2 * a, GROUP, C_IN, N_IN)
            s = tl.load(size_ptr + a_clip * stride_sb + a_tok * stride_sn, mask=has, other=0).to(ACC)
            mask_a = has[:, None] & mask_d[None, :]
            xa = tl.load(x_ptr + (a_clip * stride_xb + a_tok * stride_xn)[:, None] + offs_d[None, :] * stride_xd,
                         mask=mask_a, other=0.0).to(ACC)
            if HAS_POS:
                xa += tl.load(pos_ptr + ((a_clip % CLIPS) * stride_pc)[:, None] + offs_d[None, :],
                              mask=mask_a, other=0.0).to(ACC)
            acc += xa * s[:, None]
        # Tokens nothing merged into (class, kept, untouched B) are copied, not divided.
        y = tl.where(merged_into[:, None], acc / divisor[:, None], x_self)
        tl.store(out_rows[:, None] + offs_d[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N", "C", "NK", "R", "NB", "D", "A_START", "B_START", "GROUP", "C_IN", "N_IN",
                               "stride_gb", "stride_sb"])
def _merge_bwd_kernel(
    grad_out_ptr,  # [B', N - r, D] any strides
    size_ptr,  # [B' * GROUP, N_IN] or [B' * GROUP, N_IN, 1] any strides
    merged_ptr,  # [B', r] int64 contiguous
    dst_ptr,  # [B', r] int64 contiguous
    kept_ptr,  # [B', Na - r] int64 contiguous
    b_size_ptr,  # [B', Nb] float32/float64: merged size of every B token (from the forward)
    grad_x_ptr,  # [B' * GROUP, N_IN, D] contiguous out
    N,
    C,
    NK,
    R,
    NB,
    D,
    A_START,
    B_START,
    GROUP,
    C_IN,
    N_IN,
    stride_gb,
    stride_gn,
    stride_gd,
    stride_sb,
    stride_sn,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Work item q covers one input token, in the order class | kept | B | merged: the items are a
    # permutation of the N input tokens, so every grad_x row is written exactly once, by a gather.
    row = tl.program_id(0).to(tl.int64)
    ACC = b_size_ptr.dtype.element_ty
    offs_q = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_q = offs_q < N
    is_kept = (offs_q >= C) & (offs_q < C + NK)
    is_b = (offs_q >= C + NK) & (offs_q < C + NK + NB)
    is_merged = (offs_q >= C + NK + NB) & mask_q
    k = offs_q - C - NK - NB
    kept = tl.load(kept_ptr + row * NK + (offs_q - C), mask=is_kept, other=0)
    merged = tl.load(merged_ptr + row * R + k, mask=is_merged, other=0)
    dst = tl.load(dst_ptr + row * R + k, mask=is_merged, other=0)
    j = tl.where(is_merged, dst, offs_q - C - NK)  # the B token whose merged value the item feeds
    in_pos = tl.where(offs_q < C, offs_q,
                      tl.where(is_kept, A_START + 2 * kept,
                               tl.where(is_b, B_START + 2 * j, A_START + 2 * merged)))
    clip, tok = _joined_token(row, tl.where(mask_q, in_pos, 0), GROUP, C_IN, N_IN)
    out_pos = tl.where(is_merged, C + NK + dst, offs_q).to(tl.int64)
    weighted = is_b | is_merged
    s = tl.load(size_ptr + clip * stride_sb + tok * stride_sn, mask=weighted, other=1).to(ACC)
    s_total = tl.load(b_size_ptr + row * NB + j, mask=weighted, other=1)
    # s / s_total is exactly 1 for a B token nothing merged into, matching the forward's copy.
    w = tl.where(weighted, s / tl.where(weighted, s_total, 1.0), 1.0)

    g_row = grad_out_ptr + row * stride_gb
    gx_rows = grad_x_ptr + (clip * N_IN + tok) * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_q[:, None] & (offs_d[None, :] < D)
        g = tl.load(g_row + out_pos[:, None] * stride_gn + offs_d[None, :] * stride_gd, mask=mask, other=0.0)
        g = tl.where(weighted[:, None], g.to(ACC) * w[:, None], g.to(ACC))
        tl.store(gx_rows[:, None] + offs_d[None, :], g.to(grad_x_ptr.dtype.element_ty), mask=mask)
