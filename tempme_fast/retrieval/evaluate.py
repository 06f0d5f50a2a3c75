"""Evaluate a TempMe-patched CLIP on a retrieval split: encode, compare, rank, and measure the cost.

Every video of the split is encoded once (``model.encode_video``), every caption once
(``model.encode_text``); the similarity is the cosine of the two (both L2-normalised here, since
``encode_video`` returns an un-normalised mean of frame features). Videos that cannot be decoded
are reported with path and reason and left out together with their captions; the result says how
many. Accuracy and cost are reported side by side: GFLOPs per video (from ``tempme_fast.flops``
when it is there) and encoding throughput in videos per second.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError, as_config_error, check_int
from .data import RetrievalSplit, VideoDataset, make_loader, pad_tokens, report_skipped, tokenize
from .metrics import DSL_TEMPERATURE, TIES, check_temperature, retrieval_metrics
from .video import VideoProcessor

log = logging.getLogger(__name__)

DSL_LABEL = ("dual-softmax re-ranking (DSL): uses all test queries jointly, not comparable with the "
             "plain metrics")
METRIC_KEYS = ("R@1", "R@5", "R@10", "MdR", "MnR", "R-Sum")


class NoReadableVideos(RuntimeError):
    """Every video of the split failed to decode (the reasons are logged and in the message)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_device_dtype(model: torch.nn.Module) -> Tuple[torch.device, torch.dtype]:
    weight = model.visual.conv1.weight
    return weight.device, weight.dtype


def _check_model(model: torch.nn.Module) -> None:
    if not callable(getattr(model, "encode_video", None)):
        raise TypeError(f"model ({type(model).__name__}) has no encode_video; patch it with "
                        f"tempme_fast.apply_tempme(model, config) first (TempMeConfig.unmerged(frames) "
                        f"for per-frame CLIP)")


def check_finite_embeddings(embeddings: torch.Tensor, names: Sequence[str], what: str, dtype: torch.dtype) -> None:
    """Refuse a NaN or Inf row of ``embeddings`` (CPU), naming its ``what`` from ``names``: every similarity
    with it would be NaN, so the metrics could not be computed after all the encoding."""
    finite = torch.isfinite(embeddings).all(dim=1)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        raise ConfigError(f"the model made a NaN or Inf embedding for the {what} {names[i]!r} ({int((~finite).sum())} "
                          f"of this batch of {len(finite)}; the model runs in {dtype}, where an overflow is likeliest "
                          f"in float16: try --dtype bf16 or fp32)")


@torch.no_grad()
def encode_videos(model: torch.nn.Module, split: RetrievalSplit, processor: VideoProcessor,
                  batch_size: int = 16, workers: int = 0, progress: bool = True) -> dict:
    """Encode every video of ``split``.

    Returns:
        ``{"video_ids": [V], "embeddings": [V, D] float32 (CPU, L2-normalised), "skipped": [...],
        "encode_s": model time, "encode_s_steady": model time without the first batch,
        "videos_steady": videos in those batches, "wall_s": total time including decoding}``.
    """
    _check_model(model)
    device, dtype = _model_device_dtype(model)
    loader = make_loader(VideoDataset(split, processor), batch_size, workers,
                         pin_memory=device.type == "cuda")
    ids: List[str] = []
    chunks: List[torch.Tensor] = []
    skipped: List[dict] = []
    batch_times: List[Tuple[int, float]] = []
    start = time.perf_counter()
    with tqdm(total=len(loader.dataset), unit="video", desc="encode videos", disable=not progress) as bar:
        for batch in loader:
            skipped.extend(batch["skipped"])
            count = len(batch["video_id"])
            if count:
                video = batch["video"].to(device, dtype, non_blocking=True)
                mask = batch["mask"].to(device, non_blocking=True)
                _sync(device)
                t0 = time.perf_counter()
                emb = model.encode_video(video, mask)
                _sync(device)
                batch_times.append((count, time.perf_counter() - t0))
                chunks.append(F.normalize(emb.float(), dim=-1).cpu())
                check_finite_embeddings(chunks[-1], batch["video_id"], "video", dtype)
                ids.extend(batch["video_id"])
            bar.update(count + len(batch["skipped"]))
            if batch["skipped"]:
                bar.set_postfix(skipped=len(skipped))
    wall = time.perf_counter() - start
    report_skipped(skipped, log)
    steady = batch_times[1:] if len(batch_times) > 1 else batch_times
    return {"video_ids": ids,
            "embeddings": torch.cat(chunks) if chunks else torch.zeros(0, 0),
            "skipped": skipped,
            "encode_s": sum(t for _, t in batch_times),
            "encode_s_steady": sum(t for _, t in steady),
            "videos_steady": sum(n for n, _ in steady),
            "wall_s": wall}


