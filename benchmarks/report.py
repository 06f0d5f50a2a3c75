"""Markdown tables from a suite run: what each stage did, the headline rows, the tests' outcome.

Reads the output folder of ``benchmarks/suite.py`` or the ``.tar.gz`` archive of one, and prints the
tables BENCHMARKS.md's GPU section is filled from. It invents nothing: a stage cut short shows as such,
and a figure that was not measured is left out.

    python -m benchmarks.report results/gpu-suite.tar.gz
    python -m benchmarks.report /tmp/gpu-suite
"""
from __future__ import annotations

import argparse
import os
import tarfile
import tempfile
from collections import Counter, defaultdict
from typing import Dict, List

from .rowlog import read_records


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def markdown(rows: List[Dict[str, object]], columns: List[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _read(folder: str, name: str) -> List[Dict[str, object]]:
    path = os.path.join(folder, name)
    return read_records(path) if os.path.exists(path) else []


def report(folder: str) -> str:
    out = []
    env_path = os.path.join(folder, "environment.txt")
    if os.path.exists(env_path):
        with open(env_path) as f:
            facts = dict(line.rstrip("\n").split(": ", 1) for line in f if ": " in line)
        card = facts.get("gpu 0", f"none (cuda available: {facts.get('cuda available', '?')})")
        out.append(f"Card: {card}; nvidia-smi: {facts.get('nvidia-smi', '?')}; "
                   f"torch {facts.get('torch', '?').split(' ')[0]}, triton {facts.get('triton', '?').split(' ')[0]}; "
                   f"triton launch: {facts.get('triton launch', '?')}")
    stages = _read(folder, "stages.jsonl")
    if stages:
        out += ["", "Stages:", "", markdown(stages, ["stage", "outcome", "rc", "seconds", "limit_s"])]
    records = _read(folder, "rows.jsonl")
    rows = [r for r in records if "environment" not in r]
    copy = [r for r in rows if r.get("op") == "copy"]
    if copy:
        out += ["", "Copy bandwidth measured in the run: " + ", ".join(f"{r['copy_gbs']:.0f} GB/s ({r['tag']})"
                                                                      for r in copy)]
    ops = [r for r in rows if r.get("bench") == "bench_ops" and r.get("op") != "copy"]
    if ops:
        out += ["", "Merge ops:", "", markdown(ops, ["tag", "model", "batch", "dtype", "layer", "stage", "op", "impl",
                                                     "compiled", "ms", "ms_p20", "ms_p80", "gbs", "frac_copy_bw",
                                                     "speedup_vs_torch"])]
    model = [r for r in rows if r.get("bench") == "bench_model"]
    if model:
        out += ["", "Whole encoder:", "", markdown(model, ["tag", "model", "dtype", "batch", "mode", "variant",
                                                           "compiled", "ms", "videos_per_s", "peak_mib",
                                                           "speedup_vs_open_clip", "flops_bound_speedup"])]
    train = [r for r in rows if r.get("bench") == "bench_train"]
    if train:
        out += ["", "Training step:", "", markdown(train, ["model", "batch", "precision", "mode", "variant",
                                                          "backend", "step_ms", "speedup", "peak_mem_mb",
                                                          "memory_ratio"])]
    tests = [t for t in _read(folder, "tests.jsonl") if "nodeid" in t]
    if tests:
        per_file: Dict[str, Counter] = defaultdict(Counter)
        for t in tests:
            per_file[t["nodeid"].split("::")[0]][t["outcome"]] += 1
        kinds = sorted({k for c in per_file.values() for k in c})
        table = [{"file": f, **c} for f, c in sorted(per_file.items())]
        out += ["", "Tests:", "", markdown(table, ["file"] + kinds)]
        failed = [t for t in tests if t["outcome"] in ("failed", "error")]
        out += [f"- {t['nodeid']}: {t['outcome']}" for t in failed]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="suite output folder or its .tar.gz archive")
    args = parser.parse_args(argv)
    if os.path.isdir(args.source):
        print(report(args.source), end="")
        return 0
    if not tarfile.is_tarfile(args.source):
        parser.error(f"source {args.source}: neither a folder nor a .tar.gz archive")
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(args.source) as tar:
        tar.extractall(tmp, filter="data")
        entries = os.listdir(tmp)
        if len(entries) != 1:
            parser.error(f"source {args.source}: expected one folder in the archive, found {entries}")
        print(report(os.path.join(tmp, entries[0])), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
