"""Flash attention with a per-key additive bias vector (proportional attention), forward and backward.

Twin: ``tempme_fast.ops.reference.attention``: ``softmax(q k^T * scale + bias[key]) v`` with
``bias = log(size)``. The bias is one float per key, so it is read as a ``[B', N]`` vector instead
of a materialised ``[B', 1, N, N]`` or ``[B', 1, 1, N]`` mask.

Online softmax (FlashAttention, Dao et al. 2022; FlashAttention-2, Dao 2023): a program owns a tile
of queries, walks the keys tile by tile and keeps the running maximum and sum of exponentials, so
the ``N x N`` logits never reach memory. Exponentials are taken base 2 (``exp2``, one instruction
on the GPU): logits are scaled by ``log2(e)`` and the saved log-sum-exp is in that base too.

Backward recomputes the probabilities from the saved log-sum-exp. ``_attention_bwd_kernel`` runs
as two launches with no atomics, so its results repeat bit for bit: the dQ pass (``DKDV=False``, one
program per query tile; it also writes ``delta = rowsum(dO * O)``) and then the dK/dV pass
(``DKDV=True``, one program per key tile, summing over all queries itself). The bias gradient is
the column sum of ``dS``, written per head and summed over heads by the host.

The backward writes dQ, dK and dV through strides: into per-head buffers, or into the three slices
of one packed gradient of a q | k | v projection (the encoder's training path), which then needs no
transposing and stacking of per-head gradients.

The queries (``M`` a clip) and the keys (``N``) may differ in number: a block whose later layers read
only some tokens' outputs (the class tokens of the last block) asks for those queries alone.

Head dims that are not a power of two (48, 72, 80, 88, 96, 104) are padded to ``BLOCK_D`` with
masked loads. ``HEAD_ALIGN`` is a power of two that divides every head stride (in elements): the
head dim itself for q, k and v read as views of one packed projection. Triton proves only
divisibility by 16 of an integer argument, so without it the head offset of a head dim of 72, 88
or 104 would make every q, k, v and dO load a scalar one. Every ``tl.dot`` accumulates in float32.

A thread holds 16 keys of a 64-key tile, so what it does per key counts: on an NVIDIA GPU the sizes' log
is the hardware's ``lg2.approx`` (one instruction a key, :func:`_log2`), not libdevice's ``log2f``, which made
the forward's loop over key tiles 2.4x as long as without a bias (``benchmarks.codegen --loops``).
"""
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """``a @ b`` accumulated in float32. ``DOT_FP32`` casts 16-bit operands first: the interpreter's
    bf16 ``tl.dot`` is wrong (triton 3.8); on a GPU the operands go to the tensor cores as they are."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _tile(ptr, offs_t, offs_d, stride_t, N, HEAD_DIM: tl.constexpr, MASK_T: tl.constexpr = True):
    """Load rows ``offs_t`` (``< N``) and channels ``offs_d`` (``< HEAD_DIM``) of a unit-stride tile, 0 elsewhere.
    Without ``MASK_T`` every row is known to be ``< N`` and the head dim to fill ``offs_d``: no mask."""
    ptrs = ptr + offs_t.to(tl.int64)[:, None] * stride_t + offs_d[None, :]
    if MASK_T:
        x = tl.load(ptrs, mask=(offs_t < N)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        tl.static_assert(offs_d.shape[0] == HEAD_DIM, "an unmasked tile needs an unpadded head dim")
        x = tl.load(ptrs)
    return x


@triton.jit
def _log2(x, FAST_LOG: tl.constexpr):
    """``log2`` of float32 ``x``. With ``FAST_LOG`` (an NVIDIA GPU) the hardware's approximation
    (``lg2.approx.ftz.f32``, one special-function instruction; absolute error about ``2**-22``, a subnormal
    ``x`` flushed to 0 and so ``-inf``), where ``tl.log2`` is libdevice's ``log2f``: about 25 instructions and
    a branch, taken for every key a thread holds in every key tile. The interpreter runs no PTX and takes
    ``tl.log2``."""
    if FAST_LOG:
        y = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        y = tl.log2(x)
    return y


@triton.constexpr_function
def _unmasked_tiles(dtype, HEAD_DIM, BLOCK_D):
    """Whether the kernels walk their full tiles in a loop without masks (16-bit operands, unpadded head dim)."""
    return HEAD_DIM == BLOCK_D and dtype != tl.float32


@triton.jit
def _key_bias(bias_ptr, offs_n, stride_bn, N, HAS_BIAS: tl.constexpr, LOG_BIAS: tl.constexpr,
              FAST_LOG: tl.constexpr, MASK_T: tl.constexpr = True):
    """Bias of keys ``offs_n`` in log2 units; ``-inf`` past the last key, so padding gets no weight.
    With ``LOG_BIAS`` the kernel reads the sizes and takes their log itself. Without ``MASK_T`` every key
    is known to be ``< N``."""
    LOG2E: tl.constexpr = 1.4426950408889634
    valid = offs_n < N
    if HAS_BIAS:
        ptrs = bias_ptr + offs_n * stride_bn
        if MASK_T:
            b = tl.load(ptrs, mask=valid, other=1.0 if LOG_BIAS else 0.0).to(tl.float32)
        else:
            b = tl.load(ptrs).to(tl.float32)
        if LOG_BIAS:
            b = _log2(b, FAST_LOG)
        else:
            b = b * LOG2E
    else:
        b = tl.zeros(offs_n.shape, dtype=tl.float32)
    if MASK_T:
        b = tl.where(valid, b, float("-inf"))
    return b


@triton.jit
def _key_tiles(q, k_base, v_base, bias_base, offs_n, offs_d, stride_kn, stride_vn, stride_bn, N, QK_SCALE,
               HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, LOG_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
               PRECISION: tl.constexpr, FAST_LOG: tl.constexpr, MASK_T: tl.constexpr = True):
    """K and V tiles of keys ``offs_n`` and the logits of queries ``q`` against them (log2 units, bias
    added by the same fused multiply-add in every pass, ``-inf`` past the last key). ``MASK_T`` as
    :func:`_tile`'s: a tile of keys all ``< N`` needs no mask on its loads and logits."""
    k = _tile(k_base, offs_n, offs_d, stride_kn, N, HEAD_DIM, MASK_T)
    v = _tile(v_base, offs_n, offs_d, stride_vn, N, HEAD_DIM, MASK_T)
    s = _dot(q, tl.trans(k), DOT_FP32, PRECISION)
    b = _key_bias(bias_base, offs_n, stride_bn, N, HAS_BIAS, LOG_BIAS, FAST_LOG, MASK_T)
    return k, v, tl.fma(s, QK_SCALE, tl.broadcast_to(b[None, :], s.shape))


