"""Where the merge forward's busiest B tokens start among its programs, and what a list-scheduling model makes of it.

    python -m benchmarks.merge_order --model ViT-B-16 --videos 16          # (CPU: about a minute)

A merge forward program of one token gathers its B token's sources one step after another, so its time is a
chain of load latencies that grows with the sources (with random weights a ViT-B/16 join sends up to 151 A tokens
to one B token at 16 videos). A GPU starts a grid's programs about in order of their index. Where the busiest
token's program starts late, its chain runs after the copies of the other tokens instead of beside them.

This runs the encoder on the torch backend (random weights and frames, float32, CPU), records every merge's plan,
and prints for each merge where one token a program (the library's tiles for the encoder's merges) puts every
clip's busiest B token: the share of the merge's programs started before the last of them, in the grid order
before (clips slowest, tokens in order) and now (clips fastest, token tiles from the last: the B tokens first).
Then a model: programs start in index order on ``--slots`` slots, each taking ``--fixed-us`` plus its bytes at
``--bandwidth`` shared by the slots, plus a load latency (``--latency-us``) for its offsets and ``--waits`` more
for every step of 4 sources. The model is not a measurement; the GPU suite's profile times the kernel.
"""
from __future__ import annotations

import argparse
import heapq
import math
from typing import Dict, List

import torch

from tempme_fast import apply_tempme
from tempme_fast.arguments import add_config_arguments, non_negative_float, positive_float, positive_int
from tempme_fast.loading import create_model
from tempme_fast.ops import reference

from .common import parsed_config, recorded_matches


def copies(p: Dict[str, object]) -> int:
    """A clip's output tokens before its B tokens: the class tokens and the kept A tokens."""
    na, _ = reference.split_sizes(p["tokens"], p["protected"])
    return p["protected"] + na - p["r"]


def starts(p: Dict[str, object], b_first: bool) -> List[int]:
    """Each program's index, in the order of ``[row][output token]``, one token a program."""
    rows, r = p["rows"], p["r"]
    n_out = p["tokens"] - r
    if b_first:
        return [(n_out - 1 - t) * rows + row for row in range(rows) for t in range(n_out)]
    return [row * n_out + t for row in range(rows) for t in range(n_out)]


def chains(p: Dict[str, object], args, width: int) -> List[float]:
    """The model's time of each program, in the order of ``[row][output token]``, for ``width`` features."""
    row_bytes = width * args.itemsize
    share = args.slots / args.bandwidth  # us a byte, the bandwidth shared by every slot
    copy = args.fixed_us + args.latency_us + 3 * row_bytes * share  # read the row, write it and its LayerNorm
    times = []
    for row in range(p["rows"]):
        times += [copy] * copies(p)
        for k in p["counts"][row].tolist():
            extra = (args.latency_us + math.ceil(k / 4) * args.waits * args.latency_us + k * row_bytes * share
                     if k else 0.0)
            times.append(copy + extra)
    return times


def makespan(times: List[float], order: List[int], slots: int) -> float:
    """When the last program ends, programs started in ``order``'s index order on ``slots`` slots."""
    free = [0.0] * slots
    end = 0.0
    for i in sorted(range(len(times)), key=order.__getitem__):
        t = heapq.heappop(free) + times[i]
        heapq.heappush(free, t)
        end = max(end, t)
    return end


def table(plans: List[Dict[str, object]], args, width: int) -> str:
    lines = ["| merge | clips x tokens, r | busiest B token (sources) | each clip's busiest starts after "
             "(before -> now) | model, us (before -> now) |", "|---|---|---|---|---|"]
    for i, p in enumerate(plans):
        rows, n_out, counts = p["rows"], p["tokens"] - p["r"], p["counts"]
        total = rows * n_out
        busiest = [row * n_out + copies(p) + int(counts[row].argmax()) for row in range(rows)]
        orders = [starts(p, b_first) for b_first in (False, True)]
        cells = [max(order[k] for k in busiest) / total for order in orders]
        times = chains(p, args, width)
        model = [makespan(times, order, args.slots) for order in orders]
        lines.append(f"| {i} | {rows} x {p['tokens']}, {p['r']} | {int(counts.max())} | {cells[0]:.2f} -> "
                     f"{cells[1]:.2f} | {model[0]:.1f} -> {model[1]:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--videos", type=positive_int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slots", type=positive_int, default=660, help="programs resident at once (132 SMs x 5)")
    parser.add_argument("--latency-us", type=non_negative_float, default=0.25, help="one load latency waited in turn")
    parser.add_argument("--waits", type=non_negative_float, default=1.0, help="latencies a step of 4 sources")
    parser.add_argument("--fixed-us", type=non_negative_float, default=0.15, help="a program's cost besides its loads")
    parser.add_argument("--bandwidth", type=positive_float, default=4.2e6, help="bytes a microsecond (H200 copy)")
    parser.add_argument("--itemsize", type=positive_int, default=2, help="bytes a feature (fp16)")
    parser.add_argument("--all", action="store_true", help="every merge, not only those whose B tokens gather "
                        "at least 4 sources somewhere")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    config = parsed_config(parser, args)
    model = create_model(args.model).eval()
    apply_tempme(model, config, backend="torch")
    video = torch.randn(args.videos, args.frames, 3, *model.visual.image_size)
    with torch.no_grad(), recorded_matches() as plans:
        model.encode_video(video)
    shown = [p for p in plans if args.all or int(p["counts"].max()) >= 4]
    print(f"# {args.model}, {args.videos} videos of {args.frames} frames, random weights, torch backend: "
          f"{len(shown)} of {len(plans)} merges")
    print(table(shown, args, model.visual.transformer.width))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
