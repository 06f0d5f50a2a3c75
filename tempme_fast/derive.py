"""Schedules for any open_clip ViT, frame count and FLOPs budget, derived from the released one by rules.

The released schedule (ViT-B/32, 12 layers, 12 frames) is the only one the paper measured. The rules
below carry its shape over to other models and frame counts:

1. **Groups.** The frame count is split into prime factors, ascending: 2s and 3s become joins of 2 or 3
   clips (12 -> 2, 2, 3 as released; 64 -> six joins of 2); a prime factor above 3 cannot be split, so it
   becomes one join of that many clips (14 -> 2, 7; 13 -> one join of 13). Every video ends as one clip.
   One frame has no joins.
2. **Joins in the last layers.** As released, the ``k`` joins take layers ``depth-1-k .. depth-2`` and
   the last layer merges inside the single clip left; the layers before the first join merge images.
   With one frame there is no join, and every layer merges images.
3. **ImgMe r per layer.** The released schedule keeps 34 of a frame's 50 tokens at its first join
   (8 layers of ``r = 2``). A derived schedule keeps the same share: ``R = N - round(N * 34/50)`` tokens
   of a frame's ``N`` are removed, spread evenly over the image-merging layers with any remainder on the
   earliest ones (``imgme_r`` becomes a per-layer tuple when ``R`` does not divide evenly).
4. **Ratios.** ``cross_ratio`` and ``intra_ratio`` stay at the released 0.30 and 0.10.

With a FLOPs budget (``flops_ratio``) the search walks a ladder of schedules that merge ever more: first
``R`` from 0 up to ``max_removed`` (a frame keeps at least a quarter of its tokens), then, with that ``R``,
``cross_ratio`` and ``intra_ratio`` raised together in steps of 0.05 and 0.025 up to 0.70 and 0.30. Each
rung removes at least as many tokens at every layer as the one before, so the predicted FLOPs fall
monotonically along it; the first rung at or below the budget is the most expensive schedule the
budget allows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

from .config import TempMeConfig
from .flops import schedule_flops
from .geometry import ViTGeometry
from .schedule import IMGME, TokenSchedule, token_schedule

MAX_FRAMES = 128
RELEASED = TempMeConfig()
# Share of a frame's tokens the released ViT-B/32 schedule keeps at its first join: 50 -> 34.
RELEASED_KEEP = (34, 50)
# The strongest image merging the budget search tries: a frame keeps at least this share of its tokens.
MIN_KEEP = 0.25
# The budget search's second phase: ratio steps on top of the released cross/intra ratios.
RATIO_STEPS = 8
CROSS_STEP, INTRA_STEP = 0.05, 0.025


def clip_groups_for(frames: int) -> Tuple[int, ...]:
    """Join sizes that take ``frames`` clips down to one: prime factors, ascending (12 -> (2, 2, 3))."""
    groups, rest, p = [], frames, 2
    while rest > 1:
        while rest % p == 0:
            groups.append(p)
            rest //= p
        p += 1
    return tuple(groups)


def released_removal(tokens_per_frame: int) -> int:
    """Tokens per frame the image-merging stage removes to keep the released share (16 of 50)."""
    keep, of = RELEASED_KEEP
    return tokens_per_frame - round(tokens_per_frame * keep / of)


def max_removal(geometry: ViTGeometry, frames: int) -> int:
    """The most tokens per frame the budget search lets the image-merging stage remove.

    A frame keeps at least ``MIN_KEEP`` of its tokens, and no layer is asked for more than the spec's
    clamp allows (half of the unprotected tokens), so every rung's ``imgme_r`` is what actually runs.
    """
    n = geometry.tokens_per_frame
    removed = n - max(2, math.ceil(n * MIN_KEEP))
    while removed > 0 and _clamps(derived_config(geometry, frames, removed), geometry):
        removed -= 1
    return removed


def _clamps(config: TempMeConfig, geometry: ViTGeometry) -> bool:
    schedule = token_schedule(config, geometry.depth, geometry.tokens_per_frame)
    return any(p.r < config.imgme_r_at(p.layer) for p in schedule.layers if p.kind == IMGME)


def spread(removed: int, layers: int):
    """``removed`` tokens over ``layers`` layers, evenly, remainder first: an int when all are equal."""
    if layers == 0:
        return 0
    base, extra = divmod(removed, layers)
    if extra == 0:
        return base
    return tuple(base + 1 if i < extra else base for i in range(layers))


def _check_frames(frames) -> None:
    if isinstance(frames, bool) or not isinstance(frames, int):
        raise TypeError(f"frames must be an int, got {frames!r}")
    if not 1 <= frames <= MAX_FRAMES:
        raise ValueError(f"frames={frames} is outside the derived schedules' range (valid: 1..{MAX_FRAMES})")


def derived_config(geometry: ViTGeometry, frames: int, removed: Optional[int] = None,
                   ratio_step: int = 0) -> TempMeConfig:
    """The rule-derived schedule for ``geometry`` at ``frames`` frames.

    Args:
        removed: tokens per frame the image-merging stage removes (default: the released share).
        ratio_step: how many budget steps to raise ``cross_ratio`` / ``intra_ratio`` above the released ones.
    """
    _check_frames(frames)
    groups = clip_groups_for(frames)
    first_join = geometry.depth - 1 - len(groups) if groups else geometry.depth
    if first_join < 1:
        raise ValueError(
            f"frames={frames} needs {len(groups)} joins {groups}, but a {geometry.depth}-layer model has room "
            f"for at most {geometry.depth - 2} (one image-merging layer first, one layer after the last join)")
    removed = released_removal(geometry.tokens_per_frame) if removed is None else removed
    return TempMeConfig(frames=frames, imgme_r=spread(removed, first_join),
                        clip_layers=tuple(range(first_join, first_join + len(groups))), clip_groups=groups,
                        cross_ratio=round(RELEASED.cross_ratio + CROSS_STEP * ratio_step, 6),
                        intra_ratio=round(RELEASED.intra_ratio + INTRA_STEP * ratio_step, 6))


@dataclass(frozen=True)
class Candidate:
    """One rung of the budget ladder: its config, schedule and predicted GFLOPs against unmerged."""

    config: TempMeConfig
    schedule: TokenSchedule
    gflops: float
    unmerged_gflops: float

    @property
    def ratio(self) -> float:
        return self.gflops / self.unmerged_gflops

    @property
    def bound(self) -> float:
        """The speed-up the FLOPs allow: 1 / ratio."""
        return 1.0 / self.ratio


def costed(geometry: ViTGeometry, config: TempMeConfig) -> Candidate:
    """``config``'s schedule on ``geometry`` with its predicted GFLOPs and the unmerged model's."""
    schedule = token_schedule(config, geometry.depth, geometry.tokens_per_frame)
    unmerged = token_schedule(TempMeConfig.unmerged(config.frames), geometry.depth, geometry.tokens_per_frame)
    return Candidate(config, schedule, schedule_flops(schedule, geometry).gflops,
                     schedule_flops(unmerged, geometry).gflops)


def budget_ladder(geometry: ViTGeometry, frames: int) -> List[Candidate]:
    """Derived schedules from the lightest merging to the strongest, predicted FLOPs strictly falling."""
    top = max_removal(geometry, frames)
    rungs = [derived_config(geometry, frames, removed) for removed in range(top + 1)]
    rungs += [derived_config(geometry, frames, top, step) for step in range(1, RATIO_STEPS + 1)]
    ladder: List[Candidate] = []
    for config in rungs:
        candidate = costed(geometry, config)
        # Once the spec's clamp caps a merge, a higher ratio can leave the tokens as they were: skip it.
        if not ladder or candidate.ratio < ladder[-1].ratio:
            ladder.append(candidate)
    return ladder


def _check_ratio(flops_ratio) -> None:
    if isinstance(flops_ratio, bool) or not isinstance(flops_ratio, (int, float)):
        raise TypeError(f"flops_ratio must be a float in (0, 1], got {flops_ratio!r}")
    if not 0.0 < flops_ratio <= 1.0:
        raise ValueError(f"flops_ratio={flops_ratio} must be in (0, 1]: the share of the unmerged model's FLOPs")


def derive_config(model_or_name, frames: int = 12, flops_ratio: Optional[float] = None) -> TempMeConfig:
    """The schedule of :meth:`TempMeConfig.for_model` (see this module's docstring for the rules).

    Args:
        model_or_name: an open_clip model, model name, JSON model config path, or :class:`ViTGeometry`.
        frames: frames per video, 1..128.
        flops_ratio: None for the rule-derived schedule (the released one for ViT-B/32 at 12 frames);
            a share in (0, 1] to take the most expensive ladder schedule whose predicted FLOPs per video
            are at most that share of the unmerged model's.
    Raises:
        ValueError: frames out of range, a model too shallow for the joins, or a budget below the
            cheapest derived schedule (the message gives the lowest ratio that can be met).
    """
    geometry = ViTGeometry.of(model_or_name)
    _check_frames(frames)
    if flops_ratio is None:
        return derived_config(geometry, frames)
    _check_ratio(flops_ratio)
    return budget_candidate(geometry, frames, flops_ratio).config


def budget_candidate(geometry: ViTGeometry, frames: int, flops_ratio: float) -> Candidate:
    """The first rung of the budget ladder whose predicted FLOPs ratio is at most ``flops_ratio``."""
    ladder = budget_ladder(geometry, frames)
    for candidate in ladder:
        if candidate.ratio <= flops_ratio:
            return candidate
    raise ValueError(
        f"flops_ratio={flops_ratio} cannot be met at {frames} frames on this model ({geometry.depth} layers, "
        f"{geometry.tokens_per_frame} tokens per frame): the cheapest derived schedule costs "
        f"{ladder[-1].ratio:.3f} of the unmerged FLOPs (valid: {ladder[-1].ratio:.3f} <= flops_ratio <= 1)")


# ``TempMeConfig.for_model`` is derive_config. config.py cannot import this module (it needs the token
# schedule and the FLOPs, which import config), so the method is attached here, and the package's
# __init__ imports this module: whoever imports tempme_fast or any of its modules gets it.
TempMeConfig.for_model = staticmethod(derive_config)


def add_budget_argument(parser) -> None:
    """``--budget RATIO``: derive the schedule from the model and frame count within that FLOPs share;
    ``--derived``: the schedule derived for the model and frame count, without a budget."""
    parser.add_argument("--budget", type=float, default=None, metavar="RATIO",
                        help="derive the schedule for --model and --frames whose predicted GFLOPs are the "
                             "largest at most RATIO of the unmerged model's (in (0, 1]), instead of the "
                             "schedule options")
    parser.add_argument("--derived", action="store_true",
                        help="derive the schedule for --model's depth and patch grid and --frames "
                             "(TempMeConfig.for_model; the released one for ViT-B/32 at 12 frames), instead of "
                             "the released ViT-B/32 values")
