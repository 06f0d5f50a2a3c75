"""The ``tempme`` command: ``bench`` (the main job), ``eval``, ``train``, ``visualize``, ``index``, ``search``,
``schedule`` and ``compile``."""
from __future__ import annotations

import argparse
import os
import platform
import sys
from datetime import datetime, timezone
from typing import List, Optional

import torch

from .arguments import (SCHEDULE_OPTIONS, Parser, add_config_arguments, add_dtype_argument, add_model_arguments,
                        add_threads_argument, apply_threads, check_backend, config_from_args, non_negative_int,
                        positive_int)
from .config import TempMeConfig
from .errors import ConfigError, TempMeError, as_config_error
from .loading import DTYPES
from .ops import BACKENDS
from .outputs import new_folders


def _check_bench_mode(args) -> None:
    """``--image`` times images with ToMe, the rest videos with TempMe: an option of the other mode is
    refused, not ignored."""
    if not args.image:
        if args.tome_r is not None:
            raise ConfigError("--tome-r sets ToMe's r for images: add --image (videos take the TempMe schedule "
                              "options)")
        return
    video = [f"--{k.replace('_', '-')}" for k in (*SCHEDULE_OPTIONS, "budget") if getattr(args, k) is not None]
    video += ["--derived"] * args.derived + ["--frames"] * (args.frames != TempMeConfig().frames)
    video += ["--full-last-block"] * args.full_last_block
    if video:
        raise ConfigError(f"{', '.join(video)} shape{'s' if len(video) == 1 else ''} the video encoder; --image "
                          f"times encode_image (with --tome-r): leave {'it' if len(video) == 1 else 'them'} out")


def _cmd_bench(args) -> int:
    from .bench import (bench_model, cpu_name, default_backends, format_table, load_average, noise_warnings,
                        rows_as_dicts, schedule_name)
    from .loading import create_model, default_dtype_name, resolve_device
    from .outputs import plural, prepare_output_file, write_json

    device = resolve_device(args.device)
    if args.json:
        prepare_output_file(args.json, "--json", args)
    if args.cuda_graph and (args.image or device.type != "cuda"):
        raise ConfigError("--cuda-graph times video encoders on a CUDA device: "
                          + ("not with --image" if args.image else f"the device is {device}; pass --device cuda"))
    _check_bench_mode(args)
    if args.image:
        from .tome.bench import run_image_bench
        return run_image_bench(args)
    dtype_name = args.dtype or default_dtype_name(device)
    dtype = DTYPES[dtype_name]
    config = config_from_args(args)
    threads = apply_threads(args.threads)
    backends = args.backends or default_backends(device)
    for backend in backends:
        check_backend(backend, device, "--backends")
    model = create_model(args.model, args.pretrained, device=str(device), dtype=dtype)
    load_before = load_average()
    rows = bench_model(model, config, batch=args.batch, device=device, dtype=dtype, backends=backends,
                       repeats=args.repeats, warmup=args.warmup, progress=not args.no_progress,
                       cuda_graph=args.cuda_graph, full_last_block=args.full_last_block)
    load_after = load_average()
    host_threads = 1 if device.type == "cuda" else threads
    warnings = noise_warnings(rows, host_threads, load_before, load_after, os.cpu_count())
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"{args.model}, {schedule_name(config)}, {config.frames} frames, batch of "
          f"{plural(args.batch, 'video')}, {dtype_name}, {device_name} ({plural(threads, 'thread')}), "
          f"torch {torch.__version__}; variants interleaved, {plural(args.repeats, 'repetition')}"
          + ("; every variant replayed from a CUDA graph" if args.cuda_graph else ""))
    print(format_table(rows))
    print("speed-up: median of the per-repetition ratios to unmerged (their min-max); FLOPs bound: unmerged "
          "GFLOPs / variant GFLOPs")
    trimmed = [r for r in rows if r.gflops_executed is not None and r.gflops_executed < r.gflops_per_video]
    if trimmed:
        print(f"GFLOPs are TempMe's count; the '{trimmed[0].name}' rows run {trimmed[0].gflops_executed:.1f} GFLOPs a "
              f"video: their last block computes only the class tokens that the video feature reads")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        record = {
            "command": "tempme " + " ".join(args.argv),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": args.model, "pretrained": args.pretrained, "schedule": schedule_name(config),
            "frames": config.frames, "batch": args.batch, "dtype": dtype_name, "device": device_name,
            "threads": threads, "repeats": args.repeats, "cuda_graph": args.cuda_graph, "cpu_count": os.cpu_count(),
            "load_average": {"before": load_before, "after": load_after}, "warnings": warnings,
            "torch": torch.__version__, "python": platform.python_version(),
            "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
            "rows": rows_as_dicts(rows),
        }
        write_json(args.json, record)
    return 0


