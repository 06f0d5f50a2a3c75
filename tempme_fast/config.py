"""TempMe's configuration: the merge schedule's knobs, validated on their own and against a model."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Tuple, Union

from .errors import ConfigError


def _as_int_tuple(name: str, value) -> Tuple[int, ...]:
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints, got {type(value).__name__}") from None
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"{name} must hold ints, got {item!r} in {items}")
    return items


@dataclass(frozen=True)
class TempMeConfig:
    """How TempMe merges tokens inside a CLIP ViT.

    The defaults are the released ViT-B/32 schedule: 12 frames, 2 tokens merged per frame in
    every layer before the first join, clips joined at layers 8, 9 and 10 in groups of 2, 2 and 3.
    ``TempMeConfig.for_model(model_or_name, frames=12, flops_ratio=None)`` derives a schedule for
    other models, frame counts and FLOPs budgets (:func:`tempme_fast.derive.derive_config`).

    Attributes:
        frames: frames per video (``T``).
        imgme_r: tokens removed per clip per layer in the image-merging stage (layers before
            ``clip_layers[0]``; every layer when ``clip_layers`` is empty): one int for every such
            layer, or a tuple with one int per image-merging layer (``r`` of layer ``l`` is
            ``imgme_r[l]``; its length must be ``clip_layers[0]``, or the model's depth when
            ``clip_layers`` is empty).
        clip_layers: 0-indexed layers at which adjacent clips are joined, strictly increasing.
        clip_groups: how many adjacent clips each join takes, one per entry of ``clip_layers``.
        cross_ratio: share of a joined clip's tokens removed right after joining.
        intra_ratio: share of a clip's tokens removed after attention in layers past the first join.
        frame_pos: add a learnable temporal position embedding at every join.
        prop_attn: proportional attention (``+ log(size)`` on every attention logit).
    """

    frames: int = 12
    imgme_r: Union[int, Tuple[int, ...]] = 2
    clip_layers: Tuple[int, ...] = (8, 9, 10)
    clip_groups: Tuple[int, ...] = (2, 2, 3)
    cross_ratio: float = 0.30
    intra_ratio: float = 0.10
    frame_pos: bool = True
    prop_attn: bool = True

    def __post_init__(self):
        # Frozen dataclass: normalise lists to tuples through object.__setattr__.
        object.__setattr__(self, "clip_layers", _as_int_tuple("clip_layers", self.clip_layers))
        object.__setattr__(self, "clip_groups", _as_int_tuple("clip_groups", self.clip_groups))
        if isinstance(self.imgme_r, (list, tuple)):
            object.__setattr__(self, "imgme_r", _as_int_tuple("imgme_r", self.imgme_r))
        self._validate()

    @classmethod
    def unmerged(cls, frames: int = 12) -> "TempMeConfig":
        """A config that merges nothing: per-frame CLIP, the baseline TempMe is compared with."""
        return cls(frames=frames, imgme_r=0, clip_layers=(), clip_groups=(), cross_ratio=0.0,
                   intra_ratio=0.0, frame_pos=False, prop_attn=False)

    @property
    def merges(self) -> bool:
        """Whether this config changes anything relative to per-frame CLIP."""
        return any(r > 0 for r in self._imgme_values()) or bool(self.clip_layers)

    def imgme_r_at(self, layer: int) -> int:
        """Tokens the image-merging stage asks layer ``layer`` to remove from each clip (before the clamp)."""
        if isinstance(self.imgme_r, int):
            return self.imgme_r
        return self.imgme_r[layer]

    def _imgme_values(self) -> Tuple[int, ...]:
        return (self.imgme_r,) if isinstance(self.imgme_r, int) else self.imgme_r

    def replace(self, **changes) -> "TempMeConfig":
        return dataclasses.replace(self, **changes)

    def _validate(self):
        if isinstance(self.frames, bool) or not isinstance(self.frames, int):
            raise TypeError(f"frames must be an int, got {self.frames!r}")
        if isinstance(self.imgme_r, bool) or not isinstance(self.imgme_r, (int, tuple)):
            raise TypeError(f"imgme_r must be an int or a tuple of ints, got {self.imgme_r!r}")
        for name in ("frame_pos", "prop_attn"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool (True or False), got {value!r}")
        if self.frames < 1:
            raise ConfigError(f"frames={self.frames} must be at least 1")
        if any(r < 0 for r in self._imgme_values()):
            raise ConfigError(f"imgme_r={self.imgme_r} must be >= 0 (0 merges nothing per frame)")
        for name in ("cross_ratio", "intra_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"{name} must be a finite float, got {value!r}")
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name}={value} must be in [0, 1)")
        if len(self.clip_layers) != len(self.clip_groups):
            raise ConfigError(
                f"clip_layers={self.clip_layers} and clip_groups={self.clip_groups} must have the same "
                f"length: one group size per joining layer")
        if any(layer < 0 for layer in self.clip_layers):
            raise ConfigError(f"clip_layers={self.clip_layers} must be >= 0 (0-indexed layers)")
        if any(b <= a for a, b in zip(self.clip_layers, self.clip_layers[1:])):
            raise ConfigError(f"clip_layers={self.clip_layers} must be strictly increasing")
        if any(g < 2 for g in self.clip_groups):
            raise ConfigError(f"clip_groups={self.clip_groups} must all be >= 2 (a join takes 2 or more clips)")
        product = math.prod(self.clip_groups)
        if self.frames % product:
            raise ConfigError(
                f"frames={self.frames} is not divisible by the clip groups {self.clip_groups} whose "
                f"product is {product}")
        if not isinstance(self.imgme_r, int) and self.clip_layers and len(self.imgme_r) != self.clip_layers[0]:
            raise ConfigError(
                f"imgme_r={self.imgme_r} has {len(self.imgme_r)} entries, but clip_layers={self.clip_layers} "
                f"leaves {self.clip_layers[0]} image-merging layer(s) (0..{self.clip_layers[0] - 1}): give "
                f"one r per image-merging layer")

    def validate_for(self, depth: int) -> None:
        """Check this config against a transformer of ``depth`` layers."""
        if self.clip_layers and self.clip_layers[-1] >= depth:
            raise ConfigError(
                f"clip_layers={self.clip_layers} reaches layer {self.clip_layers[-1]}, but the model has "
                f"{depth} layers (valid: 0..{depth - 1})")
        if not isinstance(self.imgme_r, int) and not self.clip_layers and len(self.imgme_r) != depth:
            raise ConfigError(
                f"imgme_r={self.imgme_r} has {len(self.imgme_r)} entries, but without clip_layers every one of "
                f"the model's {depth} layers merges images: give {depth} values")
