"""Compile the Triton kernel variants that the benchmarks will launch, before they launch them, on every core.

With an empty Triton cache, the first launch of each kernel variant (one set of dtypes, alignments,
divisibilities and constexprs) compiles it: about 1-1.5 s of one CPU core for these kernels, plus a
C launcher stub built with the system compiler. Inside a benchmark that time is serial and counted
against the stage's time limit. Here the variants are found without running anything: the
launches are recorded on meta tensors, as :mod:`benchmarks.codegen` records them, and every
distinct one is compiled by a pool of processes into Triton's own on-disk cache. Those are the
keys the launches will look up, because the compile call is the one ``JITFunction.run`` makes,
from the same binder (``python -m benchmarks.host --launch-check`` checks that codegen's records
match the real launches). On a CUDA machine each worker also builds the variant's launcher stub.

Recorded:

- ``model``: every merge step of the schedules (the match, then the merge with the LayerNorm
  after it, inference and training forward, backward), every layer's attention (inference,
  training forward and backward), every residual add fused with the LayerNorm after it
  (inference and training), as the encoder runs them, and every block's ``c_fc`` fused with its GELU
  (16-bit: ``bench_model``'s ``tempme-triton-mlp`` rows) and its merges on the tiles of one source a step
  (16-bit inference: its ``tempme-triton-serial`` rows);
- ``ops``: what ``benchmarks.bench_ops`` calls on top of that (best match alone, the merge without
  a LayerNorm and its backward, and the join with its LayerNorm, forward and backward, at its shapes);
- ``attention``: ``benchmarks.bench_attention``'s Triton calls (``[B', H, N, d]`` views, forward,
  and forward with backward);
- ``tiles``: the GPU suite's tile sweeps (``benchmarks.suite.TILE_SWEEPS``): the attention forward, the
  merge forward (with and without the LayerNorm, after attention and at a join) and the match with each
  candidate's tiles, and the match with each plan path, at the models, batch and dtype of each sweep.

Variants are compiled in the order given (dtypes, then models, then batches), so a run stopped
early has compiled the first ones. A variant that fails to compile is counted and left to fail
where it launches.

    python -m benchmarks.warm --models ViT-B-32 ViT-B-16 --batches 1 16 32 --dtypes fp16 --jobs 16
    python -m benchmarks.warm --models ViT-B-32 --batches 1 --dtypes fp16 --arch 90   # no GPU: compile only

Run it without ``TRITON_INTERPRET`` (the interpreter replaces the kernels).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Optional, Sequence

SETS = ("model", "ops", "attention", "tiles")


def record_launches(models: Sequence[str], batches: Sequence[int], dtypes: Sequence[str],
                    sets: Sequence[str] = SETS) -> list:
    """The launches (``codegen.Launch``) of ``sets`` in that order: dtypes, then models, then batches."""
    from tempme_fast.loading import DTYPES
    from tempme_fast.ops.recording import recording_all

    from . import codegen
    from .bench_attention import attention_shapes
    from .bench_model import variant_switches
    from .common import VIT_GEOMETRY, merge_shapes

    with recording_all() as launches:  # every launcher module's, in the order of the calls
        for name in dtypes:
            dtype = DTYPES[name]
            for model in models:
                for batch in batches:
                    if "model" in sets:
                        for step in codegen.schedule_steps(model, batch):
                            codegen.run_step(step, dtype, backward=False)  # inference
                            codegen.run_step(step, dtype)  # training: forward with statistics, backward
                            if step.heads > 1 and name == "fp16":  # bench_model's tempme-triton-mean rows:
                                # the keys averaged by torch first, the match reading the mean
                                codegen.run_step(dataclasses.replace(step, channels=step.channels // step.heads,
                                                                     heads=1), dtype, backward=False)
                            if name == "fp16":  # its tempme-triton-serial rows: one source a step
                                with variant_switches("tempme-triton-serial"):
                                    codegen.run_step(step, dtype, backward=False)
                        for step in codegen.attention_steps(model, batch):
                            codegen.run_attention(step, dtype)
                        for step in codegen.norm_steps(model, batch):
                            codegen.run_norm(step, dtype)
                            codegen.run_norm(step, dtype, stats=True)
                        for step in codegen.mlp_steps(model, batch):  # bench_model's tempme-triton-mlp rows
                            codegen.run_mlp(step, dtype)
                    if model not in VIT_GEOMETRY:  # the op benchmarks have the ViT-B shapes only
                        continue
                    if "ops" in sets:
                        for shape in merge_shapes(model, batch):
                            _bench_ops_calls(shape, dtype)
                    if "attention" in sets:
                        for shape in attention_shapes(model, batch):
                            _bench_attention_calls(shape, dtype)
                    if "tiles" in sets:
                        _tile_sweep_calls(model, batch, name)
    return launches


def _tile_sweep_calls(model: str, batch: int, dtype_name: str) -> None:
    """The suite's tile sweeps that run at (model, batch, dtype): each candidate's Triton calls."""
    import torch

    from tempme_fast.loading import DTYPES
    from tempme_fast.ops import triton_attention, triton_ops

    from .bench_attention import attention_shapes, forward_tiles
    from .bench_ops import NORM_EPS, op_tiles
    from .common import merge_shapes, metric_tensor
    from .suite import TILE_SWEEPS

    dtype = DTYPES[dtype_name]
    for name, (at_models, at_batch, at_dtype, specs) in TILE_SWEEPS.items():
        if model not in at_models or (at_batch, at_dtype) != (batch, dtype_name):
            continue
        kind = name.rstrip("0123456789")  # norm1: the norm sweep at one video
        if kind == "attention":
            for s in attention_shapes(model, batch):
                size = torch.empty(s.rows, s.tokens, 1, dtype=torch.float32, device="meta")
                q, k, v = torch.empty(s.rows, s.tokens, 3, s.heads, s.head_dim, dtype=dtype,
                                      device="meta").permute(2, 0, 3, 1, 4).unbind(0)
                for spec in specs:
                    with forward_tiles(spec):
                        triton_attention.sized_attention(q, k, v, size)
            continue
        for s in merge_shapes(model, batch):
            metric = metric_tensor(s.rows, s.tokens, s.channels, s.heads, dtype, "meta")
            x = torch.empty(s.rows, s.tokens, s.width, dtype=dtype, device="meta")
            size = torch.empty(s.rows, s.tokens, 1, dtype=torch.float32, device="meta")
            for spec in specs:
                with op_tiles(spec):
                    # As bench_ops.op_fn: the plan first, under the candidate's tiles too.
                    merged, dst, kept, src, offsets = triton_ops.match_forward(metric, s.r, s.protected, 1, s.heads)
                    if kind == "merge":
                        triton_ops.merge_forward(x, size, merged, dst, kept, s.protected, 1, None, src, offsets)
                    elif kind == "norm" and s.stage != "cross":  # as bench_ops' step_norm_fwd
                        weight = torch.empty(s.width, dtype=dtype, device="meta")
                        triton_ops.merge_norm_forward(x, size, merged, dst, kept, weight, weight, NORM_EPS, s.protected,
                                                      1, None, x, src, offsets)
                    elif kind == "norm":
                        _join_call(s, dtype)
                    elif kind == "match":
                        triton_ops.best_match_forward(metric, s.protected, 1, s.heads)


def _bench_ops_calls(s, dtype) -> None:
    """``bench_ops``' Triton launcher calls at one shape: best match alone, the merge without a
    LayerNorm forward and backward (the match and the merge with one are the model's), and at a join
    the join with its LayerNorm, forward alone and with its backward."""
    import torch

    from tempme_fast.ops import triton_ops

    from .common import metric_tensor

    metric = metric_tensor(s.rows, s.tokens, s.channels, s.heads, dtype, "meta")
    x = torch.empty(s.rows, s.tokens, s.width, dtype=dtype, device="meta")
    size = torch.empty(s.rows, s.tokens, 1, dtype=torch.float32, device="meta")
    triton_ops.best_match_forward(metric, s.protected, 1, s.heads)
    merged, dst, kept, src, offsets = triton_ops.match_forward(metric, s.r, s.protected, 1, s.heads)
    out, size_out, b_size = triton_ops.merge_forward(x, size, merged, dst, kept, s.protected, 1, None, src, offsets)
    b_size = triton_ops.merged_b_sizes(size_out, b_size, offsets.shape[1] - 1)
    triton_ops.merge_backward(torch.empty_like(out), size, b_size, merged, dst, kept, s.protected, s.tokens)
    if s.stage == "cross":
        _join_call(s, dtype, backward=True)


def _join_call(s, dtype, backward: bool = False) -> None:
    """``bench_ops``' ``join_norm_fwd`` at join shape ``s``: the clips before the join, joined as they are merged,
    with their position embedding and the LayerNorm after; with ``backward`` also its ``join_norm_fwdbwd``: the
    training forward (which writes the LayerNorm's statistics) and the gradients of the clips and the embedding."""
    import torch

    from tempme_fast.ops import triton_ops

    from .oracle import NORM_EPS

    for grad in (False, True) if backward else (False,):
        clips = torch.empty(s.rows * s.group, s.tokens // s.group, s.width, dtype=dtype, device="meta",
                            requires_grad=grad)
        sizes = torch.empty(*clips.shape[:2], 1, dtype=torch.float32, device="meta")
        frame_pos = torch.empty(1, s.rows * s.group // s.batch, 1, s.width, dtype=dtype, device="meta",
                                requires_grad=grad)
        weight = torch.empty(s.width, dtype=dtype, device="meta")
        out, _, ln, _ = triton_ops.join_merge_norm(clips, sizes, s.group, s.protected // s.group, s.r, frame_pos,
                                                   (weight, weight, NORM_EPS))
        if grad:
            torch.autograd.grad((out, ln), (clips, frame_pos), (torch.empty_like(out), torch.empty_like(ln)))


def _bench_attention_calls(s, dtype) -> None:
    """``bench_attention``'s Triton calls at one shape: q, k, v as ``[B', H, N, d]`` views of one
    projection, with sizes; forward alone, then forward and backward."""
    import torch

    from tempme_fast.ops import triton_attention

    size = torch.empty(s.rows, s.tokens, 1, dtype=torch.float32, device="meta")
    for grad in (False, True):
        qkv = torch.empty(s.rows, s.tokens, 3, s.heads, s.head_dim, dtype=dtype, device="meta",
                          requires_grad=grad)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = triton_attention.sized_attention(q, k, v, size)
        if grad:
            torch.autograd.grad(out, qkv, torch.empty_like(out))


def warm(models: Sequence[str], batches: Sequence[int], dtypes: Sequence[str], sets: Sequence[str] = SETS,
         arch: Optional[int] = None, jobs: Optional[int] = None, stubs: Optional[bool] = None) -> dict:
    """Compile every variant into Triton's cache (``tempme_fast.precompile.compile_launches``: each distinct
    variant once, in worker processes); returns counts and times.

    ``arch``: compute capability as an int (90 for sm_90); default the current CUDA device's.
    ``jobs``: worker processes (default: every core; 1 compiles in this process).
    ``stubs``: also build the launcher stubs (default: when compiling for the current CUDA device).
    """
    from tempme_fast.precompile import compile_launches

    t0 = time.perf_counter()
    launches = record_launches(models, batches, dtypes, sets)
    recorded_s = time.perf_counter() - t0
    summary = compile_launches(launches, arch, jobs, stubs)
    return {**summary, "record_s": round(recorded_s, 2), "seconds": round(time.perf_counter() - t0, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-B-16"],
                        choices=["ViT-B-32", "ViT-B-16", "ViT-L-14"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 32])
    parser.add_argument("--dtypes", nargs="+", default=["fp16"], choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS,
                        help="which callers' launches to compile (default: all)")
    parser.add_argument("--arch", type=int, default=None,
                        help="compute capability to compile for, e.g. 90 or 80 (default: this CUDA device's)")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: one per core)")
    parser.add_argument("--jsonl", default=None, metavar="PATH", help="append the summary row to this file")
    parser.add_argument("--tag", default="", help="label stored in the JSON-lines row")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 replaces the kernels with the interpreter's: unset it to compile")
    if any(b < 1 for b in args.batches):
        parser.error(f"--batches {args.batches}: every batch must be >= 1")
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs {args.jobs} must be >= 1")
    if min(args.batches) < 1:
        parser.error(f"--batches {min(args.batches)}: a batch is at least 1 video")
    if args.arch is not None and args.arch < 70:
        parser.error(f"--arch {args.arch}: give a compute capability of 70 or more as an int (90 for sm_90)")
    try:
        summary = warm(args.models, args.batches, args.dtypes, args.sets, args.arch, args.jobs)
    except ValueError as e:
        parser.error(str(e))
    print(f"warm: {summary['variants']} variants for sm_{summary['arch']} "
          f"({', '.join(f'{k} {v}' for k, v in sorted(summary['by_kernel'].items()))}): "
          f"{summary['compiled']} compiled, {summary['cache_hits']} already cached, {summary['failed']} failed; "
          f"{summary['seconds']:.1f} s with {summary['jobs']} jobs "
          f"({summary['compile_s']:.1f} s of compiling, launcher stubs {'built' if summary['stubs'] else 'not built'})",
          flush=True)
    for error in summary["errors"]:
        print(f"warm: failed: {error}", file=sys.stderr)
    if summary["stubs_failed"]:
        print(f"warm: {summary['stubs_failed']} launcher stubs not built (built at their first launch instead): "
              + "; ".join(summary["stub_errors"]), file=sys.stderr)
    if args.jsonl:
        import torch

        from .common import RowLog, environment

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        RowLog(args.jsonl, "warm", environment(device), args.tag)({**summary, "models": args.models,
                                                                   "batches": args.batches, "dtypes": args.dtypes})
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
