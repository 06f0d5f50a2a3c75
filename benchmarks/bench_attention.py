"""Proportional attention, one row per candidate: the float mask, the folded bias, the Triton kernel.

Shapes are the attention layers of the token schedule (``attention_shapes``): the first layer with a
bias (after the first merge) and every joining layer. Each row is written as one JSON line (``--jsonl``)
with the median time and its 20th-80th percentile spread, forward (``fwd``) or forward + backward
(``fwdbwd``), appended as soon as it is measured. ``sdpa-nobias`` is plain SDPA without any bias: what
the flash kernel gives, a floor.

On a GPU each case is also replayed from a CUDA graph over input sets that exceed the L2 cache
(``device_ms``, see ``devicetime``): ``speedup_vs_mask`` comes from it, ``speedup_vs_mask_eager`` from
the eager times, and ``host_bound`` marks a row whose eager time is well above its device time.

    python -m benchmarks.bench_attention --jsonl attention.jsonl                 # GPU
    python -m benchmarks.bench_attention --device cpu --batches 1 --dtypes fp32  # CPU: just runs
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch

from tempme_fast import TempMeConfig, ops, token_schedule
from tempme_fast.arguments import positive_float, positive_int
from tempme_fast.loading import DTYPES
from tempme_fast.ops import triton_attention
from tempme_fast.schedule import LayerPlan

from .common import VIT_GEOMETRY, check_outputs, environment, failure, measure_ms, parsed_device, print_table
from .context import ContextLost, Resume, add_resume_argument, exit_for_good, log_probed, resume_from, stopped
from .devicetime import device_columns, host_columns, speedups
from .oracle import check_attention, check_raised
from .rowlog import open_for_append

IMPLS = ("sdpa", "fold", "triton", "sdpa-nobias", "eager")
MODES = ("fwd", "fwdbwd")
# The fields that name a row and a candidate, for a stage resumed after a lost CUDA context (benchmarks.context).
ROW_KEYS = ("model", "batch", "layer", "rows", "tokens", "queries", "dtype", "mode", "impl")
CANDIDATE_KEYS = ("mode", "impl")


@dataclass(frozen=True)
class AttentionShape:
    """One attention layer as TempMe runs it: ``rows`` clips of ``tokens`` tokens, ``heads`` x ``head_dim``;
    ``queries``: the class tokens alone query the keys (a trimmed last block), None: every token."""

    model: str
    batch: int
    layer: int
    rows: int
    tokens: int
    heads: int
    head_dim: int
    queries: Optional[int] = None


def layer_attentions(model: str, batch: int, config: TempMeConfig = TempMeConfig(), geometry=VIT_GEOMETRY
                     ) -> List[Tuple[LayerPlan, AttentionShape, bool]]:
    """Every layer's attention as the encoder runs it: the layer's plan, the attention's shape, and
    whether a merge has run before it (the layer's own cross-clip merge included), as the encoder
    decides it (``ClipState.merged``): from there on sizes differ and proportional attention has a bias.
    ``geometry``: ``{model: (depth, tokens per frame, width, heads)}``."""
    depth, tokens, width, heads = geometry[model]
    layers, merged = [], False
    for p in token_schedule(config, depth, tokens).layers:
        merged = merged or p.r_cross > 0
        layers.append((p, AttentionShape(model, batch, p.layer, batch * p.clips_out, p.tokens_attn, heads,
                                         width // heads), merged))
        merged = merged or p.r > 0
    return layers


def attention_shapes(model: str, batch: int, config: TempMeConfig = TempMeConfig()) -> List[AttentionShape]:
    """The first layer whose attention has a bias, and every joining layer, from the schedule."""
    shapes, biased_before = [], False
    for p, shape, biased in layer_attentions(model, batch, config):
        if biased and (not biased_before or p.group > 1):
            shapes.append(shape)
        biased_before = biased
    return shapes


def make_inputs(s: AttentionShape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """q, k, v as the encoder makes them (views of one ``[B', N, 3, H, d]`` projection), sizes, a gradient."""
    g = torch.Generator(device=device).manual_seed(seed)
    qkv = torch.randn(s.rows, s.tokens, 3, s.heads, s.head_dim, device=device, dtype=dtype, generator=g)
    size = torch.randint(1, 8, (s.rows, s.tokens, 1), device=device, generator=g).float()
    grad = torch.randn(s.rows, s.heads, s.tokens, s.head_dim, device=device, dtype=dtype, generator=g)
    return qkv, size, grad


@functools.lru_cache(maxsize=None)  # parsed once, not at every timed call
def parse_tiles(spec: str) -> Tuple[int, int, int, int]:
    """``"BMxBNxWxS"`` (query tile, key tile, warps, stages) as four ints; a ValueError naming the option."""
    parts = spec.split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--fwd-tiles {spec!r}: give BMxBNxWxS, four positive whole numbers, e.g. 128x64x8x3")
    block_m, block_n, warps, stages = (int(p) for p in parts)
    for name, value in (("BM", block_m), ("BN", block_n), ("W", warps)):
        if value & (value - 1):
            raise ValueError(f"--fwd-tiles {spec!r}: {name}={value} must be a power of two")
    return block_m, block_n, warps, stages


@contextlib.contextmanager
def forward_tiles(spec: Optional[str]):
    """The Triton attention forward with the tiles, warps and stages of ``spec`` (None: the library's)."""
    if spec is None:
        yield
        return
    block_m, block_n, warps, stages = parse_tiles(spec)
    blocks, options = dict(triton_attention.GPU_FWD_BLOCKS), triton_attention._launch_options
    triton_attention.GPU_FWD_BLOCKS.update({d: (block_m, block_n) for d in blocks})
    triton_attention._launch_options = lambda block_d, fp32: (
        {} if triton_attention._interpreting() else {"num_warps": warps, "num_stages": stages})
    try:
        yield
    finally:
        triton_attention.GPU_FWD_BLOCKS.update(blocks)
        triton_attention._launch_options = options


def attention_fn(impl: str, mode: str, qkv: torch.Tensor, size: torch.Tensor, grad: torch.Tensor):
    """A zero-argument callable running ``impl`` once (``mode`` ``fwd`` or ``fwdbwd``) and returning the
    output (and, for ``fwdbwd``, the gradient of ``qkv``). ``triton:SPEC`` is the Triton kernel with the
    forward tiles of ``SPEC`` (:func:`forward_tiles`)."""
    impl, _, tiles = impl.partition(":")
    backend = "triton" if impl == "triton" else "torch"
    name, bias = ("sdpa", None) if impl == "sdpa-nobias" else (impl, size)
    leaf = qkv.detach().requires_grad_(mode == "fwdbwd")

    def run():
        q, k, v = leaf.permute(2, 0, 3, 1, 4).unbind(0)
        with forward_tiles(tiles or None):
            out = ops.attention(q, k, v, bias, impl=name, backend=backend)
        if mode == "fwdbwd":
            return out, torch.autograd.grad(out, leaf, grad)[0]
        return out
    return run


def check_case(impl: str, mode: str, s: AttentionShape, dtype: torch.dtype, device: torch.device) -> Dict[str, object]:
    """The oracle's columns of one case (``benchmarks.oracle.check_attention``): ``impl`` run once more on the
    timed inputs, its output (and gradients) against the float64 attention. A check that raises records why
    and does not agree. ``eager`` gets its ``tol_ratio`` and no verdict: it is the released code's arithmetic,
    whose logits and probabilities are rounded to the input dtype, not a path held to ``ATTENTION_TOL``."""
    qkv, size, grad = make_inputs(s, dtype, device)
    try:
        result = attention_fn(impl, mode, qkv, size, grad)()
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        bias = None if impl == "sdpa-nobias" else size
        if mode == "fwdbwd":
            out, dqkv = result
            columns = check_attention(q, k, v, bias, out, grad, dqkv.permute(2, 0, 3, 1, 4).unbind(0))
        else:
            columns = check_attention(q, k, v, bias, result)
    except Exception as e:  # noqa: BLE001 (recorded in the row; the next case runs)
        return check_raised(e)
    if impl == "eager":
        return {"tol_ratio": columns["tol_ratio"]}
    return columns


def available_impls(device: torch.device) -> List[str]:
    on_triton = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    return [i for i in IMPLS if i != "triton" or (on_triton and ops.triton_available())]


def set_bytes(s: AttentionShape, dtype: torch.dtype) -> int:
    """Bytes of one input set: q, k, v, the sizes and the upstream gradient."""
    elt = torch.tensor([], dtype=dtype).element_size()
    return s.rows * s.tokens * (4 * s.heads * s.head_dim * elt + 4)


def time_case(impl: str, mode: str, s: AttentionShape, dtype: torch.dtype, device: torch.device,
              rep_ms: float) -> Dict[str, object]:
    """Eager timing of one case and, on a GPU, its device time over fresh input sets (a failure there
    costs only the device columns)."""
    timing = measure_ms(attention_fn(impl, mode, *make_inputs(s, dtype, device)), device, rep_ms=rep_ms)
    timing.update(device_columns(lambda i: attention_fn(impl, mode, *make_inputs(s, dtype, device, seed=1 + i)),
                                 set_bytes(s, dtype), device, rep_ms))
    return {**timing, **host_columns(timing["ms"], timing)}


def run(device: torch.device, models, batches, dtypes, impls, modes, rep_ms: float = 100,
        sink=None, check: bool = True, resume: Optional[Resume] = None) -> List[Dict[str, object]]:
    """Rows of every (shape, dtype, mode, impl); each is passed to ``sink`` as soon as it is measured. With
    ``check``, each row also says whether it agrees with the float64 attention (:func:`check_case`).
    Where a row lost the CUDA context (:func:`context.context_lost`), it is passed on with ``context_lost`` and
    :class:`context.ContextLost` is raised; ``resume`` skips the rows that earlier processes of the stage
    logged, and every candidate of theirs that lost the context."""
    rows = []

    def keep(row: Dict[str, object]) -> None:
        rows.append(row)
        if sink:
            sink(row)
    for model in models:
        for batch in batches:
            for s in attention_shapes(model, batch):
                for dtype_name in dtypes:
                    for mode in modes:
                        base = None
                        for impl in impls:
                            row = {**asdict(s), "dtype": dtype_name, "mode": mode, "impl": impl}
                            if resume and resume.skip(row):
                                found = resume.logged(row) if impl == "sdpa" else None
                                base = found if found and "ms" in found else base
                                continue
                            try:
                                row.update(time_case(impl, mode, s, DTYPES[dtype_name], device, rep_ms))
                            except Exception as e:  # noqa: BLE001 (recorded in the row; the next case runs)
                                row.update(failure(e))
                            if check and "ms" in row:
                                row.update(check_case(impl, mode, s, DTYPES[dtype_name], device))
                            base = row if impl == "sdpa" and "ms" in row else base
                            if "ms" in row:
                                row.update(speedups(row, base, device, "speedup_vs_mask") if base else
                                           {"speedup_vs_mask": None})
                            log_probed(device, keep, [row], lambda: f"{mode} {impl} at {s.model}, {s.batch} "
                                                                    f"videos, layer {s.layer}, {dtype_name}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", choices=VIT_GEOMETRY, default=["ViT-B-16"])
    parser.add_argument("--batches", nargs="+", type=positive_int, default=[1, 16])
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["fp16", "bf16"])
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=None,
                        help="default: all that run here (triton needs CUDA or TRITON_INTERPRET=1)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--rep-ms", type=positive_float, default=100)
    parser.add_argument("--jsonl", default=None, help="append one JSON line per row to this file")
    parser.add_argument("--tag", default="", help="label stored in every JSON line (e.g. a suite stage)")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="do not hold each row's output against the float64 attention (columns agrees, "
                             "tol_ratio, disagreement)")
    parser.add_argument("--fwd-tiles", nargs="+", default=None, metavar="BMxBNxWxS",
                        help="time the Triton forward with these query and key tiles, warps and stages (rows "
                             "'triton:SPEC'), beside the library's (row 'triton') and SDPA with the mask and "
                             "without a bias; forward only")
    add_resume_argument(parser)
    args = parser.parse_args(argv)
    resume = resume_from(parser, args, "attention", ROW_KEYS, CANDIDATE_KEYS)
    impls, modes = args.impls, args.modes
    if args.fwd_tiles:
        try:
            for spec in args.fwd_tiles:
                parse_tiles(spec)
        except ValueError as e:
            parser.error(str(e))
        impls, modes = ["sdpa", "sdpa-nobias", "triton", *(f"triton:{spec}" for spec in args.fwd_tiles)], ["fwd"]
    device = parsed_device(parser, args.device)
    check_outputs(parser, args)
    env = environment(device)
    out = open_for_append(args.jsonl) if args.jsonl else None

    def sink(row):  # every row on disk before the next is measured: a run cut short keeps it
        out.write(json.dumps({"bench": "attention", **env, **({"tag": args.tag} if args.tag else {}), **row}) + "\n")
        out.flush()
        os.fsync(out.fileno())
    try:
        rows = run(device, args.models, args.batches, args.dtypes, impls or available_impls(device),
                   modes, args.rep_ms, sink if out else None, args.check, resume)
    except ContextLost as e:
        return stopped(e, args.jsonl)
    finally:
        if out:
            out.close()
    print(f"# proportional attention on {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    print_table(rows, ["model", "batch", "layer", "rows", "tokens", "dtype", "mode", "impl", "ms", "ms_p20", "ms_p80",
                       "device_ms", "host_bound", "speedup_vs_mask", "speedup_vs_mask_eager", "agrees", "tol_ratio",
                       "error", "device_error", "disagreement"])
    return int(any("error" in r or r.get("agrees") is False for r in rows))


if __name__ == "__main__":
    exit_for_good(main())
