"""Build or grow a video index: decode in DataLoader workers, encode with TempMe, write shards.

    from tempme_fast.index import IndexSpec, build_index
    summary = build_index("my_videos/", "my_index", IndexSpec(pretrained="openai"), workers=4)

Decoding is :class:`tempme_fast.retrieval.video.VideoProcessor` (12 frames at 1 fps, as ``tempme
eval``), run in worker processes; encoding is ``model.encode_video`` in the main process. The
progress bar shows videos/s and where the time goes: seconds of decoding per video (worker time),
seconds of encoding per video, and the share of wall time the main process waited for decoded
videos, which is near 0 when the encoder limits the rate and large when decoding does.
"""
from __future__ import annotations

import logging
import os
import time
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..errors import ConfigError, check_int
from ..retrieval.cli import model_tokenizer
from ..retrieval.evaluate import check_tokenizer
from ..retrieval.video import VideoDecodeError, VideoProcessor
from . import store
from .sources import launch_rank, list_videos, rank_share, unique_videos
from .spec import IndexSpec, embed_dim, load_encoder

log = logging.getLogger(__name__)


def probe_duration(path: str) -> Optional[float]:
    """Length of the first video stream in seconds from the container header (None when unknown)."""
    import av

    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            if container.duration is not None:
                return container.duration / av.time_base
    except Exception:  # the duration is informative only; decoding already judged the file
        return None
    return None


class IndexDataset(Dataset):
    """Item ``i``: ``{"path", "video" [T, 3, H, W], "mask" [T], "duration", "decode_s"}`` or
    ``{"path", "error", "decode_s"}`` for a file that cannot be decoded (never raised in a worker)."""

    def __init__(self, paths: Sequence[str], processor: VideoProcessor):
        self.paths = list(paths)
        self.processor = processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        path = self.paths[i]
        start = time.perf_counter()
        size, mtime_ns = store.file_state(path)  # (before decoding: a file replaced meanwhile is encoded again)
        item = {"path": path, "size": size, "mtime_ns": mtime_ns}
        try:
            item["video"], item["mask"] = self.processor(path)
            item["duration"] = probe_duration(path)
        except VideoDecodeError as exc:
            item["error"] = exc.reason
        except Exception as exc:  # whatever else a broken file makes FFmpeg or PIL raise
            item["error"] = f"{type(exc).__name__}: {exc}"
        item["decode_s"] = time.perf_counter() - start
        return item


def collate_items(items: List[dict]) -> dict:
    """``{"items": [...] in order, "video": [B_ok, T, 3, H, W], "mask": [B_ok, T]}`` (no tensors when B_ok = 0)."""
    good = [it for it in items if "error" not in it]
    batch = {"items": [{k: v for k, v in it.items() if k not in ("video", "mask")} for it in items]}
    if good:
        batch["video"] = torch.stack([it["video"] for it in good])
        batch["mask"] = torch.stack([it["mask"] for it in good])
    return batch


def _record(item: dict, indexed_at: float) -> dict:
    state = {"size": item["size"], "mtime_ns": item["mtime_ns"], "indexed_at": indexed_at}
    if "error" in item:
        return {"path": item["path"], "status": "error", "reason": item["error"], "duration": None, "frames": 0,
                **state}
    frames = int(item["frames"])
    return {"path": item["path"], "status": "ok", "reason": None, "duration": item["duration"], "frames": frames,
            **state}


class _Timer:
    """Running totals for the progress bar and the summary."""

    def __init__(self):
        self.decode = self.encode = self.wait = 0.0
        self.done = 0
        self.start = time.perf_counter()

    def postfix(self) -> dict:
        n = max(self.done, 1)
        wall = max(time.perf_counter() - self.start, 1e-9)
        return {"decode": f"{self.decode / n:.2f}s/v", "encode": f"{self.encode / n:.2f}s/v",
                "wait": f"{100 * self.wait / wall:.0f}%"}


