"""Triton backend of ``ops.linear_act``: a linear layer and the activation after it in one launch.

The first half of a block's MLP, ``act(c_fc(x))``, is a matrix product whose ``[M, 4 D]`` output torch writes,
then reads back and writes again to apply the activation. ``_linear_act_fwd_kernel`` (``tempme_kernels.linear``)
applies it to each output tile before the tile is written. Forward only: where a gradient is wanted,
``ops.linear_act`` runs the torch ops.

``tempme_fast.encoder.FUSED_MLP`` decides whether the encoder takes it for each block's MLP on the Triton
backend (16-bit weights, no gradient, ``c_fc`` and ``c_proj`` linear layers around a GELU, tanh-GELU or
QuickGELU). It is off by default: the kernel replaces cuBLAS's product for ``c_fc``, and whether the
activation's saved pass outweighs what the product may lose to cuBLAS is for a GPU run to say
(``bench_model``'s ``tempme-triton-mlp`` rows).

As in :mod:`.triton_ops`: an eager call runs the launcher directly; ``tempme::linear_act_fwd`` (with a fake
implementation) is taken while ``torch.compile`` traces or a dispatch mode watches. The tiles come from the
shape alone, so results repeat bit for bit.
"""
from typing import Dict, Optional

import torch

from tempme_kernels.linear import _linear_act_fwd_kernel

from . import reference, triton_ops
from .eager import cast, custom_op_or
from .launch import Launcher
from .memo import forget_on_assign, remembered

__all__ = ["ACTIVATIONS", "linear_act", "linear_act_forward"]

# The activations the kernel applies, by name (``ops.linear_act``'s ``act``), and its ACT constexpr.
ACTIVATIONS = {name: i for i, name in enumerate(reference.LINEAR_ACTIVATIONS)}
# GPU tiles of 16-bit products (rows x columns x K step, warps, stages of operands in shared memory): 128 x 128
# at 8 warps, 4 stages (128 KB); 64 x 128 at 4 warps where those would leave fewer than GPU_FILL programs. Row
# blocks are grouped by GROUP_M for L2 reuse. 128 x 256 tiles (8 warps, 3 stages) spilled 112-176 B on sm_90 in
# the GELU's epilogue (255 registers); 128 x 128 holds 155-156 (sm_90) and 176-178 (sm_80) without a spill.
GPU_TILE = (128, 128, 64, 8, 4)
GPU_SMALL_TILE = (64, 128, 64, 4, 4)
GROUP_M = 8
# float32 products run on the FMA units ("ieee", as the reference: no TF32), in small tiles.
FP32_TILE = (64, 64, 16, 4, 3)
# Largest tile side in the interpreter (which pays per op, not per lane) and for float64 (a broadcast-sum
# product of BLOCK_M x BLOCK_N x BLOCK_K elements, no tl.dot); tests shrink it to walk several tiles.
INTERPRETER_TILE = 64
FP64_TILE = 16


def _interpreting() -> bool:
    return triton_ops._interpreting()


def _new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    return triton_ops._new_output(shape, dtype, device)


def _linear_tiles(m: int, n: int, k: int, dtype: torch.dtype) -> Dict[str, int]:
    """Tiles, warps and stages of the product ``[m, k] x [k, n]`` in ``dtype``."""
    if _interpreting() or dtype == torch.float64:
        cap = FP64_TILE if dtype == torch.float64 else INTERPRETER_TILE
        block = {name: max(16, min(triton_ops._next_power_of_2(v), cap))
                 for name, v in zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), (m, n, k))}
        return dict(block, GROUP_M=2)
    if dtype == torch.float32:
        bm, bn, bk, warps, stages = FP32_TILE
    else:
        bm, bn, bk, warps, stages = GPU_TILE
        if triton_ops._cdiv(m, bm) * triton_ops._cdiv(n, bn) < triton_ops.GPU_FILL:
            bm, bn, bk, warps, stages = GPU_SMALL_TILE
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M, num_warps=warps, num_stages=stages)


def linear_act_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: str) -> torch.Tensor:
    """``act(x @ weight.T + bias)``, one launch.

    Args:
        x: ``[..., K]`` float, any strides (copied where its last dim is not of unit stride, or where its
            leading dims do not flatten to one row stride).
        weight: ``[N, K]``; bias: ``[N]`` or None; both cast to x's dtype (as the encoder casts them).
        act: a key of :data:`ACTIVATIONS`.
    Returns:
        ``[..., N]`` contiguous in x's dtype: the product plus bias rounded once, then the activation from
        that, computed in float32 (float64 for float64 x) and rounded as torch's ops round it.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    weight = cast(weight, x.dtype)
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    m, n = rows.shape[0], weight.shape[0]
    key = ("linear_act_fwd", rows.shape, rows.stride(), weight.shape, weight.stride(), x.dtype, bias is None, act)
    launcher = remembered(key, lambda: _linear_act_launch(rows, weight, bias is not None, act))
    out = _new_output((m, n), x.dtype, x.device)
    launcher(rows, weight, out if bias is None else cast(bias, x.dtype).contiguous(), out)
    return out.view(*lead, n)


def _linear_act_launch(rows: torch.Tensor, weight: torch.Tensor, has_bias: bool, act: str) -> Launcher:
    """The launch of an input signature: it takes the kernel's four tensors (x, weight, bias, out)."""
    (m, k), n = rows.shape, weight.shape[0]
    tiles = _linear_tiles(m, n, k, rows.dtype)
    grid = (triton_ops._cdiv(m, tiles["BLOCK_M"]) * triton_ops._cdiv(n, tiles["BLOCK_N"]),)
    # Products (DOT_MODE): float64 by broadcast sums, float32 ones in full precision (the reference takes no
    # TF32), 16-bit ones on the tensor cores, but in float32 in the interpreter (its 16-bit tl.dot is wrong).
    dot_mode = 2 if rows.dtype == torch.float64 else 1 if _interpreting() or rows.dtype == torch.float32 else 0
    meta = dict(HAS_BIAS=has_bias, ACT=ACTIVATIONS[act], EVEN_K=k % tiles["BLOCK_K"] == 0, DOT_MODE=dot_mode,
                **tiles, **({"INTERPRETED": True} if _interpreting() else {}))
    return Launcher(_linear_act_fwd_kernel, grid, (m, n, k, rows.stride(0), weight.stride(0)), meta)


@torch.library.custom_op("tempme::linear_act_fwd", mutates_args=())
def _linear_act_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: str) -> torch.Tensor:
    return linear_act_forward(x, weight, bias, act)


@_linear_act_fwd_op.register_fake
def _(x, weight, bias, act):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


linear_act = custom_op_or(linear_act_forward, "linear_act_fwd")


# Assigning a tile table or a function (as the tests do) forgets the launch descriptions.
forget_on_assign(__name__)
