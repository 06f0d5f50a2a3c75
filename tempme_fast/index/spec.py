"""What an index was built with, so that a query is encoded by the same model or refused.

An :class:`IndexSpec` names the open_clip model, its weights, the TempMe schedule, the frame sampling
and the text length. It is stored in ``INDEX_DIR/index.json``; a video query needs every field to
match (the schedule changes video embeddings), a text query the model and weights, and both the
embedding width. :func:`load_encoder` rebuilds the model a spec describes.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..checkpoint import file_sha256
from ..config import TempMeConfig
from ..errors import ConfigError
from ..retrieval.video import DEFAULT_FPS, DEFAULT_FRAMES

# Fields a text query must share with the index (the text tower does not see the video schedule).
TEXT_FIELDS = ("model", "pretrained", "checkpoint_sha256", "context_length")
# The content hash of each field that may name a file: such a file counts by its content, wherever it lies.
FILE_HASHES = {"model": "model_sha256", "pretrained": "pretrained_sha256", "checkpoint": "checkpoint_sha256"}


def _file(name: str, value: Optional[str]) -> bool:
    """Whether ``value`` of the field ``name`` names a file (a JSON model config, a weights file, a checkpoint)
    rather than an open_clip model name or pretrained tag."""
    if not value:
        return False
    return value.endswith(".json") if name == "model" else name == "checkpoint" or os.path.isfile(value)


@dataclass(frozen=True)
class IndexSpec:
    """The encoder of an index.

    Attributes:
        model: open_clip model name or JSON model config path (as given to ``create_model``).
        pretrained: open_clip pretrained tag or weights file; None for random weights.
        checkpoint: a TempMe state dict or LoRA adapter loaded after patching (see ``tempme eval``).
        model_sha256, pretrained_sha256, checkpoint_sha256: the content hash of each that is a file,
            filled in by :meth:`resolved`; a file counts by its content, not by its name or place (indexes
            of earlier releases lack the first two, and take the file as it is now).
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
    model_sha256: Optional[str] = None
    pretrained_sha256: Optional[str] = None
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
        """This spec with the schedule spelled out, and each file named by its absolute path and hashed (what
        gets stored: queries from any folder find the files, and a changed file is noticed)."""
        config = self.tempme_config()
        if config.frames != self.frames:
            raise ConfigError(f"config frames={config.frames} differs from frames={self.frames}")
        files = {}
        for name, hashed in FILE_HASHES.items():
            value, digest = getattr(self, name), getattr(self, hashed)
            if not _file(name, value):
                continue
            if digest is None:
                if not os.path.isfile(value):
                    raise ConfigError(f"{name}={value!r} is not a file")
                digest = file_sha256(value)
            files[name], files[hashed] = os.path.abspath(value), digest
        as_dict = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}
        return dataclasses.replace(self, config=as_dict, **files)

    def naming_files(self, **files: Optional[str]) -> "IndexSpec":
        """This spec with ``model``, ``pretrained`` or ``checkpoint`` replaced by the files (or names) given,
        their content hashes to be taken from those files rather than kept from this spec."""
        given = {k: v for k, v in files.items() if v}
        unknown = set(given) - set(FILE_HASHES)
        if unknown:
            raise TypeError(f"naming_files takes {sorted(FILE_HASHES)}, not {sorted(unknown)}")
        return dataclasses.replace(self, **given, **{FILE_HASHES[k]: None for k in given})

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
            hashed = FILE_HASHES.get(n)
            hx, hy = (getattr(a, hashed), getattr(b, hashed)) if hashed else (None, None)
            if hx and hy:  # two files: the same content wherever each lies, or another one
                if hx != hy:
                    diffs.append((n, f"{x} (sha256 {hx[:12]})", f"{y} (sha256 {hy[:12]})"))
            elif isinstance(x, dict) and isinstance(y, dict):  # the schedule: the entries that differ, but frames
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
    for name, hashed in FILE_HASHES.items():  # (before the model is built from them)
        value, digest = getattr(spec, name), getattr(spec, hashed)
        if not (value and digest):  # (a name or tag, not a file)
            continue
        if not os.path.isfile(value):
            raise ConfigError(f"{name} {value}, which the index was built with, is not there any more: name the "
                              f"file where it lies now (--{name}), or restore it")
        if file_sha256(value) != digest:
            raise SpecMismatch(f"{name} {value} has changed since the index was built (its SHA-256 differs); build a "
                               f"new index or restore the file")
    config = spec.tempme_config()
    names = ("imgme_r", "clip_layers", "clip_groups", "cross_ratio", "intra_ratio")
    # (the unmerged model takes no schedule: config_from_args refuses one given with merge off)
    schedule = {k: getattr(config, k) if spec.merge else None for k in names}
    args = argparse.Namespace(model=spec.model, pretrained=spec.pretrained, checkpoint=spec.checkpoint,
                              merge=spec.merge, backend=backend, device=device, dtype=dtype,
                              frames=spec.frames, **schedule)
    model = build_model(args)  # random weights come from a fixed seed: the same at indexing and at query time
    if model.tempme.config != config:
        raise SpecMismatch(f"the rebuilt model's schedule {model.tempme.config} differs from the index's "
                           f"{config}")
    return model


def embed_dim(model: torch.nn.Module) -> int:
    """Width of the joint text-video embedding space of an open_clip model."""
    return int(model.visual.output_dim)
