"""The command-line options the ``tempme`` commands share, and the one way they become a TempMeConfig.

    parser = argparse.ArgumentParser()
    add_model_arguments(parser.add_argument_group("model"))    # --model --pretrained --device --backend
    add_config_arguments(parser)                               # --frames and the schedule's knobs
    config = config_from_args(parser.parse_args())             # honours --merge / --no-merge

Every schedule knob defaults to None, meaning "the released value" (:class:`TempMeConfig`'s default),
so a command line names only what it changes.
"""
from __future__ import annotations

import argparse
import math
import os
import warnings
from typing import Optional

import torch

from .config import TempMeConfig
from .derive import add_budget_argument, derive_config
from .errors import ConfigError, as_config_error
from .loading import DTYPES, resolve_model
from .ops import BACKENDS, resolve_backend, triton_available
from .retrieval.data import MSRVTT_TRAIN_LIST, load_split
from .retrieval.video import DEFAULT_FPS, DEFAULT_FRAMES

__all__ = ["Parser", "SCHEDULE_OPTIONS", "add_config_arguments", "add_data_arguments", "add_dtype_argument",
           "add_merge_argument", "add_model_arguments", "add_threads_argument", "apply_threads", "config_from_args",
           "default_workers", "finite_float", "load_data_split", "non_negative_float", "non_negative_int",
           "positive_float", "positive_int", "unit_float"]

# The TempMeConfig fields a command line may override (``frames`` comes with the data or --frames).
SCHEDULE_OPTIONS = ("imgme_r", "clip_layers", "clip_groups", "cross_ratio", "intra_ratio")


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (the usage block is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def default_workers(most: int = 3) -> int:
    """Video-decoding worker processes for this machine: one core per worker, one core left for the
    main process, at most ``most`` (``min(most, cores - 1)``); 0 decodes in the main process."""
    return max(0, min(most, (os.cpu_count() or 1) - 1))


def add_threads_argument(group) -> None:
    group.add_argument("--threads", type=positive_int, default=None,
                       help="CPU threads for torch (default: torch's choice, usually one per core)")


def apply_threads(threads: Optional[int]) -> int:
    """Set torch's CPU threads when given (warning past the core count); returns the count in use."""
    if threads:
        cores = os.cpu_count() or 1
        if threads > cores:
            warnings.warn(f"--threads {threads} exceeds the {cores} CPU core{'s' if cores > 1 else ''}; "
                          f"the threads will compete for them", stacklevel=2)
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not an integer >= 0")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{value} is not a positive finite number")
    return value


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{value} is not a finite number")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{value} is not a finite number >= 0")
    return value


def unit_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not a number in [0, 1]")
    return value


def add_model_arguments(group, *, checkpoint_help: Optional[str] = None, device_default: str = "auto",
                        device_help: str = "auto, cpu, cuda, cuda:N", backend: bool = True) -> None:
    """``--model``, ``--pretrained``, ``--device``, ``--backend`` (unless ``backend=False``: a command
    that takes several) and, given its help, ``--checkpoint``."""
    group.add_argument("--model", default="ViT-B-32-quickgelu",
                       help="open_clip model name or a JSON model config file (with --pretrained openai, "
                            "QuickGELU is used whatever the name says)")
    group.add_argument("--pretrained", default=None,
                       help="open_clip pretrained tag (openai) or local weights file; default: random weights")
    if checkpoint_help is not None:
        group.add_argument("--checkpoint", default=None, metavar="FILE", help=checkpoint_help)
    group.add_argument("--device", default=device_default, help=device_help)
    if backend:
        group.add_argument("--backend", choices=BACKENDS, default="auto", help="merge ops backend")


