"""Indexing and search speed: decode only, encode only and both with 0/2/4 workers; index size; query latency.

    python -m benchmarks.bench_index --out benchmarks/results/cpu                 # CPU defaults
    python -m benchmarks.bench_index --device cuda --videos 256 --batch 32 --workers 0 4 8 --out benchmarks/results/gpu

Pipeline rows (``bench_index_pipeline``): a folder of generated mp4s (``--videos`` clips of ``--seconds`` s,
``--size`` pixels, ``--fps`` frames per second, libx264) decoded as ``tempme index`` does (12 frames at
1 fps, open_clip transform) and encoded by ``--model`` with TempMe (random weights: speed does not depend
on their values).
- decode: the DataLoader alone, every video decoded and transformed, nothing encoded;
- encode: ``model.encode_video`` on ready ``[batch, 12, 3, 224, 224]`` tensors, nothing decoded;
- both: ``tempme_fast.index.build_index`` end to end, shards written.
Videos/s = videos / wall time of the whole pass (worker start-up included).

Query rows (``bench_index_query``): ``--query-sizes`` synthetic unit vectors (``--dim``, clustered around
1,000 centres so that approximate indexes face real neighbourhoods), ``--queries`` single-vector queries for
top-10; latency median and p90 per query, build time, recall@10 against exact search.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from benchmarks.common import check_models, check_outputs, environment, parsed_device, print_table, write_results
from tempme_fast.arguments import non_negative_int, positive_float, positive_int
from tempme_fast.index import IndexSpec, VectorSearch, brute_force, build_index, load_encoder
from tempme_fast.index.build import IndexDataset, collate_items
from tempme_fast.index.store import index_size_bytes
from tempme_fast.index.vectors import default_nlist, faiss_module
from tempme_fast.retrieval.video import VideoProcessor, write_video


def make_videos(folder: str, count: int, seconds: float, size, fps: float) -> list:
    """``count`` moving-noise clips, cached: a file of the same size, length and rate, which its name gives, is
    reused (a clip of other settings is never taken for one of these)."""
    os.makedirs(folder, exist_ok=True)
    width, height = size
    paths = []
    for k in range(count):
        path = os.path.join(folder, f"clip{k:04d}-{width}x{height}-{seconds:g}s-{fps:g}fps.mp4")
        if not os.path.exists(path):
            rng = np.random.default_rng(k)
            base = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            write_video(path, (np.roll(base, 5 * t, axis=1) for t in range(int(seconds * fps))), fps)
        paths.append(path)
    return paths


def pipeline_rows(args, paths, device) -> list:
    spec = IndexSpec(model=args.model)
    model = load_encoder(spec, device=args.device, dtype=args.dtype)
    weight = model.visual.conv1.weight
    processor = VideoProcessor.for_model(model, spec.frames, spec.fps)
    rows = []
    for workers in args.workers:
        loader = torch.utils.data.DataLoader(IndexDataset(paths, processor), batch_size=args.batch,
                                             num_workers=workers, collate_fn=collate_items)
        start = time.perf_counter()
        decode_s = sum(it["decode_s"] for batch in loader for it in batch["items"])
        wall = time.perf_counter() - start
        rows.append({"stage": "decode", "workers": workers, "videos": len(paths), "wall_s": round(wall, 2),
                     "videos_per_s": round(len(paths) / wall, 2),
                     "decode_s_per_video": round(decode_s / len(paths), 3)})
    video = torch.randn(args.batch, spec.frames, 3, 224, 224, device=weight.device, dtype=weight.dtype)
    mask = torch.ones(args.batch, spec.frames, dtype=torch.bool, device=weight.device)
    calls = max(1, len(paths) // args.batch)
    with torch.no_grad():
        model.encode_video(video, mask)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            model.encode_video(video, mask)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    rows.append({"stage": "encode", "workers": "-", "videos": calls * args.batch, "wall_s": round(wall, 2),
                 "videos_per_s": round(calls * args.batch / wall, 2)})
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as out:
            s = build_index(paths, out, spec, model=model, batch_size=args.batch, workers=workers, progress=False)
            emb, man = index_size_bytes(out)
        rows.append({"stage": "both", "workers": workers, "videos": len(paths), "wall_s": round(s["wall_s"], 2),
                     "videos_per_s": round(s["videos_per_s"], 2),
                     "decode_s_per_video": round(s["decode_s"] / len(paths), 3),
                     "encode_s_per_video": round(s["encode_s"] / len(paths), 3),
                     "wait_share": round(s["wait_s"] / s["wall_s"], 2),
                     "index_mb_per_1000": round((emb + man) / len(paths) * 1000 / 2**20, 3),
                     "embeddings_mb_per_1000": round(emb / len(paths) * 1000 / 2**20, 3)})
    return rows


def clustered_unit(n: int, dim: int, seed: int, centres: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):  # in blocks: the temporaries of 1M x 512 at once would double memory
        m = min(100_000, n - start)
        x = centres[rng.integers(0, len(centres), m)] + 0.5 * rng.standard_normal((m, dim), dtype=np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def query_rows(args) -> list:
    rows = []
    centres = np.random.default_rng(0).standard_normal((1000, args.dim), dtype=np.float32)
    for n in args.query_sizes:
        vectors = clustered_unit(n, args.dim, 1, centres)
        queries = clustered_unit(args.queries, args.dim, 2, centres)
        _, exact_ids = brute_force(vectors, queries, 10)
        nlist = args.nlist or default_nlist(n)
        variants = {"exact-numpy": ("exact", "numpy", {"use_faiss": False}),
                    "exact-faiss": ("exact", "faiss", {}),
                    "ivf": ("ivf", "faiss", {"nlist": nlist, "nprobe": args.nprobe,
                                             "train_size": min(n, args.ivf_train_per_list * nlist)}),
                    "hnsw": ("hnsw", "faiss", {})}
        for name in args.variants:
            kind, lib, options = variants[name]
            if lib == "faiss" and faiss_module() is None or kind == "hnsw" and n > args.hnsw_max:
                continue
            start = time.perf_counter()
            search = VectorSearch(vectors, kind, **options)
            build = time.perf_counter() - start
            times, ids = [], []
            for q in queries:
                t0 = time.perf_counter()
                _, got = search.search(q[None], 10)
                times.append(1000 * (time.perf_counter() - t0))
                ids.append(got[0])
            # Out of min(10, n): a collection of fewer than 10 vectors has no more to return.
            recall = np.mean([len(set(a) & set(b)) / min(10, n) for a, b in zip(ids, exact_ids)])
            times.sort()
            rows.append({"vectors": n, "dim": args.dim, "kind": kind, "library": lib,
                         "options": " ".join(f"{k}={v}" for k, v in options.items() if k != "use_faiss"),
                         "build_s": round(build, 2), "query_ms_median": round(statistics.median(times), 3),
                         "query_ms_p90": round(times[int(0.9 * (len(times) - 1))], 3),
                         "recall_at_10": round(float(recall), 3)})
            print(rows[-1], flush=True)
        del vectors
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32-quickgelu")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="default: fp16 on CUDA, fp32 on a CPU")
    p.add_argument("--videos", type=positive_int, default=24)
    p.add_argument("--seconds", type=positive_float, default=12.0)
    p.add_argument("--size", type=positive_int, nargs=2, default=(320, 240), metavar=("W", "H"))
    p.add_argument("--fps", type=positive_float, default=25.0)
    p.add_argument("--batch", type=positive_int, default=4)
    p.add_argument("--workers", type=non_negative_int, nargs="+", default=[0, 2, 4])
    p.add_argument("--video-dir", default=os.path.join(tempfile.gettempdir(), "tempme-bench-videos"))
    p.add_argument("--query-sizes", type=positive_int, nargs="*", default=[10_000, 1_000_000])
    p.add_argument("--dim", type=positive_int, default=512)
    p.add_argument("--queries", type=positive_int, default=50)
    p.add_argument("--nlist", type=positive_int, default=None, help="IVF cells (default about 4 sqrt(N))")
    p.add_argument("--nprobe", type=positive_int, default=16)
    p.add_argument("--ivf-train-per-list", type=positive_int, default=40, help="IVF k-means training vectors per cell")
    p.add_argument("--variants", nargs="+", default=["exact-numpy", "exact-faiss", "ivf", "hnsw"],
                   choices=["exact-numpy", "exact-faiss", "ivf", "hnsw"])
    p.add_argument("--hnsw-max", type=non_negative_int, default=100_000, help="largest collection to build HNSW for")
    p.add_argument("--skip-pipeline", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = parsed_device(p, args.device)
    check_models(p, [args.model], "--model")
    check_outputs(p, args)
    env = environment(device)
    env["load_average"] = os.getloadavg()
    print(env, flush=True)
    if not args.skip_pipeline:
        paths = make_videos(args.video_dir, args.videos, args.seconds, args.size, args.fps)
        rows = pipeline_rows(args, paths, device)
        print_table(rows, list(dict.fromkeys(k for r in rows for k in r)))
        if args.out:
            write_results(args.out, "bench_index_pipeline", dict(env, load_average_end=os.getloadavg()), rows)
    if args.query_sizes:
        rows = query_rows(args)
        print_table(rows, list(rows[0]))
        if args.out:
            write_results(args.out, "bench_index_query", dict(env, load_average_end=os.getloadavg()), rows)


if __name__ == "__main__":
    main()
