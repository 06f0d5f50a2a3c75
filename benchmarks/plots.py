"""PNG plots from the benchmark results: speed-up vs batch, time per layer, tokens per layer.

    python -m benchmarks.plots bench-out      # reads bench-out/rows.jsonl or bench-out/*.json, writes PNGs there
    python -m benchmarks.plots suite-out --to suite-out/plots
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

from tempme_fast import TempMeConfig, token_schedule

from .common import VIT_GEOMETRY, read_records

ROWS_FILE = "rows.jsonl"  # what the suite writes: every benchmark's rows, appended as measured


def _load(folder, name):
    """(environment, rows) of benchmark ``name``: from ``rows.jsonl`` if the folder has one, else ``<name>.json``."""
    lines = os.path.join(folder, ROWS_FILE)
    if os.path.exists(lines):
        records = read_records(lines)
        rows = [r for r in records if r.get("bench") == name and "environment" not in r]
        # Per-layer rows come from bench_model's process: its environment line labels them too.
        envs = [r["environment"] for r in records if "environment" in r]
        own = [r["environment"] for r in records if "environment" in r and r.get("bench") == name]
        return (own or envs or [None])[0], rows
    path = os.path.join(folder, f"{name}.json")
    if not os.path.exists(path):
        return None, []
    with open(path) as f:
        record = json.load(f)
    return record["environment"], record["rows"]


def _label(env):
    if not env:
        return ""
    return f"{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date'][:10]}"


def plot_all(folder: str, to: str = None) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    to = to or folder
    os.makedirs(to, exist_ok=True)

    def save(fig, name):
        path = os.path.join(to, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # Tokens per layer, straight from the schedule.
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for model, (depth, tokens, _, _) in VIT_GEOMETRY.items():
        s = token_schedule(TempMeConfig(), depth, tokens)
        per_video = [s.frames * tokens] + [p.clips_out * p.tokens_out for p in s.layers]
        ax.plot(range(-1, depth), per_video, marker="o", label=f"{model} TempMe")
        ax.axhline(s.frames * tokens, linestyle=":", color=ax.lines[-1].get_color())
    ax.set(xlabel="layer (-1: input)", ylabel="tokens per video", yscale="log",
           title="Tokens per video after each layer (12 frames; dotted: unmerged)")
    ax.legend()
    save(fig, "tokens_per_layer.png")

    def speedup_vs_batch(curves, env, ylabel, title, name):
        """One line per key of ``curves`` ({label: {batch: speed-up}}), log batch axis."""
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, points in sorted(curves.items()):
            xs = sorted(points)
            ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
        ax.set(xscale="log", xlabel="videos per batch", ylabel=ylabel, title=title)
        ax.axhline(1, color="grey", linewidth=0.8)
        ax.legend(fontsize=7, ncol=2 if len(curves) > 6 else 1)
        fig.text(0.01, 0.01, _label(env), fontsize=6)
        save(fig, name)

    env, rows = _load(folder, "bench_ops")
    curves = defaultdict(dict)
    # Rows with a device time give the device speed-up; older rows only the one as called (host included).
    basis = "device time" if any("device_ms" in r for r in rows) else "as called"
    for r in rows:
        if r["op"] == "step_fwd" and r["impl"] == "triton" and r["dtype"] == "fp16" and r.get("speedup_vs_torch"):
            curves[f"{r['model']} {r['stage']}{r['layer']}"][r["batch"]] = r["speedup_vs_torch"]
    if curves:  # Triton rows exist only from a GPU run
        speedup_vs_batch(curves, env, f"speed-up over PyTorch reference ({basis})",
                         "Merge step (match + merge), Triton, fp16", "speedup_ops_vs_batch.png")

    env, rows = _load(folder, "bench_model")
    curves = defaultdict(dict)
    for r in rows:
        if r["mode"] == "infer" and r["variant"] != "open_clip" and r.get("speedup_vs_open_clip"):
            curves[f"{r['model']} {r['variant']}"][r["batch"]] = r["speedup_vs_open_clip"]
    if curves:
        speedup_vs_batch(curves, env, "throughput / unmerged open_clip", "Video encoding, inference, 12 frames",
                         "speedup_model_vs_batch.png")

    env, rows = _load(folder, "bench_layers")
    if rows:
        models = sorted({(r["model"], r["batch"], r["dtype"]) for r in rows})
        fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 3.5), squeeze=False)
        for ax, (model, batch, dtype) in zip(axes[0], models):
            for variant in ("unmerged", "tempme"):
                pts = [r for r in rows if (r["model"], r["batch"], r["dtype"], r["variant"]) == (model, batch, dtype, variant)]
                ax.plot([str(r["layer"]) for r in pts], [r["ms"] for r in pts], marker="o", label=variant)
            ax.set(xlabel="layer", ylabel="ms", title=f"{model}, {batch} videos, {dtype}: time per layer")
            ax.legend()
        fig.text(0.01, 0.01, _label(env), fontsize=6)
        save(fig, "time_per_layer.png")
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--to", default=None, help="folder for the PNGs (default: the input folder)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.folder):
        parser.error(f"folder {args.folder}: no such folder (a benchmark output folder with rows.jsonl)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return 0
    for path in plot_all(args.folder, args.to):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
