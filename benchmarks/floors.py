"""Lower bounds on merge-op time from bytes moved and FLOPs, as a Markdown table.

    python -m benchmarks.floors --model ViT-B-16 --batch 32 --dtype fp16 --bandwidth 3.0e12 --flops 7.9e14
    python -m benchmarks.floors --model ViT-B-16 --batch 16 --norm   # + the add, merge and LayerNorm table
    python -m benchmarks.floors --model ViT-B-16 --batch 16 --add-norm   # + the residual adds with their LayerNorm
"""
from __future__ import annotations

import argparse

from tempme_fast import ops
from tempme_fast.arguments import positive_float, positive_int
from tempme_fast.loading import DTYPES

from .bench_ops import op_bytes
from .common import VIT_GEOMETRY, MergeShape, merge_shapes

OPS = ("best_match", "match", "merge_fwd", "merge_bwd", "step_fwd")


def best_match_flops(s) -> int:
    na, nb = ops.split_sizes(s.tokens, s.protected)
    return 2 * s.rows * na * nb * (s.channels // s.heads)  # products of the metric averaged over heads


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


def block_flops_per_token(tokens: int, width: int) -> int:
    """Matrix-product FLOPs one token costs in a pre-LN block: q/k/v and output projections
    (``8 D^2``), the MLP (``16 D^2``) and its row of attention scores and values (``4 N D``)."""
    return 24 * width * width + 4 * tokens * width


# How a post-attention merge step runs with the residual add before it and the ln_2 after it.
NORM_VARIANTS = ("unfused", "fused", "fused_add")


def norm_step_bytes(s: MergeShape, elt: int, variant: str) -> int:
    """Fewest bytes of a post-attention merge step with the residual add before it and the ``ln_2``
    after it (forward), for one of :data:`NORM_VARIANTS`.

    ``fused_add`` (``ops.merge_norm(residual=)``, ``op_bytes('step_norm_fwd')``): the merge launch
    reads ``x`` and the attention's output and writes the merged tokens and their LayerNorm.
    ``fused`` (``ops.merge_norm`` after a separate add): the add also writes the sum (read two, write
    one) that the merge then reads. ``unfused``: a LayerNorm after the merge also reads the merged
    tokens back. The LayerNorm's weight and bias are read in every variant.
    """
    if variant not in NORM_VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {NORM_VARIANTS}")
    x_in = s.rows * s.tokens * s.width * elt
    merged = s.rows * (s.tokens - s.r) * s.width * elt
    fused_add = op_bytes("step_norm_fwd", s, elt)  # the encoder's step: bench_ops times it
    return {"unfused": fused_add + 2 * x_in + merged, "fused": fused_add + 2 * x_in, "fused_add": fused_add}[variant]


def norm_table(model: str, batch: int, dtype: str, bandwidth: float, flops: float, config=None) -> str:
    """Every post-attention merge of the schedule with the residual add before it and its ``ln_2``:
    bytes of each of :data:`NORM_VARIANTS`, the merge's own price (over the add and ``ln_2`` that the
    block runs without a merge), and the compute the merge saves (this layer's MLP, and every later
    block, for the removed tokens) at ``flops``."""
    from tempme_fast import TempMeConfig, token_schedule

    depth, tokens, width, heads = VIT_GEOMETRY[model]
    elt = DTYPES[dtype].itemsize
    layers = token_schedule(config or TempMeConfig(), depth, tokens).layers
    lines = [f"| add + merge + ln_2 ({model}, {batch} videos, {dtype}) | rows x tokens | r | unfused | merge + ln_2 "
             "fused | add + merge + ln_2 fused | merge's price over add + ln_2 alone: unfused, fused, fused with add "
             "| compute saved: this MLP | compute saved: to the last layer |", "|" + "---|" * 9]
    total = dict.fromkeys(NORM_VARIANTS, 0)
    for i, p in enumerate(layers):
        if not p.r:
            continue
        s = MergeShape(model, batch, p.layer, p.kind, batch * p.clips_out, p.tokens_attn, p.protected_out,
                       width, width, p.r, heads)
        cells = []
        for variant in NORM_VARIANTS:
            b = norm_step_bytes(s, elt, variant)
            total[variant] += b
            cells.append(f"{b / 1e6:.1f} MB, {b / bandwidth * 1e6:.1f} us")
        # Without the merge the block still adds the residual (read two, write one) and runs ln_2
        # (read x, write its output).
        x_bytes = s.rows * s.tokens * s.width * elt
        alone = 5 * x_bytes + 2 * s.width * elt
        price = ", ".join(f"{(norm_step_bytes(s, elt, v) - alone) / bandwidth * 1e6:.1f} us" for v in NORM_VARIANTS)
        removed = s.rows * s.r  # tokens; a later join keeps their count (a clip's tokens stay its tokens)
        mlp = removed * 16 * width * width
        later = mlp + sum(removed * block_flops_per_token(q.tokens_attn, width) for q in layers[i + 1:])
        lines.append(f"| L{p.layer} {p.kind} | {s.rows} x {s.tokens} | {s.r} | " + " | ".join(cells)
                     + f" | {price} | {mlp / flops * 1e6:.1f} us | {later / flops * 1e6:.1f} us |")
    lines.append("| forward total | | | " + " | ".join(
        f"{total[v] / 1e9:.2f} GB, {total[v] / bandwidth * 1e3:.2f} ms" for v in NORM_VARIANTS) + " | | | |")
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


def add_norm_table(model: str, batch: int, dtype: str, bandwidth: float) -> str:
    """Bytes and time floors of every residual add that takes the LayerNorm after it (``ops.add_norm``):
    the add and the LayerNorm as two ops (read x and the residual, write the sum; read it back, write
    its LayerNorm) against one (read both, write both); the LayerNorm's weight and bias left out."""
    from .codegen import EMBED_STEP, norm_steps

    elt = DTYPES[dtype].itemsize
    lines = [f"| add + LayerNorm ({model}, {batch} videos, {dtype}) | clips x tokens | two ops | one op "
             "(ops.add_norm) | saved |", "|---|---|---|---|---|"]
    totals = [0, 0]
    for s in norm_steps(model, batch):
        if s.what == EMBED_STEP:  # no residual add: ops.embed_norm
            continue
        one = s.rows * s.tokens * s.width * elt
        two_ops, fused = 5 * one, 4 * one
        totals[0] += two_ops
        totals[1] += fused
        lines.append(f"| L{s.layer} {s.what} | {s.rows} x {s.tokens} | {two_ops / 1e6:.1f} MB, "
                     f"{two_ops / bandwidth * 1e6:.1f} us | {fused / 1e6:.1f} MB, {fused / bandwidth * 1e6:.1f} us "
                     f"| {one / bandwidth * 1e6:.1f} us |")
    lines.append(f"| forward total ({len(lines) - 2} ops) | | {totals[0] / 1e6:.1f} MB, "
                 f"{totals[0] / bandwidth * 1e6:.1f} us | {totals[1] / 1e6:.1f} MB, "
                 f"{totals[1] / bandwidth * 1e6:.1f} us | {(totals[0] - totals[1]) / bandwidth * 1e6:.1f} us |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--dtype", choices=DTYPES, default="fp16")
    parser.add_argument("--bandwidth", type=positive_float, default=3.0e12, help="bytes/s (H100 copy: about 3.0e12)")
    parser.add_argument("--flops", type=positive_float, default=7.9e14, help="FLOP/s of 16-bit matrix products")
    parser.add_argument("--attention", action="store_true", help="also the attention layers' table")
    parser.add_argument("--norm", action="store_true",
                        help="also every post-attention merge with the residual add and ln_2 around it, unfused and "
                             "fused (ops.merge_norm, with and without residual=)")
    parser.add_argument("--add-norm", action="store_true",
                        help="also every residual add that takes the LayerNorm after it, as two ops and as one")
    args = parser.parse_args(argv)
    if args.model not in VIT_GEOMETRY:
        parser.error(f"--model {args.model}: valid: {sorted(VIT_GEOMETRY)}")
    if args.batch < 1:
        parser.error(f"--batch {args.batch} must be >= 1")
    print(table(args.model, args.batch, args.dtype, args.bandwidth, args.flops))
    if args.add_norm:
        print()
        print(add_norm_table(args.model, args.batch, args.dtype, args.bandwidth))
    if args.norm:
        print()
        print(norm_table(args.model, args.batch, args.dtype, args.bandwidth, args.flops))
    if args.attention:
        print()
        print(attention_table(args.model, args.batch, args.dtype, args.bandwidth, args.flops))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
