"""The resumable training loop: :class:`TrainConfig` (the recipe) and :class:`Trainer`.

    model = apply_tempme(open_clip.create_model("ViT-B-32-quickgelu", pretrained="openai"))
    trainer = Trainer(model, batches, TrainConfig(mode="lora"), output_dir="runs/b32")
    trainer.fit()                      # AdamW, cosine with warm-up, checkpoints in runs/b32/last.pt

``batches`` is any iterable of ``(video [B, T, 3, H, W], tokens [B, L])`` or
``(video, tokens, mask [B, T])`` tuples, or of dicts with keys ``video``, ``tokens`` and optional
``mask`` (what :func:`tempme_fast.retrieval.make_loader` yields); it is iterated once per epoch.
For a run that resumes exactly, the batches of epoch ``e`` must depend only on ``e`` and the RNG
state at the start of the epoch (a list, a ``DataLoader`` with a seeded or ``set_epoch`` sampler, or
a callable ``epoch -> iterable``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from . import distributed
from .errors import ConfigError, TrainingDiverged
from .outputs import exclusive, prepare_output_dir
from .checkpoint import atomic_save, atomic_write, load_file, rng_state, set_rng_state
from .lora import MODES, add_lora, load_lora_state_dict, lora_config, lora_state_dict, mark_trainable
from .train import (DEFAULT_LR, PRECISIONS, VideoTextForward, cosine_schedule, make_optimizer, set_grad_checkpointing,
                    train_step, unpack_batch)

log = logging.getLogger(__name__)

# Kept as written by earlier releases, so their checkpoints still resume.
CHECKPOINT_FORMAT = "tempme_fast.train"
# Steps between checkpoints by default: at most this much work is lost to a crash (LoRA checkpoints are a
# few MB; a full ViT-B/32 one with its AdamW state about 1.8 GB).
DEFAULT_SAVE_EVERY = 200
# The contrastive loss of a batch of one pair is 0 whatever the weights: nothing to learn from it.
MIN_PAIRS = 2
# What a TrainingDiverged error advises.
_DIVERGED_ADVICE = ("Training diverged: start again with a lower lr, grad_clip (--grad-clip) or fp32 precision, or "
                    "resume from an earlier checkpoint")

__all__ = ["CHECKPOINT_FORMAT", "DEFAULT_SAVE_EVERY", "MIN_PAIRS", "TrainConfig", "Trainer"]


def _plain(value):
    """A config value as a checkpoint compares it (tuples and lists alike)."""
    return list(value) if isinstance(value, (tuple, list)) else value


def _refuse_differences(path: str, saved: Mapping[str, Any], ours: Mapping[str, Any], keys: Sequence[str],
                        why: str) -> None:
    """Refuse a resume from ``path`` where a value of ``keys`` differs between the checkpoint and this run."""
    differ = [k for k in keys if _plain(saved.get(k)) != _plain(ours[k])]
    if differ:
        raise ConfigError(f"{path} was trained with {', '.join(f'{k}={_plain(saved.get(k))!r}' for k in differ)}; "
                          f"this run has {', '.join(f'{k}={_plain(ours[k])!r}' for k in differ)}, {why}: resume "
                          f"with the run's own values, or start a new run in another folder")


def _too_short(epoch: int, consumed: int) -> ValueError:
    """A resumed epoch's data that holds fewer batches than its checkpoint had consumed."""
    return ValueError(f"the data of epoch {epoch} has fewer than the {consumed} batches the checkpoint had consumed")


def _read_log(path: str) -> List[dict]:
    """The step records of a training log. A last line that a killed run cut off is left out; any other line that
    is not a step record is left out with a warning naming it."""
    with open(path) as f:
        lines = f.readlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        elif line.endswith("\n") or number < len(lines):
            log.warning("%s:%d: not a step record, left out of the log: %r", path, number, line.strip()[:80])
    return records


