"""Triton backend of ``ops.add_norm``: the residual add and the LayerNorm after it, in one launch.

A block ends with ``x + mlp(ln_2(x))`` and the next block begins with ``ln_1`` of that sum; the last
block's class tokens go from ``x + attn`` to ``ln_2`` and from ``x + mlp`` to ``ln_post``. Two ops
there write the sum and read it back; ``_add_norm_fwd_kernel`` (``tempme_kernels.norm``) reads
``x`` and the residual once and writes the sum and its LayerNorm (and, when a gradient is wanted,
the LayerNorm's statistics). The backward is torch: the LayerNorm's gradient from the saved sum and
statistics (``triton_ops.layer_norm_backward``) plus the sum's own gradient, which is also the
gradient of ``x`` and of the residual.

``embed_norm_forward`` is the start of the vision tower in one launch (``_embed_norm_fwd_kernel``): the
class token, the position embedding and ``ln_pre`` of each frame's patch embeddings, and, given its
parameters, the first block's ``ln_1`` of the result. It has no backward of its own: where a gradient is
wanted, ``ops.embed_norm`` runs the torch ops.

As in :mod:`.triton_ops`: an eager call runs the launcher directly and uses the autograd function
only where a gradient can flow; ``tempme::add_norm_fwd`` (with a fake implementation) is taken
while ``torch.compile`` traces or a dispatch mode watches. The tile (tokens x every feature) and
the warps come from the shape alone, so results repeat bit for bit.
"""
from typing import Dict, List, Optional, Tuple

import torch
import triton.language as tl

from tempme_kernels.norm import _add_norm_fwd_kernel, _embed_norm_fwd_kernel

from . import triton_ops
from .eager import cast, custom_op_or, needs_grad
from .launch import Launcher
from .memo import forget_on_assign, remembered

__all__ = ["AddNormFunction", "add_norm", "add_norm_forward", "embed_norm", "embed_norm_forward"]


def _interpreting() -> bool:
    return triton_ops._interpreting()


def _new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    return triton_ops._new_output(shape, dtype, device)


