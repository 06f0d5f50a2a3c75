"""Patch an open_clip CLIP model so it encodes videos with TempMe, and undo the patch."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import ops
from .config import TempMeConfig
from .errors import UnsupportedModelError
from .encoder import (ClipState, EncoderOptions, block_forward, class_block_forward, embed_frames, frame_features,
                      pool_frames)
from .schedule import IMGME, TokenSchedule, token_schedule
from .subclass import patched_class
from .tracking import SourceMap, initial_sources, source_map

ATTENTION_IMPLS = ops.ATTENTION_IMPLS


@dataclass(frozen=True)
class TempMeSettings:
    """What ``apply_tempme`` attached to a model (``model.tempme``)."""

    config: TempMeConfig
    schedule: TokenSchedule
    backend: str
    attention: str
    check_finite: bool = False
    trim_last_block: bool = True


def vit_geometry(visual: nn.Module):
    """``(depth, tokens_per_frame)`` of an open_clip ``VisionTransformer``, or a clear error why not."""
    name = type(visual).__name__
    need = "TempMe needs an open_clip VisionTransformer with a class token (ViT-B/32, B/16, L/14, ...)"
    for attr in ("conv1", "class_embedding", "positional_embedding", "transformer", "ln_post", "proj"):
        if not hasattr(visual, attr):
            raise UnsupportedModelError(f"model.visual is a {name} without '{attr}', not a ViT with a class token; "
                                        f"{need}")
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedModelError(f"model.visual pools its tokens with attentional pooling (as CoCa does), not "
                                    f"the class token; {need}")
    if getattr(visual, "pool_type", "tok") != "tok":
        raise UnsupportedModelError(f"model.visual pools with pool_type={visual.pool_type!r}; TempMe needs "
                                    f"class-token pooling (pool_type='tok')")
    if visual.proj is None:
        raise UnsupportedModelError("model.visual has no projection (proj is None); TempMe needs the CLIP head")
    if not isinstance(visual.patch_dropout, nn.Identity):
        raise UnsupportedModelError("model.visual uses patch dropout; TempMe's token schedule needs every patch. "
                                    "Build the model with patch_dropout=0")
    blocks = visual.transformer.resblocks
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention) or not getattr(attn, "_qkv_same_embed_dim", False):
            raise UnsupportedModelError(f"block {i} is a {type(block).__name__} with attention "
                                        f"{type(attn).__name__}; TempMe supports open_clip's ResidualAttentionBlock "
                                        f"(nn.MultiheadAttention with a fused q/k/v projection)")
    if not getattr(visual.transformer, "batch_first", True):
        raise UnsupportedModelError("model.visual.transformer is not batch_first; use open_clip >= 2.24")
    return len(blocks), visual.positional_embedding.shape[0]


def _tempme_class(cls: Type[nn.Module]) -> Type[nn.Module]:
    """A subclass of the model's own class that adds ``encode_video`` (made once per class; it pickles)."""
    return patched_class(_TempMeMixin, cls, "TempMe", "_tempme_original_class")


class _TempMeMixin:
    def encode_video(self, video: torch.Tensor, mask: Optional[torch.Tensor] = None, normalize: bool = False,
                     *, check_finite: Optional[bool] = None, return_sources: bool = False):
        """Encode ``video [B, T, 3, H, W]`` (optional frame mask ``[B, T]``) to ``[B, embed_dim]``.

        See :func:`tempme_fast.model.encode_video` for the arguments, the checks and how padded
        frames are treated (they take part in the joined clips' attention; only the final average
        leaves them out).
        """
        return encode_video(self, video, mask, normalize, check_finite=check_finite, return_sources=return_sources)


