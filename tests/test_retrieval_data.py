"""Decoding real .mp4 files made with PyAV, frame sampling, the MSR-VTT and generic layouts, loaders."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("av")

from tempme_fast.retrieval.data import (Caption, PairDataset, RetrievalSplit, VideoDataset, collate, load_generic,
                                        load_msrvtt, load_split, make_loader, pad_tokens)
from tempme_fast.retrieval.video import (VideoDecodeError, VideoProcessor, read_frames, sample_frame_indices,
                                         uniform_indices, write_video)

H, W = 48, 64
LEVEL_STEP = 6  # grey level of frame i is LEVEL_STEP * i: the decoded level tells which frame came out


def grey_video(path, seconds, fps, red=0, **kwargs):
    """A video whose frame i is grey level 6*i (green, blue) with a constant red channel."""
    n = int(round(seconds * fps))
    assert LEVEL_STEP * (n - 1) <= 255

    def frames():
        for i in range(n):
            img = np.full((H, W, 3), LEVEL_STEP * i, np.uint8)
            img[..., 0] = red
            yield img
    return write_video(str(path), frames(), fps, **kwargs)


def frame_numbers(images):
    return [int(round(np.asarray(im)[..., 1].mean() / LEVEL_STEP)) for im in images]


def truncate(path, keep=0.5):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:int(len(data) * keep)])
    return path


class ToTensor:
    """A tiny picklable stand-in for the CLIP transform: [3, 16, 16] in [0, 1]."""

    def __call__(self, image):
        arr = np.asarray(image.resize((16, 16)), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------
# Sampling rule
# ---------------------------------------------------------------------------------------------

def test_one_fps_then_uniform():
    at_4fps = [i / 4 for i in range(80)]  # 20 s
    picked = [at_4fps[i] for i in sample_frame_indices(at_4fps, 12, 1.0)]
    assert picked == [0, 1, 3, 5, 6, 8, 10, 12, 13, 15, 17, 19]
    short = [i / 4 for i in range(12)]  # 3 s: fewer than 12 one-second frames, no subsampling
    assert [short[i] for i in sample_frame_indices(short, 12, 1.0)] == [0, 1, 2]
    ntsc = [i * 1001 / 30000 for i in range(300)]  # 29.97 fps, 10 s: frames at or just after each second
    assert sample_frame_indices(ntsc, 12, 1.0) == [0, 30, 60, 90, 120, 150, 180, 210, 240, 270]
    offset = [5.0 + t for t in short]  # times count from the first frame
    assert sample_frame_indices(offset, 12, 1.0) == [0, 4, 8]


def test_uniform_and_slow_sources():
    assert sample_frame_indices(list(range(30)), 4, None) == [0, 9, 19, 29]
    assert sample_frame_indices([0.0, 0.5, 1.0], 12, None) == [0, 1, 2]
    assert sample_frame_indices([0.0, 2.0, 4.0], 12, 1.0) == [0, 1, 2]  # 0.5 fps source: no duplicates
    assert uniform_indices(20, 12) == [0, 1, 3, 5, 6, 8, 10, 12, 13, 15, 17, 19]
    assert sample_frame_indices([], 12, 1.0) == []


@pytest.mark.parametrize("frames, fps, match", [(0, 1.0, "frames=0"), (12, -1.0, "fps=-1.0"),
                                                (12, float("nan"), "fps=nan"), (2.5, 1.0, "frames=2.5")])
def test_sampling_arguments_are_checked(frames, fps, match):
    with pytest.raises(ValueError, match=match):
        sample_frame_indices([0.0, 1.0], frames, fps)


# ---------------------------------------------------------------------------------------------
# Decoding real files
# ---------------------------------------------------------------------------------------------

def test_decodes_the_sampled_frames(tmp_path):
    short = grey_video(tmp_path / "short.mp4", 3, 4)  # 12 frames
    long = grey_video(tmp_path / "long.mp4", 20, 2)  # 40 frames
    assert frame_numbers(read_frames(short)) == [0, 4, 8]
    assert frame_numbers(read_frames(long)) == [2 * s for s in (0, 1, 3, 5, 6, 8, 10, 12, 13, 15, 17, 19)]
    assert frame_numbers(read_frames(long, frames=4, fps=None)) == [0, 13, 26, 39]
    assert read_frames(short)[0].size == (W, H) and read_frames(short)[0].mode == "RGB"


def test_processor_pads_and_masks(tmp_path):
    short = grey_video(tmp_path / "short.mp4", 3, 4)
    video, mask = VideoProcessor(ToTensor(), frames=12)(short)
    assert video.shape == (12, 3, 16, 16) and video.dtype == torch.float32
    assert mask.tolist() == [True] * 3 + [False] * 9
    assert video[3:].abs().max() == 0 and video[:3].abs().max() > 0


def test_unreadable_files_raise_with_path_and_reason(tmp_path):
    cut = truncate(grey_video(tmp_path / "cut.mp4", 20, 2))  # index at the end: cut off
    cut_fast = truncate(grey_video(tmp_path / "cut_fast.mp4", 20, 2, options={"movflags": "faststart"}))
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "text.mp4"
    text.write_text("not a video at all\n" * 20)
    cases = {str(cut): "cannot open", str(cut_fast): "truncated", str(empty): "empty",
             str(text): "cannot open", str(tmp_path / "missing.mp4"): "not found"}
    for path, reason in cases.items():
        with pytest.raises(VideoDecodeError) as info:
            read_frames(path)
        assert info.value.path == path and reason in info.value.reason, (path, info.value.reason)
        assert path in str(info.value)
        assert "Errno" not in info.value.reason and path not in info.value.reason  # FFmpeg's words, once the path


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------

def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def msrvtt(tmp_path):
    """An MSR-VTT folder: 4 test videos (one truncated), 2 train videos, CLIP4Clip's files."""
    root = tmp_path / "MSRVTT"
    videos = root / "videos" / "all"
    videos.mkdir(parents=True)
    # Red channel tells the video apart: 40 * (number + 1).
    grey_video(videos / "video7020.mp4", 3, 4, red=40)
    grey_video(videos / "video7021.mp4", 20, 2, red=80)
    truncate(grey_video(videos / "video7022.mp4", 6, 2, red=120))
    grey_video(videos / "video7023.mp4", 6, 2, red=160)
    grey_video(videos / "video1.mp4", 3, 2, red=200)
    grey_video(videos / "video2.mp4", 3, 2, red=240)
    write_csv(root / "MSRVTT_JSFUSION_test.csv", ["key", "vid_key", "video_id", "sentence"], [
        ["ret0", "msr7020", "video7020", "a dog runs on the grass"],
        ["ret1", "msr7021", "video7021", "a man cooks pasta in a kitchen"],
        ["ret2", "msr7022", "video7022", "cars race on a track"],
        ["ret3", "msr7023", "video7023", "a woman sings on stage"],
    ])
    write_csv(root / "MSRVTT_train.9k.csv", ["video_id"], [["video1"], ["video2"]])
    sentences = [{"caption": f"caption {k} of video{v}", "video_id": f"video{v}", "sen_id": 10 * v + k}
                 for v in (1, 2, 3) for k in range(3)]
    (root / "MSRVTT_data.json").write_text(json.dumps({"videos": [], "sentences": sentences}))
    return root


