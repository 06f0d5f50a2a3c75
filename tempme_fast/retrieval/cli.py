"""``tempme eval``: retrieval evaluation from the command line; the data options ``tempme train`` shares.

    tempme eval --data data/MSRVTT --model ViT-B-32-quickgelu --pretrained openai \\
        --checkpoint runs/tempme_b32.pt --json results.json

``run_eval`` returns the exit status: 0 on success, 1 when no video could be read, 2 on bad input.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..loading import DTYPES, default_dtype_name, resolve_device
from .data import MSRVTT_TRAIN_LIST, load_split
from .video import DEFAULT_FPS, DEFAULT_FRAMES, VideoProcessor

log = logging.getLogger(__name__)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not an integer >= 0")
    return value


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that pick the data and turn it into model inputs (shared by ``eval`` and ``train``)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", required=True, metavar="PATH",
                   help="an MSR-VTT folder (CLIP4Clip layout: MSRVTT_JSFUSION_test.csv, MSRVTT_data.json, "
                        "MSRVTT_train.9k.csv, videos/) or a .csv/.jsonl of video_path,caption")
    g.add_argument("--data-format", choices=("auto", "msrvtt", "generic"), default="auto",
                   help="auto: a folder is MSR-VTT, a file is the generic layout")
    g.add_argument("--split", choices=("test", "train"), default="test",
                   help="MSR-VTT split: test = 1k-A (MSRVTT_JSFUSION_test.csv), train = --train-list")
    g.add_argument("--train-list", default=MSRVTT_TRAIN_LIST, help="MSR-VTT training video list")
    g.add_argument("--videos", default=None, metavar="DIR",
                   help="video folder (MSR-VTT default: the first of <data>/videos/all, <data>/videos, "
                        "<data>/MSRVTT_Videos, <data>/MSRVTT/videos/all holding video*.mp4); for the "
                        "generic layout, the base of relative paths")
    g.add_argument("--frames", type=_positive_int, default=DEFAULT_FRAMES, help="frames per video")
    g.add_argument("--sample-fps", type=float, default=DEFAULT_FPS,
                   help="frames per second to sample before uniform subsampling to --frames; "
                        "0 samples --frames uniformly over the whole video")
    g.add_argument("--context-length", type=_positive_int, default=32, help="text tokens per caption")
    g.add_argument("--batch-size", type=_positive_int, default=16, help="videos per batch")
    g.add_argument("--workers", type=_non_negative_int, default=4,
                   help="DataLoader worker processes decoding videos (0: in the main process)")
    g.add_argument("--max-videos", type=_positive_int, default=None,
                   help="use only the first N videos (smoke runs; metrics then are not comparable)")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of ``tempme eval``, the data options included."""
    add_data_arguments(parser)
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="ViT-B-32-quickgelu",
                   help="open_clip model name or a JSON model config file (OpenAI weights need a "
                        "-quickgelu name)")
    g.add_argument("--pretrained", default=None,
                   help="open_clip pretrained tag (openai) or local weights file; default: random weights")
    g.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="state dict saved from a TempMe-patched model, or a LoRA adapter file from "
                        "tempme_fast.lora.save_lora (loaded after patching, LoRA merged)")
    g.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True,
                   help="TempMe's released merge schedule (--no-merge: per-frame CLIP, the baseline)")
    g.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto", help="merge ops backend")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    g = parser.add_argument_group("evaluation")
    g.add_argument("--dsl", action="store_true",
                   help="also report dual-softmax re-ranked metrics (labelled DSL, reported separately)")
    g.add_argument("--dsl-temperature", type=float, default=100.0, help="DSL softmax temperature")
    g.add_argument("--ties", choices=("pessimistic", "optimistic"), default="pessimistic",
                   help="how a match tied with other candidates ranks")
    g.add_argument("--text-batch-size", type=_positive_int, default=256, help="captions per batch")
    g.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _unwrap_state_dict(obj, path: str) -> dict:
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"--checkpoint {path}: expected a state dict (name -> tensor), got "
                         f"{type(obj).__name__}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_checkpoint(model: torch.nn.Module, path: str) -> None:
    """Load ``path`` into a TempMe-patched model; errors name the keys that do not fit.

    ``path`` holds either a state dict of a patched model (full fine-tuning, or LoRA already merged)
    or a LoRA adapter written by ``tempme_fast.lora.save_lora``, which is loaded and merged into the
    weights (``--pretrained`` then supplies the base weights).
    """
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("format"), str) and "lora" in obj["format"]:
        from tempme_fast import lora

        lora.load_lora(model, obj)
        lora.merge_lora(model)
        return
    state = _unwrap_state_dict(obj, path)
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    if unexpected:
        hint = ""
        if any("tempme_frame_pos" in k for k in unexpected):
            hint = " (TempMe temporal position embeddings: evaluate with --merge)"
        elif any("lora" in k.lower() or "parametrizations" in k for k in unexpected):
            hint = (" (LoRA weights: save the adapter with tempme_fast.lora.save_lora, or call "
                    "tempme_fast.lora.merge_lora(model) before saving the state dict)")
        raise ValueError(f"--checkpoint {path}: {len(unexpected)} key(s) the model does not have, e.g. "
                         f"{unexpected[:3]}{hint}")
    wrong = [k for k in state if tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise ValueError(f"--checkpoint {path}: {len(wrong)} shape mismatch(es), e.g. {k}: checkpoint "
                         f"{tuple(state[k].shape)} vs model {tuple(own[k].shape)} (another --model or "
                         f"--frames?)")
    missing = [k for k in own if k not in state]
    model.load_state_dict(state, strict=False)
    if missing:
        log.warning("--checkpoint %s lacks %d key(s) (kept from --pretrained/initialisation), e.g. %s",
                    path, len(missing), missing[:3])


_SCHEDULE_OPTIONS = ("imgme_r", "clip_layers", "clip_groups", "cross_ratio", "intra_ratio")


def tempme_config(args):
    """The released schedule for ``args.frames`` (``--no-merge``: the unmerged baseline).

    A parser that also defines schedule options (``imgme_r``, ``clip_layers``, ``clip_groups``,
    ``cross_ratio``, ``intra_ratio``, as ``tempme bench`` does) overrides the released values.
    """
    from tempme_fast import TempMeConfig

    if not args.merge:
        return TempMeConfig.unmerged(args.frames)
    overrides = {k: getattr(args, k) for k in _SCHEDULE_OPTIONS if getattr(args, k, None) is not None}
    for k in ("clip_layers", "clip_groups"):
        if k in overrides:
            overrides[k] = tuple(overrides[k])
    return TempMeConfig(frames=args.frames, **overrides)


def build_model(args) -> torch.nn.Module:
    """The open_clip model of ``args``, patched with TempMe (or the unmerged config), on its device."""
    import tempme_fast
    from tempme_fast.loading import create_model

    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype or default_dtype_name(device)]
    model = create_model(args.model, args.pretrained, device="cpu", dtype=torch.float32)
    config = tempme_config(args)
    tempme_fast.apply_tempme(model, config, backend=args.backend)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    if not args.pretrained and not args.checkpoint:
        log.warning("no --pretrained and no --checkpoint: random weights, the metrics are meaningless")
    return model.to(device=device, dtype=dtype).eval()


