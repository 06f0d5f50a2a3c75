"""Fine-tuning TempMe models: the symmetric InfoNCE loss, one training step, the optimiser and its schedule.

    optimizer = make_optimizer(model, lr=6e-4)
    scheduler = cosine_schedule(optimizer, total_steps, warmup_steps=total_steps // 10)
    for batch in batches:                     # (video [B, T, 3, H, W], tokens [B, L][, mask [B, T]])
        train_step(model, batch, optimizer, scheduler=scheduler)

:func:`train_step` is the building block for one's own loop; :class:`tempme_fast.trainer.Trainer`
is the resumable loop built on it.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_LR = {"lora": 6e-4, "full": 1e-5}
# CLIP's temperature is clamped to 100 after every step, as in CLIP's and open_clip's training.
MAX_LOGIT_SCALE = math.log(100.0)

__all__ = ["DEFAULT_LR", "MAX_LOGIT_SCALE", "PRECISIONS", "StepResult", "VideoTextForward", "contrastive_loss",
           "cosine_schedule", "make_optimizer", "set_grad_checkpointing", "train_step", "unpack_batch",
           "unwrap_model"]


# ---------------------------------------------------------------------------------------------
# Loss and step
# ---------------------------------------------------------------------------------------------

def contrastive_loss(video_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                     gather: bool = False) -> torch.Tensor:
    """Symmetric InfoNCE of matching text/video pairs (row ``i`` of each is a pair).

    Args:
        video_emb: ``[B, E]`` video embeddings (any norm; L2-normalised here).
        text_emb: ``[B, E]`` text embeddings.
        logit_scale: CLIP's log-temperature (scalar); the similarities are scaled by its ``exp()``.
        gather: gather both from every process first (gradient-correct), so each process gets the
            loss of the combined batch (:func:`tempme_fast.distributed.all_gather_with_grad`).
    Returns:
        float32 scalar: ``(CE(S, I) + CE(S^T, I)) / 2`` with ``S = exp(logit_scale) * t @ v^T``.
    """
    if video_emb.dim() != 2 or text_emb.dim() != 2 or video_emb.shape != text_emb.shape:
        raise ValueError(f"video_emb and text_emb must both be [B, E] of one shape, got "
                         f"{tuple(video_emb.shape)} and {tuple(text_emb.shape)}")
    video_emb = F.normalize(video_emb.float(), dim=-1)
    text_emb = F.normalize(text_emb.float(), dim=-1)
    if gather:
        from .distributed import all_gather_with_grad
        video_emb, text_emb = all_gather_with_grad(video_emb), all_gather_with_grad(text_emb)
    logits = logit_scale.float().exp() * text_emb @ video_emb.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def _context_length(clip: nn.Module) -> Optional[int]:
    pos = getattr(clip, "positional_embedding", None)
    if isinstance(pos, torch.Tensor) and pos.dim() == 2:
        return pos.shape[0]
    return getattr(clip, "context_length", None)


class VideoTextForward(nn.Module):
    """``forward(video, tokens, mask) -> (video_emb, text_emb, logit_scale)`` of a TempMe-patched CLIP.

    DDP synchronises gradients of what runs inside its wrapped module's ``forward``; CLIP's own
    ``forward`` encodes images, so data-parallel training wraps this module instead.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        if not hasattr(clip, "encode_video"):
            raise TypeError(f"model is a {type(clip).__name__} without encode_video; call "
                            f"tempme_fast.apply_tempme(model) first")
        self.clip = clip

    def forward(self, video: torch.Tensor, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None):
        return self.encode(self.clip, video, tokens, mask)

    @staticmethod
    def encode(clip: nn.Module, video: torch.Tensor, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None):
        length = _context_length(clip)
        if length is not None and tokens.shape[1] < length:
            # Causal text attention read at EOT: zero-padding gives the features of the shorter context.
            tokens = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], length - tokens.shape[1])], dim=1)
        return clip.encode_video(video, mask), clip.encode_text(tokens), clip.logit_scale


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile``'s and ``DistributedDataParallel``'s wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The CLIP inside ``torch.compile``, ``DistributedDataParallel`` and :class:`VideoTextForward` wrappers."""
    model = _unwrapped(model)
    return model.clip if isinstance(model, VideoTextForward) else model


def unpack_batch(batch, device: Optional[torch.device] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(video [B, T, 3, H, W], tokens [B, L], mask [B, T] or None)`` from a tuple or dict batch."""
    if isinstance(batch, dict):
        if "video" not in batch or "tokens" not in batch:
            raise ValueError(f"a dict batch needs keys 'video' and 'tokens' (optional 'mask'), got {sorted(batch)}")
        video, tokens, mask = batch["video"], batch["tokens"], batch.get("mask")
    elif isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        video, tokens = batch[0], batch[1]
        mask = batch[2] if len(batch) == 3 else None
    else:
        raise TypeError(f"batch must be (video, tokens), (video, tokens, mask) or a dict with those keys, got "
                        f"{type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list))
                                                     else ""))
    if not isinstance(video, torch.Tensor) or video.dim() != 5:
        raise ValueError(f"batch video must be a [B, T, 3, H, W] tensor, got "
                         f"{tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__}")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] != video.shape[0]:
        raise ValueError(f"batch tokens must be a [B, L] tensor with B={video.shape[0]}, got "
                         f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
    if device is not None:
        video = video.to(device, non_blocking=True)
        tokens = tokens.to(device, non_blocking=True)
        mask = mask.to(device, non_blocking=True) if mask is not None else None
    return video, tokens, mask


class StepResult(NamedTuple):
    """What :func:`train_step` reports: the loss (float), videos in this process's batch, the
    learning rate used, and the gradient norm before clipping (None without clipping)."""

    loss: float
    batch_size: int
    lr: float
    grad_norm: Optional[float]


def _first_param(model: nn.Module) -> torch.Tensor:
    return next(unwrap_model(model).parameters())


def train_step(model: nn.Module, batch, optimizer: torch.optim.Optimizer,
               scaler: Optional[torch.amp.GradScaler] = None, autocast_dtype: Optional[torch.dtype] = None,
               scheduler=None, grad_clip: Optional[float] = None, gather: Optional[bool] = None) -> StepResult:
    """One optimisation step of the symmetric InfoNCE loss on one batch.

    Args:
        model: a TempMe-patched CLIP in train mode, or :class:`VideoTextForward` of one, wrapped in
            ``DistributedDataParallel`` (:func:`tempme_fast.distributed.wrap_ddp`), ``torch.compile``
            or both (compile outermost).
        batch: ``(video, tokens[, mask])`` or a dict with those keys (see :func:`unpack_batch`);
            moved to the model's device. Tokens shorter than the text tower's context are zero-padded.
        optimizer: over the trainable parameters; gradients are zeroed first.
        scaler: a ``torch.amp.GradScaler`` for fp16 autocast (not needed for bf16 / fp32).
        autocast_dtype: ``torch.bfloat16`` / ``torch.float16`` runs the forward under autocast;
            None runs it in the parameters' dtype.
        scheduler: stepped once after the optimiser (skipped with the optimiser when fp16 overflows).
        grad_clip: clip the global gradient norm to this value.
        gather: compute the loss over all processes' batches; default: when torch.distributed is
            initialised with more than one process.
    """
    if autocast_dtype not in (None, torch.bfloat16, torch.float16):
        raise ValueError(f"autocast_dtype={autocast_dtype} must be None, torch.bfloat16 or torch.float16")
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"grad_clip={grad_clip} must be > 0 or None")
    if gather is None:
        gather = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
    device = _first_param(model).device
    video, tokens, mask = unpack_batch(batch, device)
    optimizer.zero_grad(set_to_none=True)
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    with amp:
        if isinstance(_unwrapped(model), VideoTextForward):
            video_emb, text_emb, logit_scale = model(video, tokens, mask)
        else:
            video_emb, text_emb, logit_scale = VideoTextForward.encode(model, video, tokens, mask)
    loss = contrastive_loss(video_emb, text_emb, logit_scale, gather=gather)
    lr = optimizer.param_groups[0]["lr"]
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    grad_norm = None
    if grad_clip is not None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    if scaler is not None and scaler.is_enabled():
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        stepped = scaler.get_scale() >= scale  # the scale drops only when the step was skipped
    else:
        optimizer.step()
        stepped = True
    clip = unwrap_model(model)
    if isinstance(getattr(clip, "logit_scale", None), nn.Parameter) and clip.logit_scale.requires_grad:
        with torch.no_grad():
            clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    if scheduler is not None and stepped:
        scheduler.step()
    return StepResult(loss.item(), video.shape[0], lr, grad_norm)


def set_grad_checkpointing(model: nn.Module, enable: bool = True) -> None:
    """Activation checkpointing per transformer block, both towers (recompute in backward)."""
    clip = unwrap_model(model)
    if hasattr(clip, "set_grad_checkpointing"):
        clip.set_grad_checkpointing(enable)
    else:
        clip.visual.set_grad_checkpointing(enable)


# ---------------------------------------------------------------------------------------------
# Optimiser and schedule
# ---------------------------------------------------------------------------------------------

def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.2, betas=(0.9, 0.98),
                   eps: float = 1e-6) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices decay, 0/1-D ones (biases, norms,
    ``logit_scale``) do not (CLIP's rule). Groups keep ``named_parameters`` order, so a rebuilt
    optimiser takes a saved state."""
    decay, no_decay = [], []
    for _, p in unwrap_model(model).named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("model has no trainable parameters (see tempme_fast.lora.mark_trainable)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), eps=eps)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from ``lr / warmup_steps`` to ``lr`` over ``warmup_steps``, then cosine to 0 at
    ``total_steps``."""
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got "
                         f"total_steps={total_steps}, warmup_steps={warmup_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