def apply_tempme(model: nn.Module, config: Optional[TempMeConfig] = None, backend: str = "auto",
                 attention: str = "auto", check_finite: bool = False, trim_last_block: bool = True) -> nn.Module:
    """Patch an open_clip ``CLIP`` model in place so ``model.encode_video`` runs TempMe.

    Args:
        model: an open_clip ``CLIP`` / ``CustomTextCLIP`` with a ViT image tower.
        config: the merge schedule (default: the released ViT-B/32 one, 12 frames).
            ``TempMeConfig.unmerged(frames)`` gives the per-frame CLIP baseline through the same API.
        backend: merge ops backend, ``"torch"``, ``"triton"`` or ``"auto"``.
        attention: proportional attention implementation, one of ``ops.ATTENTION_IMPLS``: ``"auto"``
            (Triton kernel for CUDA tensors on the Triton backend, SDPA otherwise), ``"triton"``, ``"fold"`` (bias folded
            into the dot product for SDPA's flash kernels), ``"sdpa"`` (bias as a float mask) or
            ``"eager"`` (explicit softmax, as the released code).
        check_finite: make ``encode_video`` refuse videos holding NaN or Inf by default (a host
            synchronisation per call; off by default, ``encode_video(check_finite=...)`` overrides it).
        trim_last_block: the last block computes only what the video feature reads, its class
            tokens (queries, output projection, MLP; no merge after its attention); every token still
            makes its keys and values. The embedding is the same up to rounding, for fewer FLOPs
            than the schedule's (``flops.model_flops(model, executed=True)``). False runs every token
            through it, as the released code does. ``return_sources=True`` always runs it in full.
    Raises:
        TypeError / ValueError: a model TempMe cannot patch (not an open_clip ViT with a class
            token, patch dropout, an unsupported dtype), a config that does not fit the model
            (joins past its last layer). An ``imgme_r`` that a layer cannot honour is clamped, as the
            spec says, with a :class:`ScheduleClampWarning`.
    Returns:
        ``model``, now with ``encode_video``, ``model.tempme`` (the settings) and, when the config
        adds them, temporal position embeddings ``model.visual.tempme_frame_pos[str(layer)]`` of
        shape ``[1, clips_before_join, 1, width]`` (zero initialised, saved in the state dict).
        ``encode_image`` and ``encode_text`` are unchanged. The patched model pickles whole
        (``torch.save(model)``; loading it needs tempme_fast importable).
    """
    config = TempMeConfig() if config is None else config
    if not isinstance(config, TempMeConfig):
        raise TypeError(f"config must be a TempMeConfig, got {type(config).__name__}")
    if backend not in ops.BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {ops.BACKENDS}")
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"attention={attention!r} is not one of {ATTENTION_IMPLS}")
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be a bool, got {check_finite!r}")
    if not isinstance(trim_last_block, bool):
        raise TypeError(f"trim_last_block must be a bool, got {trim_last_block!r}")
    visual = getattr(model, "visual", None)
    if visual is None:
        raise TypeError(f"model is a {type(model).__name__} without .visual; pass an open_clip CLIP model")
    depth, tokens = vit_geometry(visual)
    dtype = visual.conv1.weight.dtype
    if dtype not in ops.FLOAT_DTYPES:
        raise TypeError(f"model.visual has dtype {dtype}; valid: float32, float16, bfloat16, float64")
    schedule = token_schedule(config, depth, tokens)
    _warn_if_imgme_r_clamps(config, schedule)
    if config.merges:
        warn_of_bypassed_hooks([("visual", visual), *computed_blocks(visual, "visual.")], "encode_video")
    settings = TempMeSettings(config, schedule, backend, attention, check_finite, trim_last_block)

    current = getattr(model, "tempme", None)
    if isinstance(current, TempMeSettings):
        if current.config != config:
            raise ValueError("model is already patched with a different TempMeConfig; call "
                             "remove_tempme(model) first (that drops its temporal position embeddings)")
        model.tempme = settings  # same schedule: only the backend, attention or switches change
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


def computed_blocks(visual: nn.Module, prefix: str = "") -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of what the merging forwards compute themselves in an open_clip tower instead of calling:
    its transformer, each block, its attention and the attention's output projection (read as weights)."""
    transformer = getattr(visual, "transformer", None)
    named = [(f"{prefix}transformer", transformer)]
    for i, block in enumerate(getattr(transformer, "resblocks", ())):
        attn = getattr(block, "attn", None)
        named += [(f"{prefix}transformer.resblocks.{i}", block), (f"{prefix}transformer.resblocks.{i}.attn", attn),
                  (f"{prefix}transformer.resblocks.{i}.attn.out_proj", getattr(attn, "out_proj", None))]
    return named


