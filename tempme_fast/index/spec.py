"""What an index was built with, so that a query is encoded by the same model or refused.

An :class:`IndexSpec` names the open_clip model, its weights, the TempMe schedule, the frame sampling
and the text length. It is stored in ``INDEX_DIR/index.json``; a video query needs every field to
match (the schedule changes video embeddings), a text query the model and weights, and both the
embedding width. :func:`load_encoder` rebuilds the model a spec describes.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..config import TempMeConfig
from ..errors import ConfigError
from ..retrieval.video import DEFAULT_FPS, DEFAULT_FRAMES

# Fields a text query must share with the index (the text tower does not see the video schedule).
TEXT_FIELDS = ("model", "pretrained", "checkpoint_sha256", "context_length")


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file: a checkpoint is recognised by its content, not by where it lies."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class IndexSpec:
    """The encoder of an index.

    Attributes:
        model: open_clip model name or JSON model config path (as given to ``create_model``).
        pretrained: open_clip pretrained tag or weights file; None for random weights.
        checkpoint: a TempMe state dict or LoRA adapter loaded after patching (see ``tempme eval``).
        checkpoint_sha256: the checkpoint's content hash, filled in by :meth:`resolved`.
        merge: TempMe's schedule (False: per-frame CLIP).
        config: the TempMe schedule as a dict of :class:`TempMeConfig` fields (None: the released
            schedule for ``frames``); filled in by :meth:`resolved`.
        frames, fps: frame sampling (``fps=None``: uniform over the whole video).
        context_length: text tokens per query.
    """

    model: str = "ViT-B-32-quickgelu"
    pretrained: Optional[str] = None
    checkpoint: Optional[str] = None
    checkpoint_sha256: Optional[str] = None
    merge: bool = True
    config: Optional[dict] = field(default=None, compare=False)
    frames: int = DEFAULT_FRAMES
    fps: Optional[float] = DEFAULT_FPS
    context_length: int = 32

    def tempme_config(self) -> TempMeConfig:
        if self.config is not None:
            return TempMeConfig(**self.config)
        return TempMeConfig(frames=self.frames) if self.merge else TempMeConfig.unmerged(self.frames)

    def resolved(self) -> "IndexSpec":
        """This spec with the schedule spelled out and the checkpoint hashed (what gets stored)."""
        config = self.tempme_config()
        if config.frames != self.frames:
            raise ConfigError(f"config frames={config.frames} differs from frames={self.frames}")
        digest = self.checkpoint_sha256
        if self.checkpoint is not None and digest is None:
            if not os.path.isfile(self.checkpoint):
                raise ConfigError(f"checkpoint={self.checkpoint!r} is not a file")
            digest = file_sha256(self.checkpoint)
        as_dict = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}
        # A JSON model config is named by where it lies: absolute, so queries from anywhere find it.
        model = os.path.abspath(self.model) if self.model.endswith(".json") else self.model
        return dataclasses.replace(self, model=model, config=as_dict, checkpoint_sha256=digest)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "IndexSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def differences(self, other: "IndexSpec", fields=None) -> list:
        """``[(field, self's value, other's value)]`` over ``fields`` (default: all that shape an embedding)."""
        a, b = self.resolved(), other.resolved()
        names = fields or ("model", "pretrained", "checkpoint_sha256", "merge", "config", "frames", "fps",
                           "context_length")
        diffs = []
        for n in names:
            x, y = getattr(a, n), getattr(b, n)
            if isinstance(x, dict) and isinstance(y, dict):  # the schedule: the entries that differ, but frames
                diffs += [(f"{n}.{k}", x.get(k), y.get(k)) for k in dict.fromkeys([*x, *y])
                          if x.get(k) != y.get(k) and k not in names]
            elif x != y:
                diffs.append((n, x, y))
        return diffs


class SpecMismatch(ConfigError):
    """A query or an added batch of videos would use another encoder than the index was built with."""


QUERY_ADVICE = "Query it with the index's own settings (leave --model/--pretrained/--checkpoint out)"
GROW_ADVICE = ("Add videos with the settings it was built with (its index.json records them: --model, --pretrained, "
               "--checkpoint, --merge, the schedule, --frames, --sample-fps, --context-length)")


def check_same_encoder(index_spec: IndexSpec, query_spec: IndexSpec, where: str, fields=None,
                       advice: str = QUERY_ADVICE) -> None:
    """Raise :class:`SpecMismatch` naming every differing field of ``query_spec`` and ``index_spec``, then
    ``advice`` (what to do instead)."""
    diffs = index_spec.differences(query_spec, fields)
    if diffs:
        listed = "; ".join(f"{n}: index {a!r}, requested {b!r}" for n, a, b in diffs)
        raise SpecMismatch(f"{where} was built with another encoder ({listed}). {advice}, or build a new index")


def load_encoder(spec: IndexSpec, backend: str = "auto", device: str = "auto",
                 dtype: Optional[str] = None) -> torch.nn.Module:
    """The TempMe-patched open_clip model ``spec`` describes, in eval mode on ``device``.

    ``dtype``: ``fp32``, ``fp16`` or ``bf16`` (default: fp16 on CUDA, fp32 on CPU).
    """
    from ..retrieval.cli import build_model

    spec = spec.resolved()
    config = spec.tempme_config()
    schedule = {k: getattr(config, k) for k in ("imgme_r", "clip_layers", "clip_groups", "cross_ratio",
                                                 "intra_ratio")}
    args = argparse.Namespace(model=spec.model, pretrained=spec.pretrained, checkpoint=spec.checkpoint,
                              merge=spec.merge, backend=backend, device=device, dtype=dtype,
                              frames=spec.frames, **schedule)
    model = build_model(args)  # random weights come from a fixed seed: the same at indexing and at query time
    if spec.checkpoint is not None and file_sha256(spec.checkpoint) != spec.checkpoint_sha256:
        raise SpecMismatch(f"checkpoint {spec.checkpoint} has changed since the index was built (its SHA-256 "
                           f"differs); build a new index or restore the file")
    if model.tempme.config != config:
        raise SpecMismatch(f"the rebuilt model's schedule {model.tempme.config} differs from the index's "
                           f"{config}")
    return model


def embed_dim(model: torch.nn.Module) -> int:
    """Width of the joint text-video embedding space of an open_clip model."""
    return int(model.visual.output_dim)