def check_context_length(model: torch.nn.Module, context_length: int) -> None:
    """Refuse text of ``context_length`` tokens that the text tower has no positions for (before the
    videos are encoded, not after)."""
    positions = getattr(model, "context_length", None)
    if positions is not None and context_length > positions:
        raise ConfigError(f"context_length={context_length} (--context-length) exceeds the text tower's "
                          f"{positions} positions; give at most {positions}")


def check_tokens(model: torch.nn.Module, tokens: torch.Tensor, tokenizer: Callable) -> None:
    """Refuse token ids from ``tokenizer`` that the text tower has no embedding for, which would be an
    ``IndexError`` on the CPU and a device-side assert on a GPU: the model's config and its tokenizer
    do not match. ``tokens`` are on the CPU (no synchronisation)."""
    size = getattr(getattr(model, "token_embedding", None), "num_embeddings", None)
    if size is None or tokens.numel() == 0:
        return
    top = int(tokens.max())
    if top >= size:
        raise ConfigError(f"the tokenizer ({type(tokenizer).__name__}) makes token ids up to {top}, but the text "
                          f"tower's vocabulary has {size} (model.token_embedding): the model's config and its "
                          f"tokenizer do not match (open_clip picks the tokenizer by the model's name, and a JSON "
                          f"model config's text_cfg.hf_tokenizer_name when it gives one)")


def check_tokenizer(model: torch.nn.Module, tokenizer: Callable, context_length: int) -> None:
    """:func:`check_tokens` on the tokens of an empty text (its start and end tokens, which are CLIP's
    largest ids), before any video is encoded; with :func:`check_context_length`."""
    check_context_length(model, context_length)
    check_tokens(model, tokenize(tokenizer, [""], context_length), tokenizer)


def _simple_tokenizer() -> type:
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer


