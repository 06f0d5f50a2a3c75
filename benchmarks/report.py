"""Markdown tables from suite runs: what each stage did, the measured rows, where the time goes, the tests.

Reads one or more output folders of ``benchmarks/suite.py`` (or ``.tar.gz`` archives of them: one measurement's
calls, each with its own folder) and prints the tables BENCHMARKS.md's GPU section is filled from. Op and
attention rows show the eager time (``ms``, host included) beside the device time (``device_ms``, from
CUDA graph replays) where the run measured it. It invents nothing: a stage cut short shows as such, and
a figure that was not measured is a dash.

    python -m benchmarks.report results/gpu-suite.tar.gz
    python -m benchmarks.report benchmarks/results/gpu-h200 benchmarks/results/gpu-h200/run2 --markdown
"""
from __future__ import annotations

import argparse
import os
import sys
import tarfile
import tempfile
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .rowlog import read_records

OPS_COLUMNS = ["run", "tag", "model", "batch", "dtype", "layer", "stage", "plans", "max_sources", "op", "impl",
               "compiled", "agrees", "ms", "device_ms", "host_bound", "gbs", "frac_copy_bw", "frac_sized_copy",
               "speedup_vs_torch", "speedup_vs_torch_eager"]
ATTENTION_COLUMNS = ["run", "model", "batch", "layer", "rows", "tokens", "dtype", "mode", "impl", "agrees", "ms",
                     "device_ms", "host_bound", "speedup_vs_mask", "speedup_vs_mask_eager"]
MODEL_COLUMNS = ["run", "tag", "model", "dtype", "batch", "mode", "variant", "compiled", "agrees", "ms", "enqueue_ms",
                 "videos_per_s", "peak_mib", "speedup_vs_open_clip", "flops_bound_speedup"]
LAYER_COLUMNS = ["run", "model", "dtype", "batch", "variant", "layer", "ms", "device_ms", "host_bound"]
LAST_BLOCK_COLUMNS = ["run", "model", "dtype", "batch", "layer", "full_ms", "trimmed_ms", "speedup"]
WARM_COLUMNS = ["run", "arch", "jobs", "variants", "compiled", "cache_hits", "failed", "seconds", "compile_s", "stubs"]
TRAIN_COLUMNS = ["run", "model", "batch", "precision", "mode", "variant", "backend", "agrees", "step_ms", "speedup",
                 "peak_mem_mb", "memory_ratio"]
# Those of the fields that name a row of any benchmark which the rows that lost the CUDA context have.
LOST_COLUMNS = ["run", "tag", "bench", "model", "batch", "dtype", "precision", "layer", "stage", "op", "mode", "impl",
                "variant", "backend", "error"]
CASE_KEYS = ("model", "batch", "dtype", "variant")
KERNELS_PER_CASE = 8


