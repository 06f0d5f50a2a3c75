"""``tempme visualize``: draw a video's frames with every final token's region coloured.

Each final token of the encoder gets one colour, the same in every frame, so a token that
gathered patches of several frames (a ClipMe merge) shows up as one colour spread over those
frames. Thin dark lines separate patches held by different tokens. By default only tokens that
hold two or more patches are filled; ``--all-tokens`` fills the single-patch ones too.

Drawing uses Pillow (installed with open_clip's torchvision); nothing else is needed.
"""
from __future__ import annotations

import argparse
import colorsys
import os
import re
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from .errors import ConfigError, as_config_error

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")

__all__ = ["IMAGE_SUFFIXES", "add_visualize_arguments", "draw_merges", "load_frames", "run_visualize",
           "token_colours", "visualize"]


# ---------------------------------------------------------------------------------------------
# Frames in
# ---------------------------------------------------------------------------------------------

def _natural_key(path: Path):
    # frame_2.png before frame_10.png
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def load_frames(path: str, frames: int, fps: Optional[float] = 1.0) -> List["PIL.Image.Image"]:  # noqa: F821
    """The RGB frames the encoder will see, at most ``frames`` of them, in time order.

    ``path`` is a video file (decoded and sampled by :mod:`tempme_fast.retrieval.video`: ``fps``
    frames per second, then uniformly down to ``frames``; ``fps=None`` samples uniformly over the
    whole video) or a folder of images (``IMAGE_SUFFIXES``, in natural name order, sampled
    uniformly down to ``frames``).
    """
    from PIL import Image

    from .retrieval.video import VideoDecodeError, read_frames, uniform_indices

    p = Path(path)
    if p.is_dir():
        files = sorted((f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()),
                       key=_natural_key)
        if not files:
            raise ValueError(f"{path}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        images = []
        for i in uniform_indices(len(files), frames):
            try:
                with Image.open(files[i]) as image:
                    images.append(image.convert("RGB"))
            except OSError as exc:
                raise ValueError(f"{files[i]}: not a readable image ({exc})") from None
        return images
    if not p.exists():
        raise ValueError(f"{path}: no such video file or frame folder")
    try:
        return read_frames(str(p), frames, fps)
    except VideoDecodeError as exc:
        raise ValueError(str(exc)) from None


def _preprocess(model: torch.nn.Module, images: Sequence, frames: int):
    """``(video [1, T, 3, H, W], mask [1, T], shown [n, H, W, 3] uint8)``: what the model sees.

    ``shown`` is the transformed frames turned back into pixels (resize, crop, de-normalise), so
    the patch grid drawn over them is the one the model used.
    """
    from open_clip.model import get_model_preprocess_cfg

    from .retrieval.video import clip_transform

    transform = clip_transform(model)
    tensors = torch.stack([transform(image) for image in images])
    cfg = get_model_preprocess_cfg(model)
    mean = torch.tensor(cfg.get("mean") or (0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std") or (0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    shown = ((tensors * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    video = torch.zeros((1, frames, *tensors.shape[1:]), dtype=torch.float32)
    video[0, :len(images)] = tensors
    mask = torch.zeros(1, frames, dtype=torch.bool)
    mask[0, :len(images)] = True
    return video, mask, shown


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------

def token_colours(tokens: int) -> np.ndarray:
    """``[tokens, 3]`` uint8 RGB: hues a golden-ratio step apart, so tokens with near indices differ."""
    colours = np.empty((tokens, 3), dtype=np.uint8)
    for k in range(tokens):
        hue = (k * 0.6180339887) % 1.0
        saturation = (0.95, 0.65)[k % 2]
        value = (1.0, 0.85, 0.7)[k % 3]
        colours[k] = [round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value)]
    return colours


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _check_drawing(columns: Optional[int], alpha: float) -> None:
    if columns is not None and (isinstance(columns, bool) or not isinstance(columns, int) or columns < 1):
        raise ConfigError(f"columns={columns!r} must be an int >= 1 (frames per row) or None (up to 6)")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha={alpha} must be in [0, 1]")


def draw_merges(images: np.ndarray, grid: np.ndarray, sizes: np.ndarray, *, columns: Optional[int] = None,
                alpha: float = 0.55, all_tokens: bool = False, caption: str = "", scale: int = 1):
    """Draw frames with each final token's patches coloured; returns a ``PIL.Image``.

    Args:
        images: ``[n, H, W, 3]`` uint8, the frames as the model saw them.
        grid: ``[n, H_p, W_p]`` int, the final token of every patch (``SourceMap.patch_grid()``).
        sizes: ``[tokens]`` int, patches each final token holds (:func:`shown_sizes`: of the frames drawn).
        columns: frames per row (default: up to 6).
        alpha: opacity of the colour fill, in ``[0, 1]``.
        all_tokens: also fill tokens that hold a single patch.
        caption: text under the grid.
        scale: integer upscaling of every frame (nearest neighbour), for small images.
    """
    from PIL import Image, ImageDraw

    _check_drawing(columns, alpha)
    n, height, width = images.shape[:3]
    if grid.shape[0] != n or height % grid.shape[1] or width % grid.shape[2]:
        raise ValueError(f"grid {grid.shape} does not tile {n} frames of {height}x{width} pixels")
    columns = min(n, 6) if columns is None else columns
    rows = -(-n // columns)
    ph, pw = height // grid.shape[1], width // grid.shape[2]
    colours = token_colours(len(sizes))
    filled = sizes >= (1 if all_tokens else 2)

    tile_h, tile_w = height * scale, width * scale
    pad, label_h = 6, 18
    font = _font(13)
    lines = caption.splitlines() if caption else []
    caption_h = 18 * len(lines) + (pad if lines else 0)
    canvas = Image.new("RGB", (columns * (tile_w + pad) + pad, rows * (tile_h + label_h + pad) + pad + caption_h),
                       "white")
    draw = ImageDraw.Draw(canvas)
    for f in range(n):
        # Per-pixel token ids: the patch grid blown up to the frame's pixels.
        ids = np.repeat(np.repeat(grid[f], ph, axis=0), pw, axis=1)
        pixels = images[f].astype(np.float32)
        fill = filled[ids]
        pixels[fill] = (1 - alpha) * pixels[fill] + alpha * colours[ids[fill]].astype(np.float32)
        # Dark lines where the token changes between neighbouring patches.
        edge = np.zeros(ids.shape, dtype=bool)
        edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
        edge[1:, :] |= ids[1:, :] != ids[:-1, :]
        pixels[edge] = 0.35 * pixels[edge]
        tile = Image.fromarray(pixels.round().astype(np.uint8))
        if scale != 1:
            tile = tile.resize((tile_w, tile_h), Image.NEAREST)
        r, c = divmod(f, columns)
        x0, y0 = pad + c * (tile_w + pad), pad + r * (tile_h + label_h + pad)
        draw.text((x0, y0), f"frame {f}", fill="black", font=font)
        canvas.paste(tile, (x0, y0 + label_h))
    y = rows * (tile_h + label_h + pad) + pad
    for line in lines:
        draw.text((pad, y), line, fill="black", font=font)
        y += 18
    return canvas


def shown_sizes(grid: np.ndarray, tokens: int) -> np.ndarray:
    """``[tokens]``: the patches of the drawn frames (``grid [n, H_p, W_p]``) each final token holds. What is
    coloured: padding frames are not drawn, so a token that merged a shown patch only with padding holds one."""
    return np.bincount(np.asarray(grid).ravel(), minlength=tokens)


def _caption(model_name: str, sources, grid: np.ndarray, weights: str, config) -> str:
    """Two lines: the model, its weights and schedule; tokens in and out, and how many of the drawn ones merged."""
    shown = grid.shape[0]
    sizes = shown_sizes(grid, sources.tokens)
    spans = (np.stack([shown_sizes(frame[None], sources.tokens) for frame in grid]) > 0).sum(axis=0)
    original = shown * sources.assignment.shape[2]
    padded = config.frames - shown
    return (f"{model_name}, {weights}; TempMe imgme_r={config.imgme_r}, joins of {list(config.clip_groups)} at "
            f"layers {list(config.clip_layers)}\n"
            f"{shown} frames{f' (+{padded} padded, not drawn)' if padded else ''}: {original} tokens in, "
            f"{sources.tokens} out. Coloured: the {int((sizes >= 2).sum())} final tokens holding 2+ of these patches, "
            f"one colour per token in every frame it reaches ({int(((sizes >= 2) & (spans >= 2)).sum())} span several "
            f"frames); uncoloured patches are tokens of their own.")


def _trace(model: torch.nn.Module, images: Sequence):
    """``(shown [n, H, W, 3] uint8, grid [n, H_p, W_p], sources)`` for frames ``images``."""
    from .model import trace_sources

    frames = model.tempme.config.frames
    if not 1 <= len(images) <= frames:
        raise ValueError(f"got {len(images)} frames; give 1 to frames={frames}")
    video, mask, shown = _preprocess(model, images, frames)
    weight = model.visual.conv1.weight
    sources = trace_sources(model, video.to(device=weight.device, dtype=weight.dtype), mask.to(weight.device))
    grid = sources.patch_grid(tuple(model.visual.grid_size))[0, :len(images)].cpu().numpy()
    return shown, grid, sources


def visualize(model: torch.nn.Module, images: Sequence, *, columns: Optional[int] = None, alpha: float = 0.55,
              all_tokens: bool = False, caption: str = ""):
    """Trace where ``images`` (RGB ``PIL.Image`` frames, 1 to ``config.frames`` of them; fewer are
    padded with zero frames) go in the TempMe-patched ``model`` and draw it.

    Returns:
        ``(picture, sources)``: a ``PIL.Image`` and the :class:`~tempme_fast.tracking.SourceMap`
        of the (one-video) batch.
    """
    _check_drawing(columns, alpha)  # before the model runs
    shown, grid, sources = _trace(model, images)
    picture = draw_merges(shown, grid, shown_sizes(grid, sources.tokens), columns=columns, alpha=alpha,
                          all_tokens=all_tokens, caption=caption)
    return picture, sources


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def add_visualize_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of ``tempme visualize`` (the schedule's knobs from ``add_config_arguments``)."""
    from .arguments import (add_config_arguments, add_dtype_argument, add_model_arguments, non_negative_float,
                            positive_int, unit_float)

    parser.add_argument("source", metavar="VIDEO_OR_FRAMES",
                        help="a video file (decoded with PyAV) or a folder of frame images")
    parser.add_argument("--out", default="merges.png", help="where to write the picture (PNG)")
    g = parser.add_argument_group("model")
    add_model_arguments(g, checkpoint_help="state dict of a TempMe-patched model or a LoRA adapter (as tempme eval)",
                        device_default="cpu", device_help="cpu, cuda, cuda:N or auto")
    add_dtype_argument(g)
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights (without --pretrained)")
    g = parser.add_argument_group("frames and drawing")
    g.add_argument("--sample-fps", type=non_negative_float, default=1.0,
                   help="frames per second sampled from a video before uniform subsampling to --frames; "
                        "0 samples --frames uniformly over the whole video")
    g.add_argument("--columns", type=positive_int, default=None, help="frames per row (default: up to 6)")
    g.add_argument("--alpha", type=unit_float, default=0.55, help="opacity of the token colours, 0..1")
    g.add_argument("--all-tokens", action="store_true", help="also colour tokens that hold a single patch")
    add_config_arguments(parser)


def run_visualize(args) -> int:
    """``tempme visualize``: read frames, run the patched model with source tracking, write the PNG."""
    from .arguments import config_from_args
    from .loading import DTYPES, base_weights, create_model, default_dtype_name, load_checkpoint, resolve_device
    from .model import apply_tempme
    from .outputs import prepare_output_file

    if not str(args.out).lower().endswith(".png"):
        raise ConfigError(f"--out {args.out}: write a .png file")
    if os.path.isdir(args.source) and os.path.dirname(os.path.abspath(args.out)) == os.path.abspath(args.source):
        raise ConfigError(f"--out {args.out} is inside the frame folder {args.source}: it would overwrite a frame "
                          f"or be read as one next time; write it elsewhere")
    prepare_output_file(args.out, "--out", args)
    config = config_from_args(args)
    device = resolve_device(args.device)
    with as_config_error(args.source):
        images = load_frames(args.source, config.frames, args.sample_fps or None)
    torch.manual_seed(args.seed)
    model = create_model(args.model, args.pretrained, device="cpu")
    apply_tempme(model, config, backend=args.backend)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint, lambda: base_weights(args.model, args.pretrained))
    model = model.to(device=device, dtype=DTYPES[args.dtype or default_dtype_name(device)]).eval()
    shown, grid, sources = _trace(model, images)
    if args.checkpoint:
        weights = f"weights from {Path(args.checkpoint).name}"
    elif args.pretrained:
        weights = f"{args.pretrained} weights"
    else:
        weights = f"RANDOM weights (seed {args.seed}, untrained)"
    caption = _caption(Path(args.model).stem if args.model.endswith(".json") else args.model, sources, grid,
                       weights, config)
    picture = draw_merges(shown, grid, shown_sizes(grid, sources.tokens), columns=args.columns, alpha=args.alpha,
                          all_tokens=args.all_tokens, caption=caption)
    out = Path(args.out)
    picture.save(out)
    padded = config.frames - len(images)
    print(f"wrote {out}: {len(images)} frame(s){f' (+{padded} padded)' if padded else ''}, "
          f"{sources.assignment.shape[1] * sources.assignment.shape[2]} tokens -> {sources.tokens} final tokens")
    return 0
