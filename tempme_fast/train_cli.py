"""``tempme train``: fine-tune a TempMe model on text-video pairs (LoRA or full), one process or many.

    tempme train --data data/MSRVTT --model ViT-B-32-quickgelu --pretrained openai --output runs/b32
    torchrun --nproc_per_node 8 -m tempme_fast train --data data/MSRVTT ... --output runs/b32
    tempme train --synthetic 64 --batch-size 8 --epochs 1 --output /tmp/smoke     # no dataset needed

Writes into ``--output`` (default: a new ``runs/train-<date>-<time>`` folder, named in the first line)
``<output>/last.pt`` (resumable training state, every ``--save-every`` steps, at each epoch end and on
Ctrl-C; ``--resume auto`` continues it),
``<output>/train_log.jsonl`` and, at the end, ``<output>/model.pt``: the state dict with LoRA merged
into the weights, which ``tempme eval --checkpoint`` loads; in LoRA mode also ``<output>/lora.pt``
(LoRA + temporal position embeddings only, :func:`tempme_fast.lora.load_lora`).

``--batch-size`` is the global batch (the similarity matrix is ``batch x batch``); each of the
``torchrun`` processes takes ``batch / world_size`` of it.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import shlex

import torch

from .arguments import (add_config_arguments, add_data_arguments, add_merge_argument, add_model_arguments,
                        add_threads_argument, apply_threads, check_backend, config_from_args, finite_float,
                        load_data_split, non_negative_float, non_negative_int, positive_float, positive_int)
from .errors import ConfigError, as_config_error
from .outputs import plural
from .train import DEFAULT_LR, PRECISIONS
from .trainer import DEFAULT_SAVE_EVERY

log = logging.getLogger(__name__)

# What a finished run writes beside its checkpoint and log: its weights (LoRA merged) and, in LoRA mode, the adapter.
MODEL_FILE, LORA_FILE = "model.pt", "lora.pt"
FINAL_FILES = (MODEL_FILE, LORA_FILE)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of ``tempme train``: the retrieval data options, ``--synthetic``, model and recipe."""
    add_data_arguments(parser, split="train")
    # --data is required for evaluation; here --synthetic may replace it (checked in run_train).
    for action in parser._actions:
        if action.dest == "data":
            action.required = False
    parser.set_defaults(batch_size=128)
    g = parser.add_argument_group("synthetic data")
    g.add_argument("--synthetic", type=positive_int, default=None, metavar="N",
                   help="train on N random video-caption pairs instead of --data (smoke runs, benchmarks)")

    g = parser.add_argument_group("model")
    add_model_arguments(g, device_help="auto, cpu, cuda, cuda:N (under torchrun: cuda:LOCAL_RANK when CUDA is "
                                       "available)")
    g.add_argument("--official-checkpoint", default=None, metavar="FILE",
                   help="start from a checkpoint of the released TempMe code (tempme_fast.official)")
    add_merge_argument(g, baseline="train per-frame CLIP, the baseline")
    add_config_arguments(parser, frames=False)

    g = parser.add_argument_group("training (defaults: the TempMe recipe)")
    g.add_argument("--mode", choices=("lora", "full"), default="lora",
                   help="lora: LoRA on q/k/v of both towers + temporal position embeddings; full: every weight")
    # None when not given: with --mode full they are refused, not ignored.
    g.add_argument("--lora-rank", type=positive_int, default=None,
                   help="LoRA rank (default 8; with --official-checkpoint, its own)")
    g.add_argument("--lora-scale", type=finite_float, default=None,
                   help="LoRA delta multiplier (default 1: the released code)")
    g.add_argument("--epochs", type=positive_int, default=5)
    g.add_argument("--lr", type=positive_float, default=None,
                   help=f"peak learning rate (default {DEFAULT_LR['lora']} for lora, {DEFAULT_LR['full']} for full)")
    g.add_argument("--weight-decay", type=non_negative_float, default=0.2, help="AdamW weight decay (matrices only)")
    g.add_argument("--warmup", type=finite_float, default=0.1, help="share of the steps spent in linear warm-up")
    g.add_argument("--grad-clip", type=positive_float, default=None, help="clip the gradient norm to this")
    g.add_argument("--precision", "--dtype", choices=tuple(PRECISIONS), default=None,
                   help="compute dtype: autocast over fp32 weights (default: bf16 on CUDA, fp32 on CPU, where "
                        "bf16 autocast is many times slower); fp16 uses a grad scaler")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the training forward and backward (backend default: inductor); the first "
                        "step compiles")
    g.add_argument("--seed", type=int, default=0, help="seeds the model init, data order and RNGs")

    g = parser.add_argument_group("output")
    g.add_argument("--output", default=None, metavar="DIR",
                   help="folder for last.pt, train_log.jsonl, model.pt, lora.pt (default: a new "
                        "runs/train-<date>-<time>)")
    g.add_argument("--save-every", type=non_negative_int, default=DEFAULT_SAVE_EVERY, metavar="STEPS",
                   help="checkpoint every this many steps (default %(default)s; 0: only at epoch ends, which "
                        "are saved anyway, as is a run stopped with Ctrl-C)")
    g.add_argument("--resume", default=None, metavar="FILE",
                   help="continue from a checkpoint; 'auto': <output>/last.pt if it exists")
    g.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps in all")
    g.add_argument("--log-every", type=positive_int, default=10, help="log a line every this many steps")
    add_threads_argument(g)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def _build_model(args, device: torch.device) -> torch.nn.Module:
    from .loading import create_model
    from .model import apply_tempme
    model = create_model(args.model, args.pretrained, device="cpu", dtype=torch.float32)
    apply_tempme(model, config_from_args(args), backend=args.backend)
    if args.official_checkpoint:
        from .official import load_official_checkpoint
        with as_config_error(f"--official-checkpoint {args.official_checkpoint}"):
            load_official_checkpoint(model, args.official_checkpoint, strict=True)
    return model.to(device)


