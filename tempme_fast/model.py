"""Patch an open_clip CLIP model so it encodes videos with TempMe, and undo the patch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Type

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import ops
from .config import TempMeConfig
from .encoder import ClipState, EncoderOptions, block_forward, embed_frames, frame_features, pool_frames
from .schedule import TokenSchedule, token_schedule

ATTENTION_IMPLS = ("sdpa", "eager")


@dataclass(frozen=True)
class TempMeSettings:
    """What ``apply_tempme`` attached to a model (``model.tempme``)."""

    config: TempMeConfig
    schedule: TokenSchedule
    backend: str
    attention: str


def vit_geometry(visual: nn.Module):
    """``(depth, tokens_per_frame)`` of an open_clip ``VisionTransformer``, or a clear error why not."""
    name = type(visual).__name__
    for attr in ("conv1", "class_embedding", "positional_embedding", "transformer", "ln_post", "proj"):
        if not hasattr(visual, attr):
            raise TypeError(f"model.visual is a {name} without '{attr}': TempMe needs an open_clip "
                            f"VisionTransformer with a class token (ViT-B/32, B/16, L/14, ...)")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise TypeError(f"model.visual pools with pool_type={getattr(visual, 'pool_type', None)!r} / "
                        f"attentional pooling; TempMe needs class-token pooling (pool_type='tok')")
    if visual.proj is None:
        raise TypeError("model.visual has no projection (proj is None); TempMe needs the CLIP head")
    if not isinstance(visual.patch_dropout, nn.Identity):
        raise ValueError("model.visual uses patch dropout; TempMe's token schedule needs every patch. "
                         "Build the model with patch_dropout=0")
    blocks = visual.transformer.resblocks
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention) or not getattr(attn, "_qkv_same_embed_dim", False):
            raise TypeError(f"block {i} is a {type(block).__name__} with attention "
                            f"{type(attn).__name__}; TempMe supports open_clip's ResidualAttentionBlock "
                            f"(nn.MultiheadAttention with a fused q/k/v projection)")
    if not getattr(visual.transformer, "batch_first", True):
        raise TypeError("model.visual.transformer is not batch_first; use open_clip >= 2.24")
    return len(blocks), visual.positional_embedding.shape[0]


def _tempme_class(cls: Type[nn.Module]) -> Type[nn.Module]:
    """A subclass of the model's own class that adds ``encode_video`` (cached per class)."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"TempMe{cls.__name__}", (_TempMeMixin, cls), {"_tempme_original_class": cls})
    return _CLASSES[cls]


class _TempMeMixin:
    def encode_video(self, video: torch.Tensor, mask: Optional[torch.Tensor] = None,
                     normalize: bool = False) -> torch.Tensor:
        """Encode ``video [B, T, 3, H, W]`` (optional frame mask ``[B, T]``) to ``[B, embed_dim]``.

        The embedding is the mean of the L2-normalised frame features over the valid frames (padded
        frames still take part in the joined clips' attention, as in the released model).
        ``normalize=True`` also L2-normalises that mean.
        """
        return encode_video(self, video, mask, normalize)


_CLASSES: Dict[type, type] = {}


def apply_tempme(model: nn.Module, config: Optional[TempMeConfig] = None, backend: str = "auto",
                 attention: str = "sdpa") -> nn.Module:
    """Patch an open_clip ``CLIP`` model in place so ``model.encode_video`` runs TempMe.

    Args:
        model: an open_clip ``CLIP`` / ``CustomTextCLIP`` with a ViT image tower.
        config: the merge schedule (default: the released ViT-B/32 one, 12 frames).
            ``TempMeConfig.unmerged(frames)`` gives the per-frame CLIP baseline through the same API.
        backend: merge ops backend, ``"torch"``, ``"triton"`` or ``"auto"``.
        attention: ``"sdpa"`` (fused kernels) or ``"eager"`` (explicit softmax, as the released code).
    Returns:
        ``model``, now with ``encode_video``, ``model.tempme`` (the settings) and, when the config
        adds them, temporal position embeddings ``model.visual.tempme_frame_pos[str(layer)]`` of
        shape ``[1, clips_before_join, 1, width]`` (zero initialised, saved in the state dict).
        ``encode_image`` and ``encode_text`` are unchanged.
    """
    config = TempMeConfig() if config is None else config
    if not isinstance(config, TempMeConfig):
        raise TypeError(f"config must be a TempMeConfig, got {type(config).__name__}")
    if backend not in ops.BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {ops.BACKENDS}")
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"attention={attention!r} is not one of {ATTENTION_IMPLS}")
    visual = getattr(model, "visual", None)
    if visual is None:
        raise TypeError(f"model is a {type(model).__name__} without .visual; pass an open_clip CLIP model")
    depth, tokens = vit_geometry(visual)
    schedule = token_schedule(config, depth, tokens)
    settings = TempMeSettings(config, schedule, backend, attention)

    current = getattr(model, "tempme", None)
    if isinstance(current, TempMeSettings):
        if current.config != config:
            raise ValueError("model is already patched with a different TempMeConfig; call "
                             "remove_tempme(model) first (that drops its temporal position embeddings)")
        model.tempme = settings  # same schedule: only the backend or attention changes
        return model

    if config.frame_pos and config.clip_layers:
        ref = visual.conv1.weight
        visual.tempme_frame_pos = nn.ParameterDict({
            str(p.layer): nn.Parameter(torch.zeros(1, p.clips_in, 1, ref.shape[0], device=ref.device,
                                                   dtype=ref.dtype))
            for p in schedule.layers if p.group > 1
        })
    model.tempme = settings
    model.__class__ = _tempme_class(type(model))
    return model