@torch.no_grad()
def build_index(videos, out: str, spec: Optional[IndexSpec] = None, *, model: Optional[torch.nn.Module] = None,
                resume: bool = False, batch_size: int = 8, workers: int = 4, shard_size: int = 1000,
                rank: Optional[int] = None, world_size: Optional[int] = None, backend: str = "auto",
                device: str = "auto", dtype: Optional[str] = None, progress: bool = True) -> dict:
    """Encode ``videos`` into the index at ``out`` (created, or grown with ``resume=True``).

    Args:
        videos: a folder, a list file (see :func:`tempme_fast.index.sources.list_videos`) or a
            sequence of paths.
        out: the index folder.
        spec: the encoder; default ``IndexSpec()`` (ViT-B-32-quickgelu, random weights, released
            schedule). With an existing index, it must match the index's own.
        model: an already built model for ``spec`` (else built with :func:`load_encoder`).
        resume: continue or grow an existing index, encoding only videos it does not record yet, or whose
            files changed since (their newest record is the one searched).
        rank, world_size: this process's share (default: from ``torchrun``'s variables).
        backend, device, dtype: where and how to encode (not part of the index's identity).

    Returns:
        a summary dict: ``indexed``, ``failed``, ``already`` (recorded before), ``changed`` (recorded before
        and encoded again: their files changed since), ``gone`` (recorded, their files no longer exist),
        ``share``, ``total``,
        ``wall_s``, ``decode_s``, ``encode_s``, ``wait_s``, ``videos_per_s``, ``shards`` (written).
    """
    check_int("batch_size", batch_size)
    check_int("workers", workers, 0)
    check_int("shard_size", shard_size)  # here, before a folder is made or a model loaded
    spec = (spec or IndexSpec()).resolved()
    env_rank, env_world, local_rank = launch_rank()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    paths = list_videos(videos) if isinstance(videos, (str, os.PathLike)) else unique_videos(videos)
    if not paths:
        raise ConfigError("videos: the list is empty")
    share = rank_share(paths, rank, world_size)

    store.prepare_dir(out)
    with store.writing(out, rank):  # one writer per rank: another would number its shards as this one does
        # Only this rank's own shards count here: the other processes of the same launch may already have
        # committed theirs, and there is no collective to agree on "before".
        existing = store.manifests(out, rank)
        if existing and not resume:
            raise ConfigError(f"--out {out} already holds an index ({len(existing)} shard(s) of process {rank}); "
                             f"pass --resume (resume=True) to continue it or add videos, or choose another folder")
        if os.path.isfile(os.path.join(out, store.HEADER)):
            store.write_header(out, spec, store.read_header(out)["embed_dim"])  # refuses another encoder early
        store.remove_stale_temporaries(out)
        # Each file by its real path: one reached through a link, or spelt another way, is the same video.
        recorded = {os.path.realpath(p): r for p, r in store.newest_records(out).items()}
        real = {p: os.path.realpath(p) for p in share}
        changed = [p for p in share if real[p] in recorded and store.changed_since(recorded[real[p]], p)]
        todo = [p for p in share if real[p] not in recorded] + changed
        gone = sorted(p for p, r in recorded.items() if r["status"] == "ok" and store.file_state(p)[0] is None)
        if changed:
            log.warning("%d indexed video(s) changed since (size or modification time), e.g. %s: encoded again",
                        len(changed), changed[0])
        if gone:
            log.warning("%d indexed video(s) no longer exist, e.g. %s: search still returns them (build a new "
                        "index to leave them out)", len(gone), gone[0])

        if model is None:
            if device == "auto" and world_size > 1 and torch.cuda.is_available():
                device = f"cuda:{local_rank % torch.cuda.device_count()}"  # one GPU per process
            model = load_encoder(spec, backend=backend, device=device, dtype=dtype)
        check_tokenizer(model, model_tokenizer(spec.model), spec.context_length)  # else no text query could be encoded
        store.write_header(out, spec, embed_dim(model))
        weight = model.visual.conv1.weight
        processor = VideoProcessor.for_model(model, spec.frames, spec.fps)
        writer = store.ShardWriter(out, rank, shard_size)
        loader = DataLoader(IndexDataset(todo, processor), batch_size=batch_size, num_workers=workers,
                            collate_fn=collate_items, pin_memory=weight.device.type == "cuda")
        timer = _Timer()
        failed = 0
        desc = "index" if world_size == 1 else f"index rank {rank}/{world_size}"
        with tqdm(total=len(todo), unit="video", desc=desc, disable=not progress or rank != 0) as bar:
            batches = iter(loader)
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                timer.wait += time.perf_counter() - t0
                if batch is None:
                    break
                items = batch["items"]
                vectors = None
                if "video" in batch:
                    t0 = time.perf_counter()
                    emb = model.encode_video(batch["video"].to(weight.device, weight.dtype, non_blocking=True),
                                             batch["mask"].to(weight.device, non_blocking=True))
                    vectors = F.normalize(emb.float(), dim=-1).cpu().numpy()
                    timer.encode += time.perf_counter() - t0
                    frames = batch["mask"].sum(dim=1).tolist()
                    finite = np.isfinite(vectors).all(axis=1)  # a NaN row would be searched as if it were one
                    for it, n, ok in zip([it for it in items if "error" not in it], frames, finite):
                        it["frames"] = n
                        if not ok:
                            it["error"] = (f"the encoder made a NaN or Inf embedding ({weight.dtype}; an overflow "
                                           f"is likeliest in float16: try --dtype bf16 or fp32)")
                    vectors = vectors[finite] if finite.any() else None
                timer.decode += sum(it["decode_s"] for it in items)
                failed += sum("error" in it for it in items)
                writer.add([_record(it, time.time()) for it in items], vectors)
                timer.done += len(items)
                bar.update(len(items))
                bar.set_postfix(timer.postfix(), refresh=False)
        writer.flush()
    wall = time.perf_counter() - timer.start
    summary = {"indexed": len(todo) - failed, "failed": failed, "already": len(share) - len(todo),
               "changed": len(changed), "gone": len(gone),
               "share": len(share), "total": len(paths), "rank": rank, "world_size": world_size,
               "wall_s": wall, "decode_s": timer.decode, "encode_s": timer.encode, "wait_s": timer.wait,
               "videos_per_s": len(todo) / wall if wall > 0 and todo else None, "shards": writer.written}
    if failed:
        log.warning("%d video(s) could not be read; their reasons are in the manifests of %s", failed, out)
    return summary
