"""Fine-tuning TempMe models: the symmetric InfoNCE loss, one training step, and a resumable Trainer.

    model = apply_tempme(open_clip.create_model("ViT-B-32-quickgelu", pretrained="openai"))
    trainer = Trainer(model, batches, TrainConfig(mode="lora"), output_dir="runs/b32")
    trainer.fit()                      # AdamW, cosine with warm-up, checkpoints in runs/b32/last.pt

``batches`` is any iterable of ``(video [B, T, 3, H, W], tokens [B, L])`` or
``(video, tokens, mask [B, T])`` tuples, or of dicts with keys ``video``, ``tokens`` and optional
``mask`` (what :func:`tempme_fast.retrieval.make_loader` yields); it is iterated once per epoch.
For a run that resumes exactly, the batches of epoch ``e`` must depend only on ``e`` and the RNG
state at the start of the epoch (a list, a ``DataLoader`` with a seeded or ``set_epoch`` sampler, or
a callable ``epoch -> iterable``).

:func:`train_step` is the building block for one's own loop.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .lora import MODES, add_lora, has_lora, load_lora_state_dict, lora_config, lora_state_dict, mark_trainable

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_LR = {"lora": 6e-4, "full": 1e-5}
CHECKPOINT_FORMAT = "tempme_fast.train"
# CLIP's temperature is clamped to 100 after every step, as in CLIP's and open_clip's training.
MAX_LOGIT_SCALE = math.log(100.0)

__all__ = ["CHECKPOINT_FORMAT", "DEFAULT_LR", "PRECISIONS", "StepResult", "SyntheticPairs", "TrainConfig", "Trainer",
           "VideoTextForward", "atomic_save", "contrastive_loss", "cosine_schedule", "make_optimizer",
           "rng_state", "set_grad_checkpointing", "set_rng_state", "train_step", "unpack_batch", "unwrap_model"]


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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The CLIP inside a ``DistributedDataParallel`` / :class:`VideoTextForward` wrapper."""
    model = getattr(model, "module", model)
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
        model: a TempMe-patched CLIP in train mode, or ``DistributedDataParallel`` around
            :class:`VideoTextForward` of one (:func:`tempme_fast.distributed.wrap_ddp`).
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
        if isinstance(getattr(model, "module", model), VideoTextForward):
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


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def atomic_save(obj, path) -> None:
    """``torch.save`` to a temporary file in the target's folder, fsync, then ``os.replace``.

    A crash at any point leaves the previous file or the new one, never a truncated one.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # numpy is a dependency, but its state is optional here
        return state
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # Plain Python values, so checkpoints load with torch.load(weights_only=True).
    state["numpy"] = (name, keys.tolist(), int(pos), int(has_gauss), float(cached))
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """The training recipe. Defaults: the TempMe paper's (AdamW, lr 6e-4 for LoRA, weight decay
    0.2, cosine schedule with 10% warm-up, 5 epochs); its batch of 128 is the data's business.

    Attributes:
        mode: ``"lora"`` (LoRA rank ``lora_rank`` on q/k/v of both towers plus the temporal position
            embeddings train) or ``"full"`` (every weight trains).
        lr: peak learning rate; None: 6e-4 for LoRA, 1e-5 for full fine-tuning (ours; the paper
            gives only the LoRA value).
        warmup: share of the total steps spent warming up linearly.
        precision: ``"fp32"``, ``"bf16"`` (autocast) or ``"fp16"`` (autocast and a grad scaler).
        save_every: also checkpoint every this many steps (every epoch end is saved anyway).
        steps_per_epoch: needed when the data has no ``len``.
        max_steps: stop after this many steps in all (the schedule still spans every epoch); for
            smoke runs and tests.
    """

    mode: str = "lora"
    epochs: int = 5
    lr: Optional[float] = None
    weight_decay: float = 0.2
    warmup: float = 0.1
    betas: Tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: Optional[float] = None
    precision: str = "fp32"
    grad_checkpointing: bool = False
    lora_rank: int = 8
    lora_scale: float = 1.0
    log_every: int = 10
    save_every: Optional[int] = None
    steps_per_epoch: Optional[int] = None
    max_steps: Optional[int] = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {MODES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not one of {tuple(PRECISIONS)}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.mode]
        checks = [("epochs", self.epochs >= 1), ("lr", self.lr > 0), ("weight_decay", self.weight_decay >= 0),
                  ("warmup", 0 <= self.warmup < 1), ("log_every", self.log_every >= 1),
                  ("save_every", self.save_every is None or self.save_every >= 1),
                  ("steps_per_epoch", self.steps_per_epoch is None or self.steps_per_epoch >= 1),
                  ("max_steps", self.max_steps is None or self.max_steps >= 1),
                  ("grad_clip", self.grad_clip is None or self.grad_clip > 0), ("lora_rank", self.lora_rank >= 1)]
        valid = {"epochs": ">= 1", "lr": "> 0", "weight_decay": ">= 0", "warmup": "in [0, 1)", "log_every": ">= 1",
                 "save_every": ">= 1 or None", "steps_per_epoch": ">= 1 or None", "max_steps": ">= 1 or None",
                 "grad_clip": "> 0 or None", "lora_rank": ">= 1"}
        for name, ok in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} must be {valid[name]}")
        self.betas = tuple(self.betas)


class Trainer:
    """Fine-tunes a TempMe-patched CLIP on text-video pairs; resumable from its checkpoints.

    Args:
        model: patched by :func:`tempme_fast.apply_tempme`, on its training device, float32
            weights (mixed precision is autocast). In LoRA mode LoRA is added when missing.
        data: batches as the module docstring says, or a callable ``epoch -> iterable``.
        config: the recipe.
        output_dir: where ``last.pt`` (checkpoint) and ``train_log.jsonl`` go; None saves nothing.
        progress: a tqdm progress bar (on the first process only).
        resume: a checkpoint path to continue from (``"auto"``: ``output_dir/last.pt`` if present).
    Under ``torch.distributed`` (see :mod:`tempme_fast.distributed`) the model is wrapped in DDP,
    the loss covers every process's batch and only rank 0 writes files. Each process's ``data``
    must yield its own shard.
    """

    CHECKPOINT = "last.pt"
    LOG = "train_log.jsonl"

    def __init__(self, model: nn.Module, data, config: Optional[TrainConfig] = None,
                 output_dir: Optional[str] = None, progress: bool = True, resume: Optional[str] = None):
        from . import distributed

        self.config = config = config or TrainConfig()
        if not hasattr(model, "encode_video"):
            raise TypeError(f"model is a {type(model).__name__} without encode_video; call "
                            f"tempme_fast.apply_tempme(model) first")
        self.model = model
        self.data = data
        self.output_dir = output_dir
        self.progress = progress
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        if config.mode == "lora" and not has_lora(model):
            add_lora(model, rank=config.lora_rank, scale=config.lora_scale)
        self.trainable = mark_trainable(model, config.mode)
        set_grad_checkpointing(model, config.grad_checkpointing)
        self.device = next(model.parameters()).device
        self.forward_model = distributed.wrap_ddp(model) if self.world_size > 1 else model
        self.optimizer = make_optimizer(model, config.lr, config.weight_decay, config.betas, config.eps)
        self.steps_per_epoch = self._steps_per_epoch()
        self.total_steps = self.steps_per_epoch * config.epochs
        self.scheduler = cosine_schedule(self.optimizer, self.total_steps, int(config.warmup * self.total_steps))
        self.autocast_dtype = PRECISIONS[config.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.step = self.epoch = self.step_in_epoch = 0
        self.history: List[dict] = []
        self._epoch_rng: Optional[dict] = None
        self._resume_rng: Optional[dict] = None
        if resume == "auto":
            auto = os.path.join(output_dir, self.CHECKPOINT) if output_dir else None
            resume = auto if auto and os.path.isfile(auto) else None
        if resume:
            self.load_checkpoint(resume)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _steps_per_epoch(self) -> int:
        if self.config.steps_per_epoch is not None:
            return self.config.steps_per_epoch
        data = self.data(0) if callable(self.data) and not hasattr(self.data, "__iter__") else self.data
        try:
            n = len(data)
        except TypeError:
            raise ValueError("data has no len(); give TrainConfig(steps_per_epoch=...)") from None
        if n < 1:
            raise ValueError("data yields no batch (len(data) == 0)")
        return n

    def _epoch_iter(self, epoch: int) -> Iterator:
        data = self.data
        if callable(data) and not hasattr(data, "__iter__"):
            return iter(data(epoch))
        for holder in (data, getattr(data, "sampler", None), getattr(data, "batch_sampler", None)):
            if hasattr(holder, "set_epoch"):
                holder.set_epoch(epoch)
        return iter(data)

    # -- checkpoints --------------------------------------------------------------------------

    def _model_state(self) -> Dict[str, torch.Tensor]:
        # LoRA mode: the frozen CLIP weights never change, the run rebuilds them from their source.
        state = lora_state_dict(self.model) if self.config.mode == "lora" else self.model.state_dict()
        return {k: v.detach().cpu() for k, v in state.items()}

    def checkpoint_state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "version": 1, "config": asdict(self.config),
            "lora": lora_config(self.model), "tempme": asdict(self.model.tempme.config),
            "model": self._model_state(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "total_steps": self.total_steps, "rng": rng_state(), "epoch_rng": self._epoch_rng,
            "world_size": self.world_size,
        }

    def save_checkpoint(self, path: Optional[str] = None) -> Optional[str]:
        """Write the full training state atomically (rank 0); returns the path."""
        path = path or (os.path.join(self.output_dir, self.CHECKPOINT) if self.output_dir else None)
        if path is None:
            return None
        if self.is_main:
            atomic_save(self.checkpoint_state(), path)
        if self.world_size > 1:
            torch.distributed.barrier()
        return path

    def load_checkpoint(self, path: str) -> None:
        """Restore model, optimiser, scheduler, scaler, step counters and RNG states."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a checkpoint written by tempme_fast.train.Trainer")
        if state["config"]["mode"] != self.config.mode:
            raise ValueError(f"{path} was trained with mode={state['config']['mode']!r}, this run has "
                             f"mode={self.config.mode!r}")
        if state["total_steps"] != self.total_steps:
            raise ValueError(f"{path} plans {state['total_steps']} steps, this run {self.total_steps}: the data, "
                             f"batch size or epochs differ")
        if state["tempme"] != asdict(self.model.tempme.config):
            raise ValueError(f"{path} was trained with TempMeConfig {state['tempme']}, the model has "
                             f"{asdict(self.model.tempme.config)}")
        if self.config.mode == "lora":
            if state["lora"] != lora_config(self.model):
                raise ValueError(f"{path} has LoRA {state['lora']}, the model {lora_config(self.model)}")
            load_lora_state_dict(self.model, state["model"], strict=True)
        else:
            self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self._epoch_rng, self._resume_rng = state["epoch_rng"], state["rng"]
        if self.is_main and self.output_dir and os.path.isfile(os.path.join(self.output_dir, self.LOG)):
            # A killed run may have logged steps past its last checkpoint; they will be run again.
            path = os.path.join(self.output_dir, self.LOG)
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= self.step]
            with open(path, "w") as f:
                f.writelines(kept)
        if self.is_main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch,
                     self.step_in_epoch)

    # -- the loop -----------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if not self.is_main:
            return
        if record["step"] % self.config.log_every == 0 or record["step"] == self.total_steps:
            log.info("step %d/%d epoch %d loss %.4f lr %.3g %.1f videos/s", record["step"], self.total_steps,
                     record["epoch"], record["loss"], record["lr"], record["videos_per_s"])
        if self.output_dir:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, self.LOG), "a") as f:
                f.write(json.dumps(record) + "\n")

    def _usable(self, batch) -> bool:
        """False for a batch whose videos all failed to decode (the retrieval loaders drop them);
        every process skips together, so the gather in the loss never waits on a missing rank."""
        size = 0 if isinstance(batch, dict) and "video" not in batch else len(unpack_batch(batch)[0])
        if isinstance(batch, dict) and batch.get("skipped") and self.is_main:
            log.warning("skipped %d unreadable video(s), e.g. %s", len(batch["skipped"]), batch["skipped"][0])
        if self.world_size > 1:
            flag = torch.tensor([size], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            size = int(flag)
        if size == 0 and self.is_main:
            log.warning("batch %d of epoch %d has no readable video on some process; skipped", self.step_in_epoch,
                        self.epoch)
        return size > 0

    def _open_epoch(self) -> Iterator:
        """The current epoch's batches, positioned after those a resumed checkpoint had consumed."""
        if self.step_in_epoch == 0:
            self._epoch_rng = rng_state()
            return self._epoch_iter(self.epoch)
        # Resuming mid-epoch: replay the epoch's data order from its starting RNG, then the saved RNG.
        set_rng_state(self._epoch_rng)
        batches = self._epoch_iter(self.epoch)
        for _ in range(self.step_in_epoch):
            if next(batches, None) is None:
                raise ValueError(f"the data of epoch {self.epoch} has fewer than the {self.step_in_epoch} "
                                 f"batches the checkpoint had consumed")
        set_rng_state(self._resume_rng)
        return batches

    def _run_epoch(self, batches: Iterator, stop_at: int, bar) -> None:
        config = self.config
        while self.step_in_epoch < self.steps_per_epoch and self.step < stop_at:
            batch = next(batches, None)
            if batch is None:
                break
            if not self._usable(batch):
                self.step_in_epoch += 1
                continue
            t0 = time.perf_counter()
            result = train_step(self.forward_model, batch, self.optimizer, self.scaler, self.autocast_dtype,
                                self.scheduler, config.grad_clip)
            seconds = time.perf_counter() - t0
            self.step += 1
            self.step_in_epoch += 1
            record = {"step": self.step, "epoch": self.epoch, "loss": result.loss, "lr": result.lr,
                      "videos_per_s": result.batch_size * self.world_size / seconds, "seconds": seconds}
            self._log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", vps=f"{record['videos_per_s']:.1f}",
                            refresh=False)
            if config.save_every and self.step % config.save_every == 0:
                self.save_checkpoint()

    def fit(self) -> List[dict]:
        """Train until the last epoch (or ``max_steps``); returns the per-step records
        ``{"step", "epoch", "loss", "lr", "videos_per_s", "seconds"}`` of this call."""
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        stop_at = min(self.total_steps, self.config.max_steps or self.total_steps)
        self.model.train()
        start = len(self.history)
        bar = tqdm(total=stop_at, initial=self.step, desc="train", unit="step",
                   disable=not (self.progress and self.is_main))
        # Log lines go through tqdm.write, so they do not tear the progress bar.
        redirect = logging_redirect_tqdm() if not bar.disable else contextlib.nullcontext()
        with redirect, contextlib.closing(bar):
            while self.epoch < self.config.epochs and self.step < stop_at:
                self._run_epoch(self._open_epoch(), stop_at, bar)
                # The epoch is over unless max_steps cut it short.
                if self.step_in_epoch >= self.steps_per_epoch or self.step < stop_at:
                    self.epoch += 1
                    self.step_in_epoch = 0
                self.save_checkpoint()
        return self.history[start:]


