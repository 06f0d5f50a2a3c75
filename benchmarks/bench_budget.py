"""Measured speed-up of budget schedules against the bound their FLOPs give (1 / ratio), interleaved.

Each variant (unmerged, the schedule ``TempMeConfig.for_model`` derives without a budget, one schedule per
``--budgets`` entry) is its own patched copy of one random-weight model. After one untimed call each,
every round times one call of every variant, in an order rotated from round to round, so a burst of load
on a shared machine falls on all variants alike. Speed-up = median unmerged latency / median variant latency;
on a loaded machine load only ever adds time, so the ratio of the fastest calls is reported beside it.

    python -m benchmarks.bench_budget --model ViT-B-32-quickgelu --budgets 0.5 --rounds 7
    python -m benchmarks.bench_budget --model ViT-B-16 --budgets 0.45 --batch 1 --rounds 5
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
from datetime import datetime, timezone

import torch

from tempme_fast import TempMeConfig, apply_tempme
from tempme_fast.arguments import positive_int
from tempme_fast.bench import time_calls
from tempme_fast.derive import costed
from tempme_fast.geometry import ViTGeometry
from tempme_fast.loading import create_model
from tempme_fast.outputs import write_json

from .common import check_models, check_outputs


def variants(model_name: str, frames: int, budgets):
    geometry = ViTGeometry.from_name(model_name)
    out = [("unmerged", TempMeConfig.unmerged(frames)), ("derived", TempMeConfig.for_model(model_name, frames))]
    out += [(f"budget {b}", TempMeConfig.for_model(model_name, frames, flops_ratio=b)) for b in budgets]
    return [(name, config, costed(geometry, config)) for name, config in out]


def run(args, plans=None) -> dict:
    """``plans``: :func:`variants` of ``args`` when the caller has them."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    plans = plans or variants(args.model, args.frames, args.budgets)
    base = create_model(args.model, None)
    models = [apply_tempme(copy.deepcopy(base), config, backend="torch") for _, config, _ in plans]
    video = torch.randn(args.batch, args.frames, 3, *base.visual.image_size,
                        generator=torch.Generator().manual_seed(0))
    calls = []
    for model in models:
        def call(model=model):
            with torch.inference_mode():
                return model.encode_video(video)
        calls.append(call)
    load_before = os.getloadavg()
    for call in calls:
        call()
    times = [[] for _ in calls]
    for round_ in range(args.rounds):
        order = [(round_ + i) % len(calls) for i in range(len(calls))]
        for i in order:
            times[i] += time_calls(calls[i], torch.device("cpu"), repeats=1, warmup=0)
    load_after = os.getloadavg()
    unmerged, fastest = statistics.median(times[0]), min(times[0])
    rows = []
    for (name, config, plan), ts in zip(plans, times):
        median = statistics.median(ts)
        rows.append({"variant": name, "tokens_per_video": plan.schedule.output_tokens,
                     "gflops_per_video": plan.gflops, "flops_ratio": plan.ratio, "bound": plan.bound,
                     "latency_ms": median, "latency_min_ms": min(ts), "latency_max_ms": max(ts),
                     "speedup": unmerged / median, "speedup_of_bound": unmerged / median / plan.bound,
                     "speedup_fastest": fastest / min(ts),
                     "config": {k: getattr(config, k) for k in config.__dataclass_fields__}})
    return {"command": f"python -m benchmarks.bench_budget {' '.join(args.argv)}",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": args.model,
            "frames": args.frames, "batch": args.batch, "rounds": args.rounds, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average_before": load_before, "load_average_after": load_after, "rows": rows}


def format_rows(record: dict) -> str:
    lines = ["| schedule | tokens/video | GFLOPs/video | ratio | bound | latency ms, median (min-max) | "
             "speed-up | of bound | speed-up, fastest calls |", "|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        lines.append(f"| {r['variant']} | {r['tokens_per_video']} | {r['gflops_per_video']:.1f} | "
                     f"{r['flops_ratio']:.3f} | {r['bound']:.2f}x | {r['latency_ms']:.0f} "
                     f"({r['latency_min_ms']:.0f}-{r['latency_max_ms']:.0f}) | {r['speedup']:.2f}x | "
                     f"{r['speedup_of_bound']:.0%} | {r['speedup_fastest']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32-quickgelu")
    parser.add_argument("--frames", type=positive_int, default=12)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5])
    parser.add_argument("--batch", type=positive_int, default=2)
    parser.add_argument("--rounds", type=positive_int, default=7)
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    check_models(parser, [args.model], "--model")
    try:  # a model, frame count or budget that has no schedule: one line, before a model is built
        plans = variants(args.model, args.frames, args.budgets)
    except ValueError as err:
        parser.error(str(err))
    check_outputs(parser, args)
    record = run(args, plans)
    print(f"{record['model']}, {record['frames']} frames, batch {record['batch']}, {record['threads']} threads, "
          f"{record['rounds']} interleaved rounds, load average {record['load_average_before'][0]:.1f} before, "
          f"{record['load_average_after'][0]:.1f} after")
    print(format_rows(record))
    if args.json:
        write_json(args.json, record)


if __name__ == "__main__":
    main()