@torch.no_grad()
def encode_texts(model: torch.nn.Module, texts: Sequence[str], tokenizer: Callable, context_length: int = 32,
                 batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """``[N, D]`` float32 L2-normalised caption embeddings (CPU), ``context_length`` tokens each."""
    device, _ = _model_device_dtype(model)
    check_context_length(model, context_length)
    model_length = getattr(model, "context_length", None)
    causal = getattr(model, "attn_mask", None) is not None
    out, cut = [], []
    counts = isinstance(tokenizer, _simple_tokenizer())  # (CLIP's BPE, which pads with 0; others not counted)
    for start in tqdm(range(0, len(texts), batch_size), unit="batch", desc="encode captions",
                      disable=not progress):
        batch = texts[start:start + batch_size]
        if counts:  # tokenised again 4x as long: a text of more than context_length tokens has more ids than 0s
            whole = (tokenize(tokenizer, batch, 4 * context_length) != 0).sum(dim=1)
            cut += [(text, int(n)) for text, n in zip(batch, whole) if n > context_length]
        tokens = tokenize(tokenizer, batch, context_length)
        check_tokens(model, tokens, tokenizer)
        if causal and model_length is not None:
            tokens = pad_tokens(tokens, model_length)
        emb = model.encode_text(tokens.to(device))
        out.append(F.normalize(emb.float(), dim=-1).cpu())
        check_finite_embeddings(out[-1], batch, "text", emb.dtype)
    if cut:
        more = (f"; the text tower takes up to {model_length} (context_length)" if model_length and
                model_length > context_length else "")
        text, n = cut[0]
        log.warning("%s longer than %d tokens, and only the first %d are read (%s tokens: %r)%s",
                    "the text is" if len(texts) == 1 else f"{len(cut)} of {len(texts)} texts are", context_length,
                    context_length, n if n < 4 * context_length else f"{n}+", text[:80], more)
    return torch.cat(out)


def video_gflops(model: torch.nn.Module) -> Tuple[Optional[float], str]:
    """``(GFLOPs per video, how it was obtained)``; ``(None, why not)`` when it cannot be computed."""
    if getattr(model, "tempme", None) is None:
        return None, "model is not patched by tempme_fast.apply_tempme"
    try:
        from .. import flops
    except ImportError as exc:
        return None, f"tempme_fast.flops not importable ({exc})"
    for name in ("model_flops", "video_flops"):
        fn = getattr(flops, name, None)
        if fn is None:
            continue
        try:
            report = fn(model)
        except Exception as exc:  # the cost column must not sink an evaluation that already ran
            log.warning("GFLOPs not reported: tempme_fast.flops.%s failed: %s", name, exc)
            return None, f"tempme_fast.flops.{name} failed: {type(exc).__name__}: {exc}"
        value = getattr(report, "gflops", None)
        if value is None:
            total = getattr(report, "total", report)
            value = float(total) / 1e9
        return float(value), f"tempme_fast.flops.{name} (analytic, 1 multiply-add = 2 FLOPs)"
    return None, "tempme_fast.flops has no model_flops/video_flops"


def check_every_video_described(split: RetrievalSplit) -> None:
    """Refuse a split with a video that no caption names, before any video is encoded: video-to-text retrieval
    has no right answer for it (a ConfigError naming the video)."""
    described = {c.video_id for c in split.captions}
    bare = [vid for vid in split.videos if vid not in described]
    if bare:
        raise ConfigError(f"{len(bare)} video(s) of {split.name} have no caption, e.g. {bare[0]!r} "
                          f"({split.videos[bare[0]]}); give each video at least one caption or leave it out")


def evaluate_retrieval(model: torch.nn.Module, split: RetrievalSplit, processor: VideoProcessor,
                       tokenizer: Callable, *, context_length: int = 32, batch_size: int = 16,
                       text_batch_size: int = 256, workers: int = 0, dsl: bool = False,
                       dsl_temperature: float = DSL_TEMPERATURE, ties: str = "pessimistic",
                       progress: bool = True) -> dict:
    """Encode ``split``, compute the similarity matrix, the metrics and the cost. JSON-ready dict.

    Raises:
        NoReadableVideos: when no video of the split could be read (the reasons are logged).
    """
    _check_model(model)
    check_context_length(model, context_length)
    check_int("text_batch_size", text_batch_size)
    config = getattr(getattr(model, "tempme", None), "config", None)
    if config is not None and processor.frames != config.frames:  # else the first batch fails, after decoding
        raise ConfigError(f"the processor samples {processor.frames} frames a video, the model's TempMeConfig takes "
                          f"frames={config.frames}; build both with the same frames")
    if ties not in TIES:
        raise ConfigError(f"ties={ties!r} is not one of {TIES}")
    if dsl:
        with as_config_error(""):
            check_temperature(dsl_temperature, "dsl_temperature")
    check_every_video_described(split)
    check_tokenizer(model, tokenizer, context_length)
    was_training = model.training
    model.eval()
    try:
        videos = encode_videos(model, split, processor, batch_size, workers, progress)
        if not videos["video_ids"]:
            reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in videos["skipped"][:3])
            raise NoReadableVideos(f"none of the {len(split.videos)} videos of {split.name} could be read "
                               f"({reasons})")
        column = {vid: i for i, vid in enumerate(videos["video_ids"])}
        captions = [c for c in split.captions if c.video_id in column]
        t0 = time.perf_counter()
        texts = encode_texts(model, [c.text for c in captions], tokenizer, context_length, text_batch_size,
                             progress)
        text_s = time.perf_counter() - t0
    finally:
        model.train(was_training)

    sim = texts @ videos["embeddings"].T
    text_to_video = np.array([column[c.video_id] for c in captions], dtype=np.int64)
    metrics = retrieval_metrics(sim, text_to_video, ties=ties, dsl=dsl, dsl_temperature=dsl_temperature)
    gflops, gflops_source = video_gflops(model)
    device, dtype = _model_device_dtype(model)
    settings = getattr(model, "tempme", None)
    n_videos = len(videos["video_ids"])
    result = {
        "dataset": {
            "name": split.name, "source": split.source,
            "videos": len(split.videos), "captions": len(split.captions),
            "videos_evaluated": n_videos, "captions_evaluated": len(captions),
            "skipped": len(videos["skipped"]),
            "skipped_videos": [{k: s[k] for k in ("video_id", "path", "reason")} for s in videos["skipped"]],
        },
        "metrics": {"t2v": metrics["t2v"], "v2t": metrics["v2t"]},
        "cost": {
            "gflops_per_video": gflops, "gflops_source": gflops_source,
            "videos_per_s": (videos["videos_steady"] / videos["encode_s_steady"]
                             if videos["encode_s_steady"] > 0 else None),
            "end_to_end_videos_per_s": n_videos / videos["wall_s"] if videos["wall_s"] > 0 else None,
            "encode_video_s": videos["encode_s"], "encode_text_s": text_s, "wall_s": videos["wall_s"],
            "device": str(device), "dtype": str(dtype).replace("torch.", ""), "batch_size": batch_size,
            "throughput_note": "videos_per_s times model.encode_video only, without the first batch "
                               "(warm-up); end_to_end_videos_per_s includes decoding",
        },
        "settings": {
            "frames": processor.frames, "fps": processor.fps, "context_length": context_length,
            "ties": ties, "similarity": "cosine",
            "tempme": None if settings is None else {
                "config": {k: (list(v) if isinstance(v, tuple) else v)
                           for k, v in dataclasses.asdict(settings.config).items()},
                "backend": settings.backend,
                "output_tokens_per_video": settings.schedule.output_tokens,
            },
        },
    }
    if dsl:
        result["dsl"] = {"label": DSL_LABEL, "temperature": dsl_temperature,
                         "t2v": metrics["dsl_t2v"], "v2t": metrics["dsl_v2t"]}
    return result