def _cmd_schedule(args) -> int:
    import dataclasses

    from .derive import costed
    from .geometry import ViTGeometry

    from .loading import resolve_model

    resolve_model(args.model)  # refuses what TempMe cannot patch, in one line
    geometry = ViTGeometry.from_name(args.model)
    sizes = {k: v for k, v in (("depth", args.depth), ("tokens_per_frame", args.tokens_per_frame)) if v}
    geometry = dataclasses.replace(geometry, **sizes)
    # What the other commands run with the same options: the released schedule with the knobs given, or the
    # one derived for the model (--derived, --budget), here from its sizes as overridden.
    knobs = [k for k in SCHEDULE_OPTIONS if getattr(args, k) is not None]
    if args.budget is None and not args.derived:
        config = config_from_args(args)
    else:
        if knobs:
            raise ConfigError(f"{'--derived' if args.budget is None else '--budget'} derives the schedule; leave out "
                              f"{', '.join('--' + k.replace('_', '-') for k in knobs)}")
        with as_config_error(""):  # derive's messages name frames / flops_ratio and their valid range
            config = TempMeConfig.for_model(geometry, frames=args.frames, flops_ratio=args.budget)
    with as_config_error(""):  # a hand-written schedule that does not fit the model
        plan = costed(geometry, config)
    kind = (f"derived within --budget {args.budget}" if args.budget is not None else
            "derived for the model (--derived)" if args.derived else
            "the released ViT-B/32 values" + (" with the options given" if knobs else "") +
            " (what every command runs without --derived or --budget)")
    print(f"schedule: {kind}")
    print(plan.schedule.describe())
    print(f"GFLOPs per video: {plan.gflops:.1f} (unmerged: {plan.unmerged_gflops:.1f}), ratio {plan.ratio:.3f}, "
          f"speed-up bound {plan.bound:.2f}x")
    return 0