def _load_split(args):
    """The ``--data`` split (``None`` with ``--synthetic``): read before any model is built, so that a wrong
    path or annotation file costs no model load and leaves no output folder behind."""
    if args.synthetic is not None:
        data = [f"--{k.replace('_', '-')}" for k in ("split", "train_list", "videos", "max_videos")
                if getattr(args, k) is not None] + ["--data-format"] * (args.data_format != "auto")
        if data:
            raise ConfigError(f"{', '.join(data)} pick{'s' if len(data) == 1 else ''} videos of --data: not with "
                              f"--synthetic, whose pairs are random")
        if args.synthetic < args.batch_size:
            raise ConfigError(f"--synthetic {args.synthetic}: fewer pairs than one batch of --batch-size "
                              f"{args.batch_size}")
        return None
    split = load_data_split(args)
    if len(split.captions) < args.batch_size:  # one training item a caption
        raise ConfigError(f"--data {args.data}: {len(split.captions)} captions, fewer than one batch of "
                          f"--batch-size {args.batch_size}")
    return split


def _build_data(args, model, split, rank: int, world: int):
    """The training batches: ``split`` from :func:`_load_split` as a sharded loader, or synthetic pairs."""
    from .retrieval.synthetic import SyntheticPairs

    if args.batch_size % world:
        raise ConfigError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    if args.synthetic is not None:
        return SyntheticPairs(args.synthetic, args.batch_size, args.frames, model.visual.image_size[0],
                              args.context_length, model.token_embedding.num_embeddings, args.seed, rank, world)
    from torch.utils.data.distributed import DistributedSampler

    from .retrieval.cli import model_tokenizer
    from .retrieval.data import PairDataset, make_loader
    from .retrieval.evaluate import check_tokenizer
    from .retrieval.video import VideoProcessor

    fps = None if args.sample_fps == 0 else args.sample_fps
    tokenizer = model_tokenizer(args.model)
    check_tokenizer(model, tokenizer, args.context_length)
    dataset = PairDataset(split, VideoProcessor.for_model(model, args.frames, fps), tokenizer, args.context_length,
                          captions="all", seed=args.seed)
    # A DistributedSampler (also for one process) orders every epoch by seed + epoch: exact resumes.
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    return make_loader(dataset, args.batch_size // world, args.workers, sampler=sampler, drop_last=True,
                       pin_memory=torch.cuda.is_available())


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        # Our progress lines at INFO; other libraries (open_clip's model creation) only from WARNING.
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("tempme_fast").setLevel(logging.INFO)