def warn_of_bypassed_hooks(named: Sequence[Tuple[str, Optional[nn.Module]]], runner: str) -> None:
    """Warn of forward hooks on the modules ``named`` that ``runner`` computes itself rather than calls, merging
    tokens between them, so that the hooks never run; the patch embedding, the norms and the MLPs are called as
    they are, hooks and all."""
    hooked = [name for name, m in named if m is not None and (m._forward_hooks or m._forward_pre_hooks)]
    if hooked:
        warnings.warn(f"{runner} does not run the forward hooks of {', '.join(hooked)}: it computes these modules "
                      f"itself, merging tokens between them; hook the norms or the MLPs, which it calls, or read its "
                      f"result", stacklevel=3)


class ScheduleClampWarning(UserWarning):
    """``imgme_r`` asks some layer for more tokens than a frame has left; that layer removes fewer."""


def _warn_if_imgme_r_clamps(config: TempMeConfig, schedule: TokenSchedule) -> None:
    """Warn when the spec's clamp (at most half of a clip's unprotected tokens per merge) cuts ``imgme_r``.

    The clamp is part of TempMe (it lets the released 12-layer schedule run on any ViT), so the
    model runs; but the token counts then differ from ``imgme_r`` times the layers, which a user
    who wrote that ``imgme_r`` should hear about. Make it an error with
    ``warnings.simplefilter("error", ScheduleClampWarning)``.
    """
    imgme = [p for p in schedule.layers if p.kind == IMGME]
    short = next((p for p in imgme if p.r < config.imgme_r_at(p.layer)), None)
    if short is None:
        return
    largest = (schedule.tokens_per_frame - imgme[0].protected_in) // (len(imgme) + 1)
    warnings.warn(
        f"imgme_r={config.imgme_r} removes more tokens than the frames have: at layer {short.layer} a frame "
        f"has {short.tokens_in} tokens ({short.protected_in} class), so that merge removes only {short.r}; "
        f"with {len(imgme)} image-merging layer(s) of {schedule.tokens_per_frame} tokens per frame, "
        f"imgme_r <= {largest} is never clamped", ScheduleClampWarning, stacklevel=3)


def _not_patched(model: nn.Module) -> TypeError:
    return TypeError(f"model is a {type(model).__name__} that apply_tempme has not patched; call "
                     f"tempme_fast.apply_tempme(model) first")


def tempme_settings(model: nn.Module) -> "TempMeSettings":
    """What :func:`apply_tempme` attached to ``model`` (``model.tempme``), or a TypeError saying that it is not
    patched."""
    settings = getattr(model, "tempme", None)
    if not isinstance(settings, TempMeSettings):
        raise _not_patched(model)
    return settings


