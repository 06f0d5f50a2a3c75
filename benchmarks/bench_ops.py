"""Merge-op benchmarks: Triton against the PyTorch reference (eager and ``torch.compile``).

Ops: ``best_match``, ``match`` (best match + plan), ``merge`` forward and backward, the whole merge step
(match + merge), and the step as the encoder runs it after attention (``step_norm_fwd``: the residual
add, match, merge and ``ln_2``; fused into the merge launch on Triton) and at a join (``join_norm_fwd``: the
clips joined with their temporal position embedding, the match, the merge and ``ln_1``; the join and the
LayerNorm fused into the merge launch on Triton; ``join_norm_fwdbwd`` adds its backward to the clips and the
position embedding, as in training). Shapes come from the token
schedule (``common.merge_shapes``). Each row reports the median time with its 20th-80th percentile
spread, the bytes the op must move at the least (each input read once, each output written once), the
achieved GB/s and, on a GPU, the fraction of the measured device-to-device copy bandwidth (``frac_copy_bw``,
a 1 GiB copy). The merge forward and backward rows also carry ``frac_sized_copy``: the same against a copy of
as many bytes timed the same way, which a small op's start and tail weigh on as they weigh on the op.

On a GPU every case is timed twice: as called (``ms``: host work included) and replayed from a CUDA
graph over input sets that exceed the L2 cache (``device_ms``: the GPU's own time, see
``devicetime``). Bandwidth and ``speedup_vs_torch`` come from the device time there, the eager
speed-up is ``speedup_vs_torch_eager``, and ``host_bound`` marks rows whose eager time is well above the
device time. On a CPU the wall time is the device time and those columns are absent.

    python -m benchmarks.bench_ops --out bench-out                      # GPU sweep
    python -m benchmarks.bench_ops --device cpu --models ViT-B-32 --batches 1 --dtypes fp32  # CPU

``--tiles SPEC...`` adds rows ``triton:SPEC``: the Triton ops with other tiles than the library's table,
to choose that table from measurements:

- ``merge:BTxBDxW``: the merge forward's token tile, feature slice and warps;
- ``norm:BTxW``: the token tile and warps of the merge that also writes the LayerNorm
  (``step_norm_fwd`` and ``join_norm_fwd``, the model's merges; its programs span all features);
- either with ``-sN``: its gather of the merged sources software-pipelined over ``N`` stages
  (``SRC_STAGES``);
- ``merge:BTxBDxW-gN``: ``N`` of a tile's merged sources gathered at once and summed by a product
  (``SRC_BLOCK``);
- either with ``-pN``: the tile's tokens that nothing merges into copied first (and normalised), in the
  features' own dtype, then its B tokens with sources merged ``N`` at a time (``SPLIT_T``: fewer registers
  a program);
- either with ``-cN``: each token's sources gathered ``N`` (1, 2, 4 or 8) a step, every load of a step issued
  before a sum waits on one (``SRC_CHUNK``; the library's 1-token tiles take 4 where B tokens gather many
  sources);
- ``-sN``, ``-pN`` and ``-cN`` together, in that order: ``merge:8x1024x4-p1-c4`` copies its 8 tokens'
  rows first and gathers each B token's sources 4 a step (``-gN`` goes alone);
- ``match:BAxBBxBCxW-P``: the match's A, B and channel tiles, warps and products, ``P`` one of
  ``native`` (16-bit tl.dot), ``ieee`` (float32 FMA), ``tf32x3``;
- ``plan:sort`` / ``plan:count``: the library's tiles with every float32 plan sorted in registers (up
  to ``PLAN_SORT_LIMIT`` A tokens) or every plan counted, to place ``triton_ops.PLAN_SORT_MIN`` where
  the two paths cross;
- ``heads:mean``: the library's tiles with the keys averaged over heads by torch before the match
  (``triton_ops.HEADS_IN_MATCH = False``, one kernel more a merge after attention) instead of by the
  match as it reads them, to choose between the two.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from tempme_fast import ops
from tempme_fast.arguments import non_negative_int, positive_float, positive_int
from tempme_fast.loading import DTYPES
from tempme_fast.ops import reference, triton_ops

from .common import VIT_GEOMETRY, Compiled, MergeShape, RowLog, add_row_log_arguments, check_outputs, \
    copy_bandwidth_gbs, encoder_metrics, environment, failure, measure_ms, merge_shapes, metric_tensor, parsed_device, \
    print_table, shifted_metric, source_counts, write_results
from .context import Resume, add_resume_argument, exit_for_good, keep_rows, log_probed, resume_from
from .devicetime import basis_ms, device_columns, host_columns, speedups
from .oracle import NORM_EPS, check_op, check_raised, join_grads, join_inputs, norm_inputs, upstream_grad

OPS = ("best_match", "match", "merge_fwd", "merge_bwd", "step_fwd", "step_norm_fwd", "join_norm_fwd",
       "join_norm_fwdbwd", "step_fwdbwd")
# The ops of a join only (the clips joined as they are merged): they run at the cross-clip shapes alone.
JOIN_OPS = ("join_norm_fwd", "join_norm_fwdbwd")
# Ops that only move their bytes: their rows are also held to a copy of as many bytes (frac_sized_copy).
SIZED_COPY_OPS = ("merge_fwd", "merge_bwd")
# The match kernel's DOT_MODE per product kind: 16-bit tl.dot, and the float32 ones the library knows.
DOT_MODES = {"native": 0, **triton_ops._FP32_DOT_MODES}


# The ops whose Triton launches a ``merge:`` or ``norm:`` spec changes: a row of such a spec at another op would
# time the library's tiles under the candidate's name, so none is made.
TILE_OPS = {"merge": ("merge_fwd", "step_fwd", "step_fwdbwd"),
            "norm": ("step_norm_fwd", "join_norm_fwd", "join_norm_fwdbwd")}
# Where a merge's metric comes from: random (``make_inputs``: a B token gathers 3-6 sources at most) or the
# encoder's own (``common.encoder_metrics``: random weights, the plans' skew as the model's merges meet it).
PLANS = ("random", "encoder")
# Where torch.compile rows are timed unless --compile-at says otherwise (compiling every case takes minutes).
COMPILE_AT = "ViT-B-16:32:fp16"


# The fields that name a row (a resumed stage skips the rows logged under them) and a candidate (a resumed stage
# skips one that lost the CUDA context, at every later shape).
ROW_KEYS = ("model", "batch", "layer", "stage", "dtype", "op", "impl", "plans")
CANDIDATE_KEYS = ("op", "impl")


# The plan paths of ``plan:PATH``: sort every float32 row the sort can hold, or count every row.
PLAN_PATHS = {"sort": 1, "count": 0}


def parse_tiles(spec: str) -> Tuple[str, Dict[str, int]]:
    """``"merge:BTxBDxW[-gN|[-sN][-pN][-cN]]"``, ``"norm:BTxW[-sN][-pN][-cN]"``, ``"match:BAxBBxBCxW-P"``,
    ``"plan:PATH"`` or ``"heads:mean"`` as (op, launch parameters); a ValueError naming ``--tiles`` otherwise.
    ``-sN``: the merged sources gathered one after another, software-pipelined over N stages (``SRC_STAGES``);
    ``-gN`` (merge only, alone): N of a tile's sources gathered at once and summed by a product (``SRC_BLOCK``;
    N and BT at least 16); ``-pN``: the tokens without sources copied first, the others merged N at a time
    (``SPLIT_T``, a power of two up to BT); ``-cN``: each token's sources gathered N at a time, unrolled
    (``SRC_CHUNK``: 1, 2, 4 or 8). The suffixes go in that order, each at most once: ``merge:8x1024x4-p1-c4``."""
    kind, _, rest = spec.partition(":")
    sizes, dash, product = rest.partition("-")
    parts = sizes.split("x")
    fail = (f"--tiles {spec!r}: give merge:BTxBDxW[-gN|[-sN][-pN][-cN]], norm:BTxW[-sN][-pN][-cN], "
            f"match:BAxBBxBCxW-P (P: {', '.join(DOT_MODES)}), plan:PATH (PATH: {', '.join(PLAN_PATHS)}) or heads:mean")
    if kind == "plan" and rest in PLAN_PATHS:
        return kind, {"SORT": PLAN_PATHS[rest]}
    if kind == "heads" and rest == "mean":
        return kind, {"HEADS_IN_MATCH": 0}
    # merge and norm: "-sN" the sources' gather in N stages, "-pN" copies first and N merged at once, "-cN" N
    # sources a step, in that order, each at most once; merge alone: "-gN", N sources at once summed by a product
    # (the kernel takes none of the others with it).
    found = [re.fullmatch(r"([spcg])([0-9]+)", part) for part in product.split("-")] if dash else []
    letters = "".join(m.group(1) if m else "?" for m in found)
    given = {m.group(1): int(m.group(2)) for m in found if m}
    stages, split, chunk, gather = (given.get(k) for k in "spcg")
    # "spc" in that order, each at most once ("?": a part that is none of them), or "g" alone (merge only)
    suffixed = (letters == "".join(k for k in "spc" if k in letters) or (letters == "g" and kind == "merge")) and \
        (stages is None or 1 <= stages <= 9) and chunk in (None, 1, 2, 4, 8)
    if kind == "merge" and len(parts) == 3 and suffixed and all(p.isdigit() for p in parts):
        values = dict(zip(("BLOCK_T", "BLOCK_D", "num_warps"), map(int, parts)))
        if gather is not None:
            values["SRC_BLOCK"] = gather
            if min(values["SRC_BLOCK"], values["BLOCK_T"]) < 16:  # tl.dot's smallest operands
                raise ValueError(f"--tiles {spec!r}: a gather by product needs BT and N of at least 16")
    elif kind == "norm" and len(parts) == 2 and suffixed and all(p.isdigit() for p in parts):
        values = dict(zip(("BLOCK_T", "num_warps"), map(int, parts)))
    elif kind == "match" and len(parts) == 4 and all(p.isdigit() for p in parts) and product in DOT_MODES:
        values = dict(zip(("BLOCK_A", "BLOCK_B", "BLOCK_C", "num_warps"), map(int, parts)))
        values["DOT_MODE"] = DOT_MODES[product]
    else:
        raise ValueError(fail)
    if split is not None:  # merge or norm (a match spec with one is refused above)
        values["SPLIT_T"] = split
        if values["SPLIT_T"] > values["BLOCK_T"]:
            raise ValueError(f"--tiles {spec!r}: the merged tokens' block N must be at most BT")
    for name, value in values.items():
        if name != "DOT_MODE" and (value < 1 or value & (value - 1)):
            raise ValueError(f"--tiles {spec!r}: {name}={value} must be a power of two")
    if stages is not None:
        values["SRC_STAGES"] = stages
    # Without -cN a candidate gathers one source a step, as the library did before SRC_CHUNK.
    if kind in ("merge", "norm") and gather is None:
        values["SRC_CHUNK"] = chunk or 1
    return kind, values


@functools.lru_cache(maxsize=None)  # made once per spec, not at every timed call
def _tile_table(spec: str) -> Tuple[str, object]:
    """The ``triton_ops`` attribute that ``spec`` replaces (a tile function, ``PLAN_SORT_MIN`` or
    ``HEADS_IN_MATCH``), and its replacement."""
    kind, values = parse_tiles(spec)
    if kind == "heads":
        return "HEADS_IN_MATCH", bool(values["HEADS_IN_MATCH"])
    if kind == "plan":
        # The library's choice (triton_ops._plan_sort_block) with its threshold moved: from 1 A token
        # every row it can sort is sorted; beyond PLAN_SORT_LIMIT none is.
        return "PLAN_SORT_MIN", 1 if values["SORT"] else triton_ops.PLAN_SORT_LIMIT + 1
    if kind == "merge":
        def tiles(rows, tokens, width, itemsize, many=False):
            return dict(values)
        return "_merge_fwd_tiles", tiles
    if kind == "norm":
        def norm_tiles(rows, tokens, width, itemsize, has_pos, many=False):
            return dict(values, BLOCK_D=triton_ops._next_power_of_2(width))
        return "_merge_norm_tiles", norm_tiles

    def tiles(rows, na, nb, channels, dtype):
        return dict(values, **triton_ops._match_split(rows, na, nb, values["BLOCK_A"], values["BLOCK_B"]))
    return "_match_tiles", tiles


@contextlib.contextmanager
def op_tiles(spec: Optional[str]):
    """The Triton ops with the tiles of ``spec`` (:func:`parse_tiles`; None: the library's table)."""
    if spec is None:
        yield
        return
    name, tiles = _tile_table(spec)
    original = getattr(triton_ops, name)
    setattr(triton_ops, name, tiles)
    try:
        yield
    finally:
        setattr(triton_ops, name, original)


def op_bytes(op: str, s: MergeShape, elt: int) -> int:
    """Fewest bytes ``op`` must move for shape ``s`` with ``elt``-byte activations."""
    na, _ = ops.split_sizes(s.tokens, s.protected)
    metric = s.rows * s.tokens * s.channels * elt
    plan = s.rows * (na + s.r) * 8  # merged, dst (r each) and kept (Na - r), int64
    x_in, x_out = s.rows * s.tokens * s.width * elt, s.rows * (s.tokens - s.r) * s.width * elt
    sizes = s.rows * (2 * s.tokens - s.r) * 4
    table = {
        "best_match": metric + s.rows * na * (4 + 8),
        "match": metric + plan,
        "merge_fwd": x_in + plan + sizes + x_out,
        "merge_bwd": x_out + plan + sizes + x_in,
        "step_fwd": metric + x_in + sizes + x_out,
        # The model's step after attention: x and the attention's output read, the merged tokens and
        # their LayerNorm written, the LayerNorm's weight and bias read.
        "step_norm_fwd": metric + 2 * x_in + sizes + 2 * x_out + 2 * s.width * elt,
        # The encoder's join: its clips read by the match and again by the merge, their temporal position
        # embedding (one row a clip of a video), the merged tokens and their LayerNorm written.
        "join_norm_fwd": metric + x_in + sizes + 2 * x_out + (2 + s.rows * s.group // s.batch) * s.width * elt,
        # Its backward on top: the gradients of the merged tokens and of their LayerNorm read, the merged tokens
        # read again (the LayerNorm's gradient), the plan read, the clips' gradient written (the position
        # embedding's, a row a clip of a video, is reduced from it as it is written).
        "join_norm_fwdbwd": (metric + 2 * x_in + sizes + 5 * x_out + plan
                             + (2 + 2 * s.rows * s.group // s.batch) * s.width * elt),
        "step_fwdbwd": metric + 2 * (x_in + x_out) + sizes + plan,
    }
    return table[op]


def applies(impl: str, op: str) -> bool:
    """Whether ``impl`` (``torch``, ``triton``, ``triton:SPEC``...) times ``op`` as its name says (:data:`TILE_OPS`)."""
    kind = impl.split(":")[1] if impl.startswith("triton:") else None
    return op in TILE_OPS.get(kind, (op,))


def make_inputs(s: MergeShape, dtype: torch.dtype, device: torch.device, seed: int = 0,
                metrics: Optional[Dict[Tuple[int, str], torch.Tensor]] = None):
    """``(metric, x, size)`` of one input set: the metric random, or, given ``metrics``
    (:func:`common.encoder_metrics`), the encoder's for ``s`` with its clips rolled by ``seed``."""
    g = torch.Generator(device=device).manual_seed(seed)
    metric = (metric_tensor(s.rows, s.tokens, s.channels, s.heads, dtype, device, g) if metrics is None else
              shifted_metric(metrics[(s.layer, s.stage)], seed))
    x = torch.randn(s.rows, s.tokens, s.width, device=device, dtype=dtype, generator=g)
    size = torch.randint(1, 5, (s.rows, s.tokens, 1), device=device, generator=g).float()
    return metric, x, size


def op_fn(op: str, impl: str, s: MergeShape, metric, x, size, compile_backend: str = "inductor",
          compiled: Optional[Compiled] = None) -> Tuple[Callable[[], object], Optional[Compiled]]:
    """A zero-argument callable running ``op`` with implementation ``impl`` on the given inputs.

    For ``torch.compile`` also the ``Compiled`` wrapper (compiled afresh for this shape unless
    ``compiled``, made by an earlier call for the same shape and op, is given: time it before the next
    fresh one resets the compile cache), whose graph count goes in the row.
    """
    if impl.startswith("triton:"):
        spec = impl.split(":", 1)[1]
        with op_tiles(spec):  # the plan that op_fn makes ahead of a merge too
            fn, _ = op_fn(op, "triton", s, metric, x, size, compile_backend)

        def tiled():
            with op_tiles(spec):
                return fn()
        return tiled, None
    backend = "triton" if impl == "triton" else "torch"
    if op == "step_norm_fwd":
        return step_norm_fn(backend, impl, s, metric, x, size, compile_backend, compiled)
    if op in JOIN_OPS:
        return join_norm_fn(backend, impl, s, metric, size, compile_backend, compiled, op == "join_norm_fwdbwd")
    if impl == "torch.compile" and compiled is None:
        if op == "best_match":
            compiled = Compiled(lambda m: reference.best_match(m, s.protected, s.heads), compile_backend)
        elif op == "match":
            compiled = Compiled(lambda m: tuple(reference.match(m, s.r, s.protected, s.heads))[:3], compile_backend)
        else:
            compiled = Compiled(lambda m, xx, sz: reference.merge(xx, sz, reference.match(m, s.r, s.protected,
                                                                                          s.heads)),
                                compile_backend)
    fn = compiled
    plan = ops.match(metric, s.r, s.protected, backend=backend, heads=s.heads)
    if op == "best_match":
        return ((lambda: fn(metric)) if fn else
                (lambda: ops.best_match(metric, s.protected, backend=backend, heads=s.heads))), fn
    if op == "match":
        return ((lambda: fn(metric)) if fn else
                (lambda: ops.match(metric, s.r, s.protected, backend=backend, heads=s.heads))), fn
    if op == "merge_fwd":
        return (lambda: ops.merge(x, size, plan, backend=backend)), fn
    if op == "step_fwd":
        if fn:
            return (lambda: fn(metric, x, size)), fn
        return (lambda: ops.merge(x, size, ops.match(metric, s.r, s.protected, backend=backend, heads=s.heads),
                                  backend=backend)), fn
    xg = x.detach().requires_grad_(True)
    grad = upstream_grad(x, s.tokens - s.r)
    if op == "merge_bwd":
        out, _ = ops.merge(xg, size, plan, backend=backend)
        return (lambda: torch.autograd.grad(out, xg, grad, retain_graph=True)), fn

    def fwdbwd():  # step_fwdbwd
        if fn:
            out, _ = fn(metric, xg, size)
        else:
            out, _ = ops.merge(xg, size, ops.match(metric, s.r, s.protected, backend=backend, heads=s.heads),
                               backend=backend)
        return torch.autograd.grad(out, xg, grad)
    return fwdbwd, fn


def step_norm_fn(backend: str, impl: str, s: MergeShape, metric, x, size, compile_backend: str,
                 compiled: Optional[Compiled]) -> Tuple[Callable[[], object], Optional[Compiled]]:
    """``op_fn`` of ``step_norm_fwd``: the encoder's step after attention, ``x + out`` merged and the
    ``ln_2`` of the result (``ops.merge_norm(..., residual=out)``: one merge launch on Triton; an add,
    the merge and a LayerNorm on the reference), on ``oracle.norm_inputs``."""
    residual, weight, bias = norm_inputs(x)
    if impl == "torch.compile":
        compiled = compiled or Compiled(
            lambda m, xx, sz, res: reference.merge_norm(xx, sz, reference.match(m, s.r, s.protected, s.heads),
                                                        weight, bias, NORM_EPS, residual=res), compile_backend)
        return (lambda: compiled(metric, x, size, residual)), compiled

    def step():
        plan = ops.match(metric, s.r, s.protected, backend=backend, heads=s.heads)
        return ops.merge_norm(x, size, plan, weight, bias, NORM_EPS, backend=backend, residual=residual)
    return step, None


def join_norm_fn(backend: str, impl: str, s: MergeShape, metric, size, compile_backend: str,
                 compiled: Optional[Compiled], grad: bool = False) -> Tuple[Callable[[], object], Optional[Compiled]]:
    """``op_fn`` of ``join_norm_fwd``: the encoder's join, its clips joined with their position embedding, matched
    on their hidden states, merged, and the ``ln_1`` of the result (``ops.join_merge_norm``: the match and one merge
    launch on Triton), on ``oracle.join_inputs`` (whose join is ``metric``).

    With ``grad`` (``join_norm_fwdbwd``), as in training: that forward, then the gradients of the clips and of
    the position embedding for ``oracle.join_grads`` on the merged tokens and on their LayerNorm (on Triton the
    LayerNorm's gradient, aten's, and one merge backward launch, which reduces the embedding's gradient too);
    it returns them and the merged tokens (detached), which the oracle's float64 backward starts from."""
    clips, sizes, frame_pos, weight, bias = join_inputs(s, metric, size)
    group, protected = s.group, s.protected // s.group
    if impl == "torch.compile":
        compiled = compiled or Compiled(
            lambda xx, sz, pos: reference.join_merge_norm(xx, sz, group, protected, s.r, weight, bias, NORM_EPS, pos),
            compile_backend)
        call = compiled
    else:
        def call(xx, sz, pos):
            return ops.join_merge_norm(xx, sz, group, protected, s.r, weight, bias, NORM_EPS, pos, backend=backend)
    if not grad:
        return (lambda: call(clips, sizes, frame_pos)), compiled
    clips.requires_grad_(True)
    frame_pos.requires_grad_(True)
    upstream = join_grads(s, metric)

    def fwdbwd():
        out, _, ln, _ = call(clips, sizes, frame_pos)
        return (*torch.autograd.grad((out, ln), (clips, frame_pos), upstream), out.detach())
    return fwdbwd, compiled


def check_row(op: str, impl: str, s: MergeShape, metric, x, size, fn: Callable[[], object]) -> Dict[str, object]:
    """The oracle's columns of one timed case (``benchmarks.oracle``): ``fn`` called once more and its
    output held against the float64 reference, the merges by the plan that the same backend (and tiles)
    makes of ``metric``. A check that raises records why and does not agree."""
    try:
        out = fn()
        plan = None
        if op not in ("best_match", "match"):
            spec = impl.split(":", 1)[1] if impl.startswith("triton:") else None
            backend = "triton" if impl.startswith("triton") else "torch"
            with op_tiles(spec):
                plan = ops.match(metric, s.r, s.protected, backend=backend, heads=s.heads)
        return check_op(op, s, metric, x, size, out, plan)
    except Exception as e:  # noqa: BLE001 (recorded in the row; the next case runs)
        return check_raised(e)


def device_row(op: str, impl: str, s: MergeShape, dtype: torch.dtype, device: torch.device,
               compiled: Optional[Compiled], compile_backend: str, rep_ms: float,
               metrics: Optional[Dict[Tuple[int, str], torch.Tensor]] = None) -> Dict[str, object]:
    """The device-time columns of one case (none on a CPU), over fresh input sets (:func:`make_inputs`); a
    failure costs only these columns (``device_error``), not the eager figure already measured."""
    if device.type != "cuda":
        return {}

    def make(i: int):
        return op_fn(op, impl, s, *make_inputs(s, dtype, device, 1 + i, metrics), compile_backend, compiled)[0]
    elt = dtype.itemsize
    # One set: metric, x, sizes and the upstream gradient of the backward ops.
    set_bytes = s.rows * s.tokens * ((s.channels + s.width) * elt + 4) + s.rows * (s.tokens - s.r) * s.width * elt
    return device_columns(make, set_bytes, device, rep_ms)


def bandwidth_columns(nbytes: int, ms: Optional[float], copy_gbs: Optional[float],
                      sized_gbs: Optional[float] = None) -> Dict[str, object]:
    """``gbs`` (and, given the run's copy bandwidth, ``frac_copy_bw``; given that of a copy of ``nbytes``,
    ``frac_sized_copy``) from ``ms``; None without a time."""
    gbs = nbytes / (ms * 1e-3) / 1e9 if ms else None
    out = {"gbs": gbs}
    if copy_gbs:
        out.update(copy_gbs=copy_gbs, frac_copy_bw=gbs / copy_gbs if gbs else None)
    if sized_gbs:
        out.update(sized_copy_gbs=sized_gbs, frac_sized_copy=gbs / sized_gbs if gbs else None)
    return out


def sized_copy_gbs(nbytes: int, dtype: torch.dtype, device: torch.device, rep_ms: float) -> Optional[float]:
    """The bandwidth of a device-to-device copy that moves ``nbytes`` (half read, half written) in ``dtype``,
    timed as the op rows are (graph replays over random input sets beyond the L2 cache); None on a CPU or
    where it could not be timed. A 1 GiB copy (``copy_gbs``) runs long enough that its start and its last
    wave cost nothing; an op of a few tens of MB pays both, and so does a copy of its size."""
    if device.type != "cuda":
        return None
    elt = dtype.itemsize
    numel = max(1, nbytes // (2 * elt))

    def make(i: int):
        src = torch.randn(numel, device=device).to(dtype)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    ms = device_columns(make, numel * elt, device, rep_ms).get("device_ms")
    return 2 * numel * elt / (ms * 1e-3) / 1e9 if ms else None


def max_sources(s: MergeShape, metric: torch.Tensor) -> int:
    """The most sources any B token of ``s`` gathers in the reference's plan of ``metric``."""
    plan = reference.match(metric, s.r, s.protected, s.heads)
    return int(source_counts(plan.dst, ops.split_sizes(s.tokens, s.protected)[1]).max()) if s.r else 0


def run(device: torch.device, models, batches, dtypes, impls, op_names, compile_at: Optional[str] = None,
        rep_ms: float = 100, log: Optional[RowLog] = None, compile_backend: str = "inductor", check: bool = True,
        plans: str = "random", layers: Optional[Sequence[int]] = None,
        resume: Optional[Resume] = None) -> List[Dict[str, object]]:
    """Time every (shape, dtype, op, impl); ``compile_at`` ("ViT-B-16:32:fp16") limits torch.compile rows.
    With ``check``, each row also says whether its op agrees with the float64 reference (:func:`check_row`).
    ``plans`` (:data:`PLANS`): where the metrics come from; ``layers``: only the merges of these layers. Each row
    names its ``plans`` and the most sources a B token of its plan gathers (``max_sources``).

    Each row goes to ``log`` as soon as it is measured, so a run stopped by a time limit keeps it. On a
    GPU the first row is the device-to-device copy bandwidth measured in this run; every bandwidth row
    is compared with it, and the merge rows (:data:`SIZED_COPY_OPS`) also with a copy of their own bytes
    (:func:`sized_copy_gbs`, timed once a size).

    After each row the CUDA context is probed (:func:`context.context_lost`): where a row lost it, the row is
    kept with ``context_lost`` and :class:`context.ContextLost` is raised. ``resume`` (the rows earlier processes
    of the stage logged) skips the rows measured already and every candidate that lost the context, and takes
    the copy bandwidth from their copy row.
    """
    log = log or RowLog(None, "bench_ops", {})
    bandwidth = resume.value("copy_gbs", op="copy") if resume else None
    if device.type == "cuda" and bandwidth is None:
        bandwidth = copy_bandwidth_gbs(device)
        log({"op": "copy", "impl": "torch", "copy_gbs": bandwidth})
    start = len(log.rows)

    def keep(row: Dict[str, object]) -> None:
        """Logs ``row``; raises ContextLost after it where the context is gone."""
        log_probed(device, log, [row], lambda: f"{row['op']} {row['impl']} at {row['model']}, {row['batch']} videos, "
                                               f"layer {row['layer']} {row['stage']}, {row['dtype']}")
    sized: Dict[Tuple[int, torch.dtype], Optional[float]] = {}  # (bytes, dtype) -> a copy of as many bytes, GB/s
    for model in models:
        for batch in batches:
            encoder = {}  # dtype name -> the encoder's metrics at this model and batch, made when first needed
            for s in merge_shapes(model, batch):
                if layers is not None and s.layer not in layers:
                    continue
                for dtype_name in dtypes:
                    dtype = DTYPES[dtype_name]
                    if plans == "encoder" and dtype_name not in encoder:
                        encoder[dtype_name] = encoder_metrics(model, batch, dtype, device)
                    metrics = encoder.get(dtype_name)
                    metric, x, size = make_inputs(s, dtype, device, metrics=metrics)
                    busiest = max_sources(s, metric)
                    for op in op_names:
                        if op == "step_norm_fwd" and s.stage == "cross":
                            continue  # a join's merge has no residual add before it (join_norm_fwd times it)
                        if op in JOIN_OPS and s.stage != "cross":
                            continue  # only a join joins clips
                        base = None
                        for impl in filter(functools.partial(applies, op=op), impls):
                            if impl == "torch.compile":
                                if op in ("merge_fwd", "merge_bwd"):
                                    continue  # the compiled rows time whole graphs: match and step
                                if compile_at and compile_at != f"{model}:{batch}:{dtype_name}":
                                    continue
                            row = {"model": model, "batch": batch, "layer": s.layer, "stage": s.stage,
                                   "rows": s.rows, "tokens": s.tokens, "r": s.r, "dtype": dtype_name, "op": op,
                                   "impl": impl, "plans": plans, "max_sources": busiest}
                            if resume and resume.skip(row):
                                found = resume.logged(row) if impl == "torch" else None
                                base = found if found and "error" not in found else base
                                continue
                            try:
                                fn, compiled = op_fn(op, impl, s, metric, x, size, compile_backend)
                                row.update(measure_ms(fn, device, rep_ms=rep_ms))
                            except Exception as e:  # noqa: BLE001 (recorded in the row; the next case runs)
                                keep({**row, **failure(e)})
                                continue
                            row.update(device_row(op, impl, s, dtype, device, compiled, compile_backend, rep_ms,
                                                  metrics))
                            if check:
                                row.update(check_row(op, impl, s, metric, x, size, fn))
                            row.update(host_columns(row["ms"], row))
                            row.update(compiled.record() if compiled else {"compiled": False})
                            nbytes = op_bytes(op, s, x.element_size())
                            if op in SIZED_COPY_OPS and (nbytes, dtype) not in sized:
                                sized[(nbytes, dtype)] = sized_copy_gbs(nbytes, dtype, device, rep_ms)
                            row.update(bytes=nbytes, **bandwidth_columns(nbytes, basis_ms(row, device), bandwidth,
                                                                         sized.get((nbytes, dtype))))
                            if impl == "torch":
                                base = row
                            row.update(speedups(row, base, device, "speedup_vs_torch") if base else
                                       {"speedup_vs_torch": None})
                            keep(row)
    return log.rows[start:]


def check_compile_at(parser, args, impls: Sequence[str]) -> Optional[str]:
    """The one case of the sweep where torch.compile rows are timed (None: every case). A ``--compile-at``
    that names no case of the sweep, or that is given without torch.compile rows, is refused: it would
    leave the compiled rows out without a word."""
    if args.compile_at is None:
        return COMPILE_AT
    if "torch.compile" not in impls:
        parser.error(f"--compile-at {args.compile_at!r} places the torch.compile rows: add torch.compile to --impls")
    swept = [f"{m}:{b}:{d}" for m in args.models for b in args.batches for d in args.dtypes]
    if args.compile_at and args.compile_at not in swept:
        parser.error(f"--compile-at {args.compile_at!r} is not a case of this sweep: give MODEL:BATCH:DTYPE of "
                     f"--models, --batches and --dtypes ({', '.join(swept[:4])}{', ...' if len(swept) > 4 else ''}), "
                     f"or '' for every case")
    return args.compile_at or None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", choices=VIT_GEOMETRY, default=["ViT-B-32", "ViT-B-16"])
    parser.add_argument("--batches", nargs="+", type=positive_int, default=[1, 8, 32, 128])
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["fp16"])
    parser.add_argument("--impls", nargs="+", choices=("torch", "triton", "torch.compile"), default=None)
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--compile-at", default=None, metavar="MODEL:BATCH:DTYPE",
                        help=f"only time torch.compile at this case (default {COMPILE_AT}; '' for everywhere)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled rows")
    parser.add_argument("--rep-ms", type=positive_float, default=100)
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="do not hold each row's output against the float64 reference (columns agrees, "
                             "tol_ratio, near_ties, disagreement)")
    parser.add_argument("--plans", choices=PLANS, default="random",
                        help="the merges' metrics: random (a B token gathers 3-6 sources at most), or the encoder's "
                             "own (random weights and frames, torch backend: up to 161 sources at ViT-B/16's last "
                             "join, 32 videos)")
    parser.add_argument("--layers", nargs="+", type=non_negative_int, default=None,
                        help="only the merges of these layers")
    parser.add_argument("--out", default=None, help="folder for bench_ops.json / .csv, written at the end")
    add_resume_argument(parser)
    parser.add_argument("--tiles", nargs="+", default=[], metavar="SPEC",
                        help="also time the Triton ops with these tiles (rows 'triton:SPEC'): "
                             "merge:BTxBDxW[-gN|[-sN][-pN][-cN]], norm:BTxW[-sN][-pN][-cN] (-sN: the sources' "
                             "gather pipelined over N stages; -gN: N sources gathered at once; -pN: tokens without "
                             "sources copied first, the others merged N at a time; -cN: a token's sources N a "
                             "step), match:BAxBBxBCxW-P, P one of " + ", ".join(DOT_MODES) + "; or with every plan on "
                             "one path: plan:" + " or plan:".join(PLAN_PATHS))
    add_row_log_arguments(parser)
    args = parser.parse_args(argv)
    device = parsed_device(parser, args.device)
    try:
        for spec in args.tiles:
            parse_tiles(spec)
    except ValueError as e:
        parser.error(str(e))
    merging = sorted({s.layer for m in args.models for b in args.batches for s in merge_shapes(m, b)})
    if args.layers is not None and not set(args.layers) <= set(merging):
        parser.error(f"--layers {' '.join(map(str, args.layers))}: the merges benchmarked are at layers "
                     f"{', '.join(map(str, merging))}")
    impls = args.impls or (["torch", "triton", "torch.compile"] if device.type == "cuda" else ["torch"])
    impls = [*impls, *(f"triton:{spec}" for spec in args.tiles)]
    compile_at = check_compile_at(parser, args, impls)
    check_outputs(parser, args)
    resume = resume_from(parser, args, "bench_ops", ROW_KEYS, CANDIDATE_KEYS)
    env = environment(device)
    log = RowLog(args.jsonl, "bench_ops", env, args.tag)

    def write(rows) -> Optional[str]:
        if args.out:
            write_results(args.out, "bench_ops", env, rows)
            return f"--out {args.out}"
        return None
    try:
        rows = run(device, args.models, args.batches, args.dtypes, impls, args.ops, compile_at,
                   args.rep_ms, log, args.compile_backend, args.check, args.plans, args.layers, resume)
    except BaseException as e:  # (Ctrl-C too: the rows measured are written before it ends the run)
        return keep_rows(e, args.jsonl, lambda: write(log.rows_of()))
    write(rows)
    print(f"# merge ops on {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    print_table([r for r in rows if r["op"] != "copy"],
                ["model", "batch", "layer", "stage", "dtype", "op", "impl", "max_sources", "ms", "device_ms",
                 "host_bound", "gbs", "frac_copy_bw", "frac_sized_copy", "speedup_vs_torch", "speedup_vs_torch_eager",
                 "compiled", "agrees", "tol_ratio", "near_ties", "error", "device_error", "disagreement"])
    return int(any("error" in r or r.get("agrees") is False for r in rows))


if __name__ == "__main__":
    exit_for_good(main())