@triton.jit
def _softmax_tile(q, m_i, l_i, acc, k_base, v_base, bias_base, offs_n, offs_d, stride_kn, stride_vn, stride_bn, N,
                  QK_SCALE, HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, LOG_BIAS: tl.constexpr,
                  DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, FAST_LOG: tl.constexpr, MASK_T: tl.constexpr):
    """One key tile of the online softmax: the running maximum ``m_i``, sum ``l_i`` and output ``acc``
    after keys ``offs_n``."""
    _, v, s = _key_tiles(q, k_base, v_base, bias_base, offs_n, offs_d, stride_kn, stride_vn, stride_bn, N, QK_SCALE,
                         HEAD_DIM, HAS_BIAS, LOG_BIAS, DOT_FP32, PRECISION, FAST_LOG, MASK_T)
    # Every query sees key 0 in the first tile, so m_new is finite from there on.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32, PRECISION)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["M", "N"])
def _attention_fwd_kernel(
    q_ptr,  # [B', H, M, HEAD_DIM] any strides, unit channel stride
    k_ptr,  # [B', H, N, HEAD_DIM] any strides, unit channel stride
    v_ptr,  # [B', H, N, HEAD_DIM] any strides, unit channel stride
    bias_ptr,  # [B', N] float32 log(size) of every key, or with LOG_BIAS size, any float (read only if HAS_BIAS)
    out_ptr,  # [B', M, H, HEAD_DIM] contiguous (returned as a [B', H, M, HEAD_DIM] view)
    lse_ptr,  # [B', H, M] float32 out (if STORE_LSE): log2 of the sum of exp2 of each query's logits (log2 units)
    M,  # queries
    N,  # keys
    H,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bn,
    QK_SCALE,  # softmax scale times log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LOG_BIAS: tl.constexpr,  # bias_ptr holds the sizes: their log is taken here (inference: one op fewer)
    STORE_LSE: tl.constexpr,  # write lse (for a backward); inference passes False and no lse buffer
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    HEAD_ALIGN: tl.constexpr,  # a power of two dividing stride_qh, stride_kh and stride_vh
    FAST_LOG: tl.constexpr,  # the sizes' log by the hardware's lg2.approx (an NVIDIA GPU; see _log2)
):
    UNMASKED_TILES: tl.constexpr = _unmasked_tiles(q_ptr.dtype.element_ty, HEAD_DIM, BLOCK_D)
    # Query tiles of one (clip, head) are adjacent in the grid, so their K and V stay in L2. One grid axis: any
    # number of clips x heads (a second axis holds at most 65535).
    tiles = tl.cdiv(M, BLOCK_M)
    bh = tl.program_id(0) // tiles
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = (tl.program_id(0) % tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _tile(q_ptr + b * stride_qb + tl.multiple_of(h * stride_qh, HEAD_ALIGN), offs_m, offs_d, stride_qn, M,
              HEAD_DIM)
    k_base = k_ptr + b * stride_kb + tl.multiple_of(h * stride_kh, HEAD_ALIGN)
    v_base = v_ptr + b * stride_vb + tl.multiple_of(h * stride_vh, HEAD_ALIGN)
    bias_base = bias_ptr + b * stride_bb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # The full key tiles without masks (no predicate a key on the loads and the logits), then the last,
    # partial one: the same tiles in the same order as one masked loop, so the same bits. The partial tile
    # is a loop of at most one trip, not straight code after the loop: as straight code its loads are
    # independent of the loop, and the compiler kept them live through it (98 -> 238 registers in the dQ
    # pass at head dim 104, 304 B of spills in the float32 forward; sm_90, triton 3.6). Only for 16-bit
    # operands and an unpadded head dim (UNMASKED_TILES): with a padded one two loops spilled 16 B on sm_80
    # (triton 3.8, 64 x 32 tiles of 8 warps), and float32 products saved 2% of their loop for 2-3x the registers.
    n_full = 0
    if UNMASKED_TILES:
        n_full = N - N % BLOCK_N
        for start in range(0, n_full, BLOCK_N):
            m_i, l_i, acc = _softmax_tile(q, m_i, l_i, acc, k_base, v_base, bias_base, start + tl.arange(0, BLOCK_N),
                                          offs_d, stride_kn, stride_vn, stride_bn, N, QK_SCALE, HEAD_DIM, HAS_BIAS,
                                          LOG_BIAS, DOT_FP32, PRECISION, FAST_LOG, False)
    for start in range(n_full, N, BLOCK_N):
        m_i, l_i, acc = _softmax_tile(q, m_i, l_i, acc, k_base, v_base, bias_base, start + tl.arange(0, BLOCK_N),
                                      offs_d, stride_kn, stride_vn, stride_bn, N, QK_SCALE, HEAD_DIM, HAS_BIAS,
                                      LOG_BIAS, DOT_FP32, PRECISION, FAST_LOG, True)
    acc = acc / l_i[:, None]
    mask_m = offs_m < M
    if STORE_LSE:
        tl.store(lse_ptr + bh.to(tl.int64) * M + offs_m, m_i + tl.log2(l_i), mask=mask_m)
    out_rows = out_ptr + ((b * M + offs_m.to(tl.int64)) * H + h) * HEAD_DIM
    tl.store(out_rows[:, None] + offs_d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _dq_tile(q, do, lse, delta, dq, k_base, v_base, bias_base, offs_n, offs_d, stride_kn, stride_vn, stride_bn, N,
             QK_SCALE, HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, LOG_BIAS: tl.constexpr,
             DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, FAST_LOG: tl.constexpr, MASK_T: tl.constexpr):
    """``dq`` plus the contribution of keys ``offs_n`` (the dQ pass; unscaled)."""
    k, v, s = _key_tiles(q, k_base, v_base, bias_base, offs_n, offs_d, stride_kn, stride_vn, stride_bn, N, QK_SCALE,
                         HEAD_DIM, HAS_BIAS, LOG_BIAS, DOT_FP32, PRECISION, FAST_LOG, MASK_T)
    p = tl.exp2(s - lse[:, None])
    dp = _dot(do, tl.trans(v), DOT_FP32, PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, DOT_FP32, PRECISION)


@triton.jit
def _dkdv_tile(k, v, key_bias, dk, dv, dbias, q_base, do_base, lse_row, delta_row, offs_m, offs_d, stride_qn,
               stride_dn, M, QK_SCALE, HEAD_DIM: tl.constexpr, BIAS_GRAD: tl.constexpr, DOT_FP32: tl.constexpr,
               PRECISION: tl.constexpr, MASK_T: tl.constexpr):
    """``dk`` (unscaled), ``dv`` and ``dbias`` plus the contributions of queries ``offs_m`` (the dK/dV pass)."""
    q = _tile(q_base, offs_m, offs_d, stride_qn, M, HEAD_DIM, MASK_T)
    do = _tile(do_base, offs_m, offs_d, stride_dn, M, HEAD_DIM, MASK_T)
    if MASK_T:
        # Padding queries get lse = +inf, so their probabilities are exactly 0.
        mask_m = offs_m < M
        lse = tl.load(lse_row + offs_m, mask=mask_m, other=float("inf"))
        delta = tl.load(delta_row + offs_m, mask=mask_m, other=0.0)
    else:
        lse = tl.load(lse_row + offs_m)
        delta = tl.load(delta_row + offs_m)
    # Transposed tiles (keys x queries), so every product below reduces over a loaded axis.
    s_t = tl.fma(_dot(k, tl.trans(q), DOT_FP32, PRECISION), QK_SCALE,
                 tl.broadcast_to(key_bias[:, None], (k.shape[0], q.shape[0])))
    p_t = tl.exp2(s_t - lse[None, :])
    dv += _dot(p_t.to(do.dtype), do, DOT_FP32, PRECISION)
    dp_t = _dot(v, tl.trans(do), DOT_FP32, PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += _dot(ds_t.to(q.dtype), q, DOT_FP32, PRECISION)
    if BIAS_GRAD:
        dbias += tl.sum(ds_t, axis=1)
    return dk, dv, dbias


@triton.jit(do_not_specialize=["M", "N"])
def _attention_bwd_kernel(
    q_ptr,  # [B', H, M, HEAD_DIM] any strides, unit channel stride
    k_ptr,  # [B', H, N, HEAD_DIM] any strides, unit channel stride
    v_ptr,  # [B', H, N, HEAD_DIM] any strides, unit channel stride
    bias_ptr,  # [B', N] float32, or with LOG_BIAS the sizes, any float (read only if HAS_BIAS)
    out_ptr,  # [B', M, H, HEAD_DIM] contiguous: the forward's output (dQ pass)
    do_ptr,  # [B', H, M, HEAD_DIM] any strides, unit channel stride: gradient of the output
    lse_ptr,  # [B', H, M] float32: the forward's log-sum-exp (log2 units)
    delta_ptr,  # [B', H, M] float32: rowsum(dO * O), written by the dQ pass, read by the dK/dV pass
    dq_ptr,  # [B', H, M, HEAD_DIM] out (dQ pass), strides stride_gq*, unit channel stride
    dk_ptr,  # [B', H, N, HEAD_DIM] out (dK/dV pass), strides stride_gk*, unit channel stride
    dv_ptr,  # [B', H, N, HEAD_DIM] out (dK/dV pass), dk's strides
    dbias_ptr,  # [B', H, N] float32 out: this head's share of the bias gradient (dK/dV pass, if BIAS_GRAD)
    M,  # queries
    N,  # keys
    H,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bn,
    stride_db, stride_dh, stride_dn,
    stride_gqb, stride_gqh, stride_gqn,  # of dq: [B', H, M, d] contiguous, or a slice of a packed gradient
    stride_gkb, stride_gkh, stride_gkn,  # of dk and dv
    QK_SCALE,  # softmax scale times log2(e)
    SM_SCALE,  # softmax scale
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LOG_BIAS: tl.constexpr,  # bias_ptr holds the sizes: their log is taken here, as the forward took it
    BIAS_GRAD: tl.constexpr,
    DKDV: tl.constexpr,  # False: the dQ pass (one program per query tile); True: the dK/dV pass (per key tile)
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    HEAD_ALIGN: tl.constexpr,  # a power of two dividing the head strides: stride_qh, ..., stride_dh, stride_g*h
    FAST_LOG: tl.constexpr,  # as the forward's
):
    UNMASKED_TILES: tl.constexpr = _unmasked_tiles(q_ptr.dtype.element_ty, HEAD_DIM, BLOCK_D)
    # One grid axis, as the forward's: a (clip, head)'s query tiles (key tiles with DKDV) adjacent.
    if DKDV:
        tiles = tl.cdiv(N, BLOCK_N)
    else:
        tiles = tl.cdiv(M, BLOCK_M)
    bh = tl.program_id(0) // tiles
    tile = tl.program_id(0) % tiles
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    query_base = bh.to(tl.int64) * M  # row of this (clip, head) in lse and delta
    key_base = bh.to(tl.int64) * N  # in the bias gradient
    q_base = q_ptr + b * stride_qb + tl.multiple_of(h * stride_qh, HEAD_ALIGN)
    k_base = k_ptr + b * stride_kb + tl.multiple_of(h * stride_kh, HEAD_ALIGN)
    v_base = v_ptr + b * stride_vb + tl.multiple_of(h * stride_vh, HEAD_ALIGN)
    do_base = do_ptr + b * stride_db + tl.multiple_of(h * stride_dh, HEAD_ALIGN)
    bias_base = bias_ptr + b * stride_bb
    if not DKDV:
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        q = _tile(q_base, offs_m, offs_d, stride_qn, M, HEAD_DIM)
        do = _tile(do_base, offs_m, offs_d, stride_dn, M, HEAD_DIM)
        o = _tile(out_ptr + b * M * H * HEAD_DIM + h * HEAD_DIM, offs_m, offs_d, H * HEAD_DIM, M, HEAD_DIM)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
        tl.store(delta_ptr + query_base + offs_m, delta, mask=mask_m)
        lse = tl.load(lse_ptr + query_base + offs_m, mask=mask_m, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        # Full key tiles unmasked, then the partial one (a loop of at most one trip), as the forward's.
        n_full = 0
        if UNMASKED_TILES:
            n_full = N - N % BLOCK_N
            for start in range(0, n_full, BLOCK_N):
                dq = _dq_tile(q, do, lse, delta, dq, k_base, v_base, bias_base, start + tl.arange(0, BLOCK_N), offs_d,
                              stride_kn, stride_vn, stride_bn, N, QK_SCALE, HEAD_DIM, HAS_BIAS, LOG_BIAS, DOT_FP32,
                              PRECISION, FAST_LOG, False)
        for start in range(n_full, N, BLOCK_N):
            dq = _dq_tile(q, do, lse, delta, dq, k_base, v_base, bias_base, start + tl.arange(0, BLOCK_N), offs_d,
                          stride_kn, stride_vn, stride_bn, N, QK_SCALE, HEAD_DIM, HAS_BIAS, LOG_BIAS, DOT_FP32,
                          PRECISION, FAST_LOG, True)
        dq_base = dq_ptr + b * stride_gqb + tl.multiple_of(h * stride_gqh, HEAD_ALIGN)
        dq_rows = dq_base + offs_m.to(tl.int64) * stride_gqn
        tl.store(dq_rows[:, None] + offs_d[None, :], (dq * SM_SCALE).to(dq_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_d[None, :])
    else:
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k = _tile(k_base, offs_n, offs_d, stride_kn, N, HEAD_DIM)
        v = _tile(v_base, offs_n, offs_d, stride_vn, N, HEAD_DIM)
        key_bias = _key_bias(bias_base, offs_n, stride_bn, N, HAS_BIAS, LOG_BIAS, FAST_LOG)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dbias = tl.zeros([BLOCK_N], dtype=tl.float32)
        # Full query tiles unmasked, then the partial one (a loop of at most one trip).
        m_full = 0
        if UNMASKED_TILES:
            m_full = M - M % BLOCK_M
            for start in range(0, m_full, BLOCK_M):
                dk, dv, dbias = _dkdv_tile(k, v, key_bias, dk, dv, dbias, q_base, do_base, lse_ptr + query_base,
                                           delta_ptr + query_base, start + tl.arange(0, BLOCK_M), offs_d, stride_qn,
                                           stride_dn, M, QK_SCALE, HEAD_DIM, BIAS_GRAD, DOT_FP32, PRECISION, False)
        for start in range(m_full, M, BLOCK_M):
            dk, dv, dbias = _dkdv_tile(k, v, key_bias, dk, dv, dbias, q_base, do_base, lse_ptr + query_base,
                                       delta_ptr + query_base, start + tl.arange(0, BLOCK_M), offs_d, stride_qn,
                                       stride_dn, M, QK_SCALE, HEAD_DIM, BIAS_GRAD, DOT_FP32, PRECISION, True)
        rows = b * stride_gkb + tl.multiple_of(h * stride_gkh, HEAD_ALIGN) + offs_n.to(tl.int64) * stride_gkn
        mask = mask_n[:, None] & mask_d[None, :]
        tl.store((dk_ptr + rows)[:, None] + offs_d[None, :], (dk * SM_SCALE).to(dk_ptr.dtype.element_ty), mask=mask)
        tl.store((dv_ptr + rows)[:, None] + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=mask)
        if BIAS_GRAD:
            tl.store(dbias_ptr + key_base + offs_n, dbias, mask=mask_n)
