"""Where a token of a (possibly joined) clip lives in memory.

A ClipMe join turns ``GROUP`` adjacent clips of ``N_IN`` tokens (``C_IN`` class tokens each) into
one clip: the ``GROUP * C_IN`` class tokens in clip order, then clip 0's patches, clip 1's, ...
(``reference.join_clips``). Rather than copy the clips into that order, the kernels read the
unjoined tensor through this mapping; with ``GROUP = 1`` it is the identity. ``_token_rows`` loads
the features of such tokens, optionally with a residual added.
"""
import triton
import triton.language as tl


@triton.jit
def _joined_token(row, pos, GROUP, C_IN, N_IN):
    """Token ``pos`` of joined clip ``row`` -> ``(clip, token)`` of the unjoined input, both int64."""
    n_cls = GROUP * C_IN
    is_cls = pos < n_cls
    patch = pos - n_cls
    per_clip = N_IN - C_IN
    # No join (GROUP 1): clip 0 of the input, the identity. Triton specialises an integer argument of 1
    # into the code, so there the divisions are dead code: each is about 20 instructions when its divisor
    # is only known at run time, and they sit in every merged source's load.
    k = tl.where(GROUP == 1, 0, tl.where(is_cls, pos // tl.maximum(C_IN, 1), patch // per_clip))
    t = tl.where(is_cls, pos - k * C_IN, C_IN + patch - k * per_clip)
    return row * GROUP + k.to(tl.int64), t.to(tl.int64)


@triton.jit
def _token_rows(x_ptr, res_ptr, clip, tok, offs_d, mask, stride_xb, stride_xn, stride_xd, stride_rb, stride_rn,
                stride_rd, HAS_RES: tl.constexpr):
    """Feature slice ``offs_d`` of tokens ``(clip, tok)`` (columns, ``[T, 1]``) of ``x``, or of ``x + residual``
    rounded to x's dtype (``HAS_RES``: as ``torch.add`` computes it, in float32 for 16-bit inputs)."""
    x = tl.load(x_ptr + clip * stride_xb + tok * stride_xn + offs_d[None, :] * stride_xd, mask=mask, other=0.0)
    if HAS_RES:
        res = tl.load(res_ptr + clip * stride_rb + tok * stride_rn + offs_d[None, :] * stride_rd, mask=mask,
                      other=0.0)
        x = _rounded_sum(x, res)
    return x


@triton.jit
def _rounded_sum(x, y):
    """``x + y`` rounded to x's dtype as ``torch.add`` computes it (in float32 for 16-bit inputs)."""
    if x.dtype == tl.float64:
        s = x + y
    else:
        s = (x.to(tl.float32) + y.to(tl.float32)).to(x.dtype)
    return s


@triton.jit
def _bf16_nearest(v):
    """float32 ``v`` rounded to the nearest bfloat16 (ties to even), still as float32: converting that to
    bfloat16 is then exact. The interpreter's conversion truncates, the GPU's rounds; this rounds in both."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)
