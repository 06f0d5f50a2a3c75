"""``tempme index`` and ``tempme search``: build a searchable index of your videos, then query it.

    tempme index my_videos/ --out my_index --pretrained openai --workers 4
    tempme index my_videos/ --out my_index --pretrained openai --resume      # continue, or add new videos
    torchrun --nproc_per_node 8 -m tempme_fast index my_videos/ --out my_index --pretrained openai
    tempme search my_index "a dog catches a frisbee" -k 10
    tempme search my_index --like my_videos/frisbee.mp4 -k 5

Both return 0 on success, 2 on bad input (with a message naming the option), 1 when ``index``
could read no video at all.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from ..arguments import (add_config_arguments, add_dtype_argument, add_merge_argument, add_model_arguments,
                         config_from_args, default_workers, non_negative_float, non_negative_int, positive_int)
from ..errors import ConfigError
from ..retrieval.video import DEFAULT_FPS
from .vectors import KINDS


def _runtime_arguments(group) -> None:
    add_model_arguments(group, checkpoint_help="fine-tuned TempMe state dict or LoRA adapter, loaded after "
                                               "patching",
                        device_help="auto (cuda:LOCAL_RANK under torchrun when there is a GPU), cpu, cuda, cuda:N")
    add_dtype_argument(group)


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("videos", help="a folder (searched recursively for .mp4 .webm .avi .mkv .mov) or a "
                                       "list: .txt (one path per line), .csv or .jsonl with video_path")
    parser.add_argument("--out", required=True, metavar="INDEX_DIR", help="the index folder")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run or add new videos to an existing index; only "
                             "videos the index does not record yet are encoded")
    g = parser.add_argument_group("encoder (model, weights, schedule and sampling are recorded in the index; "
                                  "queries must match them)")
    _runtime_arguments(g)
    add_merge_argument(g)
    g.add_argument("--sample-fps", type=non_negative_float, default=DEFAULT_FPS,
                   help="sampling rate before uniform subsampling to --frames (0: uniform over the video)")
    g.add_argument("--context-length", type=positive_int, default=32, help="text tokens per query")
    add_config_arguments(parser)
    g = parser.add_argument_group("throughput")
    g.add_argument("--batch-size", type=positive_int, default=8, help="videos per encoder call")
    g.add_argument("--workers", type=non_negative_int, default=default_workers(most=4),
                   help="decoding worker processes (0: main process; default: min(4, CPU cores - 1), here "
                        "%(default)s)")
    g.add_argument("--shard-size", type=positive_int, default=1000,
                   help="videos per shard: what a killed run can lose at most")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--json", default=None, metavar="PATH", help="also write the run's summary as JSON")


def spec_from_args(args):
    from .spec import IndexSpec

    config = config_from_args(args)  # the released schedule, with any overrides; validated
    as_dict = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}
    return IndexSpec(model=args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, merge=args.merge,
                     config=as_dict, frames=args.frames, fps=args.sample_fps or None,
                     context_length=args.context_length)


def run_index(args) -> int:
    from ..outputs import prepare_output_file, write_json
    from .build import build_index
    from .store import index_file_at

    if args.json:
        if os.path.realpath(args.json) == os.path.realpath(args.out):
            raise ConfigError(f"--json {args.json} is the --out folder; give a file path (e.g. inside it)")
        owned = index_file_at(args.out, args.json)
        if owned:
            raise ConfigError(f"--json {args.json} is a file of the --out index ({owned}); writing it would "
                              f"break the index: give another path, e.g. {os.path.join(args.out, 'summary.json')}")
        prepare_output_file(args.json, "--json", args)  # before the videos are encoded, not after

    # Input errors are ConfigErrors, which the tempme command prints in one line (exit 2).
    summary = build_index(args.videos, args.out, spec_from_args(args), resume=args.resume,
                          batch_size=args.batch_size, workers=args.workers, shard_size=args.shard_size,
                          backend=args.backend, device=args.device, dtype=args.dtype,
                          progress=not args.no_progress)
    rate = summary["videos_per_s"]
    where = "" if summary["world_size"] == 1 else f"rank {summary['rank']}/{summary['world_size']}: "
    print(f"{where}{summary['indexed']} video(s) indexed, {summary['failed']} unreadable (recorded with "
          f"their reason), {summary['already']} already in the index; {summary['share']} of {summary['total']} "
          f"listed | {'n/a' if rate is None else f'{rate:.2f}'} videos/s | decode {summary['decode_s']:.1f} s "
          f"(worker time), encode {summary['encode_s']:.1f} s, waiting for decoded videos "
          f"{summary['wait_s']:.1f} s of {summary['wall_s']:.1f} s -> {args.out}")
    if args.json:
        write_json(args.json, summary)
    return 1 if summary["failed"] and not summary["indexed"] and not summary["already"] else 0


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", metavar="INDEX_DIR", help="a folder built by `tempme index`")
    parser.add_argument("query", nargs="?", default=None, help="what to look for, in words")
    parser.add_argument("--like", default=None, metavar="VIDEO", help="query by a video file instead of text")
    parser.add_argument("-k", type=positive_int, default=10, help="results to return")
    parser.add_argument("--index-type", choices=KINDS, default="exact",
                        help="exact inner product (default), or FAISS IVF / HNSW for large collections")
    # Defaults in _TUNING: an option given for another --index-type is refused, not ignored.
    parser.add_argument("--nlist", type=positive_int, default=None, help="IVF cells (default about 4 sqrt(N))")
    parser.add_argument("--nprobe", type=positive_int, default=None, help="IVF cells scanned per query (default 16)")
    parser.add_argument("--hnsw-m", type=positive_int, default=None, help="HNSW links per vector (default 32)")
    parser.add_argument("--ef-search", type=positive_int, default=None, help="HNSW search beam width (default 128)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON lines")
    _runtime_arguments(parser.add_argument_group("encoder (model, weights and checkpoint default to the index's "
                                                 "own; naming different ones is refused)"))
    parser.set_defaults(model=None)


# --index-type -> its tuning options and their defaults (None: chosen from the collection's size).
_TUNING = {"exact": {}, "ivf": {"nlist": None, "nprobe": 16}, "hnsw": {"hnsw_m": 32, "ef_search": 128}}


def _search_options(args) -> dict:
    """The tuning options of ``--index-type``, with their defaults; one given for another type is refused."""
    own = _TUNING[args.index_type]
    for kind, options in _TUNING.items():
        for name in options:
            if name not in own and getattr(args, name) is not None:
                raise ConfigError(f"--{name.replace('_', '-')} tunes --index-type {kind}, not "
                                  f"--index-type {args.index_type}")
    return {name: default if getattr(args, name) is None else getattr(args, name) for name, default in own.items()}


def run_search(args) -> int:
    from ..retrieval.video import VideoDecodeError
    from . import store
    from .search import VideoIndex
    from .spec import IndexSpec
    from .vectors import FAISS_HINT, FaissMissing, faiss_module

    try:
        if (args.query is None) == (args.like is None):
            raise ConfigError("give either a text query or --like VIDEO (exactly one)")
        options = _search_options(args)
        index_spec = IndexSpec.from_json(store.read_header(args.index)["spec"])
        query_spec = index_spec.naming_files(model=args.model, pretrained=args.pretrained, checkpoint=args.checkpoint)
        if faiss_module() is None and args.index_type == "exact":
            print(f"note: FAISS is not installed; exact search runs in NumPy. For faster search and the IVF/HNSW "
                  f"indexes: {FAISS_HINT}", file=sys.stderr)
        index = VideoIndex.open(args.index, args.index_type, query_spec=query_spec, backend=args.backend,
                                device=args.device, dtype=args.dtype, **options)
        hits = index.search_text(args.query, args.k) if args.query is not None else \
            index.search_video(args.like, args.k)
    except VideoDecodeError as err:
        raise ConfigError(f"--like {err.path}: {err.reason}") from err
    except FaissMissing as err:
        raise ConfigError(str(err)) from err
    wanted = min(args.k, len(index.contents.records))
    if len(hits) < wanted:  # an approximate index scanned too little of the collection to fill k
        more = "--nprobe (IVF cells scanned)" if args.index_type == "ivf" else "--ef-search (HNSW beam width)"
        print(f"note: {len(hits)} of the {wanted} results asked for: the {args.index_type.upper()} search reached "
              f"no more videos; raise {more}, or use --index-type exact", file=sys.stderr)
    if args.json:
        for hit in hits:
            print(json.dumps(hit.as_dict()))
        return 0
    print(f"{'rank':>4}  {'score':>7}  path")
    for hit in hits:
        print(f"{hit.rank:>4}  {hit.score:>7.4f}  {hit.path}")
    return 0


def register(subparsers) -> None:
    """Add ``index`` and ``search`` to the ``tempme`` command's subparsers."""
    index = subparsers.add_parser("index", help="encode a folder or list of videos into a searchable index "
                                                "(resumable; several processes under torchrun)")
    add_index_arguments(index)
    index.set_defaults(func=run_index)
    search = subparsers.add_parser("search", help="search a video index by text or by an example video")
    add_search_arguments(search)
    search.set_defaults(func=run_search)