# ---------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------

class SyntheticPairs:
    """``n`` random video-caption pairs in batches of ``(video, tokens, mask)``, for smoke runs.

    Pair ``i`` is the same tensors whatever the epoch, batch or process; epoch ``e`` visits the pairs
    in an order drawn from ``seed + e``. With ``world_size > 1`` each process yields its
    ``batch_size // world_size`` share of every global batch of ``batch_size``. Incomplete last
    batches are dropped.

    Tokens: random ids in ``[1, vocab_size - 1)``, an end token ``vocab_size - 1`` (CLIP's EOT, which
    its text pooling finds with argmax) at a random position, zeros after it.
    """

    def __init__(self, n: int, batch_size: int, frames: int, image_size: int = 224, context_length: int = 32,
                 vocab_size: int = 49408, seed: int = 0, rank: int = 0, world_size: int = 1):
        if n < 1 or batch_size < 1 or n < batch_size:
            raise ValueError(f"need n >= batch_size >= 1, got n={n}, batch_size={batch_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} must be divisible by the {world_size} processes")
        if context_length < 3 or vocab_size < 3:
            raise ValueError(f"context_length={context_length} and vocab_size={vocab_size} must be >= 3")
        self.n, self.batch_size, self.frames, self.image_size = n, batch_size, frames, image_size
        self.context_length, self.vocab_size, self.seed = context_length, vocab_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def __len__(self) -> int:
        return self.n // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def pair(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        video = torch.randn(self.frames, 3, self.image_size, self.image_size, generator=g)
        tokens = torch.randint(1, self.vocab_size - 1, (self.context_length,), generator=g)
        end = int(torch.randint(2, self.context_length, (1,), generator=g))
        tokens[end] = self.vocab_size - 1
        tokens[end + 1:] = 0
        return video, tokens

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        share = self.batch_size // self.world_size
        for b in range(len(self)):
            ids = order[b * self.batch_size:(b + 1) * self.batch_size][self.rank * share:(self.rank + 1) * share]
            videos, tokens = zip(*(self.pair(int(i)) for i in ids))
            yield torch.stack(videos), torch.stack(tokens), torch.ones(len(ids), self.frames, dtype=torch.bool)