def _train_config(args, precision: str):
    from .trainer import TrainConfig

    lora = {k: getattr(args, k) for k in ("lora_rank", "lora_scale") if getattr(args, k) is not None}
    if lora and args.mode != "lora":
        given = " and ".join("--" + k.replace("_", "-") for k in lora)
        raise ConfigError(f"{given} set{'s' if len(lora) == 1 else ''} up LoRA: not with --mode {args.mode}, which "
                          f"trains every weight")
    return TrainConfig(mode=args.mode, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                       warmup=args.warmup, grad_clip=args.grad_clip, precision=precision,
                       grad_checkpointing=args.grad_checkpointing, log_every=args.log_every,
                       save_every=args.save_every or None, max_steps=args.max_steps, compile=args.compile, **lora)


def _check_arguments(args):
    """Everything that can be checked before a model is built or a process group formed; returns the
    ``--data`` split (``None`` with ``--synthetic``)."""
    from .loading import resolve_device, resolve_model
    from .outputs import default_run_dir, prepare_output_dir
    from .weights import check_pretrained

    if (args.data is None) == (args.synthetic is None):
        raise ConfigError("give exactly one of --data PATH and --synthetic N")
    check_backend(args.backend, resolve_device(args.device))  # ("auto": the device this process would take)
    name = resolve_model(args.model)[0]
    if args.pretrained:
        check_pretrained(name, args.pretrained)
    if args.official_checkpoint and not os.path.isfile(args.official_checkpoint):
        raise ConfigError(f"--official-checkpoint {args.official_checkpoint}: no such file (a checkpoint of the "
                          f"released TempMe code)")
    config_from_args(args)
    _train_config(args, args.precision or "fp32")
    if args.resume and args.resume != "auto" and not os.path.isfile(args.resume):
        raise ConfigError(f"--resume {args.resume}: no such checkpoint (or 'auto': <output>/last.pt)")
    if args.resume == "auto" and not args.output:
        raise ConfigError("--resume auto needs --output (it resumes <output>/last.pt)")
    if args.output is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("under torchrun give --output DIR: every process must write to the same folder")
    split = _load_split(args)
    if args.output is None:
        args.output = default_run_dir("train")
        print(f"tempme train: writing to {args.output} (no --output given)")
    prepare_output_dir(args.output, "--output")
    from .trainer import Trainer

    with Trainer.writing(args.output, f"--output {args.output}"):  # refused now, while another run trains there
        pass
    # (a new run, or a resume of another run's checkpoint, would replace this folder's run's files)
    Trainer.check_folder(args.output, args.resume, also=FINAL_FILES, labels=("--output ", "--resume auto"))
    return split


def _run_info(args, split) -> dict:
    """What a resume of this run must give the same, beyond the training recipe and the schedule that the
    checkpoint holds anyway (:class:`~tempme_fast.trainer.Trainer`'s ``run_info``). Weight files count by
    their name and content (downloads share a few names) and the data by its captions, so that moved files
    still resume."""
    from .checkpoint import file_sha256
    from .loading import resolve_model

    def source(value):
        return os.path.basename(value) if value and os.path.isfile(value) else value

    data = f"--synthetic {args.synthetic}" if split is None else split.content_digest()
    info = {"--model": resolve_model(args.model)[0], "--pretrained": source(args.pretrained),
            "--official-checkpoint": source(args.official_checkpoint), "--batch-size": args.batch_size,
            "--seed": args.seed, "--context-length": args.context_length,
            "--sample-fps": None if split is None else args.sample_fps, "data": data}  # (no videos to sample)
    for option in ("--pretrained", "--official-checkpoint"):  # (keys of their own: older checkpoints lack them)
        value = getattr(args, option[2:].replace("-", "_"))
        if value and os.path.isfile(value):
            info[f"{option} sha256"] = file_sha256(value)
    return info


