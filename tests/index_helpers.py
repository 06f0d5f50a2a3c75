"""Tiny generated videos, the tiny model and a built index, shared by test_index.py and test_search.py."""
import copy
import json
import os

import numpy as np
import pytest

from tiny import TINY_ARGS, TINY_JSON

H, W = 48, 64
# tests/tiny.py's vision tower (4 layers, 17 tokens per frame); a text tower that takes open_clip's
# own tokenizer (full vocabulary, 32 positions), since search encodes real text.
INDEX_MODEL = copy.deepcopy(TINY_JSON)
INDEX_MODEL["text_cfg"].update(vocab_size=49408, context_length=32)
SCHEDULE_ARGS = list(TINY_ARGS)  # --frames 4 and the tiny schedule


def make_video(path, seed, seconds=5, fps=2):
    """A video of its own: a random image per seed, with a dominant colour, sliding sideways."""
    from tempme_fast.retrieval.video import write_video

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    base[..., seed % 3] = 40 + 40 * (seed % 5)
    frames = (np.roll(base, 4 * t, axis=1) for t in range(int(seconds * fps)))
    return write_video(str(path), frames, fps)


def make_collection(folder, count=5, corrupt=True):
    """``count`` videos ``clip{k}.mp4`` (in a sub-folder from the third on), plus a corrupt file and
    a text file that is not a video. Returns the good paths, sorted."""
    os.makedirs(os.path.join(folder, "more"), exist_ok=True)
    paths = [make_video(os.path.join(folder, "more" if k >= 2 else "", f"clip{k}.mp4"), k) for k in range(count)]
    if corrupt:
        with open(os.path.join(folder, "broken.mp4"), "wb") as f:
            f.write(b"\x00" * 128)
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("not a video\n")
    return sorted(os.path.abspath(p) for p in paths)


def write_model(folder):
    path = os.path.join(folder, "tempme-index-tiny.json")
    with open(path, "w") as f:
        json.dump(INDEX_MODEL, f)
    return path


def index_argv(videos, out, model, *extra):
    return ["index", str(videos), "--out", str(out), "--model", model, *SCHEDULE_ARGS, "--workers", "0",
            "--batch-size", "2", "--no-progress", *extra]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``(videos folder, index folder, model json, good video paths)`` of one index built by the CLI."""
    from tempme_fast.cli import main

    root = tmp_path_factory.mktemp("collection")
    videos = root / "videos"
    good = make_collection(str(videos))
    model = write_model(str(root))
    out = root / "index"
    assert main(index_argv(videos, out, model)) == 0
    return videos, out, model, good


def vectors_by_path(index_dir):
    from tempme_fast.index import load_contents

    contents = load_contents(str(index_dir))
    return {r["path"]: contents.vectors[i].astype(np.float32) for i, r in enumerate(contents.records)}


def refused(argv) -> bool:
    """Whether ``tempme ARGV`` stops on an input error: one line on stderr, exit status 2."""
    from tempme_fast.cli import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    return stop.value.code == 2

