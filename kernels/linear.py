"""A linear layer with its activation in one launch: ``act(x @ weight.T + bias)``, the first half of a
transformer block's MLP (open_clip's ``c_fc`` and its ``gelu``).

Twin: ``tempme_fast.ops.reference.linear_act``. torch runs the product (with the bias) as one kernel, which
writes the ``[M, 4 D]`` hidden activations rounded to their dtype, and the activation as a second, which
reads them back and writes them again: at ViT-B/16 and 16 videos a third of a GB each way per block. Here
the activation is applied to the product's tile while it is still in registers.

The rounding follows torch's: the product plus bias is rounded once to the output dtype (as ``F.linear``
writes it), the activation computed from that in float32 (float64 for float64 inputs) and rounded once
(``ACT`` 1, 2: ``nn.GELU`` exact and ``tanh``), or, for ``QuickGELU`` (``ACT`` 3, ``x * sigmoid(1.702 x)``,
three torch ops), rounded after each of its three steps as those ops round.

Work split: one program per ``BLOCK_M x BLOCK_N`` output tile; the tiles of ``GROUP_M`` row blocks are
numbered column by column, so programs that run together share their rows of ``x`` and their columns of
``weight`` in L2.
"""
import triton
import triton.language as tl

from .best_match import _dot_tile
from .tokens import _bf16_nearest


@triton.jit
def _rounded(v, DTYPE: tl.constexpr, ACC: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    """``v`` rounded to ``DTYPE`` to nearest (as a torch op writing that dtype rounds it), in ``ACC``."""
    if BF16_BY_HAND and DTYPE == tl.bfloat16:
        return _bf16_nearest(v)
    return v.to(DTYPE).to(ACC)


@triton.jit
def _activation(y, ACT: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    """``ACT`` of ``y`` (the product rounded to ``DTYPE``, in ``ACC``): 0 none, 1 GELU (erf), 2 GELU (tanh),
    3 QuickGELU (each of its steps rounded to ``DTYPE``)."""
    if ACT == 1:
        return 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        # tanh(t) = 2 sigmoid(2 t) - 1
        return 0.5 * y * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    elif ACT == 3:
        scaled = _rounded(1.702 * y, DTYPE, ACC, BF16_BY_HAND)
        gate = _rounded(tl.sigmoid(scaled), DTYPE, ACC, BF16_BY_HAND)
        return y * gate
    else:
        return y


# M (tokens) changes from layer to layer; the feature counts and strides keep their divisibility by 16,
# which lets the compiler emit 128-bit loads and stores.
@triton.jit(do_not_specialize=["M"])
def _linear_act_fwd_kernel(
    x_ptr,  # [M, K] any float dtype, unit stride along K
    w_ptr,  # [N, K] x's dtype, unit stride along K (nn.Linear's weight)
    b_ptr,  # [N] x's dtype (read only if HAS_BIAS)
    out_ptr,  # [M, N] contiguous out, x's dtype
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,  # K is a multiple of BLOCK_K
    DOT_MODE: tl.constexpr,  # the products (best_match._dot_tile's): 0 16-bit tl.dot, 1 float32, 2 float64
    INTERPRETED: tl.constexpr = False,  # bfloat16 rounded to nearest by hand (the interpreter's conversion truncates)
):
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(blocks_m - first_m, GROUP_M)
    block_m = first_m + (pid % per_group) % group_m
    block_n = (pid % per_group) // group_m

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        if EVEN_K:  # no K step runs past the end: only the rows are masked
            a = tl.load(x_rows + k[None, :], mask=mask_m[:, None], other=0.0)
            b = tl.load(w_rows + k[None, :], mask=mask_n[:, None], other=0.0)
        else:
            a = tl.load(x_rows + k[None, :], mask=mask_m[:, None] & (k[None, :] < K), other=0.0)
            b = tl.load(w_rows + k[None, :], mask=mask_n[:, None] & (k[None, :] < K), other=0.0)
        acc += _dot_tile(a, b, DOT_MODE, ACC)
    if HAS_BIAS:
        # Loaded in the accumulator's own layout (every row of the tile reads the same bias, from L1): a
        # [BLOCK_N] load takes the layout of the accumulator's columns, one 16-bit element a thread.
        rows_n = offs_n[None, :] + 0 * offs_m[:, None]
        acc += tl.load(b_ptr + rows_n, mask=mask_n[None, :] & mask_m[:, None], other=0.0).to(ACC)
    y = _activation(_rounded(acc, DTYPE, ACC, INTERPRETED), ACT, DTYPE, ACC, INTERPRETED)
    out = out_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out, _rounded(y, DTYPE, ACC, INTERPRETED).to(DTYPE), mask=mask_m[:, None] & mask_n[None, :])