def _resume_command(args) -> str:
    """The command line that continues this run (the one typed, when known, with its output and
    ``--resume auto``)."""
    argv = list(getattr(args, "argv", None) or ["train", "..."])
    for option in ("--output", "--resume"):
        while option in argv:
            i = argv.index(option)
            del argv[i:i + 2]
        argv = [a for a in argv if not a.startswith(option + "=")]
    return "tempme " + " ".join(shlex.quote(a) for a in argv + ["--output", args.output, "--resume", "auto"])


def run_train(args) -> int:
    """Run ``tempme train`` with parsed ``args``; returns 0 (130 when stopped by Ctrl-C, after writing
    the checkpoint and the command that resumes it). Bad input raises
    :class:`tempme_fast.errors.ConfigError` before any work starts (``tempme`` exits with 2)."""
    from . import distributed
    from .loading import base_weights
    from .lora import has_lora, merge_lora, save_lora
    from .retrieval.evaluate import check_context_length
    from .trainer import Trainer

    split = _check_arguments(args)
    _setup_logging()
    apply_threads(args.threads)
    try:
        info = distributed.init_distributed(device=None if args.device == "auto" else args.device)
    except RuntimeError as err:  # a launch without torchrun's variables
        raise ConfigError(f"torch.distributed: {err}") from err
    try:
        _seed_everything(args.seed)
        precision = args.precision or ("bf16" if info.device.type == "cuda" else "fp32")
        config = _train_config(args, precision)
        if not args.pretrained and not args.official_checkpoint and info.rank == 0:
            log.warning("training from RANDOM weights (no --pretrained or --official-checkpoint): fine for a "
                        "smoke test, not for a useful model; e.g. --pretrained openai")
        model = _build_model(args, info.device)
        check_context_length(model, args.context_length)
        data = _build_data(args, model, split, info.rank, info.world_size)
        trainer = Trainer(model, data, config, output_dir=args.output, progress=not args.no_progress,
                          resume=args.resume, run_info=_run_info(args, split))
        if info.rank == 0:
            total = sum(p.numel() for p in model.parameters())
            print(f"tempme train: {args.model}, mode={args.mode}, {trainer.trainable:,} of {total:,} parameters "
                  f"trainable, {trainer.total_steps} steps ({trainer.steps_per_epoch}/epoch), global batch "
                  f"{args.batch_size} on {plural(info.world_size, 'process', 'processes')}, {precision}, "
                  f"device {info.device}")
        try:
            history = trainer.fit()
        except Exception:
            if info.rank == 0 and trainer.failure_checkpoint:
                print(f"tempme train: step {trainer.step + 1} failed; checkpoint {trainer.failure_checkpoint} holds "
                      f"step {trainer.step}/{trainer.total_steps}; once the cause is fixed, continue with:\n  "
                      f"{_resume_command(args)}", flush=True)
            raise
        if info.rank == 0 and history:
            last = history[-1]
            print(f"tempme train: step {last['step']}/{trainer.total_steps}, loss {last['loss']:.4f}")
        if info.rank == 0 and trainer.skipped_batches:
            print(f"tempme train: skipped {plural(trainer.skipped_batches, 'batch', 'batches')} with fewer than "
                  f"2 readable pairs")
        if trainer.interrupted:
            if info.rank == 0:
                print(f"tempme train: stopped by Ctrl-C at step {trainer.step}/{trainer.total_steps}; checkpoint "
                      f"{os.path.join(args.output, trainer.CHECKPOINT)}; continue with:\n  {_resume_command(args)}")
            return 130
        if info.rank == 0:
            if args.mode == "lora":
                save_lora(model, os.path.join(args.output, LORA_FILE), base=base_weights(args.model, args.pretrained))
            merged = has_lora(model)  # (also in full mode, where an official checkpoint's LoRA trained too)
            if merged:
                merge_lora(model)
            from .checkpoint import atomic_save
            atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                        os.path.join(args.output, MODEL_FILE))
            print(f"tempme train: wrote {os.path.join(args.output, MODEL_FILE)} ("
                  f"{'LoRA merged; ' if merged else ''}tempme eval --checkpoint loads it)")
    finally:
        distributed.cleanup()
    return 0
