"""Decode a video file into the frames a CLIP video encoder sees: PyAV decoding, frame sampling, padding.

How frames are chosen (the CLIP4Clip / DRL / TempMe recipe, ``frames=12, fps=1.0``):

1. Every frame's presentation time is read from the container (demuxing only, no decoding) and
   measured from the first frame: ``t_0 = 0 <= t_1 <= ...``.
2. **1 fps sampling**: for ``k = 0, 1, 2, ...`` while ``k / fps <= t_last``, take the first frame
   with ``t >= k / fps`` (duplicates dropped when the source has fewer frames per second than
   ``fps``). A clip of 3.0 s gives 3 frames (at 0, 1, 2 s); 20.0 s gives 20.
3. **Uniform fallback**: when step 2 gives more than ``frames`` candidates, keep the candidates at
   positions ``floor(linspace(0, n - 1, frames))``, first and last included (CLIP4Clip's
   ``slice_framepos=2``). A 20 s clip keeps the frames at 0, 1, 3, 5, 6, 8, 10, 12, 13, 15, 17 and
   19 s. With ``fps=None`` (or when the file carries no timestamps) step 2 is skipped and the same
   rule picks ``frames`` frames among all decoded frames.
4. **Padding**: a video with fewer than ``frames`` chosen frames is padded with all-zero frames at
   the end and its mask marks only the real frames valid (``mask [T]``, ``True`` = real frame).

For a constant integer frame rate, step 2 takes frame indices ``0, fps, 2*fps, ...``, which are the
frames CLIP4Clip's OpenCV reader seeks to; at 29.97 fps this uses the true timestamps where the
OpenCV reader rounds the rate down to 29 and drifts.

Corrupt and unreadable files raise :class:`VideoDecodeError` with the path and the reason, so a
data loader can report and skip them (see :mod:`tempme_fast.retrieval.data`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

DEFAULT_FRAMES = 12
DEFAULT_FPS = 1.0
# A timestamp within this many seconds below a sampling instant counts as at it (rounding in pts).
_TIME_EPS = 1e-3


class VideoDecodeError(RuntimeError):
    """A video file could not be turned into frames: missing, not a video, corrupt or truncated."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):
        # Raised in DataLoader workers and pickled back to the main process.
        return type(self), (self.path, self.reason)


def _check_sampling(frames: int, fps: Optional[float]) -> None:
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames={frames!r} must be a positive int (12 in the TempMe recipe)")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float))
                            or not math.isfinite(fps) or fps <= 0):
        raise ValueError(f"fps={fps!r} must be a positive number of frames per second, or None for "
                         f"uniform sampling over the whole video")


def uniform_indices(count: int, frames: int) -> List[int]:
    """``frames`` positions among ``count`` items, spread evenly, first and last included.

    Returns all of ``range(count)`` when ``count <= frames``.
    """
    if count <= frames:
        return list(range(count))
    return [int(i) for i in np.linspace(0, count - 1, num=frames).astype(np.int64)]


def sample_frame_indices(times: Sequence[float], frames: int = DEFAULT_FRAMES,
                         fps: Optional[float] = DEFAULT_FPS) -> List[int]:
    """Indices into ``times`` of the frames to keep, in increasing order (the module docstring's rule).

    Args:
        times: presentation time of every frame in seconds, in presentation order (any origin:
            times are measured from the first one).
        frames: at most this many indices are returned.
        fps: sampling rate in frames per second; ``None`` samples uniformly over all frames.
    """
    _check_sampling(frames, fps)
    count = len(times)
    if count == 0:
        return []
    if fps is None:
        return uniform_indices(count, frames)
    t = np.asarray(times, dtype=np.float64)
    if not np.all(np.isfinite(t)):
        raise ValueError("times must all be finite seconds")
    if np.any(np.diff(t) < 0):
        raise ValueError("times must be in presentation (non-decreasing) order")
    t = t - t[0]
    steps = int(math.floor(t[-1] * fps + _TIME_EPS * fps)) + 1
    instants = np.arange(steps, dtype=np.float64) / fps - _TIME_EPS
    candidates = np.searchsorted(t, instants, side="left")
    candidates = sorted(set(int(i) for i in candidates if i < count))
    return [candidates[i] for i in uniform_indices(len(candidates), frames)]


def _ffmpeg_reason(exc) -> str:
    """FFmpeg's own words for ``exc`` ("Invalid data found when processing input"), without PyAV's
    ``[Errno N]`` prefix and the path that the caller's message already names."""
    return getattr(exc, "strerror", None) or str(exc)


def _frame_seconds(pts: Sequence[int], time_base) -> List[float]:
    return [float(p * time_base) for p in pts]


