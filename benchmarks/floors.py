"""Lower bounds on merge-op time from bytes moved and FLOPs, as a Markdown table.

    python -m benchmarks.floors --model ViT-B-16 --batch 32 --dtype fp16 --bandwidth 3.0e12 --flops 7.9e14
"""
from __future__ import annotations

import argparse

from tempme_fast import ops
from tempme_fast.loading import DTYPES

from .bench_ops import op_bytes
from .common import merge_shapes

OPS = ("best_match", "match", "merge_fwd", "merge_bwd", "step_fwd")


def best_match_flops(s) -> int:
    na, nb = ops.split_sizes(s.tokens, s.protected)
    return 2 * s.rows * na * nb * s.channels


def table(model: str, batch: int, dtype: str, bandwidth: float, flops: float) -> str:
    elt = DTYPES[dtype].itemsize
    lines = [f"| merge ({model}, {batch} videos, {dtype}) | rows x tokens | r | "
             + " | ".join(OPS) + " | best-match FLOPs (floor) |",
             "|" + "---|" * (len(OPS) + 4)]
    for s in merge_shapes(model, batch):
        cells = []
        for op in OPS:
            b = op_bytes(op, s, elt)
            cells.append(f"{b / 1e6:.1f} MB, {b / bandwidth * 1e6:.1f} us")
        f = best_match_flops(s)
        lines.append(f"| L{s.layer} {s.stage} | {s.rows} x {s.tokens} | {s.r} | " + " | ".join(cells)
                     + f" | {f / 1e9:.2f} GFLOP, {f / flops * 1e6:.1f} us |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", choices=DTYPES, default="fp16")
    parser.add_argument("--bandwidth", type=float, default=3.0e12, help="bytes/s (H100 copy: about 3.0e12)")
    parser.add_argument("--flops", type=float, default=7.9e14, help="FLOP/s of 16-bit matrix products")
    args = parser.parse_args(argv)
    print(table(args.model, args.batch, args.dtype, args.bandwidth, args.flops))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