def remove_tempme(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_tempme`: the original class, no ``encode_video``, no added parameters."""
    if not isinstance(getattr(model, "tempme", None), TempMeSettings):
        raise ValueError("model is not patched by apply_tempme; nothing to remove")
    model.__class__ = model._tempme_original_class
    del model.tempme
    if hasattr(model.visual, "tempme_frame_pos"):
        del model.visual.tempme_frame_pos
    return model


def check_video(model: nn.Module, video: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    """Validate ``encode_video``'s inputs; raises ``ValueError``/``TypeError`` naming the argument."""
    settings: TempMeSettings = model.tempme
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"video must be a torch.Tensor, got {type(video).__name__}")
    if video.dim() != 5:
        raise ValueError(f"video must have shape [B, T, 3, H, W] (5 dims), got {tuple(video.shape)}")
    b, t, ch, h, w = video.shape
    if b == 0:
        raise ValueError("video is an empty batch (B=0); give at least one video")
    if t != settings.config.frames:
        raise ValueError(f"video has T={t} frames but the TempMeConfig expects frames="
                         f"{settings.config.frames}; pad the video (and pass a mask) or change the config")
    image_size = tuple(model.visual.image_size)
    if ch != 3 or (h, w) != image_size:
        raise ValueError(f"video frames are {ch}x{h}x{w} but the model takes 3x{image_size[0]}x{image_size[1]}")
    if not video.is_floating_point():
        raise TypeError(f"video has dtype {video.dtype}; give preprocessed float frames")
    if video.device != model.visual.conv1.weight.device:
        raise ValueError(f"video is on {video.device} but the model is on {model.visual.conv1.weight.device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, t):
            raise ValueError(f"mask must be a tensor of shape [B, T] = [{b}, {t}], got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if mask.device != video.device:
            raise ValueError(f"mask is on {mask.device} but video is on {video.device}")
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if not torch.compiler.is_compiling() and not capturing and not bool((mask != 0).any(dim=1).all()):
            raise ValueError("mask has a video with no valid frame; every video needs at least one")


def encode_video(model: nn.Module, video: torch.Tensor, mask: Optional[torch.Tensor] = None,
                 normalize: bool = False) -> torch.Tensor:
    """See ``encode_video`` on a patched model."""
    check_video(model, video, mask)
    settings: TempMeSettings = model.tempme
    visual = model.visual
    b, t = video.shape[:2]
    frames = video.flatten(0, 1)
    if not settings.config.merges:
        # Per-frame CLIP through open_clip's own forward (its own attention path).
        features = visual(frames.to(visual.conv1.weight.dtype))
        features = (features[0] if isinstance(features, tuple) else features).view(b, t, -1)
    else:
        state = run_blocks(model, embed_frames(visual, frames))
        features = frame_features(visual, state, b)
    pooled = pool_frames(features, mask)
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


def encoder_options(model: nn.Module) -> EncoderOptions:
    settings: TempMeSettings = model.tempme
    return EncoderOptions(settings.backend, settings.config.prop_attn, settings.attention)


def run_blocks(model: nn.Module, state: ClipState) -> ClipState:
    """Every transformer block of ``model.visual`` with TempMe's schedule."""
    visual = model.visual
    options = encoder_options(model)
    frame_pos = getattr(visual, "tempme_frame_pos", {})
    use_checkpoint = visual.transformer.grad_checkpointing and torch.is_grad_enabled()
    for block, plan in zip(visual.transformer.resblocks, model.tempme.schedule.layers):
        pos = frame_pos[str(plan.layer)] if str(plan.layer) in frame_pos else None
        if use_checkpoint:
            state = checkpoint(block_forward, block, state, plan, pos, options, use_reentrant=False)
        else:
            state = block_forward(block, state, plan, pos, options)
    return state
