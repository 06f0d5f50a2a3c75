"""TempMe's video encoder over an open_clip ``VisionTransformer``: stem, merging blocks, head.

Each piece is a plain function of the visual tower's own modules and an explicit state, so the
forward can be compiled, checkpointed, and measured layer by layer (the FLOPs report does that).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import ops, tracking
from .ops.eager import cast, needs_grad
from .schedule import LayerPlan


class ClipState(NamedTuple):
    """What one block hands the next.

    Attributes:
        x: ``[B * F, N, D]`` tokens, clips of one video adjacent.
        size: ``[B * F, N, 1]`` float32, original patches each token stands for.
        protected: class tokens at the front of every clip.
        sources: None (the default: no tracking, no cost), or ``[B, T * (1 + P)]`` int64, the
            token now holding every original token of the video (see :mod:`tempme_fast.tracking`).
        merged: False while every size is still 1, known from the schedule without reading
            ``size``; attention then gets no bias. True (the safe default) when unknown.
        normed: None, or ``(norm, norm(x))`` when the block that wrote ``x`` also applied the
            LayerNorm that reads it next (:func:`ops.add_norm`: its residual add and that
            LayerNorm in one op; see :func:`block_forward`'s ``next_norm``). Read only by a
            consumer whose LayerNorm is that very module.
    """

    x: torch.Tensor
    size: torch.Tensor
    protected: int
    sources: Optional[torch.Tensor] = None
    merged: bool = True
    normed: Optional[Tuple[nn.Module, torch.Tensor]] = None


# Whether each block's c_fc and activation run as one ops.linear_act on the Triton backend (16-bit weights, no
# gradient; see _mlp). Off by default: that kernel replaces cuBLAS's product for c_fc, and whether the activation's
# saved pass outweighs what the product may lose to cuBLAS is for a GPU run to say (tempme-triton-mlp rows of
# benchmarks.bench_model).
FUSED_MLP = False


class EncoderOptions(NamedTuple):
    """Per-call switches of the encoder that are not part of the merge schedule."""

    backend: str = "auto"
    prop_attn: bool = True
    attention: str = "auto"


def _patchify_conv(conv: nn.Module) -> bool:
    """Whether ``conv`` is a plain patchifying convolution (kernel = stride, no padding, dilation,
    groups or hooks), which :func:`patch_embed` may compute as one matrix product."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == conv.stride and conv.padding == (0, 0)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and not conv._forward_hooks and not conv._forward_pre_hooks)


def patch_embed(conv: nn.Module, frames: torch.Tensor, as_matmul: Optional[bool] = None) -> torch.Tensor:
    """``conv(frames)`` as tokens: ``[M, 3, H, W]`` -> ``[M, gh * gw, D]``.

    On CUDA (``as_matmul=None``) a patchifying convolution runs as one matrix product over the
    flattened patches. cuDNN takes a 3-channel, stride-32 convolution as an implicit GEMM after two
    layout conversions: at one ViT-B/32 video they took 0.38 of the forward's 1.13 ms of kernel time
    on an H200 (the GEMM itself is about 10 us of work). The product sums the same terms in another
    order; on the CPU the convolution runs as open_clip runs it.
    """
    if as_matmul is None:  # (meta tensors count as CUDA while a model's launches are recorded: ops.recording)
        as_matmul = frames.is_cuda or ops.recording.META_AS_GPU and frames.is_meta
    if not (as_matmul and _patchify_conv(conv)):
        return conv(frames).flatten(2).transpose(1, 2)
    (ph, pw), (m, channels, height, width) = conv.kernel_size, frames.shape
    gh, gw = height // ph, width // pw  # a stride-p convolution drops a remainder of rows and columns
    patches = frames[:, :, :gh * ph, :gw * pw].reshape(m, channels, gh, ph, gw, pw)
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(m, gh * gw, channels * ph * pw)
    return F.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)