def remove_tempme(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_tempme`: the original class, no ``encode_video``, no added parameters."""
    if not isinstance(getattr(model, "tempme", None), TempMeSettings):
        raise ValueError("model is not patched by apply_tempme; nothing to remove")
    model.__class__ = model._tempme_original_class
    del model.tempme
    if hasattr(model.visual, "tempme_frame_pos"):
        del model.visual.tempme_frame_pos
    return model


def check_video(model: nn.Module, video: torch.Tensor, mask: Optional[torch.Tensor],
                check_finite: bool = False) -> None:
    """Validate ``encode_video``'s inputs; raises ``ValueError``/``TypeError`` naming the argument.

    Shapes, dtypes and devices cost nothing. The mask's values (0/1, at least one valid frame per
    video) are read back to the host once, except while compiling or capturing a CUDA graph;
    ``check_finite=True`` adds one more read-back to look for NaN and Inf in ``video``.
    """
    try:
        settings: TempMeSettings = model.tempme
    except AttributeError:  # (no call on the way of a patched model: its settings are a plain attribute)
        raise _not_patched(model) from None
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
        raise TypeError(f"video has dtype {video.dtype}; give preprocessed float frames (float32, float16, "
                        f"bfloat16 or float64)")
    model_device = model.visual.conv1.weight.device
    if video.device != model_device:
        raise ValueError(f"video is on {video.device} but the model is on {model_device}")
    if settings.config.merges:
        ops.resolve_backend(settings.backend, video)  # e.g. backend='triton' for a CPU tensor
    checking = not torch.compiler.is_compiling() and not (
        torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, t):
            raise ValueError(f"mask must be a tensor of shape [B, T] = [{b}, {t}], got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if mask.is_complex():
            raise TypeError(f"mask has dtype {mask.dtype}; give bool (True = real frame) or 0/1 integers")
        if mask.device != video.device:
            raise ValueError(f"mask is on {mask.device} but video is on {video.device}")
        if checking:
            valid = mask != 0
            binary = (mask == 0) | (mask == 1)  # always true for bool masks
            each_has_one, is_binary = torch.stack([valid.any(dim=1).all(), binary.all()]).tolist()
            if not is_binary:
                raise ValueError(f"mask holds values other than 0 and 1 (dtype {mask.dtype}); give bool "
                                 f"(True = real frame, False = padding) or 0/1 values")
            if not each_has_one:
                raise ValueError("mask has a video with no valid frame; every video needs at least one")
    if check_finite and checking:
        ops.assert_finite("video", video)


def encode_video(model: nn.Module, video: torch.Tensor, mask: Optional[torch.Tensor] = None,
                 normalize: bool = False, *, check_finite: Optional[bool] = None,
                 return_sources: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, SourceMap]]:
    """Encode videos with TempMe: ``video [B, T, 3, H, W]`` -> ``[B, embed_dim]``.

    Args:
        model: patched by :func:`apply_tempme`.
        video: CLIP-preprocessed frames, any float dtype (cast to the model's), any strides; ``T``
            must equal ``config.frames`` and ``H x W`` the model's image size.
        mask: optional ``[B, T]``, bool (True = real frame) or 0/1 values, at least one real frame
            per video.
        normalize: L2-normalise the returned embedding.
        check_finite: refuse a video holding NaN or Inf (a host synchronisation); default: what
            ``apply_tempme(check_finite=...)`` chose (off).
        return_sources: also return a :class:`~tempme_fast.tracking.SourceMap`, which final token
            every original token of every frame ended in. Off by default, and then nothing of it
            is computed. With it the last block runs in full (its merge places the final tokens),
            so where ``apply_tempme(trim_last_block=True)`` the embedding can differ from the
            untracked one by rounding.

    Returns:
        The embedding ``[B, embed_dim]`` in the model's dtype, or ``(embedding, sources)`` with
        ``return_sources=True``.

    Padded frames: the embedding is the mean of the L2-normalised class-token features of the
    frames the mask marks valid, and a padded frame gets weight exactly zero in that mean. Padded
    frames are still encoded with the rest of their video, as in the released TempMe model: from
    the first ClipMe layer on they share joined clips with real frames, so real frames attend to
    their tokens and merge with them. What a padded frame holds (zeros, a repeated frame) therefore
    changes its video's embedding slightly; pad the same way at training and test time (the
    retrieval loaders pad with zero frames at the end). A video's embedding never depends on the
    other videos in the batch.
    """
    try:
        settings: TempMeSettings = model.tempme
    except AttributeError:
        raise _not_patched(model) from None
    check_finite = settings.check_finite if check_finite is None else check_finite
    check_video(model, video, mask, check_finite)
    visual = model.visual
    b, t = video.shape[:2]
    frames = video.flatten(0, 1)
    sources = None
    if not settings.config.merges:
        if getattr(visual, "tome", None) is not None:  # (its forward would merge: no baseline, and sources untrue)
            raise ValueError("model.visual is patched by apply_tome, so the unmerged TempMe config would merge with "
                             "ToMe; remove_tome(model) first")
        # Per-frame CLIP through open_clip's own forward (its own attention path).
        features = visual(frames.to(visual.conv1.weight.dtype))
        features = (features[0] if isinstance(features, tuple) else features).view(b, t, -1)
        if return_sources:
            tokens = settings.schedule.tokens_per_frame
            sources = source_map(initial_sources(b, t, tokens, video.device), t, t, tokens, 1)
    else:
        state = run_blocks(model, embed_frames(visual, frames, track_videos=b if return_sources else None,
                                               backend=settings.backend, next_norm=first_norm(model)))
        features = frame_features(visual, state, b)
        if return_sources:
            sources = source_map(state.sources, t, state.x.shape[0] // b, state.x.shape[1], state.protected)
    pooled = pool_frames(features, mask)
    pooled = torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled
    return (pooled, sources) if return_sources else pooled


def trace_sources(model: nn.Module, video: torch.Tensor, mask: Optional[torch.Tensor] = None) -> SourceMap:
    """Run the patched ``model`` on ``video [B, T, 3, H, W]`` and return where every original token went.

    The same as ``model.encode_video(video, mask, return_sources=True)[1]``, without gradients. The
    mask does not change the merges (padded frames take part in them); it is validated only.
    """
    with torch.no_grad():
        _, sources = encode_video(model, video, mask, return_sources=True)
    return sources


def encoder_options(model: nn.Module) -> EncoderOptions:
    settings: TempMeSettings = model.tempme
    return EncoderOptions(settings.backend, settings.config.prop_attn, settings.attention)


def layer_steps(model: nn.Module):
    """``(block, plan, frame_pos)`` of every layer of a patched model, in order; ``frame_pos`` is the
    layer's temporal position embedding, or None where it has none."""
    frame_pos = getattr(model.visual, "tempme_frame_pos", {})
    for block, plan in zip(model.visual.transformer.resblocks, model.tempme.schedule.layers):
        yield block, plan, frame_pos[str(plan.layer)] if str(plan.layer) in frame_pos else None


def trims_last_block(model: nn.Module) -> bool:
    """Whether ``encode_video`` runs a patched model's last block trimmed to its class tokens:
    ``apply_tempme(trim_last_block=True)`` with a config that merges (the unmerged config runs
    open_clip's own forward, every block in full)."""
    return model.tempme.trim_last_block and bool(model.tempme.config.merges)


def block_function(model: nn.Module, layer: int, state: ClipState):
    """What layer ``layer`` of a patched model runs on ``state``: :func:`~tempme_fast.encoder.class_block_forward`
    for the last layer when the model trims it (:func:`trims_last_block`) and nothing tracks sources,
    :func:`~tempme_fast.encoder.block_forward` otherwise."""
    last = layer == len(model.tempme.schedule.layers) - 1
    if last and trims_last_block(model) and state.sources is None:
        return class_block_forward
    return block_forward


def next_norm(model: nn.Module, layer: int, forward, steps: Optional[list] = None) -> Optional[nn.Module]:
    """The LayerNorm that reads the output of layer ``layer`` (run by ``forward``) next, for the block
    to apply with its last residual add (``ops.add_norm``), or None: the next block's ``ln_1`` unless
    that block joins clips (its cross-clip merge reads the sum itself); after the last block,
    ``ln_post`` when the block is trimmed to the class tokens that :func:`encoder.frame_features` reads.
    ``steps``: ``list(layer_steps(model))``, when the caller has it."""
    steps = list(layer_steps(model)) if steps is None else steps
    if layer + 1 < len(steps):
        block, plan, _ = steps[layer + 1]
        return block.ln_1 if plan.group == 1 else None
    return model.visual.ln_post if forward is class_block_forward else None


def first_norm(model: nn.Module) -> Optional[nn.Module]:
    """The LayerNorm that reads the embedding's output (the first block's ``ln_1``, unless that block joins
    clips), for ``embed_frames`` to apply in its op; None under gradient checkpointing, as :func:`run_blocks`
    hands no LayerNorm on there."""
    visual = model.visual
    if visual.transformer.grad_checkpointing and torch.is_grad_enabled():
        return None
    # (next_norm(model, -1, None) without building the whole list of layer steps: host time at every call)
    return visual.transformer.resblocks[0].ln_1 if model.tempme.schedule.layers[0].group == 1 else None


def run_blocks(model: nn.Module, state: ClipState) -> ClipState:
    """Every transformer block of ``model.visual`` with TempMe's schedule (each layer runs
    :func:`block_function`'s choice: the last one trimmed to its class tokens by default). Each block
    applies the LayerNorm that reads its output (:func:`next_norm`) in its last residual add, except
    under gradient checkpointing, where a state holding it would be kept for every block."""
    visual = model.visual
    options = encoder_options(model)
    use_checkpoint = visual.transformer.grad_checkpointing and torch.is_grad_enabled()
    steps = list(layer_steps(model))
    for i, (block, plan, pos) in enumerate(steps):
        forward = block_function(model, i, state)
        if use_checkpoint:
            state = checkpoint(forward, block, state, plan, pos, options, use_reentrant=False)
        else:
            state = forward(block, state, plan, pos, options, next_norm(model, i, forward, steps))
    return state