def test_msrvtt_test_split(msrvtt):
    split = load_msrvtt(msrvtt, "test")
    assert split.video_ids == ["video7020", "video7021", "video7022", "video7023"]
    assert [(c.caption_id, c.video_id) for c in split.captions] == [
        ("ret0", "video7020"), ("ret1", "video7021"), ("ret2", "video7022"), ("ret3", "video7023")]
    assert split.videos["video7021"] == str(msrvtt / "videos" / "all" / "video7021.mp4")
    assert load_split(msrvtt).video_ids == split.video_ids  # a folder is MSR-VTT, test by default
    assert split.limit(2).video_ids == ["video7020", "video7021"] and len(split.limit(2).captions) == 2


def test_msrvtt_train_split(msrvtt):
    split = load_msrvtt(msrvtt, "train")
    assert split.video_ids == ["video1", "video2"]  # video3 has captions but is not in the 9k list
    assert [c.caption_id for c in split.captions] == ["video1#10", "video1#11", "video1#12",
                                                      "video2#20", "video2#21", "video2#22"]


def test_content_digest_ignores_where_the_files_lie(msrvtt, tmp_path):
    split = load_msrvtt(msrvtt, "test")
    digest = split.content_digest()
    assert digest.startswith("4 captions of 4 videos, sha256 ") and len(digest.rsplit(" ", 1)[1]) == 16
    moved = msrvtt.rename(tmp_path / "moved")
    assert load_msrvtt(moved, "test").content_digest() == digest
    assert split.limit(3).content_digest().startswith("3 captions of 3 videos")
    changed = load_msrvtt(moved, "test")
    changed.captions[0] = type(changed.captions[0])("ret0", "video7020", "a cat runs on the grass")
    assert changed.content_digest() != digest and changed.content_digest().startswith("4 captions of 4 videos")


def test_msrvtt_errors_name_what_is_missing(msrvtt, tmp_path):
    with pytest.raises(ValueError, match="split='val'"):
        load_msrvtt(msrvtt, "val")
    (msrvtt / "MSRVTT_JSFUSION_test.csv").unlink()
    with pytest.raises(FileNotFoundError, match="MSRVTT_JSFUSION_test.csv"):
        load_msrvtt(msrvtt, "test")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="video folder"):
        load_msrvtt(empty)


