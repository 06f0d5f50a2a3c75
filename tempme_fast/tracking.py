"""Source tracking: which original (frame, token) every final token of the TempMe encoder stands for.

Off by default and free when off: the encoder carries a source map in ``ClipState.sources`` only
when one is asked for (``encode_video(..., return_sources=True)`` or :func:`tempme_fast.model.trace_sources`).

The map while the encoder runs is ``sources [B, T * (1 + P)]`` int64, one entry per original
token of a video: original token ``p`` of frame ``t`` (``p = 0`` is the class token) is entry
``t * (1 + P) + p``, and its value is the token that holds it now, flattened over the video's
clips as ``clip * N + position`` (``N`` tokens per clip). A join and a merge each send every old
flat index to a new one; the join's map comes from :func:`reference.join_clips` itself (the one
definition of the joined order) and the merge's from the :class:`MergePlan`, the same plan the
backend's merge uses. Following the map is a gather of integers, so the result is exact, and it is
the same on both backends whenever their plans are (they are equal index for index, barring
scores that tie to within rounding).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .ops import reference
from .ops.reference import MergePlan, split_positions

__all__ = ["SourceMap", "initial_sources", "join_sources", "merge_sources", "source_map"]


def initial_sources(videos: int, frames: int, tokens_per_frame: int, device=None) -> torch.Tensor:
    """The map before any merge, ``[B, T * (1 + P)]`` int64: every token holds only itself."""
    index = torch.arange(frames * tokens_per_frame, device=device, dtype=torch.int64)
    return index.expand(videos, -1).contiguous()


def join_sources(sources: torch.Tensor, clips: int, tokens: int, protected: int, group: int) -> torch.Tensor:
    """Follow a ClipMe join of every ``group`` adjacent clips.

    Args:
        sources: ``[B, S]`` flat indices into ``clips`` clips of ``tokens`` tokens per video.
        protected: class tokens per clip before the join.
    Returns:
        ``[B, S]`` flat indices into ``clips / group`` clips of ``group * tokens`` tokens.
    """
    # Join a tensor of flat indices exactly as the model joins its tokens, then invert the
    # permutation: new_of_old[old flat index] = new flat index.
    old = torch.arange(clips * tokens, device=sources.device).view(clips, tokens)
    joined = reference.join_clips(old, group, protected).reshape(-1)
    new_of_old = torch.empty_like(joined)
    new_of_old[joined] = torch.arange(joined.numel(), device=sources.device)
    return new_of_old[sources]


def merge_sources(sources: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Follow one bipartite merge.

    Args:
        sources: ``[B, S]`` flat indices into the ``B' / B`` clips per video that ``plan`` merges
            (``B'`` is ``plan.merged.shape[0]``), ``plan.tokens`` tokens each.
    Returns:
        ``[B, S]`` flat indices into clips of ``plan.tokens - plan.r`` tokens. Output positions follow
        the spec: class tokens, kept A tokens, then B tokens; a merged A token goes to its B token.
    """
    rows, r = plan.merged.shape
    n, c = plan.tokens, plan.protected
    device = sources.device
    a_pos, b_pos = split_positions(n, c, device)
    na, nb = a_pos.numel(), b_pos.numel()
    kept = na - r
    new_a = torch.empty(rows, na, dtype=torch.int64, device=device)
    new_a.scatter_(1, plan.kept, (c + torch.arange(kept, device=device)).expand(rows, kept))
    new_a.scatter_(1, plan.merged, c + kept + plan.dst)
    new_pos = torch.empty(rows, n, dtype=torch.int64, device=device)
    new_pos[:, :c] = torch.arange(c, device=device)
    new_pos[:, a_pos] = new_a
    new_pos[:, b_pos] = c + kept + torch.arange(nb, device=device)
    videos = sources.shape[0]
    clips = rows // videos
    clip_start = (torch.arange(clips, device=device) * (n - r)).view(1, clips, 1)
    new_flat = (new_pos.view(videos, clips, n) + clip_start).view(videos, clips * n)
    return new_flat.gather(1, sources)


class SourceMap(NamedTuple):
    """Where every original token of a video ended up after the encoder's last merge.

    Attributes:
        assignment: ``[B, T, 1 + P]`` int64: the final token (``0 <= index < tokens``) that
            original token ``p`` of frame ``t`` was merged into (``p = 0``: the frame's class token,
            ``p >= 1``: its patches in raster order). Final tokens are numbered clip by clip,
            ``clip * tokens_per_clip + position``, in the encoder's output order.
        clips: clips per video at the end (1 for the released schedule).
        tokens_per_clip: tokens per final clip, class tokens included.
        protected: class tokens at the front of every final clip.
    """

    assignment: torch.Tensor
    clips: int
    tokens_per_clip: int
    protected: int

    @property
    def tokens(self) -> int:
        """Final tokens per video (97 for the released ViT-B/32 schedule)."""
        return self.clips * self.tokens_per_clip

    def sizes(self) -> torch.Tensor:
        """``[B, tokens]`` int64: how many original tokens each final token stands for."""
        flat = self.assignment.flatten(1)
        counts = torch.zeros(flat.shape[0], self.tokens, dtype=torch.int64, device=flat.device)
        return counts.scatter_add_(1, flat, torch.ones_like(flat))

    def dense(self) -> torch.Tensor:
        """``[B, tokens, T * (1 + P)]`` bool: entry ``[b, k, t * (1 + P) + p]`` is set when original
        token ``p`` of frame ``t`` is in final token ``k``. Every column holds exactly one True."""
        return torch.nn.functional.one_hot(self.assignment.flatten(1), self.tokens).transpose(1, 2).bool()

    def is_class_token(self) -> torch.Tensor:
        """``[tokens]`` bool: which final tokens are protected class tokens."""
        position = torch.arange(self.tokens, device=self.assignment.device) % self.tokens_per_clip
        return position < self.protected

    def patch_grid(self, grid: Optional[tuple] = None) -> torch.Tensor:
        """``[B, T, H_p, W_p]``: the final token of every patch, laid out as the image's patch grid.

        ``grid`` is ``(H_p, W_p)`` (a model's ``visual.grid_size``); by default the patches are taken to form a
        square, and a count that is no square is refused (12 patches could be 3 x 4 or 4 x 3).
        """
        patches = self.assignment[..., 1:]
        if grid is None:
            side = int(round(patches.shape[-1] ** 0.5))
            if side * side != patches.shape[-1]:
                raise ValueError(f"a frame's {patches.shape[-1]} patches form no square: give grid=(H_p, W_p), the "
                                 f"model's visual.grid_size")
            grid = (side, side)
        if grid[0] * grid[1] != patches.shape[-1]:
            raise ValueError(f"grid={tuple(grid)} does not hold the {patches.shape[-1]} patches of a frame")
        return patches.reshape(*patches.shape[:2], *grid)


def source_map(sources: torch.Tensor, frames: int, clips: int, tokens_per_clip: int, protected: int) -> SourceMap:
    """Wrap the encoder's final ``sources [B, T * (1 + P)]`` as a :class:`SourceMap`."""
    return SourceMap(sources.view(sources.shape[0], frames, -1), clips, tokens_per_clip, protected)