def _format_skipped(skipped, limit: int = 20) -> str:
    lines = [f"  {s['video_id']}: {s['path']}: {s['reason']}" for s in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more (all in the JSON output)")
    return "\n".join(["unreadable videos (skipped with their captions):"] + lines)


@functools.lru_cache(maxsize=4)
def _tokenizer(model_name: str):
    # Building the BPE tables takes seconds; repeated runs in one process share them.
    import open_clip

    return open_clip.get_tokenizer(model_name)


def run_eval(args) -> int:
    """Run ``tempme eval`` with parsed ``args``; prints the table, writes ``--json``; returns the exit status."""
    from .evaluate import NoReadableVideos, evaluate_retrieval, format_results

    try:
        fps = None if args.sample_fps == 0 else args.sample_fps
        split = load_split(args.data, args.split, args.data_format, args.videos, args.train_list)
        split = split.limit(args.max_videos)
        if not split.videos:
            raise ValueError(f"--data {args.data}: the split has no videos")
        missing = split.missing_videos()
        if len(missing) == len(split.videos):
            raise FileNotFoundError(f"none of the {len(missing)} video files exists, e.g. "
                                    f"{split.videos[missing[0]]}; check --data / --videos")
        model = build_model(args)
        processor = VideoProcessor.for_model(model, args.frames, fps)
        tokenizer = _tokenizer(Path(args.model).stem if args.model.endswith(".json") else args.model)
        result = evaluate_retrieval(model, split, processor, tokenizer, context_length=args.context_length,
                                    batch_size=args.batch_size, text_batch_size=args.text_batch_size,
                                    workers=args.workers, dsl=args.dsl, dsl_temperature=args.dsl_temperature,
                                    ties=args.ties, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as err:
        print(f"tempme eval: error: {err}", file=sys.stderr)
        return 2
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
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