def test_generic_csv_and_jsonl(tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    grey_video(clips / "a.mp4", 3, 2, red=40)
    grey_video(clips / "b.mp4", 3, 2, red=80)
    write_csv(tmp_path / "pairs.csv", ["video_path", "caption"], [
        ["clips/a.mp4", "first caption of a"], ["clips/b.mp4", "only caption of b"],
        ["clips/a.mp4", "second caption of a"]])
    split = load_split(tmp_path / "pairs.csv")
    assert split.videos == {"clips/a.mp4": str(clips / "a.mp4"), "clips/b.mp4": str(clips / "b.mp4")}
    assert [(c.caption_id, c.video_id) for c in split.captions] == [
        ("row1", "clips/a.mp4"), ("row2", "clips/b.mp4"), ("row3", "clips/a.mp4")]
    lines = [{"video_path": "a.mp4", "caption": ["one", "two"], "video_id": "A"},
             {"video_path": str(clips / "b.mp4"), "caption": "three", "caption_id": "c3"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    split = load_generic(tmp_path / "pairs.jsonl", video_root=clips)
    assert split.videos == {"A": str(clips / "a.mp4"), str(clips / "b.mp4"): str(clips / "b.mp4")}
    assert [c.caption_id for c in split.captions] == ["row1#0", "row1#1", "c3"]
    write_csv(tmp_path / "bad.csv", ["path", "caption"], [["a.mp4", "x"]])
    with pytest.raises(ValueError, match="video_path"):
        load_generic(tmp_path / "bad.csv")
    # A byte-order mark (some editors write one) is read past, as in a CSV; a null video_path is refused
    # (it was looked for as a file named "None").
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(lines[1]).encode() + b"\n")
    assert load_generic(tmp_path / "bom.jsonl").videos == {str(clips / "b.mp4"): str(clips / "b.mp4")}
    (tmp_path / "null.jsonl").write_text(json.dumps({"video_path": None, "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match="null.jsonl:1: video_path must be a string, got None"):
        load_generic(tmp_path / "null.jsonl")
    with pytest.raises(ValueError, match="unknown annotation format"):
        load_generic(tmp_path / "clips" / "a.mp4")


def test_one_video_file_is_one_video_however_its_rows_name_it(tmp_path):
    # Two spellings of one file were two videos with equal embeddings: each caption tied with the twin, and the
    # pessimistic rank halved R@1 without a word.
    write_csv(tmp_path / "pairs.csv", ["video_path", "caption"], [
        ["clips/a.mp4", "one"], ["./clips/a.mp4", "two"], [str(tmp_path / "clips" / "a.mp4"), "three"],
        ["clips/../clips/b.mp4", "four"]])
    split = load_generic(tmp_path / "pairs.csv")
    assert split.videos == {"clips/a.mp4": str(tmp_path / "clips" / "a.mp4"),
                            "clips/../clips/b.mp4": str(tmp_path / "clips/../clips/b.mp4")}
    assert [c.video_id for c in split.captions] == ["clips/a.mp4"] * 3 + ["clips/../clips/b.mp4"]
    # A row without video_id joins the video that named the file first; a second id for it is refused.
    lines = [{"video_path": "a.mp4", "caption": "one", "video_id": "A"}, {"video_path": "./a.mp4", "caption": "two"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert [c.video_id for c in load_generic(tmp_path / "pairs.jsonl").captions] == ["A", "A"]
    lines.append({"video_path": "a.mp4", "caption": "three", "video_id": "B"})
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:3: video_id 'B' names .*a.mp4, which .*pairs.jsonl:1 lists "
                                         r"as video 'A'; give every row of one video file the same video_id"):
        load_generic(tmp_path / "pairs.jsonl")


def test_rows_a_list_cannot_hold_are_refused_at_their_line(tmp_path):
    (tmp_path / "empty.jsonl").write_text(json.dumps({"video_path": "a.mp4", "caption": []}) + "\n")
    with pytest.raises(ValueError, match="empty.jsonl:1: the caption list is empty"):
        load_generic(tmp_path / "empty.jsonl")
    # An unquoted comma in a caption: the text past it was a list that .strip() failed on.
    (tmp_path / "comma.csv").write_text("video_path,caption\na.mp4,a dog, running\n")
    with pytest.raises(ValueError, match="comma.csv:2: 3 fields, the header has 2; put a field that holds a comma "
                                         "in double quotes"):
        load_generic(tmp_path / "comma.csv")
    # Blank lines and a caption over two lines before the bad row: the line named is the bad row's own.
    (tmp_path / "lines.csv").write_text('video_path,caption\n\na.mp4,"over\ntwo lines"\nb.mp4,\n')
    with pytest.raises(ValueError, match="lines.csv:5: caption must be a non-empty string"):
        load_generic(tmp_path / "lines.csv")


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------

def red_level(video, mask):
    return round(float(video[mask][:, 0].mean()) * 255 / 40) * 40


def check_batches(batches, split):
    seen, skipped = {}, []
    for batch in batches:
        skipped += batch["skipped"]
        for k, vid in enumerate(batch["video_id"]):
            assert split.video_ids[int(batch["index"][k])] == vid
            seen[vid] = red_level(batch["video"][k], batch["mask"][k])
    return seen, skipped


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_skips_and_reports_corrupt_videos(msrvtt, workers):
    split = load_msrvtt(msrvtt, "test")
    loader = make_loader(VideoDataset(split, VideoProcessor(ToTensor(), frames=12)), batch_size=3,
                         workers=workers)
    seen, skipped = check_batches(loader, split)
    # Every readable video carries its own content: nothing shifted past the corrupt one.
    assert seen == {"video7020": 40, "video7021": 80, "video7023": 160}
    assert len(skipped) == 1
    assert skipped[0]["video_id"] == "video7022" and skipped[0]["path"].endswith("video7022.mp4")
    assert "cannot open" in skipped[0]["reason"]


def test_collate_of_only_failures_is_empty():
    batch = collate([{"index": 4, "video_id": "v", "path": "/x/v.mp4", "error": "file not found"}])
    assert batch["video_id"] == [] and batch["index"].numel() == 0 and "video" not in batch
    assert batch["skipped"] == [{"index": 4, "video_id": "v", "path": "/x/v.mp4", "reason": "file not found"}]


def test_pair_dataset_keeps_captions_with_their_videos(msrvtt):
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    split = load_msrvtt(msrvtt, "test")
    pairs = PairDataset(split, VideoProcessor(ToTensor(), frames=4), tokenizer, context_length=32)
    batch = collate([pairs[i] for i in range(len(pairs))])
    assert batch["caption_id"] == ["ret0", "ret1", "ret3"]
    assert batch["video_id"] == ["video7020", "video7021", "video7023"]
    assert [s["video_id"] for s in batch["skipped"]] == ["video7022"]
    assert batch["tokens"].shape == (3, 32) and batch["video"].shape == (3, 4, 3, 16, 16)
    expected = tokenizer(["a dog runs on the grass", "a man cooks pasta in a kitchen", "a woman sings on stage"],
                         context_length=32)
    assert torch.equal(batch["tokens"], expected)
    train = PairDataset(load_msrvtt(msrvtt, "train"), VideoProcessor(ToTensor(), frames=4), tokenizer,
                        captions="random", seed=0)
    assert len(train) == 2 and train[1]["caption_id"].startswith("video2#")


def test_random_captions_are_drawn_per_epoch_alike_in_every_worker(tmp_path):
    """Each DataLoader worker held a copy of one RNG in its starting state, made anew each epoch: every epoch drew
    the same captions, and a resumed run drew others than the uninterrupted one."""
    from torch.utils.data import DataLoader

    videos = {f"v{k}": str(tmp_path / f"v{k}.mp4") for k in range(8)}  # (missing: the items carry their ids)
    captions = [Caption(f"v{k}#{j}", f"v{k}", f"caption {j} of video {k}") for k in range(8) for j in range(5)]
    pairs = PairDataset(RetrievalSplit("s", videos, captions), VideoProcessor(lambda im: im, frames=4),
                        lambda texts, context_length: None, captions="random", seed=3)

    def epoch(e, workers):
        pairs.set_epoch(e)
        loader = DataLoader(pairs, batch_size=4, num_workers=workers, collate_fn=lambda items: items)
        return [it["caption_id"] for batch in loader for it in batch]

    draws = [epoch(e, 0) for e in range(3)]
    assert len({tuple(d) for d in draws}) == 3  # anew each epoch
    assert [epoch(e, 2) for e in range(3)] == draws  # whichever process loads an item
    again = PairDataset(RetrievalSplit("s", videos, captions), VideoProcessor(lambda im: im, frames=4),
                        lambda texts, context_length: None, captions="random", seed=3)
    again.set_epoch(2)
    assert [again[i]["caption_id"] for i in range(8)] == draws[2]  # a resumed run's epoch 2


def test_pad_tokens():
    tokens = torch.tensor([[49406, 320, 49407]])
    assert pad_tokens(tokens, 5).tolist() == [[49406, 320, 49407, 0, 0]]
    with pytest.raises(ValueError, match="at most 2"):
        pad_tokens(tokens, 2)