@dataclass
class TrainConfig:
    """The training recipe. Defaults: the TempMe paper's (AdamW, lr 6e-4 for LoRA, weight decay
    0.2, cosine schedule with 10% warm-up, 5 epochs); its batch of 128 is the data's business.

    Attributes:
        mode: ``"lora"`` (LoRA rank ``lora_rank`` on q/k/v of both towers plus the temporal position
            embeddings train) or ``"full"`` (every weight trains).
        lora_rank, lora_scale: of the LoRA that LoRA mode adds (default 8 and 1.0, the released code's); a
            model that already has LoRA (an official checkpoint's) trains its own, and a value here that
            differs from it is refused.
        lr: peak learning rate; None: 6e-4 for LoRA, 1e-5 for full fine-tuning (ours; the paper
            gives only the LoRA value).
        warmup: share of the total steps spent warming up linearly.
        precision: ``"fp32"``, ``"bf16"`` (autocast) or ``"fp16"`` (autocast and a grad scaler).
        save_every: also checkpoint every this many steps (default 200; None: only at epoch ends,
            which are saved anyway).
        steps_per_epoch: needed when the data has no ``len``.
        max_steps: stop after this many steps in all (the schedule still spans every epoch); for
            smoke runs and tests.
        compile: a ``torch.compile`` backend (``"inductor"``, ``"aot_eager"``, ...; see
            ``torch.compiler.list_backends()``) that compiles the training forward of both towers, and
            through AOTAutograd its backward; None (default) trains eagerly. The first step, and the
            first of each new batch size, compiles.
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
    lora_rank: Optional[int] = None
    lora_scale: Optional[float] = None
    log_every: int = 10
    save_every: Optional[int] = DEFAULT_SAVE_EVERY
    steps_per_epoch: Optional[int] = None
    max_steps: Optional[int] = None
    compile: Optional[str] = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is not one of {MODES}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r} is not one of {tuple(PRECISIONS)}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.mode]
        checks = [("epochs", self.epochs >= 1), ("lr", 0 < self.lr < math.inf),
                  ("weight_decay", 0 <= self.weight_decay < math.inf),
                  ("warmup", 0 <= self.warmup < 1), ("log_every", self.log_every >= 1),
                  ("save_every", self.save_every is None or self.save_every >= 1),
                  ("steps_per_epoch", self.steps_per_epoch is None or self.steps_per_epoch >= 1),
                  ("max_steps", self.max_steps is None or self.max_steps >= 1),
                  ("grad_clip", self.grad_clip is None or self.grad_clip > 0),
                  ("lora_rank", self.lora_rank is None or self.lora_rank >= 1),
                  ("lora_scale", self.lora_scale is None
                   or (math.isfinite(self.lora_scale) and self.lora_scale != 0))]
        valid = {"epochs": ">= 1", "lr": "finite and > 0", "weight_decay": "finite and >= 0", "warmup": "in [0, 1)",
                 "log_every": ">= 1", "save_every": ">= 1 or None", "steps_per_epoch": ">= 1 or None",
                 "max_steps": ">= 1 or None", "grad_clip": "> 0 or None", "lora_rank": ">= 1 or None",
                 "lora_scale": "a finite non-zero number or None"}
        for name, ok in checks:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be {valid[name]}")
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else ()
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"betas={self.betas!r} must be two numbers in [0, 1) (AdamW's, e.g. (0.9, 0.98))")
        self.betas = betas
        if not (isinstance(self.eps, (int, float)) and 0 <= self.eps < math.inf):
            raise ConfigError(f"eps={self.eps!r} must be finite and >= 0")
        if self.compile is not None:
            if not isinstance(self.compile, str) or self.compile not in torch.compiler.list_backends(exclude_tags=()):
                raise ConfigError(f"compile={self.compile!r} is not a torch.compile backend; valid: None (eager) "
                                  f"or a name torch.compiler.list_backends() gives: "
                                  f"{', '.join(torch.compiler.list_backends())}")


class Trainer:
    """Fine-tunes a TempMe-patched CLIP on text-video pairs; resumable from its checkpoints.

    Args:
        model: patched by :func:`tempme_fast.apply_tempme`, on its training device, float32
            weights (mixed precision is autocast). In LoRA mode LoRA is added when missing.
        data: batches as the module docstring says, or a callable ``epoch -> iterable``.
        config: the recipe.
        output_dir: where ``last.pt`` (checkpoint) and ``train_log.jsonl`` go, made when missing; None saves
            nothing. A folder that already holds them is refused unless ``resume`` continues that run, and so is
            a place that cannot be written, before the first step.
        progress: a tqdm progress bar (on the first process only).
        resume: a checkpoint path to continue from (``"auto"``: ``output_dir/last.pt`` if present; it needs
            ``output_dir``).
        run_info: what else the run depends on that ``config`` and the model do not record, as plain
            values (``tempme train`` gives the model's name and weights, the global batch size, the
            seed, the data): stored in the checkpoints, and a resume where one of them differs from
            the checkpoint's is refused, naming both values.
    Under ``torch.distributed`` (see :mod:`tempme_fast.distributed`) the model is wrapped in DDP,
    the loss covers every process's batch and only rank 0 writes files. Each process's ``data``
    must yield its own shard.
    """

    CHECKPOINT = "last.pt"
    LOG = "train_log.jsonl"
    LOCK = ".train.lock"  # held by the main process while it writes in output_dir (:meth:`writing`)

    @classmethod
    def run_files(cls, folder: str, also: Sequence[str] = ()) -> List[str]:
        """The files of a training run that ``folder`` already holds: ``last.pt``, ``train_log.jsonl``, then
        those of ``also``, in that order."""
        return [n for n in (cls.CHECKPOINT, cls.LOG, *also) if os.path.exists(os.path.join(folder, n))]

    @classmethod
    def check_folder(cls, output_dir: str, resume: Optional[str], also: Sequence[str] = (),
                     labels: Tuple[str, str] = ("output_dir=", "resume='auto'")) -> None:
        """Refuse a run in ``output_dir`` that would replace another run's files there or mix the logs (a
        :class:`ConfigError`): a new run (``resume`` None) in a folder that holds one; a resume of another
        run's checkpoint into it; ``"auto"`` where the folder holds final weights (those of ``also``) but no
        ``last.pt`` to continue from, so that a run would start over and replace them. ``labels``: how the
        message names the folder and the automatic resume (the command line's are ``--output``, ``--resume
        auto``)."""
        held = cls.run_files(output_dir, also)
        if not held:
            return
        where, auto = f"{labels[0]}{output_dir}", labels[1]
        last = os.path.join(output_dir, cls.CHECKPOINT)
        if resume is None:
            raise ConfigError(f"{where} already holds a training run ({', '.join(held)}); continue it with {auto}, or "
                              f"give another folder")
        if resume == "auto":
            final = [n for n in held if n in also]
            if final and not os.path.isfile(last):
                raise ConfigError(f"{where} holds a run's {' and '.join(final)} but no {cls.CHECKPOINT} to continue "
                                  f"from: {auto} would train from the start and replace them; give another folder")
            return
        if not os.path.isfile(resume):
            raise ConfigError(f"{resume}: no such checkpoint to resume from")
        if not (os.path.isfile(last) and os.path.samefile(resume, last)):
            raise ConfigError(f"{where} holds another run ({', '.join(held)}), which continuing {resume} there would "
                              f"replace and mix into its log; continue that folder's own run with {auto}, or give "
                              f"an empty folder")

    def __init__(self, model: nn.Module, data, config: Optional[TrainConfig] = None,
                 output_dir: Optional[str] = None, progress: bool = True, resume: Optional[str] = None,
                 run_info: Optional[Mapping[str, Any]] = None):
        self.config = config = config or TrainConfig()
        if run_info is not None and not (isinstance(run_info, Mapping) and all(isinstance(k, str) for k in run_info)):
            raise TypeError(f"run_info must be a mapping with str keys, got {run_info!r}")
        self.run_info = dict(run_info or {})
        if not hasattr(model, "encode_video"):
            raise TypeError(f"model is a {type(model).__name__} without encode_video; call "
                            f"tempme_fast.apply_tempme(model) first")
        if resume == "auto" and not output_dir:
            raise ConfigError("resume='auto' continues the run in output_dir (its last.pt): give output_dir, or "
                              "resume=<checkpoint path>")
        if output_dir:  # found at the first step's log line otherwise, or at the first checkpoint
            prepare_output_dir(output_dir, "output_dir")
            with self.writing(output_dir):  # refused here, before anything is set up, while another run writes there
                pass
            self.check_folder(output_dir, resume)
        self.model = model
        self.data = data
        self.output_dir = output_dir
        self.progress = progress
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.config = config = self._lora_settings(model, config)
        self.trainable = mark_trainable(model, config.mode)
        self._refuse_half_weights(model)
        set_grad_checkpointing(model, config.grad_checkpointing)
        self.device = next(model.parameters()).device
        self.forward_model = self._forward_model(model)
        self.optimizer = make_optimizer(model, config.lr, config.weight_decay, config.betas, config.eps)
        self.steps_per_epoch = self._steps_per_epoch()
        self.total_steps = self.steps_per_epoch * config.epochs
        self.scheduler = cosine_schedule(self.optimizer, self.total_steps, int(config.warmup * self.total_steps))
        self.autocast_dtype = PRECISIONS[config.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.step = self.epoch = self.step_in_epoch = 0
        # Batches left out because fewer than MIN_PAIRS of their pairs were readable (all processes).
        self.skipped_batches = 0
        # Set when fit() stopped early on Ctrl-C (SIGINT) after writing a checkpoint.
        self.interrupted = False
        self._stop_requested = False
        # The checkpoint written when a step raised before the optimiser changed anything (None otherwise).
        self.failure_checkpoint: Optional[str] = None
        self._optimizer_stepped = False
        self.optimizer.register_step_pre_hook(self._mark_stepped)
        self.history: List[dict] = []
        self._epoch_rng: Optional[dict] = None
        self._resume_rng: Optional[dict] = None
        if resume == "auto":
            auto = os.path.join(output_dir, self.CHECKPOINT) if output_dir else None
            resume = auto if auto and os.path.isfile(auto) else None
            stale = os.path.join(output_dir, self.LOG) if output_dir and not resume else None
            if stale and self.is_main and os.path.isfile(stale):
                with self.writing(output_dir):
                    os.remove(stale)  # a run stopped before its first checkpoint: its steps run again, logged afresh
        if resume:
            self.load_checkpoint(resume)

    @staticmethod
    def _lora_settings(model: nn.Module, config: TrainConfig) -> TrainConfig:
        """``config`` with the rank and scale of the LoRA this run trains: LoRA mode adds it when the model has
        none (rank 8, scale 1.0 unless ``config`` says otherwise); a model's own LoRA is trained as it is, and
        ``config`` values that differ from it are refused rather than ignored."""
        current = lora_config(model)
        if current is not None:
            differ = {k: v for k, v in (("lora_rank", config.lora_rank), ("lora_scale", config.lora_scale))
                      if v is not None and v != current[k[len("lora_"):]]}
            if differ:
                raise ConfigError(f"{', '.join(f'{k}={v!r}' for k, v in differ.items())}: the model already has LoRA "
                                  f"of rank={current['rank']} scale={current['scale']} (an official checkpoint's, or "
                                  f"added before), which this run trains; leave them unset, or remove_lora(model) "
                                  f"first")
            return dataclasses.replace(config, lora_rank=current["rank"], lora_scale=current["scale"])
        if config.mode != "lora":
            given = [k for k in ("lora_rank", "lora_scale") if getattr(config, k) is not None]
            if given:
                raise ConfigError(f"{' and '.join(f'{k}={getattr(config, k)!r}' for k in given)} set up LoRA: not "
                                  f"with mode={config.mode!r}, which trains every weight")
            return config
        rank = 8 if config.lora_rank is None else config.lora_rank
        scale = 1.0 if config.lora_scale is None else config.lora_scale
        add_lora(model, rank=rank, scale=scale)
        return dataclasses.replace(config, lora_rank=rank, lora_scale=scale)

    @staticmethod
    def _refuse_half_weights(model: nn.Module) -> None:
        """AdamW on fp16 or bf16 weights rounds most updates away (an lr 1e-5 step is below half a bf16 ulp of
        most weights), and the loss barely moves: such weights are refused. Mixed precision keeps float32
        weights and autocasts (``precision``)."""
        half = next(((n, p.dtype) for n, p in model.named_parameters()
                     if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16)), None)
        if half is not None:
            raise ConfigError(f"the trainable weight {half[0]} is {str(half[1]).replace('torch.', '')}: updates "
                              f"this small would round away; give the model float32 weights (model.float()) and "
                              f"precision='bf16' or 'fp16' for mixed precision")

    @classmethod
    def writing(cls, output_dir: Optional[str], label: Optional[str] = None):
        """The lock of ``output_dir`` (:func:`~tempme_fast.outputs.exclusive` on ``output_dir/.train.lock``),
        held by the main process while it writes there: a second run in the same folder, started while this
        one trains, would replace its checkpoint and mix the logs, and is refused instead, its message
        naming the folder as ``label`` (default ``output_dir=...``)."""
        if not output_dir or distributed.rank() != 0 or os.environ.get("RANK", "0") != "0":  # (before torchrun's
            return contextlib.nullcontext()                                                  # group is made too)
        return exclusive(os.path.join(output_dir, cls.LOCK), lambda holder: (
            f"{label or f'output_dir={output_dir}'}: {holder} is training in this folder, and a second run would "
            f"replace its checkpoint and mix the logs; wait for it to end (then a resume continues it), or give "
            f"another folder"))

    def _forward_model(self, model: nn.Module) -> nn.Module:
        """What :func:`train_step` calls: the model, or :class:`VideoTextForward` of it wrapped in DDP (several
        processes) and then compiled (``config.compile``; one graph per batch shape, not a dynamic one)."""
        if self.world_size == 1 and self.config.compile is None:
            return model
        forward = VideoTextForward(model)
        if self.world_size > 1:
            forward = distributed.wrap_ddp(forward)
        if self.config.compile is not None:
            forward = torch.compile(forward, backend=self.config.compile, dynamic=False)
        return forward

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _steps_per_epoch(self) -> int:
        factory = callable(self.data) and not hasattr(self.data, "__iter__")
        given = self.config.steps_per_epoch
        if given is not None and factory:  # (not called for its length: making an epoch's batches may cost)
            return given
        data = self.data(0) if factory else self.data
        try:
            n = len(data)
        except TypeError:
            if given is not None:
                return given
            raise ValueError("data has no len(); give TrainConfig(steps_per_epoch=...)") from None
        if given is not None:
            if given < n and self.is_main:
                log.warning("steps_per_epoch=%d: each epoch trains on the first %d of the data's %d batches, the "
                            "rest never", given, given, n)
            return given
        if n < 1:
            raise ValueError("data yields no batch (len(data) == 0)")
        return n

    def _epoch_iter(self, epoch: int) -> Iterator:
        data = self.data
        if callable(data) and not hasattr(data, "__iter__"):
            return iter(data(epoch))
        self._set_epoch(data, epoch)
        return iter(data)

    @staticmethod
    def _set_epoch(data, epoch: int) -> None:
        # (the dataset too: PairDataset draws its random captions per epoch)
        for holder in (data, getattr(data, "sampler", None), getattr(data, "batch_sampler", None),
                       getattr(data, "dataset", None)):
            if hasattr(holder, "set_epoch"):
                holder.set_epoch(epoch)

    def _skip_loading(self, epoch: int, consumed: int) -> Optional[Iterator]:
        """The batches of ``epoch`` after its first ``consumed``, without loading those (decoding every video a
        resumed epoch had consumed took as long as the epoch), or None where that could change what the rest
        holds. Called with the RNG as the epoch began; a DataLoader's order then comes from its batch sampler's
        indices alone. Only where no worker makes items from its own random state (no workers, or a dataset that
        says its items depend on their index alone, as PairDataset does): the remaining batches fall to other
        workers than they did in the epoch that was cut."""
        from torch.utils.data import DataLoader, IterableDataset

        data = self.data
        if not isinstance(data, DataLoader) or data.batch_sampler is None or isinstance(data.dataset, IterableDataset) \
                or (data.num_workers and not getattr(data.dataset, "items_depend_on_index", False)):
            return None
        self._set_epoch(data, epoch)
        start = rng_state()
        torch.empty((), dtype=torch.int64).random_(generator=data.generator)  # (a DataLoader iterator's first draw)
        order = list(data.batch_sampler)
        if len(order) < consumed:
            raise _too_short(epoch, consumed)
        options = {"prefetch_factor": data.prefetch_factor} if data.num_workers else {}
        rest = DataLoader(data.dataset, batch_sampler=order[consumed:], num_workers=data.num_workers,
                          collate_fn=data.collate_fn, pin_memory=data.pin_memory, timeout=data.timeout,
                          worker_init_fn=data.worker_init_fn, multiprocessing_context=data.multiprocessing_context,
                          generator=data.generator, **options)
        set_rng_state(start)  # (so its workers get the seeds the epoch's had)
        return iter(rest)

    # -- checkpoints --------------------------------------------------------------------------

    def _model_state(self) -> Dict[str, torch.Tensor]:
        # LoRA mode: the frozen CLIP weights never change, the run rebuilds them from their source.
        state = lora_state_dict(self.model) if self.config.mode == "lora" else self.model.state_dict()
        return {k: v.detach().cpu() for k, v in state.items()}

    def checkpoint_state(self, rng: Optional[dict] = None) -> dict:
        """The training state; ``rng``: the random-number states to store (default: the current ones)."""
        return {
            "format": CHECKPOINT_FORMAT, "version": 1, "config": asdict(self.config),
            "lora": lora_config(self.model), "tempme": asdict(self.model.tempme.config),
            "model": self._model_state(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "total_steps": self.total_steps, "rng": rng or rng_state(), "epoch_rng": self._epoch_rng,
            "world_size": self.world_size, "skipped_batches": self.skipped_batches, "run": self.run_info,
        }

    def save_checkpoint(self, path: Optional[str] = None) -> Optional[str]:
        """Write the full training state atomically (rank 0); returns the path."""
        path = path or (os.path.join(self.output_dir, self.CHECKPOINT) if self.output_dir else None)
        if path is None:
            return None
        if self.is_main:
            state = self.checkpoint_state()
            self._refuse_non_finite(state["model"], path)
            atomic_save(state, path)
        if self.world_size > 1:
            torch.distributed.barrier()
        return path

    def _refuse_non_finite(self, weights: Dict[str, torch.Tensor], path: str) -> None:
        """Raise :class:`TrainingDiverged` instead of writing weights that hold NaN or Inf over the last good
        checkpoint (about 0.1 s a save for a whole ViT-B on the CPU; nothing for LoRA's)."""
        bad = next((name for name, w in weights.items() if w.is_floating_point() and not torch.isfinite(w).all()),
                   None)
        if bad is not None:
            raise TrainingDiverged(f"step {self.step}: the weights hold NaN or Inf ({bad}), so they were not written; "
                                   f"{self._kept(path)}. {_DIVERGED_ADVICE}")

    @staticmethod
    def _kept(path: Optional[str]) -> str:
        if path is None:
            return "nothing is saved without an output_dir"
        return f"the last checkpoint written, {path}, is kept" if os.path.isfile(path) else "none was written before"

    def load_checkpoint(self, path: str) -> None:
        """Restore model, optimiser, scheduler, scaler, step counters and RNG states."""
        state = load_file(path, "checkpoint")
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"{path} is not a checkpoint written by tempme_fast.trainer.Trainer")
        if state["config"]["mode"] != self.config.mode:
            raise ConfigError(f"{path} was trained with mode={state['config']['mode']!r}, this run has "
                             f"mode={self.config.mode!r}")
        # The optimiser's state brings these back from the checkpoint: another value here would be ignored.
        _refuse_differences(path, state["config"], asdict(self.config), ("lr", "weight_decay", "betas", "eps"),
                            "which the optimiser's restored state would override")
        _refuse_differences(path, state["config"], asdict(self.config), ("warmup",),
                            "which the restored learning-rate schedule would jump to")
        if (state["config"].get("precision") == "fp16") != (self.config.precision == "fp16"):
            _refuse_differences(path, state["config"], asdict(self.config), ("precision",),
                                "and fp16's loss scaler is part of the run's state")
        for key in ("precision", "grad_clip"):  # (a change that may rescue a run: allowed, said)
            if _plain(state["config"].get(key)) != _plain(getattr(self.config, key)) and self.is_main:
                log.warning("%s was trained with %s=%r; it continues with %s=%r", path, key, state["config"].get(key),
                            key, getattr(self.config, key))
        saved_run = state.get("run") or {}  # (absent from checkpoints of earlier releases)
        _refuse_differences(path, saved_run, self.run_info, [k for k in self.run_info if k in saved_run],
                            "and a resumed run must continue the same one")
        if state["total_steps"] != self.total_steps:
            raise ConfigError(f"{path} plans {state['total_steps']} steps, this run {self.total_steps}: the data, "
                             f"batch size or epochs differ")
        if state["tempme"] != asdict(self.model.tempme.config):
            raise ConfigError(f"{path} was trained with TempMeConfig {state['tempme']}, the model has "
                             f"{asdict(self.model.tempme.config)}")
        if self.config.mode == "lora":
            if state["lora"] != lora_config(self.model):
                raise ConfigError(f"{path} has LoRA {state['lora']}, the model {lora_config(self.model)}")
            load_lora_state_dict(self.model, state["model"], strict=True)
        else:
            self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self._epoch_rng, self._resume_rng = state["epoch_rng"], state["rng"]
        self.skipped_batches = state.get("skipped_batches", 0)
        log_path = os.path.join(self.output_dir, self.LOG) if self.output_dir else None
        if self.is_main and log_path and os.path.isfile(log_path):
            # A killed run may have logged steps past its last checkpoint; they will be run again.
            kept = [r for r in _read_log(log_path) if r["step"] <= self.step]
            atomic_write(log_path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
        if self.is_main:
            log.info("resumed from checkpoint %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch,
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
        """False for a batch with fewer than ``MIN_PAIRS`` readable pairs in all, or none on some
        process (the retrieval loaders drop videos that fail to decode). Every process decides
        alike, so the gather in the loss never waits on a rank that skipped."""
        size = 0 if isinstance(batch, dict) and "video" not in batch else len(unpack_batch(batch)[0])
        if isinstance(batch, dict) and batch.get("skipped") and self.is_main:
            log.warning("skipped %d unreadable video(s), e.g. %s", len(batch["skipped"]), batch["skipped"][0])
        smallest = total = size
        if self.world_size > 1:
            smallest_t = torch.tensor([size], device=self.device)
            total_t = torch.tensor([size], device=self.device)
            torch.distributed.all_reduce(smallest_t, op=torch.distributed.ReduceOp.MIN)
            torch.distributed.all_reduce(total_t)
            smallest, total = int(smallest_t), int(total_t)
        if smallest > 0 and total >= MIN_PAIRS:
            return True
        self.skipped_batches += 1
        if self.is_main:
            log.warning("batch %d of epoch %d skipped: %d readable pair(s)%s, a contrastive step needs %d "
                        "(%d batch(es) skipped so far)", self.step_in_epoch, self.epoch, total,
                        " (none on some process)" if smallest == 0 and total else "", MIN_PAIRS,
                        self.skipped_batches)
        return False

    def _stop_agreed(self) -> bool:
        """Whether a Ctrl-C asked to stop, on any process (all stop at the same step)."""
        stop = self._stop_requested
        if self.world_size > 1:
            flag = torch.tensor([int(stop)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag)
        return stop

    @contextlib.contextmanager
    def _stop_on_interrupt(self):
        """The first Ctrl-C lets the current step finish, then :meth:`fit` checkpoints and returns;
        a second one interrupts at once. Only the main thread can take signals."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            if self.is_main:
                log.warning("Ctrl-C: stopping after this step and writing a checkpoint (Ctrl-C again to quit now)")

        previous = signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _open_epoch(self) -> Iterator:
        """The current epoch's batches, positioned after those a resumed checkpoint had consumed."""
        resume_rng, self._resume_rng = self._resume_rng, None  # (the first epoch after a resume only)
        if self.step_in_epoch == 0:
            if resume_rng is not None:  # resuming at an epoch's start: the RNG as the checkpoint left it
                set_rng_state(resume_rng)
            self._epoch_rng = rng_state()
            return self._epoch_iter(self.epoch)
        # Resuming mid-epoch: replay the epoch's data order from its starting RNG, then the saved RNG (or, when
        # fit() runs again in this process after a Ctrl-C, the RNG as it stands).
        resume_rng = resume_rng or rng_state()
        set_rng_state(self._epoch_rng)
        batches = self._skip_loading(self.epoch, self.step_in_epoch)
        if batches is None:
            batches = self._epoch_iter(self.epoch)
            for _ in range(self.step_in_epoch):
                if next(batches, None) is None:
                    raise _too_short(self.epoch, self.step_in_epoch)
        set_rng_state(resume_rng)
        return batches

    def _mark_stepped(self, optimizer, args, kwargs) -> None:
        self._optimizer_stepped = True

    def _save_after_failure(self, rng: Optional[dict], error: BaseException) -> None:
        """A step raised: write the state of the last completed step, if nothing of the failed one has
        changed it, so that the run resumes from there and not from the last periodic checkpoint. ``rng``:
        the random-number states as the failed step began. The error itself is raised again by the caller."""
        if self.output_dir is None or not self.is_main or self.step == 0:
            return
        last = os.path.join(self.output_dir, self.CHECKPOINT)
        if self._optimizer_stepped:
            log.error("step %d failed inside the optimiser update (%s: %s); the weights may be half updated, so no "
                      "checkpoint was written: the last one is %s", self.step + 1, type(error).__name__, error,
                      last if os.path.isfile(last) else "none")
            return
        try:
            # No barrier: the other processes may be failing, or waiting on this one.
            atomic_save(self.checkpoint_state(rng), last)
        except Exception as save_error:  # noqa: BLE001 (the step's error is the one to raise)
            log.error("step %d failed (%s: %s), and writing its checkpoint failed too: %s", self.step + 1,
                      type(error).__name__, error, save_error)
            return
        self.failure_checkpoint = last
        log.error("step %d failed (%s: %s); wrote checkpoint %s at step %d (epoch %d, batch %d): once the cause "
                  "is fixed, resume from it", self.step + 1, type(error).__name__, error, last, self.step,
                  self.epoch, self.step_in_epoch)

    def _run_epoch(self, batches: Iterator, stop_at: int, bar) -> None:
        config = self.config
        while self.step_in_epoch < self.steps_per_epoch and self.step < stop_at:
            # The random-number states as this step begins: what a checkpoint of a failed step resumes from
            # (about 0.1 ms; only where _save_after_failure may write).
            rng = rng_state() if self.output_dir is not None and self.is_main and self.step > 0 else None
            self._optimizer_stepped = False
            try:
                if self._stop_agreed():  # (a collective: it raises when another process has gone)
                    self.interrupted = True
                    return
                batch = next(batches, None)
                if batch is None:
                    break
                if not self._usable(batch):
                    self.step_in_epoch += 1
                    continue
                t0 = time.perf_counter()
                result = train_step(self.forward_model, batch, self.optimizer, self.scaler, self.autocast_dtype,
                                    self.scheduler, config.grad_clip)
            except Exception as error:
                self._save_after_failure(rng, error)
                raise
            seconds = time.perf_counter() - t0
            self.step += 1
            self.step_in_epoch += 1
            record = {"step": self.step, "epoch": self.epoch, "loss": result.loss, "lr": result.lr,
                      "videos_per_s": result.batch_size * self.world_size / seconds, "seconds": seconds}
            self._log(record)
            if not math.isfinite(result.loss) and self._optimizer_stepped:  # (a skipped fp16 step changed nothing)
                last = os.path.join(self.output_dir, self.CHECKPOINT) if self.output_dir else None
                raise TrainingDiverged(f"step {self.step}: the loss is {result.loss} and the optimiser has applied its "
                                       f"gradients, so the weights are no longer usable and no checkpoint is written "
                                       f"from them; {self._kept(last)}. {_DIVERGED_ADVICE}")
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", vps=f"{record['videos_per_s']:.1f}",
                            refresh=False)
            if config.save_every and self.step % config.save_every == 0:
                self.save_checkpoint()

    def _data_ran_out(self) -> None:
        """The data ended before ``steps_per_epoch`` batches: an epoch with none is refused (a one-shot iterator,
        such as a generator, is empty from its second epoch on), a short one is trained with a warning, since
        the learning-rate schedule counts ``steps_per_epoch`` batches an epoch and so ends too early."""
        where = (f"epoch {self.epoch} of the data ended after {self.step_in_epoch} of "
                 f"steps_per_epoch={self.steps_per_epoch} batches")
        if self.step_in_epoch == 0:
            raise ConfigError(f"{where}: nothing to train on. A one-shot iterator (a generator) is empty after its "
                              f"first epoch: give a DataLoader, a list, or a callable epoch -> batches")
        log.warning("%s; the learning-rate schedule counts %d steps in all, so it will not run its course: give "
                    "steps_per_epoch=%d, or data of that many batches", where, self.total_steps, self.step_in_epoch)

    def fit(self) -> List[dict]:
        """Train until the last epoch (or ``max_steps``); returns the per-step records
        ``{"step", "epoch", "loss", "lr", "videos_per_s", "seconds"}`` of this call.

        Ctrl-C (SIGINT) ends the current step, writes the checkpoint (with an ``output_dir``), sets
        :attr:`interrupted` and returns; ``resume="auto"`` continues from there exactly.
        """
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        stop_at = min(self.total_steps, self.config.max_steps or self.total_steps)
        self.model.train()
        start = len(self.history)
        bar = tqdm(total=stop_at, initial=self.step, desc="train", unit="step",
                   disable=not (self.progress and self.is_main))
        # Log lines go through tqdm.write, so they do not tear the progress bar.
        redirect = logging_redirect_tqdm() if not bar.disable else contextlib.nullcontext()
        self._stop_requested = self.interrupted = False
        with self.writing(self.output_dir), redirect, contextlib.closing(bar), self._stop_on_interrupt():
            while self.epoch < self.config.epochs and self.step < stop_at:
                self._run_epoch(self._open_epoch(), stop_at, bar)
                if self.interrupted:
                    self.save_checkpoint()
                    break
                if self.step_in_epoch < self.steps_per_epoch and self.step < stop_at:
                    self._data_ran_out()
                # The epoch is over unless max_steps cut it short.
                if self.step_in_epoch >= self.steps_per_epoch or self.step < stop_at:
                    self.epoch += 1
                    self.step_in_epoch = 0
                self.save_checkpoint()
        return self.history[start:]