def check_backend(backend: str, device: torch.device, option: str = "--backend") -> None:
    """Refuse a merge-ops backend that cannot run on ``device`` (``triton`` on a CPU outside the interpreter, or
    without the triton package) in a ConfigError naming ``option``, before a model is built: the first forward
    found it, after the model was built and data decoded."""
    try:
        if device.type == "cpu":
            resolve_backend(backend, torch.empty(0))
        elif backend == "triton" and not triton_available():  # (no tensor on a GPU: that would open a CUDA context
            # there, on the first GPU for every process of a torchrun launch that has not picked its own yet)
            raise RuntimeError("backend='triton' needs the triton package; install it or use backend='torch'")
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"{option} {backend}: {err}") from None


def add_dtype_argument(group) -> None:
    group.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")


def add_merge_argument(group, baseline: str = "per-frame CLIP, the baseline") -> None:
    group.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True,
                       help=f"TempMe's released merge schedule (--no-merge: {baseline})")


def add_config_arguments(parser: argparse.ArgumentParser, frames: bool = True) -> None:
    """The schedule's knobs (``--imgme-r``, ``--clip-layers``, ...), ``--frames`` unless the data
    options already define it, and ``--budget``, which derives the schedule for the command's model."""
    d = TempMeConfig()
    group = parser.add_argument_group("TempMe schedule (defaults: the released ViT-B/32 schedule)")
    if frames:
        group.add_argument("--frames", type=positive_int, default=d.frames, help="frames per video")
    group.add_argument("--imgme-r", type=int, default=None,
                       help=f"tokens merged per frame per layer (default {d.imgme_r})")
    group.add_argument("--clip-layers", type=int, nargs="*", default=None,
                       help=f"layers that join clips (default {' '.join(map(str, d.clip_layers))}; none: no joins)")
    group.add_argument("--clip-groups", type=int, nargs="*", default=None,
                       help=f"clips joined at each of those layers (default {' '.join(map(str, d.clip_groups))})")
    group.add_argument("--cross-ratio", type=finite_float, default=None,
                       help=f"share of tokens removed when clips join (default {d.cross_ratio})")
    group.add_argument("--intra-ratio", type=finite_float, default=None,
                       help=f"share of tokens removed inside a clip (default {d.intra_ratio})")
    add_budget_argument(group)


def config_from_args(args: argparse.Namespace) -> TempMeConfig:
    """The released schedule for ``args.frames`` with the knobs the command line set.

    ``--no-merge`` (``args.merge`` False) gives the unmerged baseline and refuses any knob,
    ``--derived`` or ``--budget`` given with it; a parser without ``--merge`` always merges. ``--derived``
    and ``--budget`` derive the schedule for ``args.model`` instead (:meth:`TempMeConfig.for_model`, without
    and within a FLOPs budget) and cannot be combined with a knob. Knobs that are None or absent keep the
    released value.
    """
    derived = getattr(args, "derived", False)
    if not getattr(args, "merge", True):
        given = [f"--{k.replace('_', '-')}" for k in (*SCHEDULE_OPTIONS, "budget")
                 if getattr(args, k, None) is not None] + (["--derived"] if derived else [])
        if given:
            raise ConfigError(f"--no-merge runs the unmerged model: leave out {', '.join(given)}")
        return TempMeConfig.unmerged(args.frames)
    overrides = {k: getattr(args, k) for k in SCHEDULE_OPTIONS if getattr(args, k, None) is not None}
    budget = getattr(args, "budget", None)
    if budget is not None or derived:
        option = "--derived" if budget is None else "--budget"
        if overrides:
            names = ", ".join("--" + k.replace("_", "-") for k in overrides)
            raise ConfigError(f"{option} derives the schedule; leave out {names}")
        resolve_model(args.model)  # a model TempMe cannot patch is refused as such, before any sizes are read
        with as_config_error(option if budget is None else f"--budget {budget}"):
            return derive_config(args.model, frames=args.frames, flops_ratio=budget)
    for k in ("clip_layers", "clip_groups"):
        if k in overrides:
            overrides[k] = tuple(overrides[k])
    return TempMeConfig(frames=args.frames, **overrides)


