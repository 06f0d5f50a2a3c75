"""``tempme bench --image``: images/s of an open_clip image tower, unmerged against ToMe.

The rows are ``tempme_fast.bench.BenchRow`` (per image where those say per video) and print in
``tempme bench``'s table. Repeats are interleaved: one timed call of every variant per round, so a
load change on a shared machine hits all variants alike rather than one of them.
"""
from __future__ import annotations

import os
import statistics
from typing import Dict, List, Sequence

import torch

from ..bench import BenchRow, format_table, peak_memory_mb, set_speedups, time_calls
from ..flops import flop_counter
from ..outputs import plural, write_json
from .open_clip_patch import apply_tome, remove_tome, tome_tokens

DEFAULT_R = (8, 16)  # tempme bench --image's ToMe r values when --tome-r is not given


def _variants(r_values: Sequence[int], backends: Sequence[str]):
    yield "open_clip (unmerged)", None, "-"
    for r in dict.fromkeys(r_values):  # each value and backend once
        for backend in dict.fromkeys(backends):
            yield f"ToMe r={r}", r, backend


def _set(model, r, backend):
    if r is None:
        if tome_tokens(model) is not None:
            remove_tome(model)
    else:
        apply_tome(model, r, backend=backend)


def bench_images(model: torch.nn.Module, r_values: Sequence[int], *, batch: int, device: torch.device,
                 dtype: torch.dtype, backends: Sequence[str], repeats: int = 3, warmup: int = 1,
                 seed: int = 0) -> List[BenchRow]:
    """Time ``model.encode_image`` unmerged and with ToMe at each ``r`` and backend, same random images.

    Returns one row per variant (``tokens_per_video`` = tokens per image after the last block,
    ``videos_per_s`` = images/s). The model is left unpatched.
    """
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"batch={batch} and repeats={repeats} must be >= 1, warmup={warmup} >= 0")
    model = model.to(device=device, dtype=dtype).eval()
    size = model.visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    images = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    variants = list(_variants(r_values, backends))

    def run():
        with torch.inference_mode():
            return model.encode_image(images)

    times: Dict[int, List[float]] = {i: [] for i in range(len(variants))}
    for i, (_, r, backend) in enumerate(variants):
        _set(model, r, backend)
        time_calls(run, device, 0, warmup)
    order = list(range(len(variants)))
    for rep in range(repeats):  # (interleaved, in the opposite order every other time: as tempme bench's videos)
        for i in (order if rep % 2 == 0 else order[::-1]):
            _, r, backend = variants[i]
            _set(model, r, backend)
            times[i] += time_calls(run, device, 1, 0)
    rows = []
    for i, (name, r, backend) in enumerate(variants):
        _set(model, r, backend)
        with flop_counter() as counter, torch.inference_mode():
            model.encode_image(images[:1])
        tokens = tome_tokens(model) or model.visual.positional_embedding.shape[0]
        median = statistics.median(times[i])
        rows.append(BenchRow(name=name, backend=backend, tokens_per_video=tokens,
                             gflops_per_video=counter.get_total_flops() / 1e9, latency_ms=median,
                             latency_min_ms=min(times[i]), latency_max_ms=max(times[i]),
                             videos_per_s=batch / (median / 1e3), peak_mem_mb=peak_memory_mb(run, device)))
    _set(model, None, "-")
    set_speedups(rows, [times[i] for i in range(len(variants))])
    return rows


def format_image_table(rows: Sequence[BenchRow]) -> str:
    """``tempme bench``'s table, its per-video headers read per image."""
    header, rest = format_table(rows).split("\n", 1)
    return header.replace("tokens/video", "tokens/image").replace("GFLOPs/video", "GFLOPs/image").replace(
        "videos/s", "images/s") + "\n" + rest


def run_image_bench(args) -> int:
    """``tempme bench --image``: the bench command's model, device, dtype, batch and repeat options,
    with ``--tome-r`` (r values, default 8 and 16) in place of the TempMe schedule; ``--batch`` counts images."""
    import sys

    from ..arguments import apply_threads, check_backend
    from ..bench import cpu_name, default_backends, load_average, noise_warnings
    from ..loading import DTYPES, create_model, default_dtype_name, resolve_device

    device = resolve_device(args.device)
    dtype_name = args.dtype or default_dtype_name(device)
    threads = apply_threads(args.threads)
    backends = args.backends or default_backends(device)
    for backend in backends:
        check_backend(backend, device, "--backends")
    model = create_model(args.model, args.pretrained, device=str(device), dtype=DTYPES[dtype_name])
    load_before = load_average()
    rows = bench_images(model, args.tome_r or DEFAULT_R, batch=args.batch, device=device, dtype=DTYPES[dtype_name],
                        backends=backends, repeats=args.repeats, warmup=args.warmup)
    load_after = load_average()
    warnings = noise_warnings(rows, 1 if device.type == "cuda" else threads, load_before, load_after, os.cpu_count())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    load = "n/a" if load_before is None else f"{load_before:.2f} before, {load_after:.2f} after"
    print(f"{args.model}, batch of {plural(args.batch, 'image')}, {dtype_name}, {where} "
          f"({plural(threads, 'thread')}), torch {torch.__version__}; variants interleaved, "
          f"{plural(args.repeats, 'repetition')}; load average {load}")
    print(format_image_table(rows))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        from ..bench import rows_as_dicts
        command = "tempme " + " ".join(getattr(args, "argv", None) or sys.argv[1:])
        write_json(args.json, {"command": command, "model": args.model, "batch": args.batch, "dtype": dtype_name,
                               "device": where, "threads": threads, "repeats": args.repeats,
                               "load_average": {"before": load_before, "after": load_after}, "warnings": warnings,
                               "rows": rows_as_dicts(rows)})
    return 0
