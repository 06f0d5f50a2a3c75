"""Retrieval datasets: the MSR-VTT layout of the CLIP4Clip family, a generic CSV/JSONL layout, loaders.

A split is a :class:`RetrievalSplit`: an ordered ``video_id -> path`` table and a list of
:class:`Caption` records, each naming its ``video_id``. Every item a loader yields carries its ids,
so a video that fails to decode is dropped together with its captions and nothing shifts onto the
wrong video.

MSR-VTT (files of ``msrvtt_data.zip`` from CLIP4Clip's release, videos from the official source):

    <root>/MSRVTT_data.json            train captions: {"videos": [...], "sentences": [{"video_id",
                                        "caption", "sen_id"}, ...]}
    <root>/MSRVTT_train.9k.csv         column video_id: the 9k training videos
    <root>/MSRVTT_JSFUSION_test.csv    columns key, vid_key, video_id, sentence: the 1k-A test split
    <root>/videos/<video_id>.mp4       (also found: <root>/videos/all/, <root>/MSRVTT_Videos/)

The annotation files may also sit in ``<root>/msrvtt_data/`` (the zip's own folder).

Generic layout: a ``.csv`` with a header holding ``video_path`` and ``caption`` (optional
``video_id``, ``caption_id``), or a ``.jsonl`` with one object per line with the same keys, where
``caption`` may also be a list of captions. Relative paths are relative to the file's folder, or
to ``video_root`` when given. Rows naming the same video file share one video, however they spell its
path; a row without ``video_id`` takes the id of the file's first row (else its ``video_path``).
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from .video import VideoDecodeError, VideoProcessor

log = logging.getLogger(__name__)

MSRVTT_TRAIN_JSON = "MSRVTT_data.json"
MSRVTT_TRAIN_LIST = "MSRVTT_train.9k.csv"
MSRVTT_TEST_CSV = "MSRVTT_JSFUSION_test.csv"
MSRVTT_TEST_COLUMNS = ("key", "vid_key", "video_id", "sentence")
_ANNOTATION_DIRS = (".", "msrvtt_data", "annotations", "anns")
_VIDEO_DIRS = ("videos/all", "videos", "MSRVTT_Videos", "MSRVTT/videos/all")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov")


@dataclass(frozen=True)
class Caption:
    """One caption: its own id, the id of its video and the text."""

    caption_id: str
    video_id: str
    text: str


@dataclass
class RetrievalSplit:
    """Videos (``video_id -> path``, in a fixed order) and the captions that describe them."""

    name: str
    videos: Dict[str, str]
    captions: List[Caption]
    source: str = ""
    notes: List[str] = field(default_factory=list)

    def __post_init__(self):
        unknown = [c for c in self.captions if c.video_id not in self.videos]
        if unknown:
            raise ValueError(f"{len(unknown)} caption(s) name a video that the split does not list, e.g. "
                             f"caption {unknown[0].caption_id!r} -> video {unknown[0].video_id!r}")
        ids = [c.caption_id for c in self.captions]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"caption ids must be unique; {dup!r} appears more than once")

    @property
    def video_ids(self) -> List[str]:
        return list(self.videos)

    def limit(self, max_videos: Optional[int]) -> "RetrievalSplit":
        """The first ``max_videos`` videos and their captions (for smoke runs)."""
        if max_videos is None:
            return self
        if isinstance(max_videos, bool) or not isinstance(max_videos, int) or max_videos < 1:
            raise ValueError(f"max_videos={max_videos!r} must be a positive int or None (all videos)")
        keep = dict(list(self.videos.items())[:max_videos])
        captions = [c for c in self.captions if c.video_id in keep]
        return RetrievalSplit(self.name, keep, captions, self.source, list(self.notes))

    def content_digest(self) -> str:
        """Which captions of which videos, in order, in a few words: ``"N captions of M videos, sha256 <16
        hex digits>"`` over the video ids and every caption's id, video and text. The files' locations are
        left out, so a moved dataset keeps its digest."""
        data = json.dumps([list(self.videos), [[c.caption_id, c.video_id, c.text] for c in self.captions]])
        digest = hashlib.sha256(data.encode("utf-8")).hexdigest()[:16]
        return f"{len(self.captions)} captions of {len(self.videos)} videos, sha256 {digest}"

    def missing_videos(self) -> List[str]:
        """Ids of videos whose file does not exist."""
        return [vid for vid, path in self.videos.items() if not os.path.isfile(path)]


# --------------------------------------------------------------------------------------------
# MSR-VTT
# --------------------------------------------------------------------------------------------

def _find_file(root: Path, name: str, what: str) -> Path:
    tried = [root / d / name for d in _ANNOTATION_DIRS]
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{what} {name} not found; looked at " + ", ".join(str(p) for p in tried))


def find_msrvtt_video_dir(root: Path) -> Path:
    """The folder of ``<video_id>.mp4`` files under an MSR-VTT root."""
    tried = [root / d for d in _VIDEO_DIRS]
    for path in tried:
        if path.is_dir() and any(path.glob("video*")):
            return path
    raise FileNotFoundError("MSR-VTT video folder not found; looked for video*.mp4 in "
                            + ", ".join(str(p) for p in tried) + " (or pass videos=/--videos)")


def _video_path(folder: Path, video_id: str) -> str:
    # CLIP4Clip's loaders fall back to .webm; accept any common container, prefer .mp4.
    for ext in VIDEO_EXTENSIONS:
        candidate = folder / f"{video_id}{ext}"
        if candidate.is_file():
            return str(candidate)
    return str(folder / f"{video_id}.mp4")


def read_csv(path, required: Sequence[str]) -> List[Dict[str, str]]:
    """The rows of a CSV file, column names and values stripped, once its header holds every ``required`` column
    (a ValueError that names the file otherwise); a byte-order mark is tolerated. Each row also holds ``"_line"``,
    the line of the file where it ends (blank lines and quoted line breaks counted). A row with more fields than
    the header is a ValueError naming its line: an unquoted comma in a caption would otherwise be lost."""
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in required if c not in columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; the header must hold {list(required)}, "
                             f"found {columns}")
        rows = []
        for row in reader:
            if None in row:  # (DictReader's key for the fields past the header's)
                raise ValueError(f"{path}:{reader.line_num}: {len(columns) + len(row[None])} fields, the header "
                                 f"has {len(columns)}; put a field that holds a comma in double quotes")
            rows.append({**{k.strip(): (v or "").strip() for k, v in row.items()}, "_line": reader.line_num})
        return rows


def load_msrvtt(root, split: str = "test", videos=None, train_list: str = MSRVTT_TRAIN_LIST) -> RetrievalSplit:
    """MSR-VTT in the CLIP4Clip layout.

    Args:
        root: folder holding the annotation files (directly or in ``msrvtt_data/``).
        split: ``"test"`` (the 1k-A split: 1000 videos, one caption each, caption ids from ``key``)
            or ``"train"`` (the videos of ``train_list``, all their captions from the JSON; caption
            ids ``<video_id>#<sen_id>``).
        videos: folder of ``<video_id>.mp4``; default: found under ``root``.
        train_list: CSV with a ``video_id`` column (``MSRVTT_train.9k.csv`` or ``MSRVTT_train.7k.csv``).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MSR-VTT root {root} is not a folder")
    if split not in ("test", "train"):
        raise ValueError(f"split={split!r} is not 'test' (1k-A) or 'train' ({train_list})")
    folder = Path(videos) if videos is not None else find_msrvtt_video_dir(root)
    if not folder.is_dir():
        raise FileNotFoundError(f"video folder {folder} does not exist")
    if split == "test":
        path = _find_file(root, MSRVTT_TEST_CSV, "MSR-VTT 1k-A test file")
        rows = read_csv(path, ("key", "video_id", "sentence"))
        captions = [Caption(r["key"], r["video_id"], r["sentence"]) for r in rows]
        source = str(path)
    else:
        list_path = _find_file(root, train_list, "MSR-VTT train list")
        json_path = _find_file(root, MSRVTT_TRAIN_JSON, "MSR-VTT caption file")
        train_ids = {r["video_id"] for r in read_csv(list_path, ("video_id",))}
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
        if "sentences" not in data:
            raise ValueError(f"{json_path}: no 'sentences' list; expected MSR-VTT's "
                             f"{{'videos': [...], 'sentences': [...]}}")
        captions = []
        for n, s in enumerate(data["sentences"]):
            if s["video_id"] in train_ids:
                sen = s.get("sen_id", n)
                captions.append(Caption(f"{s['video_id']}#{sen}", s["video_id"], s["caption"]))
        missing = train_ids - {c.video_id for c in captions}
        if missing:
            raise ValueError(f"{len(missing)} video(s) of {list_path.name} have no caption in "
                             f"{json_path.name}, e.g. {sorted(missing)[0]}")
        source = f"{list_path} + {json_path}"
    order = list(dict.fromkeys(c.video_id for c in captions))
    table = {vid: _video_path(folder, vid) for vid in order}
    return RetrievalSplit(f"msrvtt-{split}", table, captions, source)


# --------------------------------------------------------------------------------------------
# Generic CSV / JSONL
# --------------------------------------------------------------------------------------------

def _resolve(path: str, base: Path) -> str:
    p = Path(os.path.expanduser(path))
    return str(p if p.is_absolute() else base / p)


def load_generic(path, video_root=None) -> RetrievalSplit:
    """A ``.csv`` or ``.jsonl`` list of ``video_path, caption`` rows (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    base = Path(video_root) if video_root is not None else path.parent
    suffix = path.suffix.lower()
    records = []
    if suffix == ".csv":
        for row in read_csv(path, ("video_path", "caption")):
            records.append(row)
    elif suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({exc})") from None
                if not isinstance(row, dict) or "video_path" not in row or "caption" not in row:
                    raise ValueError(f"{path}:{line_no}: each line must be an object with 'video_path' "
                                     f"and 'caption'")
                row["_line"] = line_no
                records.append(row)
    else:
        raise ValueError(f"{path}: unknown annotation format {suffix!r}; use .csv or .jsonl")
    if not records:
        raise ValueError(f"{path}: no rows")
    videos: Dict[str, str] = {}
    ids_of_files: Dict[str, Tuple[str, str]] = {}  # one file, one video: its real path -> (video id, first row)
    captions: List[Caption] = []
    for n, row in enumerate(records, start=1):
        where = f"{path}:{row['_line']}"
        if not isinstance(row["video_path"], str):  # (a null would be looked for as a file named None)
            raise ValueError(f"{where}: video_path must be a string, got {row['video_path']!r}")
        video_path = row["video_path"].strip()
        if not video_path:
            raise ValueError(f"{where}: empty video_path")
        resolved = _resolve(video_path, base)
        file = os.path.realpath(resolved)
        named = str(row.get("video_id") or "").strip()
        known_id, first = ids_of_files.setdefault(file, (named or video_path, where))
        video_id = named or known_id
        if video_id != known_id:  # (two columns of one video: each caption would tie with its twin)
            raise ValueError(f"{where}: video_id {video_id!r} names {resolved}, which {first} lists as video "
                             f"{known_id!r}; give every row of one video file the same video_id")
        if os.path.realpath(videos.setdefault(video_id, resolved)) != file:
            raise ValueError(f"{where}: video_id {video_id!r} already names {videos[video_id]}, not {resolved}")
        texts = row["caption"] if isinstance(row["caption"], list) else [row["caption"]]
        if not texts:  # (a video no caption describes has no place in the retrieval metrics)
            raise ValueError(f"{where}: the caption list is empty; give each video at least one caption")
        for k, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: caption must be a non-empty string, got {text!r}")
            caption_id = row.get("caption_id") or f"row{n}"
            if len(texts) > 1:
                caption_id = f"{caption_id}#{k}"
            captions.append(Caption(str(caption_id), video_id, text.strip()))
    return RetrievalSplit(path.stem, videos, captions, str(path))


def load_split(data, split: str = "test", fmt: str = "auto", videos=None,
               train_list: str = MSRVTT_TRAIN_LIST) -> RetrievalSplit:
    """Load ``data``: an MSR-VTT root folder, or a generic ``.csv``/``.jsonl`` file.

    ``fmt="auto"`` picks MSR-VTT for a folder and generic for a file. ``split`` applies to MSR-VTT.
    """
    if fmt not in ("auto", "msrvtt", "generic"):
        raise ValueError(f"fmt={fmt!r} is not one of 'auto', 'msrvtt', 'generic'")
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"data path {data} does not exist (an MSR-VTT folder or a .csv/.jsonl file)")
    if fmt == "auto":
        fmt = "msrvtt" if data.is_dir() else "generic"
    if fmt == "msrvtt":
        return load_msrvtt(data, split, videos, train_list)
    return load_generic(data, videos)


# --------------------------------------------------------------------------------------------
# Datasets and loaders
# --------------------------------------------------------------------------------------------

def tokenize(tokenizer: Callable, texts: Sequence[str], context_length: int) -> torch.Tensor:
    """``[N, context_length]`` token ids (truncated, EOT kept last) from an open_clip tokenizer."""
    return tokenizer(list(texts), context_length=context_length)


def pad_tokens(tokens: torch.Tensor, model_context_length: int) -> torch.Tensor:
    """Zero-pad ``[N, L]`` tokens to the text tower's ``model_context_length``.

    CLIP's text attention is causal and its feature is read at the EOT token, so tokens
    tokenised to 32 and zero-padded give exactly the features of a model cut to 32 positions
    (what the CLIP4Clip family runs).
    """
    n, length = tokens.shape
    if length > model_context_length:
        raise ValueError(f"tokens have length {length} but the text tower takes at most {model_context_length}")
    if length == model_context_length:
        return tokens
    return torch.cat([tokens, tokens.new_zeros(n, model_context_length - length)], dim=1)


def _load_video(processor: VideoProcessor, path: str):
    """``(video, mask, None)`` or ``(None, None, reason)``: a bad file never raises out of a worker."""
    try:
        video, mask = processor(path)
        return video, mask, None
    except VideoDecodeError as exc:
        return None, None, exc.reason
    except Exception as exc:  # anything else a broken file can trigger inside FFmpeg or PIL
        return None, None, f"{type(exc).__name__}: {exc}"


class VideoDataset(Dataset):
    """One item per video of a split: ``{"index", "video_id", "path", "video", "mask"}``.

    A video that cannot be read gives ``{"index", "video_id", "path", "error"}`` instead;
    :func:`collate` drops it and records it under ``"skipped"``.
    """

    def __init__(self, split: RetrievalSplit, processor: VideoProcessor):
        self.items = list(split.videos.items())
        self.processor = processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        video_id, path = self.items[index]
        video, mask, error = _load_video(self.processor, path)
        item = {"index": index, "video_id": video_id, "path": path}
        if error is not None:
            item["error"] = error
        else:
            item.update(video=video, mask=mask)
        return item


class PairDataset(Dataset):
    """Caption-video pairs for training: ``{"index", "video_id", "caption_id", "path", "video", "mask",
    "tokens"}``.

    ``captions="all"`` makes one item per caption (the unfolded sentences, DRL's choice);
    ``"random"`` one item per video with one of its captions drawn for each epoch: the draw depends on
    ``seed``, the epoch (:meth:`set_epoch`, which :class:`~tempme_fast.trainer.Trainer` calls on a
    DataLoader's dataset) and the index only, so DataLoader workers draw alike and a resumed run draws
    what the uninterrupted one did. Without ``set_epoch`` every epoch draws the same captions.
    """

    # An item depends on its index (and the epoch) alone, in whichever DataLoader worker it is made: a resumed
    # Trainer skips the batches an epoch had consumed without loading them (processors that draw random numbers
    # would break this; VideoProcessor draws none).
    items_depend_on_index = True

    def __init__(self, split: RetrievalSplit, processor: VideoProcessor, tokenizer: Callable,
                 context_length: int = 32, captions: str = "all", seed: Optional[int] = None):
        if captions not in ("all", "random"):
            raise ValueError(f"captions={captions!r} is not 'all' (one item per caption) or 'random' "
                             f"(one item per video)")
        self.split, self.processor, self.tokenizer = split, processor, tokenizer
        self.context_length = context_length
        self.mode = captions
        self.by_video: Dict[str, List[Caption]] = {}
        for c in split.captions:
            self.by_video.setdefault(c.video_id, []).append(c)
        self.video_ids = list(self.by_video)
        # (None: a base drawn once here, so that runs differ; each draw still depends on epoch and index alone)
        self.seed = random.SystemRandom().randrange(2 ** 63) if seed is None else seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the captions of epoch ``epoch`` (``captions="random"``)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.split.captions) if self.mode == "all" else len(self.video_ids)

    def __getitem__(self, index: int) -> dict:
        if self.mode == "all":
            caption = self.split.captions[index]
        else:
            # (a str seed is hashed the same way in every process, whatever PYTHONHASHSEED says)
            draw = random.Random(f"{self.seed}:{self.epoch}:{index}")
            caption = draw.choice(self.by_video[self.video_ids[index]])
        path = self.split.videos[caption.video_id]
        video, mask, error = _load_video(self.processor, path)
        item = {"index": index, "video_id": caption.video_id, "caption_id": caption.caption_id, "path": path}
        if error is not None:
            item["error"] = error
            return item
        tokens = tokenize(self.tokenizer, [caption.text], self.context_length)[0]
        item.update(video=video, mask=mask, tokens=tokens)
        return item


def collate(items: List[dict]) -> dict:
    """Stack the readable items of a batch; list the unreadable ones under ``"skipped"``.

    Returns ``{"video": [B, T, 3, H, W], "mask": [B, T] bool, "index": [B] long, "video_id": [B],
    "path": [B], "skipped": [{"index", "video_id", "path", "reason"}, ...]}`` (plus ``"tokens"``
    ``[B, L]`` and ``"caption_id"`` for pairs). ``B`` may be 0 when every item failed.
    """
    good = [it for it in items if "error" not in it]
    skipped = [{"index": it["index"], "video_id": it["video_id"], "path": it["path"], "reason": it["error"]}
               for it in items if "error" in it]
    batch = {"index": torch.tensor([it["index"] for it in good], dtype=torch.long),
             "video_id": [it["video_id"] for it in good], "path": [it["path"] for it in good],
             "skipped": skipped}
    if good:
        batch["video"] = torch.stack([it["video"] for it in good])
        batch["mask"] = torch.stack([it["mask"] for it in good])
        if "tokens" in good[0]:
            batch["tokens"] = torch.stack([it["tokens"] for it in good])
            batch["caption_id"] = [it["caption_id"] for it in good]
    return batch


def _ignore_ctrl_c(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group. The main process decides what it means (the trainer
    # finishes its step and checkpoints); a worker that died of it would fail the next batch instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset: Dataset, batch_size: int, workers: int = 0, shuffle: bool = False,
                drop_last: bool = False, pin_memory: bool = False, **kwargs) -> DataLoader:
    """A DataLoader with :func:`collate`, which skips unreadable videos instead of failing."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers={workers!r} must be an int >= 0 (0 decodes in the main process)")
    if workers > 0:
        kwargs.setdefault("persistent_workers", False)
        kwargs.setdefault("prefetch_factor", 2)
        kwargs.setdefault("worker_init_fn", _ignore_ctrl_c)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      collate_fn=collate, drop_last=drop_last, pin_memory=pin_memory, **kwargs)


def report_skipped(skipped: Sequence[dict], logger: Optional[logging.Logger] = None) -> None:
    """Log every skipped video with its path and reason, then the count."""
    logger = logger or log
    for s in skipped:
        logger.warning("skipped video %s (%s): %s", s["video_id"], s["path"], s["reason"])
    if skipped:
        logger.warning("%d video(s) skipped as unreadable", len(skipped))