def _row(name: str, m: Dict[str, float]) -> str:
    return (f"{name:<26}" + "".join(f"{m[k]:>8.1f}" for k in ("R@1", "R@5", "R@10", "MdR"))
            + f"{m['MnR']:>8.1f}{m['R-Sum']:>9.1f}")


def format_results(result: dict) -> str:
    """The metrics and the cost as a plain-text table."""
    d, c = result["dataset"], result["cost"]
    lines = [f"{d['name']}: {d['videos_evaluated']} videos, {d['captions_evaluated']} captions "
             f"({d['skipped']} unreadable video(s) skipped)",
             f"{'':<26}" + "".join(f"{k:>8}" for k in METRIC_KEYS[:5]) + f"{'R-Sum':>9}",
             _row("text-to-video", result["metrics"]["t2v"]),
             _row("video-to-text", result["metrics"]["v2t"])]
    if "dsl" in result:
        lines += [_row("text-to-video (DSL)", result["dsl"]["t2v"]),
                  _row("video-to-text (DSL)", result["dsl"]["v2t"]),
                  f"DSL = {result['dsl']['label']}"]
    gflops = "n/a" if c["gflops_per_video"] is None else f"{c['gflops_per_video']:.2f}"
    speed = "n/a" if c["videos_per_s"] is None else f"{c['videos_per_s']:.1f}"
    e2e = "n/a" if c["end_to_end_videos_per_s"] is None else f"{c['end_to_end_videos_per_s']:.1f}"
    lines.append(f"cost: {gflops} GFLOPs/video | {speed} videos/s encoding ({e2e} videos/s with decoding) "
                 f"| {c['device']} {c['dtype']}, batch {c['batch_size']}")
    return "\n".join(lines)