@dataclass
class Run:
    """What one suite output folder holds."""

    name: str
    facts: Dict[str, str] = field(default_factory=dict)
    stages: List[Dict[str, object]] = field(default_factory=list)
    rows: List[Dict[str, object]] = field(default_factory=list)
    tests: List[Dict[str, object]] = field(default_factory=list)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def markdown(rows: Sequence[Dict[str, object]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _read(folder: str, name: str) -> List[Dict[str, object]]:
    path = os.path.join(folder, name)
    return read_records(path) if os.path.exists(path) else []


def load(folder: str, name: str) -> Run:
    """The run in ``folder``, labelled ``name`` in every row."""
    run = Run(name)
    env_path = os.path.join(folder, "environment.txt")
    if os.path.exists(env_path):
        with open(env_path) as f:
            run.facts = dict(line.rstrip("\n").split(": ", 1) for line in f if ": " in line)
    run.stages = [{"run": name, **s} for s in _read(folder, "stages.jsonl")]
    run.rows = [{"run": name, **r} for r in _read(folder, "rows.jsonl") if "environment" not in r]
    if run.facts.get("gpu 0"):
        run.rows = [_eager_speedups_relabelled(r) for r in run.rows]
    run.tests = [t for t in _read(folder, "tests.jsonl") if "nodeid" in t]
    return run


def _eager_speedups_relabelled(row: Dict[str, object]) -> Dict[str, object]:
    """A GPU row written before device times were measured: its speed-up came from eager times, so it
    belongs in the ``_eager`` column, and the device speed-up is unknown."""
    for name in ("speedup_vs_torch", "speedup_vs_mask"):
        if name in row and f"{name}_eager" not in row and "device_ms" not in row:
            row = {**row, name: None, f"{name}_eager": row[name]}
    return row


# A profiled case: mode "train" (forward and backward) or "infer" (rows from before the mode: None).
PROFILE_KEYS = ("run", *CASE_KEYS, "mode")


def profile_table(rows: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """One row per profiled case (model, batch, dtype, variant, mode): its forward summary, and each group's
    milliseconds per forward as a column ``<group> ms``."""
    table: Dict[tuple, Dict[str, object]] = {}
    for r in rows:
        entry = table.setdefault(tuple(r.get(k) for k in PROFILE_KEYS), {k: r.get(k) for k in PROFILE_KEYS})
        if r.get("kind") == "forward":
            entry.update({k: r[k] for k in ("wall_ms", "kernel_ms", "host_ms", "launches", "error") if k in r})
        elif r.get("kind") == "group":
            entry[f"{r['group']} ms"] = r["us"] / 1e3
    return list(table.values())


def profile_columns(table: Sequence[Dict[str, object]]) -> List[str]:
    groups = list(dict.fromkeys(k for r in table for k in r if k.endswith(" ms")))
    return [*PROFILE_KEYS, "wall_ms", "kernel_ms", "host_ms", "launches", *groups]


# The sweeps: per benchmark, the keys of one shape, the column a sweep's candidates are summed over with
# the shape's keys left out (an op, a pass), and the columns each candidate carries into the read-out.
SWEEP_KEYS = ("run", "tag", "model", "batch", "dtype", "layer", "stage", "plans", "max_sources", "op")
ATTENTION_SWEEP_KEYS = ("run", "tag", "model", "batch", "dtype", "layer", "mode")
SWEEPS = {"bench_ops": (SWEEP_KEYS, "op", ("frac_copy_bw", "frac_sized_copy")),
          "attention": (ATTENTION_SWEEP_KEYS, "mode", ())}


def _basis(row: Dict[str, object]) -> Optional[str]:
    """The field a row's speed-ups are computed from, as ``benchmarks.devicetime.basis_ms`` chooses it: its device
    time where it has one; its wall time where none was taken (a CPU, or a run before device timing); None where
    its device timing failed (``device_error``): its eager time against another row's device time would count
    the host's time on one side only."""
    if row.get("device_ms"):
        return "device_ms"
    return None if "device_ms" in row or "device_error" in row or not row.get("ms") else "ms"


def sweep_tables(rows: Sequence[Dict[str, object]], bench: str = "bench_ops"
                 ) -> Tuple[List[Dict[str, object]], List[Dict[str, object]]]:
    """What the tile sweeps of ``bench`` say: ``bench_ops --tiles`` or ``bench_attention --fwd-tiles``
    (rows ``triton:SPEC`` beside the library's ``triton``). Per shape, the library's time and the fastest
    candidate that agrees with the float64 reference (a row without the check counts as agreeing; one
    that disagrees never wins); and per sweep, each candidate's summed time over the shapes where it and
    the library both ran, against the library's sum over the same shapes (a candidate that disagrees
    anywhere is marked so). Attention shapes also carry ``nobias_ms``: SDPA without a bias at that
    shape, the time that proportional attention adds to. Times are device times where the rows have them, wall
    times where none were taken (:func:`_basis`); a row whose device timing failed is left out."""
    keys, over, extra = SWEEPS[bench]
    groups: Dict[tuple, List[Dict[str, object]]] = defaultdict(list)
    floors: Dict[tuple, object] = {}
    for r in rows:
        if r.get("bench") != bench:
            continue
        key = tuple(r.get(k) for k in keys)
        if str(r.get("impl", "")).startswith("triton") and _basis(r):
            groups[key].append(r)
        elif r.get("impl") == "sdpa-nobias" and _basis(r):
            floors[key] = r
    per_shape, totals = [], {}
    summed_keys = ("run", "tag", "dtype", over)
    for key, group in groups.items():
        library = next((r for r in group if r["impl"] == "triton"), None)
        if library is None:
            continue
        basis = _basis(library)
        # Only candidates timed as the library was: a device time is never set against an eager one.
        candidates = [r for r in group if r["impl"] != "triton" and _basis(r) == basis]
        if not candidates:
            continue
        good = [r for r in candidates if r.get("agrees") is not False]
        best = min(good, key=lambda r: r[basis]) if good else None
        shape = dict(zip(keys, key))
        entry = dict(shape, library_ms=library[basis], **{f"library_{c}": library.get(c) for c in extra})
        if bench == "attention":
            floor = floors.get(key)
            entry["nobias_ms"] = floor[basis] if floor and _basis(floor) == basis else None
        if best is not None:
            entry.update(best=best["impl"].split(":", 1)[1], best_ms=best[basis],
                         **{f"best_{c}": best.get(c) for c in extra}, speedup=library[basis] / best[basis])
        per_shape.append(entry)
        for r in candidates:
            total = totals.setdefault(tuple(shape[k] for k in summed_keys) + (r["impl"],),
                                      {**{k: shape[k] for k in summed_keys},
                                       "candidate": r["impl"].split(":", 1)[1], "shapes": 0, "candidate_ms": 0.0,
                                       "library_ms": 0.0, "agrees": True})
            total["shapes"] += 1
            total["candidate_ms"] += r[basis]
            total["library_ms"] += library[basis]
            total["agrees"] = total["agrees"] and r.get("agrees") is not False
    summed = sorted(totals.values(), key=lambda t: (t["run"], t["tag"] or "", t[over],
                                                    t["candidate_ms"] / t["library_ms"]))
    for t in summed:
        t["speedup"] = t["library_ms"] / t["candidate_ms"]
    return per_shape, summed


PLANS_COLUMNS = ["run", "model", "batch", "dtype", "op", "candidate", "shapes", "random_speedup", "encoder_speedup",
                 "worst_speedup", "agrees"]


def plans_table(rows: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """Each ``bench_ops --tiles`` candidate timed on random plans and on the encoder's (``--plans encoder``), over
    the shapes it ran at on both: the library's summed time over the candidate's, against the library's rows of
    the same sweep, on each kind of plan, and the worse of the two (a tile to adopt should lose on neither),
    fastest first; ``agrees``: at every one of those rows. Times as in :func:`sweep_tables`."""
    sweeps: Dict[tuple, Dict[str, Dict[str, object]]] = defaultdict(dict)  # one shape of one sweep -> impl -> row
    for r in rows:
        if r.get("bench") == "bench_ops" and str(r.get("impl", "")).startswith("triton") and _basis(r):
            key = tuple(r.get(k) for k in ("run", "tag", "model", "batch", "dtype", "op", "layer", "stage"))
            sweeps[key][r["impl"]] = r
    # (run, model, batch, dtype, op, candidate) -> (layer, stage) -> plans -> (library ms, candidate ms, agrees)
    pairs: Dict[tuple, Dict[tuple, Dict[str, tuple]]] = defaultdict(lambda: defaultdict(dict))
    for (run, _, model, batch, dtype, op, layer, stage), impls in sweeps.items():
        library = impls.get("triton")
        basis = library and _basis(library)
        for impl, r in impls.items():
            if basis and impl != "triton" and _basis(r) == basis:  # (never a device time over an eager one)
                pairs[(run, model, batch, dtype, op, impl.split(":", 1)[1])][(layer, stage)][
                    r.get("plans", "random")] = (library[basis], r[basis], r.get("agrees") is not False)
    table = []
    for (run, model, batch, dtype, op, candidate), shapes in pairs.items():
        both = [by for by in shapes.values() if {"random", "encoder"} <= set(by)]
        if not both:
            continue
        speedups = {plans: sum(by[plans][0] for by in both) / sum(by[plans][1] for by in both)
                    for plans in ("random", "encoder")}
        table.append({"run": run, "model": model, "batch": batch, "dtype": dtype, "op": op, "candidate": candidate,
                      "shapes": len(both), "random_speedup": speedups["random"],
                      "encoder_speedup": speedups["encoder"], "worst_speedup": min(speedups.values()),
                      "agrees": all(v[2] for by in both for v in by.values())})
    return sorted(table, key=lambda t: (t["run"], t["model"], t["batch"], t["op"], -t["worst_speedup"]))


SCALING_KEYS = ("run", "model", "dtype", "layer", "stage", "op", "impl")  # one shape of one op, batches apart
SCALING_COLUMNS = [*SCALING_KEYS, "batches", "mb", "device_us", "frac_copy_bw", "fixed_us", "marginal_gbs",
                   "frac_copy_marginal"]


def scaling_table(rows: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """Each op row of the library's Triton kernels (``bench_ops``, ``triton``, eager, on random plans) timed on the
    GPU at two or more batch sizes, read as a fixed cost and a rate per byte: the line through its two largest batches,
    ``device_us = fixed_us + bytes / marginal_gbs``. A row at 0.5 of the copy bandwidth whose marginal rate is
    near the copy's loses its time to what it pays once (its start, its last partial wave); one whose marginal
    rate is itself near 0.5 loses it to every byte. Shapes whose time did not grow with their bytes are left
    out (no rate to read). Between the two batches the op's tiles may differ (they are chosen per shape)."""
    shapes: Dict[tuple, Dict[object, Dict[str, object]]] = defaultdict(dict)
    for r in rows:
        if (r.get("bench") == "bench_ops" and r.get("impl") == "triton" and not r.get("compiled")
                and r.get("plans", "random") == "random" and r.get("device_ms") and r.get("bytes")
                and r.get("copy_gbs") and r.get("agrees") is not False):
            key = tuple(r.get(k) for k in SCALING_KEYS)
            shapes[key][r.get("batch")] = r
    table = []
    for key, by_batch in shapes.items():
        if len(by_batch) < 2:
            continue
        small, large = (by_batch[b] for b in sorted(by_batch)[-2:])
        extra_s = (large["device_ms"] - small["device_ms"]) * 1e-3
        extra_bytes = large["bytes"] - small["bytes"]
        if extra_s <= 0 or extra_bytes <= 0:
            continue
        marginal = extra_bytes / extra_s / 1e9
        table.append({**dict(zip(SCALING_KEYS, key)),
                      "batches": f"{small['batch']},{large['batch']}", "mb": large["bytes"] / 1e6,
                      "device_us": large["device_ms"] * 1e3, "frac_copy_bw": large.get("frac_copy_bw"),
                      "fixed_us": (large["device_ms"] * 1e-3 - large["bytes"] / (marginal * 1e9)) * 1e6,
                      "marginal_gbs": marginal, "frac_copy_marginal": marginal / large["copy_gbs"]})
    return sorted(table, key=lambda t: tuple(str(t[k]) for k in ("run", "model", "dtype", "op", "impl"))
                  + (t["layer"] if isinstance(t["layer"], int) else -1, str(t["stage"])))


# The GPU targets (BENCHMARKS.md, "Targets after the second run"): the merge step against the PyTorch reference
# and the merge forward against the copy bandwidth at ViT-B/16, fp16, 32 videos; the encoder against its FLOPs
# bound at 16 videos; the graph-replayed encoder against graph-replayed open_clip at one video.
TARGET_SHAPE = {"model": "ViT-B-16", "batch": 32, "dtype": "fp16"}
TARGET_STEP_SPEEDUP = 5.0
TARGET_MERGE_COPY = 0.60
TARGET_BOUND_SHARE = 0.9
TARGET_COLUMNS = ["target", "model", "measured", "needed", "status", "where"]


def _status(measured, needed: float) -> str:
    return "not measured" if measured is None else ("met" if measured >= needed else "missed")


def _weakest(rows: Sequence[Dict[str, object]], value, detail=lambda r: "") -> Tuple[Optional[float], str]:
    """The smallest ``value(row)`` over ``rows`` and where it is (layer and stage, then ``detail(row)``), or
    (None, "")."""
    scored = [(value(r), r) for r in rows if value(r) is not None]
    if not scored:
        return None, ""
    v, r = min(scored, key=lambda t: t[0])
    return v, f"L{r.get('layer')} {r.get('stage')} ({len(scored)} shapes){detail(r)}"


def _copy_share(row: Dict[str, object]) -> Optional[float]:
    return row.get("frac_copy_bw")


def _sized_copy_share(row: Dict[str, object]) -> str:
    """A merge row's share of a copy of its own bytes, where it was measured, to follow where the row is."""
    share = row.get("frac_sized_copy")
    return "" if share is None else f"; {share:.2f} of a copy of as many bytes"


def targets_table(rows: Sequence[Dict[str, object]]) -> List[Dict[str, object]]:
    """What ``rows`` say of each GPU target: the measured figure (the weakest shape's), what is needed, and
    met / missed / not measured. The merge forward is read twice: at the library's tiles, and at the
    fastest agreeing tile-sweep candidate of each shape (what adopting the sweep's winners would give). The
    one-video target pairs times within one run, dtype and stage, and reads the best such pair."""
    # (On random metrics, as the targets were set: rows before bench_ops --plans have no "plans".)
    at = [r for r in rows if r.get("bench") == "bench_ops" and all(r.get(k) == v for k, v in TARGET_SHAPE.items())
          and r.get("plans", "random") == "random"]
    steps = [r for r in at if r.get("op") == "step_fwd" and r.get("impl") == "triton"]
    step, step_at = _weakest(steps, lambda r: r.get("speedup_vs_torch"))
    merges = [r for r in at if r.get("op") == "merge_fwd" and r.get("impl") == "triton"]
    merge, merge_at = _weakest(merges, _copy_share, _sized_copy_share)
    swept: Dict[tuple, Dict[str, object]] = {}
    for r in at:
        if r.get("op") == "merge_fwd" and str(r.get("impl", "")).startswith("triton") \
                and r.get("agrees") is not False and r.get("frac_copy_bw") is not None:
            key = (r.get("run"), r.get("layer"), r.get("stage"))
            if key not in swept or r["frac_copy_bw"] > swept[key]["frac_copy_bw"]:
                swept[key] = r
    best, best_at = _weakest(list(swept.values()), _copy_share, _sized_copy_share)
    table = [
        {"target": "merge step vs reference, every layer (32 videos, fp16)", "model": TARGET_SHAPE["model"],
         "measured": step, "needed": TARGET_STEP_SPEEDUP, "where": step_at},
        {"target": "merge forward, share of copy bandwidth (library tiles)", "model": TARGET_SHAPE["model"],
         "measured": merge, "needed": TARGET_MERGE_COPY, "where": merge_at},
        {"target": "merge forward, share of copy bandwidth (best agreeing tiles per shape)",
         "model": TARGET_SHAPE["model"], "measured": best, "needed": TARGET_MERGE_COPY, "where": best_at}]
    model_rows = [r for r in rows if r.get("bench") == "bench_model" and r.get("mode") == "infer" and r.get("ms")]
    for name in sorted({r.get("model") for r in model_rows}):
        mine = [r for r in model_rows if r.get("model") == name]
        sixteen = [r for r in mine if r.get("batch") == 16 and str(r.get("variant", "")).startswith("tempme-triton")
                   and r.get("speedup_vs_open_clip") and r.get("flops_bound_speedup")]
        fastest = max(sixteen, key=lambda r: r["speedup_vs_open_clip"], default=None)
        table.append({"target": "encoder at 16 videos, share of the FLOPs bound", "model": name,
                      "measured": fastest and fastest["speedup_vs_open_clip"] / fastest["flops_bound_speedup"],
                      "needed": TARGET_BOUND_SHARE, "where": fastest and (
                          f"{fastest['variant']}: {fastest['speedup_vs_open_clip']:.2f}x of "
                          f"{fastest['flops_bound_speedup']:.2f}x")})
        # Both times of a ratio from one run, dtype and stage: across runs it would compare two cards or builds.
        ones: Dict[tuple, Dict[str, float]] = defaultdict(dict)
        for r in mine:
            if r.get("batch") == 1:
                ones[(r.get("run"), r.get("dtype"), r.get("tag"))][r.get("variant")] = r["ms"]
        paired = []
        for (run, dtype, _), one in ones.items():
            graphed = {v: ms for v, ms in one.items() if v.startswith("tempme-triton") and v.endswith("+graph")}
            variant = min(graphed, key=graphed.get, default=None)
            if variant and "open_clip+graph" in one:
                paired.append((one["open_clip+graph"] / graphed[variant],
                               f"{run}, {dtype}: {variant} {graphed[variant]:.3g} ms, "
                               f"open_clip+graph {one['open_clip+graph']:.3g} ms"))
        measured, where = max(paired, key=lambda p: p[0], default=(None, None))
        table.append({"target": "one video, graph-replayed: open_clip+graph ms over TempMe's", "model": name,
                      "measured": measured, "needed": 1.0, "where": where})
    for entry in table:
        entry["status"] = _status(entry["measured"], entry["needed"])
    return table


def _tests_table(runs: Sequence[Run]):
    """Per file, the count of each outcome; a test run in several calls counts once, by its last outcome."""
    last: Dict[str, str] = {}
    for run in runs:
        for t in run.tests:
            last[t["nodeid"]] = t["outcome"]
    per_file: Dict[str, Counter] = defaultdict(Counter)
    for nodeid, outcome in last.items():
        per_file[nodeid.split("::")[0]][outcome] += 1
    kinds = sorted({k for c in per_file.values() for k in c})
    table = [{"file": f, **c} for f, c in sorted(per_file.items())]
    failed = [f"- {n}: {o}" for n, o in last.items() if o in ("failed", "error")]
    return table, ["file"] + kinds, failed


def report(runs: Sequence[Run], as_markdown: bool = False, tags: Optional[Sequence[str]] = None) -> str:
    """The tables of ``runs``; with ``as_markdown``, headed and explained for BENCHMARKS.md's GPU section.
    ``tags`` keeps only the rows of those suite stages (rows without a tag stay: attention's, in runs
    before its stages were tagged)."""
    out: List[str] = []

    def section(title: str, note: str, body: str) -> None:
        out.extend(["", f"### {title}" if as_markdown else f"{title}:"] + ([note] if as_markdown and note else [])
                   + ["", body])

    cards = []
    for run in runs:
        facts = run.facts
        if facts:
            card = facts.get("gpu 0", f"none (cuda available: {facts.get('cuda available', '?')})")
            cards.append(card)
            torch_version, triton_version = (facts.get(k, "?").split(" ")[0] for k in ("torch", "triton"))
            out.append(f"{run.name}: Card: {card}; nvidia-smi: {facts.get('nvidia-smi', '?')}; "
                       f"torch {torch_version}, triton {triton_version}; "
                       f"triton launch: {facts.get('triton launch', '?')}"
                       + "".join(f"; {k}: {facts[k]}" for k in ("cached launch", "context probe") if k in facts))
    if as_markdown:
        out.insert(0, f"## GPU results: {cards[0] if cards else 'card not recorded'}\n")
    stages = [s for run in runs for s in run.stages]
    if stages:
        section("Stages", "Each call's stages: `timeout` was cut off at its limit (its rows are kept), "
                "`skipped` found no time left; `restarts` (where a stage has some): processes started again with "
                "`--resume` after one lost the CUDA context; `triton_cache_new`: entries the stage added to Triton's "
                "cache (kernel variants it compiled, launcher stubs it built).",
                markdown(stages, ["run", "stage", "outcome", "rc", "seconds", "limit_s",
                                  *(["restarts"] if any("restarts" in s for s in stages) else []),
                                  "triton_cache_new"]))
    rows = [r for run in runs for r in run.rows if not tags or r.get("tag") in (None, "", *tags)]
    warmed = [r for r in rows if r.get("bench") == "warm"]
    if warmed:
        section("Kernels compiled ahead (`benchmarks.warm`)", "", markdown(warmed, WARM_COLUMNS))
    copy = [r for r in rows if r.get("op") == "copy"]
    if copy:
        out += ["", "Copy bandwidth measured in the run: " + ", ".join(
            f"{r['copy_gbs']:.0f} GB/s ({r['run']}, {r['tag']})" for r in copy)]
    device_note = ("`ms`: as called, host included (events around each eager call); `device_ms`: the GPU's "
                   "own time, replayed from a CUDA graph over inputs that exceed L2; `host_bound`: eager time "
                   "over 1.5x device time. Speed-ups come from `device_ms`, the `_eager` ones from `ms`; bandwidth "
                   "from `device_ms` where the row has one, else (runs before device timing) from `ms`; a dash: "
                   "not measured in that run.")
    ops = [r for r in rows if r.get("bench") == "bench_ops" and r.get("op") != "copy"]
    if ops:
        section("Merge ops", device_note, markdown(ops, OPS_COLUMNS))
    scaling = scaling_table(ops)
    if scaling:
        section("Merge ops across batch sizes: a fixed cost and a rate per byte", "Per shape, the line through "
                "the device times of its two largest batches (`batches`): `fixed_us` is what the op pays once, "
                "`marginal_gbs` what each further byte costs, `frac_copy_marginal` that rate over the run's copy "
                "bandwidth; `mb`, `device_us` and `frac_copy_bw` are the larger batch's.",
                markdown(scaling, SCALING_COLUMNS))
    attention = [r for r in rows if r.get("bench") == "attention"]
    if attention:
        section("Proportional attention", device_note, markdown(attention, ATTENTION_COLUMNS))
    model = [r for r in rows if r.get("bench") == "bench_model"]
    for bench, what in (("bench_ops", "bench_ops --tiles"), ("attention", "bench_attention --fwd-tiles")):
        per_shape, summed = sweep_tables(rows, bench)
        if not per_shape:
            continue
        keys, over, extra = SWEEPS[bench]
        floor = ["nobias_ms"] if bench == "attention" else []
        section(f"Tile sweeps ({what}): the fastest candidate per shape", f"`{what}` rows against the library's "
                "tiles (`triton`), device time where measured (a row whose device timing failed is left out); "
                "only candidates that agree with the float64 reference may win."
                + (" `nobias_ms`: SDPA without a bias at the same shape." if floor else ""),
                markdown(per_shape, [*keys, "library_ms", "best", "best_ms", "speedup", *floor,
                                     *(f"{w}_{c}" for c in extra for w in ("library", "best"))]))
        section(f"Tile sweeps ({what}): each candidate over all its shapes", "Summed time over the shapes where "
                "the candidate and the library both ran, fastest first; `agrees`: at every one of them.",
                markdown(summed, ["run", "tag", "dtype", over, "candidate", "shapes", "library_ms", "candidate_ms",
                                  "speedup", "agrees"]))
    both_plans = plans_table(rows)
    if both_plans:
        section("Tile sweeps on random plans and on the encoder's", "Each candidate over the shapes it ran at "
                "with random metrics and with the encoder's (`bench_ops --plans encoder`): the library's summed time "
                "over the candidate's on each, and the worse of the two, fastest first.",
                markdown(both_plans, PLANS_COLUMNS))
    train = [r for r in rows if r.get("bench") == "bench_train"]
    wrong = [r for r in ops + attention + model + train if r.get("agrees") is False]
    if wrong:
        section("Rows that do not agree with their reference",
                "Their times are of a wrong result (`benchmarks/oracle.py`): `disagreement` says what failed first.",
                markdown(wrong, ["run", "tag", "model", "batch", "dtype", "precision", "layer", "op", "mode", "impl",
                                 "variant", "backend", "disagreement"]))
    lost = [r for r in rows if r.get("context_lost")]  # every benchmark's: benchmarks.context
    if lost:
        section("Rows that lost the CUDA context", "After each of these rows the process could run nothing more on "
                "the GPU (a kernel faulted); its stage went on in a new process without that candidate "
                "(`benchmarks.context`).",
                markdown(lost, [c for c in LOST_COLUMNS if any(c in r for r in lost)]))
    if model:
        section("Whole encoder", "`+graph` variants are replayed from a CUDA graph: the device time of the "
                "whole forward.", markdown(model, MODEL_COLUMNS))
    if ops or model:
        section("GPU targets", "Each target's weakest shape in these rows; `not measured`: no row for it.",
                markdown(targets_table(rows), TARGET_COLUMNS))
    layers = [r for r in rows if r.get("bench") == "bench_layers"]
    if layers:
        section("Time per layer", "`ms`: synchronised after each block (host included); `device_ms`: the block "
                "replayed from a CUDA graph on the inputs a real forward gives it.", markdown(layers, LAYER_COLUMNS))
    last = [r for r in rows if r.get("bench") == "bench_last_block"]
    if last:
        section("Last block, in full and trimmed to its class tokens", "`full_ms`: every token through the block "
                "(as the released code); `trimmed_ms`: the class tokens alone (the default); eager calls, host "
                "included.", markdown(last, LAST_BLOCK_COLUMNS))
    if train:
        section("Training step", "", markdown(train, TRAIN_COLUMNS))
    profiled = [r for r in rows if r.get("bench") == "profile"]
    if profiled:
        table = profile_table(profiled)
        section("Where the forward's time goes", "`wall_ms`: one synchronised forward; `kernel_ms`: the sum of "
                "its kernels' device time (torch.profiler); `host_ms`: their difference, the time the GPU waits "
                "for the host; group columns: kernel ms per forward.", markdown(table, profile_columns(table)))
        top = []
        for case in table:
            kernels = [r for r in profiled if r.get("kind") == "kernel"
                       and all(r.get(k) == case.get(k) for k in PROFILE_KEYS)]
            top += sorted(kernels, key=lambda r: -r["us"])[:KERNELS_PER_CASE]
        if top:
            section("Costliest kernels per forward", "", markdown(top, [*PROFILE_KEYS, "name", "group", "calls", "us"]))
    if any(run.tests for run in runs):
        table, columns, failed = _tests_table(runs)
        section("Tests", "Per file, each test counted once, by its last outcome over the calls.",
                "\n".join([markdown(table, columns)] + failed))
    return "\n".join(out).lstrip("\n") + "\n"


def extract(archive: str, target: str) -> None:
    """Unpack ``archive`` into ``target``. One cut off (a copy that stopped early) gives the files before the
    cut, the last of them maybe short, and a note on stderr: a row log's cut-off last line is skipped."""
    extracted = 0
    with tarfile.open(archive) as tar:
        try:
            for member in tar:
                tar.extract(member, target, filter="data")
                extracted += 1
        except (EOFError, tarfile.ReadError, zlib.error) as err:
            print(f"report: {archive} is cut off after {extracted} entries ({err}); the tables show what it holds",
                  file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", help="suite output folders or their .tar.gz archives (one per call)")
    parser.add_argument("--markdown", action="store_true", help="headed, explained tables for BENCHMARKS.md")
    parser.add_argument("--tags", nargs="+", default=None, metavar="TAG",
                        help="only the rows of these suite stages' tags (e.g. headline profile)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for i, source in enumerate(args.sources):
            folder = source
            if not os.path.isdir(source):
                if not os.path.exists(source) or not tarfile.is_tarfile(source):
                    parser.error(f"source {source}: neither a folder nor a .tar.gz archive")
                target = os.path.join(tmp, str(i))
                extract(source, target)
                entries = os.listdir(target) if os.path.isdir(target) else []
                if len(entries) != 1:
                    parser.error(f"source {source}: expected one folder in the archive, found {entries}")
                folder = os.path.join(target, entries[0])
            name = os.path.basename(os.path.normpath(folder))
            if any(run.name == name for run in runs):  # two calls' folders of one name stay apart
                name = f"{name}#{i + 1}"
            runs.append(load(folder, name))
        print(report(runs, args.markdown, args.tags), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