def _add_norm_tiles(tokens: int, width: int, itemsize: int) -> Dict[str, int]:
    """A program takes ``BLOCK_T`` tokens with all their features: about ``NORM_TILE_ELEMENTS`` a
    tile on a GPU, as the merge kernel's LayerNorm stage (8 warps for 32-bit features)."""
    block_d = triton_ops._next_power_of_2(width)
    cap = triton_ops.INTERPRETER_BLOCK if _interpreting() else max(1, triton_ops.NORM_TILE_ELEMENTS // block_d)
    block_t = max(1, min(triton_ops._next_power_of_2(tokens), cap))
    return dict(BLOCK_T=block_t, BLOCK_D=block_d, num_warps=8 if itemsize > 2 else 4)


def add_norm_forward(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                     stats: bool = False) -> Tuple[torch.Tensor, ...]:
    """``(x + residual, layer_norm(x + residual))`` and, with ``stats``, the LayerNorm's statistics,
    one launch.

    Args:
        x, residual: ``[B', N, D]``, one float dtype, any strides.
        weight, bias: ``[D]`` LayerNorm parameters, any float dtype; eps: its epsilon.
        stats: also write the LayerNorm's statistics, for its backward.
    Returns:
        Both ``[B', N, D]`` contiguous in x's dtype: the sum rounded as ``torch.add`` rounds it,
        and its LayerNorm computed in float32 (float64 for float64 x) and rounded once; with
        ``stats`` then ``[2, B', N, 1]`` in that accumulation dtype (means, then reciprocal standard
        deviations).
    """
    eps = float(eps)
    key = ("add_norm_fwd", x.shape, x.stride(), residual.stride(), x.dtype, eps, stats)
    launcher = remembered(key, lambda: _add_norm_launch(x, residual, eps, stats))
    out = _new_output(x.shape, x.dtype, x.device)
    ln = _new_output(x.shape, x.dtype, x.device)
    stats_buf = triton_ops._layer_norm_stats(x.shape[0], x.shape[1], x) if stats else ln  # not written without stats
    launcher(x, residual, weight.contiguous(), bias.contiguous(), out, ln, stats_buf)
    return (out, ln, stats_buf) if stats else (out, ln)


def _add_norm_launch(x: torch.Tensor, residual: torch.Tensor, eps: float, stats: bool) -> Launcher:
    """The add-norm launch of an input signature: it takes the kernel's seven tensors."""
    rows, tokens, width = x.shape
    tiles = _add_norm_tiles(rows * tokens, width, x.dtype.itemsize)
    meta = dict(ACC=tl.float64 if x.dtype == torch.float64 else tl.float32, **tiles,
                **({"STATS": True} if stats else {}))
    return Launcher(_add_norm_fwd_kernel, (triton_ops._cdiv(rows * tokens, tiles["BLOCK_T"]),),
                    (rows * tokens, tokens, width, *x.stride(), *residual.stride(), eps), meta)


@torch.library.custom_op("tempme::add_norm_fwd", mutates_args=())
def _add_norm_fwd_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                     stats: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return triton_ops._op_outputs(add_norm_forward(x, residual, weight, bias, eps, stats), x, stats)


@_add_norm_fwd_op.register_fake
def _(x, residual, weight, bias, eps, stats=False):
    return x.new_empty(x.shape), x.new_empty(x.shape), triton_ops._fake_stats(x, *x.shape[:2], stats)


_add_norm_fwd = custom_op_or(add_norm_forward, "add_norm_fwd")


class AddNormFunction(torch.autograd.Function):
    """``(x + residual, layer_norm(x + residual))``, differentiable in ``x``, ``residual``, ``weight``
    and ``bias``; ``x`` and ``residual`` get the same gradient."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps: float):
        out, ln, stats = _add_norm_fwd(x, residual, weight, bias, eps, True)
        ctx.save_for_backward(out, weight, stats)
        ctx.eps = eps
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros, no add
        return out, ln

    @staticmethod
    def backward(ctx, grad_out, grad_ln):
        out, weight, stats = ctx.saved_tensors
        grad, grad_w, grad_b = grad_out, None, None
        if grad_ln is not None:
            grad_norm_in, grad_w, grad_b = triton_ops.layer_norm_backward(grad_ln, out, weight, ctx.eps,
                                                                          ctx.needs_input_grad[2:4], stats)
            grad = grad_norm_in if grad is None else grad + grad_norm_in
        grad = None if grad is None else cast(grad, out.dtype)
        return grad, grad, grad_w, grad_b, None


def add_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """:class:`AddNormFunction` where a gradient can flow; otherwise its forward alone, without a graph node."""
    if needs_grad(x, residual, weight, bias):
        return AddNormFunction.apply(x, residual, weight, bias, float(eps))
    return _add_norm_fwd(x, residual, weight, bias, float(eps))[:2]


def embed_norm_forward(patches: torch.Tensor, class_embedding: torch.Tensor, positional_embedding: torch.Tensor,
                       weight: torch.Tensor, bias: torch.Tensor, eps: float, next_weight: Optional[torch.Tensor] = None,
                       next_bias: Optional[torch.Tensor] = None, next_eps: float = 0.0) -> List[torch.Tensor]:
    """``layer_norm(cat([class_embedding, patches]) + positional_embedding)`` per frame, one launch; with
    ``next_weight`` and ``next_bias``, also the LayerNorm that reads it next, in the same launch.

    Args:
        patches: ``[M, N - 1, D]`` float, any strides: each frame's patch embeddings.
        class_embedding: ``[D]``; positional_embedding: ``[N, D]``; both cast to the patches' dtype first
            (as the encoder casts them).
        weight, bias: ``[D]`` LayerNorm parameters, any float dtype; eps: its epsilon.
        next_weight, next_bias, next_eps: the next LayerNorm's (the first block's ``ln_1``), or None.
    Returns:
        ``[ln]``, or with the next LayerNorm ``[ln, next]``: ``ln`` ``[M, N, D]`` contiguous in the patches'
        dtype, the sum rounded as torch's add rounds it, then its LayerNorm computed in float32 (float64 for
        float64 patches) and rounded once; ``next`` that LayerNorm of ``ln`` as stored, computed the same way.
    """
    eps, next_eps, has_next = float(eps), float(next_eps), next_weight is not None
    frames, _, width = patches.shape
    tokens = positional_embedding.shape[0]
    key = ("embed_norm_fwd", patches.shape, patches.stride(), patches.dtype, tokens, eps, next_eps, has_next)
    launcher = remembered(key, lambda: _embed_norm_launch(patches, tokens, eps, next_eps, has_next))
    ln = _new_output((frames, tokens, width), patches.dtype, patches.device)
    outs = [ln, _new_output((frames, tokens, width), patches.dtype, patches.device)] if has_next else [ln]
    weight, bias = weight.contiguous(), bias.contiguous()
    launcher(patches, cast(class_embedding, patches.dtype).contiguous(),
             cast(positional_embedding, patches.dtype).contiguous(), weight, bias, ln,
             next_weight.contiguous() if has_next else weight, next_bias.contiguous() if has_next else bias, outs[-1])
    return outs


def _embed_norm_launch(patches: torch.Tensor, tokens: int, eps: float, next_eps: float, has_next: bool) -> Launcher:
    """The embed-norm launch of an input signature: it takes the kernel's nine tensors."""
    frames, _, width = patches.shape
    tiles = _add_norm_tiles(frames * tokens, width, patches.dtype.itemsize)
    meta = dict(ACC=tl.float64 if patches.dtype == torch.float64 else tl.float32, **tiles,
                **({"NEXT": True} if has_next else {}))
    return Launcher(_embed_norm_fwd_kernel, (triton_ops._cdiv(frames * tokens, tiles["BLOCK_T"]),),
                    (frames * tokens, tokens, width, *patches.stride(), eps, next_eps), meta)


@torch.library.custom_op("tempme::embed_norm_fwd", mutates_args=())
def _embed_norm_fwd_op(patches: torch.Tensor, class_embedding: torch.Tensor, positional_embedding: torch.Tensor,
                       weight: torch.Tensor, bias: torch.Tensor, eps: float, next_weight: Optional[torch.Tensor] = None,
                       next_bias: Optional[torch.Tensor] = None, next_eps: float = 0.0) -> List[torch.Tensor]:
    return embed_norm_forward(patches, class_embedding, positional_embedding, weight, bias, eps, next_weight,
                              next_bias, next_eps)


@_embed_norm_fwd_op.register_fake
def _(patches, class_embedding, positional_embedding, weight, bias, eps, next_weight=None, next_bias=None,
      next_eps=0.0):
    shape = (patches.shape[0], positional_embedding.shape[0], patches.shape[2])
    return [patches.new_empty(shape) for _ in range(1 if next_weight is None else 2)]


embed_norm = custom_op_or(embed_norm_forward, "embed_norm_fwd")


# Assigning a function (as the tests do) forgets the launch descriptions.
forget_on_assign(__name__)
