"""The token schedule: how many clips and tokens every layer sees. The one place it is computed.

The model, the FLOPs report, the benchmarks, the docs and the tests all read it from here, so a
change to the merge rules shows up everywhere at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

from .config import TempMeConfig

IMGME = "imgme"
CLIPME = "clipme"
INTRA = "intra"


@dataclass(frozen=True)
class LayerPlan:
    """Token counts of one transformer layer, per clip unless named per video.

    A layer takes ``clips_in`` clips of ``tokens_in`` tokens (``protected_in`` of them class
    tokens). A ClipMe layer first joins ``group`` adjacent clips and removes ``r_cross`` tokens;
    attention then runs on ``tokens_attn`` tokens per clip; finally ``r`` tokens are removed,
    leaving ``tokens_out``.
    """

    layer: int
    kind: str
    clips_in: int
    tokens_in: int
    protected_in: int
    group: int
    r_cross: int
    r: int

    @property
    def clips_out(self) -> int:
        return self.clips_in // self.group

    @property
    def protected_out(self) -> int:
        return self.protected_in * self.group

    @property
    def tokens_joined(self) -> int:
        return self.tokens_in * self.group

    @property
    def tokens_attn(self) -> int:
        return self.tokens_joined - self.r_cross

    @property
    def tokens_out(self) -> int:
        return self.tokens_attn - self.r


@dataclass(frozen=True)
class TokenSchedule:
    """Per-layer plans for one config on one model geometry."""

    config: TempMeConfig
    tokens_per_frame: int
    layers: Tuple[LayerPlan, ...]

    @property
    def frames(self) -> int:
        return self.config.frames

    @property
    def output_clips(self) -> int:
        return self.layers[-1].clips_out if self.layers else self.frames

    @property
    def output_tokens_per_clip(self) -> int:
        return self.layers[-1].tokens_out if self.layers else self.tokens_per_frame

    @property
    def output_tokens(self) -> int:
        """Tokens per video leaving the encoder (class tokens included)."""
        return self.output_clips * self.output_tokens_per_clip

    def token_counts(self) -> List[int]:
        """Tokens per clip at the start and after every join and every merge, in order."""
        counts = [self.tokens_per_frame]
        for plan in self.layers:
            if plan.group > 1:
                counts += [plan.tokens_joined, plan.tokens_attn]
            if plan.r:
                counts.append(plan.tokens_out)
        return counts

    def describe(self) -> str:
        """One line per layer, e.g. ``layer  8  clipme  12 clips x 34 -> join 2: 68 -> 48 -> 44``."""
        lines = []
        for p in self.layers:
            clips = "clips" if p.clips_in != 1 else "clip "
            text = f"layer {p.layer:2d}  {p.kind:6s}  {p.clips_in:2d} {clips} x {p.tokens_in:3d}"
            if p.group > 1:
                text += f" -> join {p.group}: {p.tokens_joined} -> {p.tokens_attn}"
            if p.r:
                text += f" -> {p.tokens_out}"
            lines.append(text)
        clips = "clip" if self.output_clips == 1 else "clips"
        lines.append(f"output: {self.output_clips} {clips} x {self.output_tokens_per_clip} tokens = "
                     f"{self.output_tokens} tokens per video (unmerged: {self.frames * self.tokens_per_frame})")
        return "\n".join(lines)


def _clamp(r: int, tokens: int, protected: int) -> int:
    """The spec's clamp: never more than half of the unprotected tokens, never negative."""
    return max(0, min(r, (tokens - protected) // 2))


def token_schedule(config: TempMeConfig, depth: int, tokens_per_frame: int,
                   class_tokens: int = 1) -> TokenSchedule:
    """Compute the token schedule of ``config`` on a ViT of ``depth`` layers.

    Args:
        config: the merge configuration.
        depth: number of transformer layers.
        tokens_per_frame: tokens per frame entering the transformer, class tokens included
            (50 for ViT-B/32 at 224 px, 197 for ViT-B/16).
        class_tokens: protected tokens per frame (1 for CLIP).
    """
    if depth < 1:
        raise ValueError(f"depth={depth} must be at least 1")
    if tokens_per_frame <= class_tokens:
        raise ValueError(f"tokens_per_frame={tokens_per_frame} must exceed class_tokens={class_tokens}")
    config.validate_for(depth)
    joins = dict(zip(config.clip_layers, config.clip_groups))
    first_join = config.clip_layers[0] if config.clip_layers else depth
    clips, tokens, protected = config.frames, tokens_per_frame, class_tokens
    plans = []
    for layer in range(depth):
        group, r_cross = 1, 0
        if layer < first_join:
            kind = IMGME
            r = _clamp(config.imgme_r_at(layer), tokens, protected)
        else:
            if layer in joins:
                kind, group = CLIPME, joins[layer]
                r_cross = _clamp(int(tokens * group * config.cross_ratio), tokens * group, protected * group)
            else:
                kind = INTRA
            attn_tokens = tokens * group - r_cross
            r = _clamp(int(attn_tokens * config.intra_ratio), attn_tokens, protected * group)
        plan = LayerPlan(layer, kind, clips, tokens, protected, group, r_cross, r)
        plans.append(plan)
        clips, tokens, protected = plan.clips_out, plan.tokens_out, plan.protected_out
    return TokenSchedule(config, tokens_per_frame, tuple(plans))