def _cmd_compile(args) -> int:
    from .loading import create_model
    from .model import apply_tempme
    from .outputs import plural
    from .precompile import check_compile_target, compile_kernels

    config = config_from_args(args)
    if args.arch is None and not torch.cuda.is_available():
        raise ConfigError("--arch: no CUDA device here; give the compute capability to compile for "
                          "(90: H100 and H200, 80: A100)")
    try:  # before the model is built
        check_compile_target(args.arch, args.jobs)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(str(err)) from err
    # Random weights on the CPU: the weights' values do not change which kernels run, and nothing is run.
    model = apply_tempme(create_model(args.model, None), config, backend="triton")
    try:
        summary = compile_kernels(model, args.batch, dtype=DTYPES[args.dtype], training=args.training,
                                  arch=args.arch, jobs=args.jobs)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(str(err)) from err
    kernels = ", ".join(f"{k} {v}" for k, v in sorted(summary["by_kernel"].items()))
    print(f"{args.model}, {config.frames} frames, {args.dtype}, batch {' '.join(map(str, args.batch))}"
          f"{', training' if args.training else ''}: {plural(summary['variants'], 'kernel variant')} for "
          f"sm_{summary['arch']} ({kernels}) of {summary['launches']} launches; {summary['compiled']} compiled, "
          f"{summary['cache_hits']} already cached, {summary['failed']} failed, in {summary['seconds']:.1f} s with "
          f"{plural(summary['jobs'], 'process', 'processes')}")
    for error in summary["errors"]:
        print(f"failed: {error}", file=sys.stderr)
    return 1 if summary["failed"] else 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tempme", description=__doc__.replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="time unmerged open_clip against TempMe on each backend")
    add_model_arguments(bench, backend=False)
    add_dtype_argument(bench)
    bench.add_argument("--batch", type=positive_int, default=2, help="videos per batch")
    bench.add_argument("--backends", "--backend", nargs="+", choices=BACKENDS, default=None,
                       help="TempMe backends to time, one or more (default: torch, plus triton on CUDA)")
    bench.add_argument("--repeats", type=positive_int, default=5,
                       help="repetitions; each times every variant once, in alternating order")
    bench.add_argument("--warmup", type=non_negative_int, default=1, help="untimed runs per variant first")
    add_threads_argument(bench)
    bench.add_argument("--cuda-graph", action="store_true",
                       help="time every variant replayed from a CUDA graph (CUDA only): the latency without the "
                            "host's launch cost, as tempme_fast.GraphedVideoEncoder serves it")
    bench.add_argument("--full-last-block", action="store_true",
                       help="also time TempMe with every token through the last block, as the released code runs "
                            "it (by default only the class tokens the video feature reads go through it)")
    bench.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.add_argument("--image", action="store_true",
                       help="time encode_image, unmerged against ToMe (--tome-r); --batch counts images")
    bench.add_argument("--tome-r", type=non_negative_int, nargs="+", default=None,
                       help="ToMe r values for --image (default 8 16)")
    add_config_arguments(bench)
    bench.set_defaults(func=_cmd_bench)

    compile_ = sub.add_parser("compile", help="compile ahead, on every core, the Triton kernels that encode_video "
                                              "launches, into Triton's cache")
    compile_.add_argument("--model", default="ViT-B-32-quickgelu",
                          help="open_clip model name or JSON model config (random weights: nothing is run)")
    compile_.add_argument("--dtype", choices=tuple(DTYPES), default="fp16", help="the model's dtype")
    compile_.add_argument("--batch", type=positive_int, nargs="+", default=[1], help="videos per call, one or more")
    compile_.add_argument("--training", action="store_true", help="also the training forward and backward")
    compile_.add_argument("--arch", type=positive_int, default=None,
                          help="compute capability to compile for, e.g. 90 (H100, H200) or 80 (A100); default: this "
                               "machine's GPU")
    compile_.add_argument("--jobs", type=positive_int, default=None, help="compiling processes (default: one per core)")
    add_config_arguments(compile_)
    compile_.set_defaults(func=_cmd_compile)

    from .retrieval.cli import add_eval_arguments, run_eval
    from .train_cli import add_train_arguments, run_train
    from .visualize import add_visualize_arguments, run_visualize

    for name, summary, add_arguments, run in (
            ("eval", "text-video retrieval metrics (MSR-VTT 1k-A or your own CSV/JSONL)", add_eval_arguments,
             run_eval),
            ("train", "fine-tune with TempMe (LoRA or full), on one GPU or many (torchrun)", add_train_arguments,
             run_train),
            ("visualize", "draw which patches of which frames merged into each final token", add_visualize_arguments,
             run_visualize)):
        command = sub.add_parser(name, help=summary)
        add_arguments(command)
        command.set_defaults(func=run)

    from .index.cli import register as register_index

    register_index(sub)

    sched = sub.add_parser("schedule", help="print a schedule's layer table, GFLOPs and speed-up bound")
    sched.add_argument("--model", default="ViT-B-32-quickgelu",
                       help="open_clip model name or JSON model config (sizes only, nothing is built)")
    sched.add_argument("--depth", type=positive_int, default=None, help="override the model's layers")
    sched.add_argument("--tokens-per-frame", type=positive_int, default=None,
                       help="override 1 + patches (197: ViT-B/16)")
    add_config_arguments(sched)
    sched.set_defaults(func=_cmd_schedule)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command as typed, for messages that repeat it (how to resume a run)
    try:
        with new_folders() as made:  # a failed command leaves no empty output folder behind
            status = args.func(args)
            if status not in (0, None):
                made.remove_empty()
            return status
    except TempMeError as err:
        # Input the user can fix: one line. Anything else is a bug and keeps its traceback.
        message = " ".join(str(err).split("\n"))
        parser.exit(2, f"tempme {args.command}: error: {message}\n")
    except KeyboardInterrupt:  # Ctrl-C: one line that says what was kept, not a traceback; 130 as shells give
        print(f"tempme {args.command}: interrupted{_KEPT_ON_INTERRUPT.get(args.command, '')}", file=sys.stderr)
        return 130


# What an interrupted command leaves for the next run (tempme train's first Ctrl-C is its own: it checkpoints).
_KEPT_ON_INTERRUPT = {
    "index": "; the shards written so far are kept: run the same command with --resume to continue",
    "train": "; any checkpoint written is kept: run the same command with --resume auto to continue",
    "compile": "; the kernels compiled so far stay in Triton's cache",
}


if __name__ == "__main__":
    sys.exit(main())
