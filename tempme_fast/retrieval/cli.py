"""``tempme eval``: retrieval evaluation from the command line.

    tempme eval --data data/MSRVTT --model ViT-B-32-quickgelu --pretrained openai \\
        --checkpoint runs/tempme_b32.pt --json results.json

``run_eval`` returns the exit status: 0 on success, 1 when no video could be read; bad input raises
:class:`tempme_fast.errors.ConfigError` (the ``tempme`` command prints it and exits with 2).
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..arguments import (add_config_arguments, add_data_arguments, add_dtype_argument, add_merge_argument,
                         add_model_arguments, check_backend, config_from_args, load_data_split, positive_float,
                         positive_int)
from ..errors import ConfigError
from ..loading import DTYPES, base_weights, create_model, default_dtype_name, load_checkpoint, resolve_device
from ..model import apply_tempme
from .video import VideoProcessor

log = logging.getLogger(__name__)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of ``tempme eval``, the data options included."""
    add_data_arguments(parser)
    g = parser.add_argument_group("model")
    add_model_arguments(g, checkpoint_help="state dict saved from a TempMe-patched model, or a LoRA adapter file "
                                           "from tempme_fast.lora.save_lora (loaded after patching, LoRA merged)")
    add_merge_argument(g)
    add_dtype_argument(g)
    add_config_arguments(parser, frames=False)
    g = parser.add_argument_group("evaluation")
    g.add_argument("--dsl", action="store_true",
                   help="also report dual-softmax re-ranked metrics (labelled DSL, reported separately)")
    g.add_argument("--dsl-temperature", type=positive_float, default=None,
                   help="DSL softmax temperature (default 100; with --dsl)")
    g.add_argument("--ties", choices=("pessimistic", "optimistic"), default="pessimistic",
                   help="how a match tied with other candidates ranks")
    g.add_argument("--text-batch-size", type=positive_int, default=256, help="captions per batch")
    g.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_model(args) -> torch.nn.Module:
    """The open_clip model of ``args``, patched with TempMe (or the unmerged config), on its device.

    Random weights (no ``--pretrained``) are drawn from seed 0, without touching the caller's random
    state: every command builds the same model from the same options, so that a smoke run repeats its
    numbers and an index built with random weights can be queried."""
    device = resolve_device(args.device)
    check_backend(args.backend, device)
    dtype = DTYPES[args.dtype or default_dtype_name(device)]
    loaded = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_model(args.model, args.pretrained, device="cpu", dtype=torch.float32)
        apply_tempme(model, config_from_args(args), backend=args.backend)  # may add parameters of its own
        if args.checkpoint:
            loaded = load_checkpoint(model, args.checkpoint, lambda: base_weights(args.model, args.pretrained))
    if not args.pretrained and loaded != "state_dict":
        log.warning("%s random weights, so the embeddings (and any metric or search score from them) mean nothing",
                    "no --pretrained and no --checkpoint:" if loaded is None else
                    "no --pretrained: the --checkpoint LoRA adapter was merged onto")
    return model.to(device=device, dtype=dtype).eval()


def _format_skipped(skipped, limit: int = 20) -> str:
    lines = [f"  {s['video_id']}: {s['path']}: {s['reason']}" for s in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more (all in the JSON output)")
    return "\n".join(["unreadable videos (skipped with their captions):"] + lines)


@functools.lru_cache(maxsize=4)
def model_tokenizer(model: str):
    """open_clip's tokenizer of ``--model`` (a model name, or a JSON config's file name once
    :func:`~tempme_fast.loading.create_model` has registered it). Building the BPE tables takes seconds;
    repeated runs in one process share them."""
    import open_clip

    if model.endswith(".json") and os.path.isfile(model):  # (its text_cfg may name a tokenizer of its own)
        open_clip.add_model_config(model)
    return open_clip.get_tokenizer(Path(model).stem if model.endswith(".json") else model)


def run_eval(args) -> int:
    """Run ``tempme eval`` with parsed ``args``; prints the table, writes ``--json``; returns the exit status."""
    from ..outputs import prepare_output_file, write_json
    from .evaluate import NoReadableVideos, evaluate_retrieval, format_results
    from .metrics import DSL_TEMPERATURE

    if args.dsl_temperature is not None and not args.dsl:
        raise ConfigError("--dsl-temperature sets the dual-softmax re-ranking's temperature: add --dsl")
    check_backend(args.backend, resolve_device(args.device))  # (before the data is read)
    config_from_args(args)
    if args.json:
        prepare_output_file(args.json, "--json", args)
    split = load_data_split(args)
    try:
        fps = None if args.sample_fps == 0 else args.sample_fps
        model = build_model(args)
        processor = VideoProcessor.for_model(model, args.frames, fps)
        tokenizer = model_tokenizer(args.model)
        result = evaluate_retrieval(model, split, processor, tokenizer, context_length=args.context_length,
                                    batch_size=args.batch_size, text_batch_size=args.text_batch_size,
                                    workers=args.workers, dsl=args.dsl,
                                    dsl_temperature=args.dsl_temperature or DSL_TEMPERATURE, ties=args.ties,
                                    progress=not args.no_progress)
    except NoReadableVideos as err:
        print(f"tempme eval: error: {err}", file=sys.stderr)
        return 1

    print(format_results(result))
    if result["dataset"]["skipped_videos"]:
        print(_format_skipped(result["dataset"]["skipped_videos"]))
    if args.json:
        result["run"] = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": args.model, "pretrained": args.pretrained, "checkpoint": args.checkpoint,
            "merge": args.merge, "backend": args.backend, "data": str(args.data), "split": args.split,
            "max_videos": args.max_videos, "torch": torch.__version__, "python": platform.python_version(),
        }
        write_json(args.json, result)
    return 0
