"""ToMe for open_clip image towers: ``apply_tome(model, r)`` makes ``encode_image`` merge tokens.

Each block runs attention (proportional to token size when ``prop_attn``), the residual add, then
one bipartite merge of ``r`` tokens with the keys averaged over heads as the metric and the class
token protected (ToMe's ``bipartite_soft_matching(..., class_token=True)`` plus ``merge_wavg``),
then the MLP. The blocks are TempMe's own (``tempme_fast.encoder.block_forward``), so the merges
run on ``tempme_fast.ops`` (Triton on CUDA with ``backend="auto"``), and the state passes from
block to block explicitly; nothing is stored on the modules between calls except, with
``trace_source``, the last source matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Type

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..encoder import EncoderOptions, block_forward, embed_frames
from ..model import computed_blocks, vit_geometry, warn_of_bypassed_hooks
from ..schedule import LayerPlan
from ..subclass import patched_class
from .schedule import RSpec, clamped_r, parse_r

TOME = "tome"


@dataclass(frozen=True)
class ToMeSettings:
    """What :func:`apply_tome` attached to ``model.visual`` (``visual.tome``)."""

    r: Tuple[int, ...]
    prop_attn: bool
    trace_source: bool
    backend: str
    layers: Tuple[LayerPlan, ...]

    @property
    def tokens_out(self) -> int:
        return self.layers[-1].tokens_out


def layer_plans(tokens: int, r_per_layer) -> Tuple[LayerPlan, ...]:
    """One :class:`LayerPlan` per block for an image of ``tokens`` tokens (one class token)."""
    return tuple(LayerPlan(layer=i, kind=TOME, clips_in=1, tokens_in=n, protected_in=1, group=1, r_cross=0, r=r)
                 for i, (n, r) in enumerate(clamped_r(tokens, r_per_layer, 1)))


def _visual_of(model: nn.Module) -> nn.Module:
    visual = getattr(model, "visual", model)
    if not hasattr(visual, "transformer"):
        raise TypeError(f"model is a {type(model).__name__}; pass an open_clip CLIP model or its "
                        f"VisionTransformer (model.visual)")
    return visual


def _tome_class(cls: Type[nn.Module]) -> Type[nn.Module]:
    return patched_class(_ToMeVisual, cls, "ToMe", "_tome_original_class")


class _ToMeVisual:
    def forward(self, x: torch.Tensor):
        """``x [B, 3, H, W]`` -> pooled ``[B, embed_dim]`` (and the merged tokens if ``output_tokens``)."""
        return tome_forward(self, x)


def apply_tome(model: nn.Module, r: RSpec, prop_attn: bool = True, trace_source: bool = False,
               backend: str = "auto") -> nn.Module:
    """Patch an open_clip image tower in place so ``encode_image`` (``model.visual``) merges tokens.

    Args:
        model: an open_clip ``CLIP`` (or its ``VisionTransformer``) with class-token pooling.
        r: tokens removed per block: an int, a per-layer list, or ``(r, inflection)`` (ToMe's
            ``parse_r``); each layer's ``r`` is clamped to half its unprotected tokens.
        prop_attn: proportional attention (``log(size)`` added to the logits), as ToMe off the shelf.
        trace_source: keep ``model.visual.tome_source`` after each forward: ``[B, N_out, N]`` float
            0/1, which input tokens every output token holds (ToMe's ``_tome_info["source"]``).
        backend: merge ops backend, ``"auto"``, ``"torch"`` or ``"triton"``.
    Returns:
        ``model``. Calling again changes ``r`` and the options; :func:`remove_tome` undoes it.
    """
    visual = _visual_of(model)
    depth, tokens = vit_geometry(visual)
    if backend not in ops.BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {ops.BACKENDS}")
    for name, flag in (("prop_attn", prop_attn), ("trace_source", trace_source)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    r_list = parse_r(depth, r)
    warn_of_bypassed_hooks(computed_blocks(visual), "a ToMe-patched tower")
    visual.tome = ToMeSettings(tuple(r_list), prop_attn, trace_source, backend, layer_plans(tokens, r_list))
    if not isinstance(visual, _ToMeVisual):
        visual.__class__ = _tome_class(type(visual))
    return model


def remove_tome(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_tome`: the tower's original class and forward, no added attributes."""
    visual = _visual_of(model)
    if not isinstance(visual, _ToMeVisual):
        raise ValueError("model is not patched by apply_tome; nothing to remove")
    visual.__class__ = visual._tome_original_class
    del visual.tome
    if hasattr(visual, "tome_source"):
        del visual.tome_source
    return model


def tome_forward(visual: nn.Module, images: torch.Tensor):
    """open_clip's ``VisionTransformer.forward`` with a ToMe merge in every block."""
    settings: ToMeSettings = visual.tome
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must have shape [B, 3, H, W], got {got}")
    state = embed_frames(visual, images, track_videos=images.shape[0] if settings.trace_source else None,
                         backend=settings.backend)
    options = EncoderOptions(settings.backend, settings.prop_attn, "sdpa")
    use_checkpoint = getattr(visual.transformer, "grad_checkpointing", False) and torch.is_grad_enabled()
    for block, plan in zip(visual.transformer.resblocks, settings.layers):
        if use_checkpoint:
            state = checkpoint(block_forward, block, state, plan, None, options, use_reentrant=False)
        else:
            state = block_forward(block, state, plan, None, options)
    if settings.trace_source:
        visual.tome_source = source_matrix(state.sources, state.x.shape[1])
    pooled, tokens = _pool(visual, state.x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return (pooled, tokens) if getattr(visual, "output_tokens", False) else pooled


def _pool(visual: nn.Module, x: torch.Tensor):
    if hasattr(visual, "_pool"):
        return visual._pool(x)
    x = visual.ln_post(x)  # open_clip before 2.24 pooled after ln_post on every token
    return x[:, 0], x[:, 1:]


def source_matrix(sources: torch.Tensor, tokens_out: int) -> torch.Tensor:
    """``sources [B, N]`` (the output token holding each input token) -> ToMe's ``[B, N_out, N]`` 0/1 float."""
    return torch.nn.functional.one_hot(sources, tokens_out).transpose(1, 2).float()


def tome_tokens(model: nn.Module) -> Optional[int]:
    """Tokens per image after the last block of a patched tower (None when not patched)."""
    settings = getattr(_visual_of(model), "tome", None)
    return settings.tokens_out if isinstance(settings, ToMeSettings) else None


__all__ = ["ToMeSettings", "apply_tome", "remove_tome", "source_matrix", "tome_forward", "tome_tokens"]