def add_data_arguments(parser: argparse.ArgumentParser, split: str = "test") -> None:
    """Options that pick the data and turn it into model inputs (shared by ``eval`` and ``train``);
    ``split``: the command's MSR-VTT split when ``--split`` is not given."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", required=True, metavar="PATH",
                   help="an MSR-VTT folder (CLIP4Clip layout: MSRVTT_JSFUSION_test.csv, MSRVTT_data.json, "
                        "MSRVTT_train.9k.csv, videos/) or a .csv/.jsonl of video_path,caption")
    g.add_argument("--data-format", choices=("auto", "msrvtt", "generic"), default="auto",
                   help="auto: a folder is MSR-VTT, a file is the generic layout")
    # None when not given: an MSR-VTT option given for generic data is refused (load_data_split), not ignored.
    g.add_argument("--split", choices=("test", "train"), default=None,
                   help=f"MSR-VTT split: test = 1k-A (MSRVTT_JSFUSION_test.csv), train = --train-list (default "
                        f"{split})")
    g.add_argument("--train-list", default=None,
                   help=f"MSR-VTT training video list of --split train (default {MSRVTT_TRAIN_LIST})")
    parser.set_defaults(command_split=split)
    g.add_argument("--videos", default=None, metavar="DIR",
                   help="video folder (MSR-VTT default: the first of <data>/videos/all, <data>/videos, "
                        "<data>/MSRVTT_Videos, <data>/MSRVTT/videos/all holding video*.mp4); for the "
                        "generic layout, the base of relative paths")
    g.add_argument("--frames", type=positive_int, default=DEFAULT_FRAMES, help="frames per video")
    g.add_argument("--sample-fps", type=non_negative_float, default=DEFAULT_FPS,
                   help="frames per second to sample before uniform subsampling to --frames; "
                        "0 samples --frames uniformly over the whole video")
    g.add_argument("--context-length", type=positive_int, default=32, help="text tokens per caption")
    g.add_argument("--batch-size", type=positive_int, default=16, help="videos per batch")
    g.add_argument("--workers", type=non_negative_int, default=default_workers(),
                   help="DataLoader worker processes decoding videos (0: in the main process; default: "
                        "min(3, CPU cores - 1), here %(default)s)")
    g.add_argument("--max-videos", type=positive_int, default=None,
                   help="use only the first N videos (smoke runs; metrics then are not comparable)")


def load_data_split(args):
    """The split that the options of :func:`add_data_arguments` name, cut to ``--max-videos``.

    Refused with a :class:`ConfigError` naming ``--data`` when it cannot be read, holds no caption, or
    none of its video files exists; some missing files are the caller's to skip as unreadable.
    """
    msrvtt = args.data_format == "msrvtt" or (args.data_format == "auto" and os.path.isdir(args.data))
    given = [o for o, v in (("--split", args.split), ("--train-list", args.train_list)) if v is not None]
    if given and not msrvtt:
        raise ConfigError(f"{' and '.join(given)} pick{'s' if len(given) == 1 else ''} an MSR-VTT split; --data "
                          f"{args.data} is a generic list, whose every row is used")
    args.split = args.split or args.command_split
    if args.train_list is not None and args.split != "train":
        raise ConfigError(f"--train-list lists the videos of --split train; this is --split {args.split}")
    with as_config_error(f"--data {args.data}"):
        split = load_split(args.data, args.split, args.data_format, args.videos, args.train_list or MSRVTT_TRAIN_LIST)
    split = split.limit(args.max_videos)
    if not split.captions:
        raise ConfigError(f"--data {args.data}: {'the ' + args.split + ' split' if msrvtt else 'it'} has no captions")
    missing = split.missing_videos()
    if len(missing) == len(split.videos):
        raise ConfigError(f"--data {args.data}: none of the {len(missing)} video files exists, e.g. "
                          f"{split.videos[missing[0]]}; check --data / --videos")
    return split