def read_frames(path: str, frames: int = DEFAULT_FRAMES, fps: Optional[float] = DEFAULT_FPS):
    """Decode the sampled frames of ``path`` as RGB ``PIL.Image`` objects, in time order.

    Raises:
        VideoDecodeError: the file is missing, has no video stream or no frames, cannot be parsed,
            fails to decode before every chosen frame is out, or holds fewer packets than its own
            index lists (a truncated file).
    """
    import av  # PyAV bundles FFmpeg; imported here so the package imports without it.

    _check_sampling(frames, fps)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoDecodeError(path, "file not found")
    if os.path.isdir(path):
        raise VideoDecodeError(path, "is a directory, not a video file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "file is empty (0 bytes)")
    try:
        container = av.open(path)
    except av.FFmpegError as exc:
        raise VideoDecodeError(path, f"cannot open: {_ffmpeg_reason(exc)}") from None
    with container:
        if not container.streams.video:
            raise VideoDecodeError(path, "no video stream in the file")
        stream = container.streams.video[0]
        try:
            pts = [p.pts for p in container.demux(stream) if p.pts is not None and p.size > 0]
        except av.FFmpegError as exc:
            raise VideoDecodeError(path, f"cannot read packets: {_ffmpeg_reason(exc)}") from None
        if not pts:
            raise VideoDecodeError(path, "no video frames in the file")
        listed = stream.frames or 0
        if listed > len(pts):
            raise VideoDecodeError(path, f"truncated: the container index lists {listed} frames but only "
                                         f"{len(pts)} could be read")
        pts.sort()
        if stream.time_base is None or len(set(pts)) != len(pts):
            # No usable timestamps: decode order is all we know, so sample uniformly over it.
            wanted = set(uniform_indices(len(pts), frames))
            by_pts = None
        else:
            chosen = sample_frame_indices(_frame_seconds(pts, stream.time_base), frames, fps)
            wanted = set(chosen)
            by_pts = {pts[i]: i for i in chosen}
        picked = {}
        stream.thread_type = "AUTO"
        try:
            container.seek(0, stream=stream)
            for index, frame in enumerate(container.decode(stream)):
                key = index if by_pts is None or frame.pts is None else by_pts.get(frame.pts)
                if key is not None and key in wanted and key not in picked:
                    picked[key] = frame.to_image()
                    if len(picked) == len(wanted):
                        break
        except av.FFmpegError as exc:
            raise VideoDecodeError(path, f"decoding failed after {len(picked)} of {len(wanted)} sampled "
                                         f"frames: {_ffmpeg_reason(exc)}") from None
        if len(picked) < len(wanted):
            raise VideoDecodeError(path, f"decoded only {len(picked)} of {len(wanted)} sampled frames "
                                         f"(corrupt or truncated stream)")
    return [picked[i].convert("RGB") for i in sorted(picked)]


def write_video(path: str, frames: Iterable[np.ndarray], fps: float, codec: str = "libx264",
                options: Optional[dict] = None) -> str:
    """Encode RGB frames (each ``[H, W, 3]`` uint8, even H and W) into a video file with PyAV.

    For synthetic data and test fixtures. ``options`` go to the muxer (e.g.
    ``{"movflags": "faststart"}`` puts the MP4 index before the data).
    """
    import av
    from fractions import Fraction

    iterator = iter(frames)
    first = next(iterator, None)
    if first is None:
        raise ValueError("frames is empty; a video needs at least one frame")
    first = np.asarray(first)
    if first.ndim != 3 or first.shape[2] != 3 or first.dtype != np.uint8:
        raise ValueError(f"frames must be [H, W, 3] uint8 arrays, got {first.shape} {first.dtype}")
    height, width = first.shape[:2]
    if height % 2 or width % 2:
        raise ValueError(f"frame size {width}x{height} must be even in both dimensions (yuv420p)")
    with av.open(os.fspath(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for packet in stream.encode(av.VideoFrame.from_ndarray(first, format="rgb24")):
            container.mux(packet)
        for image in iterator:
            image = np.asarray(image)
            if image.shape != first.shape or image.dtype != np.uint8:
                raise ValueError(f"every frame must be {first.shape} uint8 like the first, got "
                                 f"{image.shape} {image.dtype}")
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return os.fspath(path)


def clip_transform(model: torch.nn.Module) -> Callable:
    """open_clip's evaluation transform (resize, center crop, normalise) for ``model``'s image tower.

    Uses the preprocessing config open_clip attached to the model (size, mean, std, interpolation,
    resize mode); a model built directly from ``open_clip.CLIP(...)`` gets its image size and the
    OpenAI mean and std.
    """
    import open_clip
    from open_clip.model import get_model_preprocess_cfg

    cfg = dict(get_model_preprocess_cfg(model))
    size = cfg.get("size") or getattr(model.visual, "image_size", None)
    if size is None:
        raise ValueError("model has no image size (model.visual.image_size); pass an open_clip CLIP model")
    return open_clip.image_transform(size, is_train=False, mean=cfg.get("mean"), std=cfg.get("std"),
                                     resize_mode=cfg.get("resize_mode"),
                                     interpolation=cfg.get("interpolation"),
                                     fill_color=cfg.get("fill_color", 0))


@dataclass(frozen=True)
class VideoProcessor:
    """Path -> ``(video [T, 3, H, W] float32, mask [T] bool)``: read, sample, transform, pad.

    ``transform`` maps one RGB ``PIL.Image`` to a ``[3, H, W]`` tensor (build it with
    :func:`clip_transform`). Picklable, so DataLoader workers can use it.
    """

    transform: Callable
    frames: int = DEFAULT_FRAMES
    fps: Optional[float] = DEFAULT_FPS

    def __post_init__(self):
        _check_sampling(self.frames, self.fps)
        if not callable(self.transform):
            raise TypeError(f"transform must be callable (PIL.Image -> [3, H, W] tensor), got "
                            f"{type(self.transform).__name__}")

    @classmethod
    def for_model(cls, model: torch.nn.Module, frames: int = DEFAULT_FRAMES,
                  fps: Optional[float] = DEFAULT_FPS) -> "VideoProcessor":
        return cls(clip_transform(model), frames, fps)

    def __call__(self, path: str) -> Tuple[torch.Tensor, torch.Tensor]:
        images = read_frames(path, self.frames, self.fps)
        tensors = [self.transform(image) for image in images]
        video = torch.zeros((self.frames, *tensors[0].shape), dtype=torch.float32)
        video[:len(tensors)] = torch.stack(tensors)
        mask = torch.zeros(self.frames, dtype=torch.bool)
        mask[:len(tensors)] = True
        return video, mask
