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


def attention_bytes(impl: str, rows: int, heads: int, tokens: int, head_dim: int, elt: int) -> int:
    """Fewest bytes one proportional-attention forward moves with ``impl``.

    All read q, k, v and write the output (``4 * B' H N d`` elements). On top of that:
    ``mask``: SDPA's memory-efficient kernel reads the ``[B', 1, 1, N]`` float mask expanded to
    ``[B', H, N, N]``, one bias row per query; ``eager``: the released path writes the ``N x N``
    logits, adds the bias, takes the softmax and reads it back (3 writes and 3 reads of them);
    ``vector``: the Triton kernel reads ``log(size)`` once per clip (float32); ``fold``: q, k and v
    are copied into ``folded_width(d)`` channels that SDPA then reads, and its output has that width.
    """
    from tempme_fast.ops.attention_impl import folded_width

    base = 4 * rows * heads * tokens * head_dim * elt
    logits = rows * heads * tokens * tokens * elt
    wide = rows * heads * tokens * folded_width(head_dim) * elt
    extra = {"none": 0, "vector": rows * tokens * 4, "mask": logits + rows * tokens * elt, "eager": 6 * logits,
             "fold": 3 * wide + 3 * wide + wide - rows * heads * tokens * head_dim * elt}
    return base + extra[impl]


def attention_table(model: str, batch: int, dtype: str, bandwidth: float, flops: float) -> str:
    """Bytes and time floors of each attention layer with a bias: mask against bias vector against fold."""
    from .bench_attention import attention_shapes
    from tempme_fast.ops.attention_impl import folded_width

    elt = DTYPES[dtype].itemsize
    impls = ("mask", "eager", "fold", "vector", "none")
    lines = [f"| attention fwd ({model}, {batch} videos, {dtype}) | clips x tokens | "
             + " | ".join(impls) + " | FLOPs (floor) |", "|" + "---|" * (len(impls) + 3)]
    for s in attention_shapes(model, batch):
        cells = []
        for impl in impls:
            b = attention_bytes(impl, s.rows, s.heads, s.tokens, s.head_dim, elt)
            cells.append(f"{b / 1e6:.1f} MB, {b / bandwidth * 1e6:.1f} us")
        f = 4 * s.rows * s.heads * s.tokens ** 2 * s.head_dim
        wide = f * folded_width(s.head_dim) // s.head_dim
        lines.append(f"| L{s.layer} | {s.rows} x {s.tokens} | " + " | ".join(cells)
                     + f" | {f / 1e9:.2f} GFLOP, {f / flops * 1e6:.1f} us (fold: {wide / flops * 1e6:.1f} us) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtype", choices=DTYPES, default="fp16")
    parser.add_argument("--bandwidth", type=float, default=3.0e12, help="bytes/s (H100 copy: about 3.0e12)")
    parser.add_argument("--flops", type=float, default=7.9e14, help="FLOP/s of 16-bit matrix products")
    parser.add_argument("--attention", action="store_true", help="also the attention layers' table")
    args = parser.parse_args(argv)
    print(table(args.model, args.batch, args.dtype, args.bandwidth, args.flops))
    if args.attention:
        print()
        print(attention_table(args.model, args.batch, args.dtype, args.bandwidth, args.flops))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