def embed_frames(visual: nn.Module, frames: torch.Tensor, track_videos: Optional[int] = None,
                 backend: str = "torch", next_norm: Optional[nn.Module] = None) -> ClipState:
    """Patch embedding, class token, position embedding and ``ln_pre``: ``[M, 3, H, W]`` -> state.

    ``track_videos=B`` (``M = B * T``) starts source tracking; None leaves it off. On the Triton backend,
    where no gradient is wanted, the class token, position embedding and ``ln_pre`` are one op
    (``ops.embed_norm``) if ``ln_pre`` is a LayerNorm with weight and bias and patch dropout drops nothing;
    training runs open_clip's ops. ``next_norm``: the LayerNorm that reads the result next (the first block's
    ``ln_1``, see ``model.next_norm``); a fusable one goes into that op, and the state hands it on in
    ``normed``.
    """
    x = patch_embed(visual.conv1, cast(frames, visual.conv1.weight.dtype))
    ln_pre, normed = visual.ln_pre, None
    if (ops.resolve_backend(backend, x) == "triton" and _fusable_norm(ln_pre)
            and _drops_nothing(visual.patch_dropout)
            and not needs_grad(x, visual.class_embedding, visual.positional_embedding, ln_pre.weight, ln_pre.bias)):
        fuse_next = next_norm is not None and _fusable_norm(next_norm)
        x = ops.embed_norm(x, visual.class_embedding, visual.positional_embedding, ln_pre.weight, ln_pre.bias,
                           ln_pre.eps, "triton",
                           next_norm=(next_norm.weight, next_norm.bias, next_norm.eps) if fuse_next else None)
        if fuse_next:
            x, h = x
            normed = (next_norm, h)
    else:
        cls = cast(visual.class_embedding, x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + cast(visual.positional_embedding, x.dtype)
        x = visual.patch_dropout(x)
        x = _layer_norm(ln_pre, x)
    size = torch.ones(x.shape[0], x.shape[1], 1, device=x.device, dtype=torch.float32)
    sources = None
    if track_videos is not None:
        sources = tracking.initial_sources(track_videos, x.shape[0] // track_videos, x.shape[1], x.device)
    return ClipState(x, size, 1, sources, merged=False, normed=normed)


def _self_attention(attn: nn.MultiheadAttention, h: torch.Tensor, size: Optional[torch.Tensor],
                    impl: str, backend: str, keys: bool):
    """Multi-head self-attention with open_clip's weights; returns ``(out [B', N, D], keys [B', N, D])``
    (keys None unless asked for).

    ``keys`` are every head's keys, token-major: a view of the projection. Averaged over heads they
    are the merge metric of the merge after attention, which :func:`ops.match` takes with
    ``heads`` (on Triton, averaged as the match reads them, never written).
    """
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
    out, _ = ops.self_attention(qkv, attn.num_heads, size, impl=impl, backend=backend)
    width = h.shape[-1]
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias), (qkv[..., width:2 * width] if keys else None)


def _layer_scale(scale: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``scale(x)``: a block's LayerScale, or open_clip's ``nn.Identity`` where it has none, whose call (a
    module call of host time, twice a block) is skipped."""
    return x if type(scale) is nn.Identity else scale(x)


def _drops_nothing(dropout: nn.Module) -> bool:
    """Whether open_clip's patch dropout (``nn.Identity`` without one) passes every token: not in training, or
    with a dropout probability of 0."""
    return type(dropout) is nn.Identity or not dropout.training or getattr(dropout, "prob", None) == 0


def _fusable_norm(norm: nn.Module) -> bool:
    """A LayerNorm over the last dim with weight and bias (torch's, open_clip's LayerNorm and LayerNormFp32)
    and no forward hook, which :func:`ops.merge_norm` computes; any other norm, a subclass with a forward of its
    own among them, runs as its module after the merge."""
    kind = type(norm)
    return ((kind is nn.LayerNorm or (kind.__name__ in ("LayerNorm", "LayerNormFp32")
                                      and kind.__module__ == "open_clip.transformer"))
            and len(norm.normalized_shape) == 1 and norm.weight is not None and norm.bias is not None
            and not norm._forward_hooks and not norm._forward_pre_hooks)


def _mlp_activation(mlp: nn.Module) -> Optional[str]:
    """``ops.linear_act``'s name for the activation of an open_clip MLP (``c_fc``, the activation, ``c_proj``:
    ``nn.GELU`` exact or tanh, or open_clip's ``QuickGELU``), or None for any other MLP: other layers, a
    subclass of ``nn.Linear`` (a quantised or adapted layer computes something else from its weight), or a
    forward hook on any of them (the fused op would skip it)."""
    children = list(mlp.named_children()) if isinstance(mlp, nn.Sequential) else []
    if [name for name, _ in children] != ["c_fc", "gelu", "c_proj"] or not (
            type(mlp.c_fc) is nn.Linear and type(mlp.c_proj) is nn.Linear):
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in (mlp, mlp.c_fc, mlp.gelu)):
        return None
    act = mlp.gelu
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    return "quick_gelu" if type(act).__name__ == "QuickGELU" else None


def _mlp(mlp: nn.Module, h: torch.Tensor, backend: str) -> torch.Tensor:
    """The block's MLP of ``h`` where :data:`FUSED_MLP` is set: on the Triton backend, for 16-bit inputs where
    no gradient is wanted, ``c_fc`` and its activation run as one ``ops.linear_act``; otherwise (and for an
    MLP of other layers) the module runs as it is."""
    if h.dtype in (torch.float16, torch.bfloat16) and ops.resolve_backend(backend, h) == "triton":
        act = _mlp_activation(mlp)
        if act is not None and not needs_grad(h, mlp.c_fc.weight, mlp.c_fc.bias):
            return mlp.c_proj(ops.linear_act(h, mlp.c_fc.weight, mlp.c_fc.bias, act, "triton"))
    return mlp(h)


def _layer_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)``. open_clip's ``LayerNorm`` casts its result back to x's dtype even when it already
    has it; that cast is an aten op of host time per block, so it is skipped where it changes nothing."""
    kind = type(norm)
    if (kind is nn.LayerNorm or (kind.__name__ == "LayerNorm" and kind.__module__ == "open_clip.transformer")) \
            and not norm._forward_hooks and not norm._forward_pre_hooks:  # (a hooked norm is called, hooks and all)
        out = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        return cast(out, x.dtype)
    return norm(x)


def _normed(state: ClipState, norm: nn.Module) -> Optional[torch.Tensor]:
    """``norm(state.x)`` if the block that wrote the state computed it already, else None."""
    return state.normed[1] if state.normed is not None and state.normed[0] is norm else None


def _fusable_add(x: torch.Tensor, residual: torch.Tensor) -> bool:
    """Whether ``x + residual`` can go into a fused op, which keeps x's dtype. Not when the add would
    promote: LayerScale's float32 scale on a 16-bit branch under autocast makes the residual float32,
    and the add then carries the stream on in float32, as open_clip's block does."""
    return residual.dtype == x.dtype


def _add_then_norm(x: torch.Tensor, residual: torch.Tensor, norm: nn.Module, backend: str):
    """``(x + residual, norm(x + residual))``: one op (``ops.add_norm``) for a LayerNorm with weight
    and bias, the add and the module otherwise."""
    if _fusable_norm(norm) and _fusable_add(x, residual):
        return ops.add_norm(x, residual, norm.weight, norm.bias, norm.eps, backend=backend)
    x = x + residual
    return x, _layer_norm(norm, x)


def _block_output(x: torch.Tensor, residual: torch.Tensor, next_norm: Optional[nn.Module], backend: str):
    """A block's last residual add, ``x + residual``, and the state's ``normed``: with a fusable
    ``next_norm`` (the LayerNorm that reads the output next) it comes from the same op."""
    if next_norm is None or not _fusable_norm(next_norm) or not _fusable_add(x, residual):
        return x + residual, None
    x, ln = ops.add_norm(x, residual, next_norm.weight, next_norm.bias, next_norm.eps, backend=backend)
    return x, (next_norm, ln)


def _merge_then_norm(x, residual, size, sources, keys, heads, r, protected, norm: nn.Module, backend):
    """The residual add after attention (``x + residual``), the merge matched on ``keys`` averaged
    over ``heads``, then the block's ``ln_2`` of its output: ``(x, size, sources, ln)``. A LayerNorm
    goes into the merge op with the add (one pass over the merged tokens on the Triton backend,
    which never writes the sum)."""
    plan = ops.match(keys, r, protected, backend=backend, heads=heads)
    if not _fusable_add(x, residual):
        x, residual = x + residual, None
    if _fusable_norm(norm):
        x, size, ln = ops.merge_norm(x, size, plan, norm.weight, norm.bias, norm.eps, backend=backend,
                                     residual=residual)
    else:
        x, size = ops.merge(x if residual is None else x + residual, size, plan, backend=backend)
        ln = norm(x)
    if sources is not None:
        sources = tracking.merge_sources(sources, plan)
    return x, size, sources, ln


def _join_then_norm(x, size, group, protected, r, frame_pos, norm: nn.Module, backend):
    """ClipMe's join and cross-clip merge, then the block's ``ln_1`` of its output:
    ``(x, size, ln, plan)``. A LayerNorm goes into the join's merge op, as in :func:`_merge_then_norm`."""
    if _fusable_norm(norm):
        return ops.join_merge_norm(x, size, group, protected, r, norm.weight, norm.bias, norm.eps, frame_pos,
                                   backend=backend)
    x, size, plan = ops.join_merge(x, size, group, protected, r, frame_pos, backend=backend)
    return x, size, norm(x), plan


def _block_input(block: nn.Module, state: ClipState, plan: LayerPlan, frame_pos: Optional[torch.Tensor],
                 options: EncoderOptions):
    """A block up to its attention: ClipMe's join and cross-clip merge where ``plan`` has one, and
    ``ln_1`` (taken from ``state.normed`` where the block before computed it). Returns ``(x, size,
    protected, sources, merged, h)`` with ``h = ln_1(x)``."""
    x, size, c, sources, merged, _ = state
    if plan.group > 1:
        pos = frame_pos if frame_pos is None else cast(frame_pos, x.dtype)
        if sources is not None:
            sources = tracking.join_sources(sources, x.shape[0] // sources.shape[0], x.shape[1], c, plan.group)
        x, size, h, cross = _join_then_norm(x, size, plan.group, c, plan.r_cross, pos, block.ln_1, options.backend)
        c *= plan.group
        if sources is not None and plan.r_cross:
            sources = tracking.merge_sources(sources, cross)
    else:
        h = _normed(state, block.ln_1)
        if h is None:
            h = _layer_norm(block.ln_1, x)
    return x, size, c, sources, merged or plan.r_cross > 0, h


def block_forward(block: nn.Module, state: ClipState, plan: LayerPlan, frame_pos: Optional[torch.Tensor],
                  options: EncoderOptions, next_norm: Optional[nn.Module] = None) -> ClipState:
    """One residual block with TempMe's joins and merges, as ``plan`` (from the schedule) says.

    Args:
        block: an open_clip ``ResidualAttentionBlock``.
        state: ``plan.clips_in`` clips per video of ``plan.tokens_in`` tokens.
        frame_pos: ``[1, plan.clips_in, 1, D]`` temporal position embedding of a joining layer, or None.
        next_norm: the LayerNorm that reads this block's output next (the next block's ``ln_1``,
            when that block joins no clips), or None. A LayerNorm with weight and bias is applied
            in the op of the block's last residual add and handed on in ``state.normed``.
    """
    x, size, c, sources, merged, h = _block_input(block, state, plan, frame_pos, options)
    attn_size = size if options.prop_attn and merged else None
    out, keys = _self_attention(block.attn, h, attn_size, options.attention, options.backend, plan.r > 0)
    if plan.r:
        x, size, sources, h = _merge_then_norm(x, _layer_scale(block.ls_1, out), size, sources, keys,
                                               block.attn.num_heads, plan.r, c, block.ln_2, options.backend)
    else:
        x = x + _layer_scale(block.ls_1, out)
        h = _layer_norm(block.ln_2, x)
    mlp = _mlp(block.mlp, h, options.backend) if FUSED_MLP else block.mlp(h)
    x, normed = _block_output(x, _layer_scale(block.ls_2, mlp), next_norm, options.backend)
    return ClipState(x, size, c, sources, merged or plan.r > 0, normed)


def class_block_forward(block: nn.Module, state: ClipState, plan: LayerPlan, frame_pos: Optional[torch.Tensor],
                        options: EncoderOptions, next_norm: Optional[nn.Module] = None) -> ClipState:
    """The last block as the video feature reads it: only the class tokens leave it.

    :func:`frame_features` reads nothing but the class tokens of the last block's output, and a
    class token's output depends on the other tokens only as keys and values of its attention. So
    this block runs the join and ``ln_1`` on every token (they make the keys and values), and the
    query projection, attention, output projection, ``ln_2`` and MLP on the class tokens alone; the
    merge after attention (it never moves a class token) is left out. The class tokens come out as
    :func:`block_forward`'s do, up to rounding.

    Returns:
        A state holding the ``plan.protected_out`` class tokens of every clip (``x [B', c, D]``,
        their sizes), without source tracking: to track sources run :func:`block_forward`.
        ``next_norm`` (``ln_post``, read by :func:`frame_features`) is as in :func:`block_forward`.
    """
    if state.sources is not None:
        raise ValueError("class_block_forward does not track sources (state.sources is set); use block_forward")
    x, size, c, _, merged, h = _block_input(block, state, plan, frame_pos, options)
    attn_size = size if options.prop_attn and merged else None
    out = _layer_scale(block.ls_1, _class_attention(block.attn, h, c, attn_size, options.attention, options.backend))
    x, h = _add_then_norm(x[:, :c], out, block.ln_2, options.backend)
    mlp = _mlp(block.mlp, h, options.backend) if FUSED_MLP else block.mlp(h)
    x, normed = _block_output(x, _layer_scale(block.ls_2, mlp), next_norm, options.backend)
    return ClipState(x, size[:, :c], c, None, merged or plan.r > 0, normed)


def _class_attention(attn: nn.MultiheadAttention, h: torch.Tensor, c: int, size: Optional[torch.Tensor], impl: str,
                     backend: str) -> torch.Tensor:
    """Attention of the first ``c`` tokens of every clip of ``h [B', N, D]`` over all ``N``, with
    open_clip's weights: ``[B', c, D]``. Only those ``c`` rows are projected to queries."""
    width = h.shape[-1]
    weight_q, weight_kv = attn.in_proj_weight.split([width, 2 * width])
    bias_q, bias_kv = (None, None) if attn.in_proj_bias is None else attn.in_proj_bias.split([width, 2 * width])
    q = F.linear(h[:, :c], weight_q, bias_q)
    kv = F.linear(h, weight_kv, bias_kv)
    out = ops.query_attention(q, kv, attn.num_heads, size, impl=impl, backend=backend)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


def frame_features(visual: nn.Module, state: ClipState, videos: int) -> torch.Tensor:
    """Each frame's class token through ``ln_post`` and the projection: ``[B, T, E]``.

    After the joins, a clip's class tokens are its frames' class tokens in frame order, and clips of
    a video are adjacent, so flattening clips and class tokens gives the frames in order.
    """
    normed = _normed(state, visual.ln_post)
    if normed is not None:  # the last block applied ln_post with its residual add
        return normed[:, :state.protected].reshape(videos, -1, state.x.shape[-1]) @ visual.proj
    cls = state.x[:, :state.protected].reshape(videos, -1, state.x.shape[-1])
    return _layer_norm(visual.ln_post, cls) @ visual.proj


def pool_frames(features: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """L2-normalise each frame feature ``[B, T, E]`` and average over the valid frames -> ``[B, E]``.

    ``mask [B, T]``: a frame is valid where it is non-zero (True); the others get weight exactly 0.
    """
    features = F.normalize(features, dim=-1)
    if mask is None:
        return features.mean(dim=1)
    valid = (mask != 0).unsqueeze(-1)
    total = torch.where(valid, features, torch.zeros((), dtype=features.dtype, device=features.device)).sum(dim=1)
    return total / valid.sum(dim=1).to(features.dtype)
