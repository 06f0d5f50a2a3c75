"""`tempme index`: shards and manifests, resume after a kill, growing an index, two processes, bad input."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("av")

from index_helpers import built, index_argv, make_video, refused, vectors_by_path  # noqa: F401 (built: a fixture)
from kit import held_lock, process_env
from tempme_fast.cli import main
from tempme_fast.errors import ConfigError
from tempme_fast.index import IndexSpec, build_index, list_videos, load_contents, load_encoder, rank_share
from tempme_fast.index import store
from tempme_fast.retrieval.video import VideoProcessor

# Stored embeddings are fp16: a unit vector's entries round by at most 2^-11 relative, < 1e-3 absolute.
FP16_ATOL = 1e-3


def _spec(model):
    return IndexSpec(model=model, frames=4, config={"frames": 4, "imgme_r": 1, "clip_layers": [2, 3],
                                                    "clip_groups": [2, 2], "cross_ratio": 0.3,
                                                    "intra_ratio": 0.1, "frame_pos": True, "prop_attn": True})


def test_index_records_every_video(built):
    videos, out, model, good = built
    header = json.loads((out / "index.json").read_text())
    assert header["embed_dim"] == 24 and header["spec"]["model"] == os.path.abspath(model)
    assert header["spec"]["config"]["clip_layers"] == [2, 3] and header["spec"]["frames"] == 4
    rows = [r for m in store.manifests(str(out)) for r in store.read_manifest(m)]
    assert sorted(r["path"] for r in rows if r["status"] == "ok") == good
    (bad,) = [r for r in rows if r["status"] != "ok"]
    assert bad["path"].endswith("broken.mp4") and bad["reason"] and bad["row"] is None
    assert all(r["frames"] == 4 and r["duration"] == pytest.approx(5.0, abs=0.6) for r in rows if r["status"] == "ok")
    assert not any(r["path"].endswith(".txt") for r in rows)

    # The stored vectors are the model's own embeddings of those files, L2-normalised, in fp16.
    contents = load_contents(str(out))
    assert contents.vectors.dtype == np.float16 and contents.vectors.shape == (5, 24)
    encoder = load_encoder(contents.spec)
    processor = VideoProcessor.for_model(encoder, 4, 1.0)
    for i, record in enumerate(contents.records):
        video, mask = processor(record["path"])
        with torch.no_grad():
            expected = F.normalize(encoder.encode_video(video[None], mask[None]), dim=-1)[0].numpy()
        np.testing.assert_allclose(contents.vectors[i].astype(np.float32), expected, atol=FP16_ATOL, rtol=0)
    # Different videos give different vectors (a test on identical vectors could not catch a mix-up).
    sims = contents.vectors.astype(np.float32) @ contents.vectors.astype(np.float32).T
    assert np.all(sims[~np.eye(5, dtype=bool)] < 0.9995)


def test_resume_after_a_kill_between_shard_files(built, tmp_path, monkeypatch):
    """Killed after a shard's vectors but before its manifest: the resumed run redoes just that shard."""
    videos, reference, model, good = built
    out = tmp_path / "index"
    real_write = store._atomic_write
    manifests_written = []

    def dies_on_second_manifest(path, write):
        if path.endswith(".jsonl"):
            if len(manifests_written) == 1:
                raise KeyboardInterrupt("killed")
            manifests_written.append(path)
        real_write(path, write)

    monkeypatch.setattr(store, "_atomic_write", dies_on_second_manifest)
    with pytest.raises(KeyboardInterrupt):
        build_index(str(videos), str(out), _spec(model), batch_size=1, workers=0, shard_size=2, progress=False)
    monkeypatch.setattr(store, "_atomic_write", real_write)
    shards = out / "shards"
    assert sorted(os.listdir(shards)) == ["r0000-000000.jsonl", "r0000-000000.npy", "r0000-000001.npy"]
    # A writer killed mid-write leaves a temporary file: a dead writer's is removed, never read.
    dead = subprocess.Popen(["true"])
    dead.wait()
    (shards / f".r0000-000001.jsonl.{dead.pid}.tmp").write_text('{"path": "half a li')
    first = load_contents(str(out))  # the committed shard: broken.mp4 and clip0.mp4, in path order
    assert [r["path"] for r in first.records] == good[:1] and len(first.failed) == 1

    summary = build_index(str(videos), str(out), _spec(model), resume=True, batch_size=2, workers=0,
                          shard_size=2, progress=False)
    assert (summary["already"], summary["indexed"], summary["failed"]) == (2, 4, 0)
    assert not [n for n in os.listdir(shards) if n.endswith(".tmp")]
    got, want = vectors_by_path(out), vectors_by_path(reference)
    assert sorted(got) == sorted(want) == good
    for path in good:
        np.testing.assert_allclose(got[path], want[path], atol=FP16_ATOL, rtol=0)
    # Run to completion: a further resume has nothing left to do.
    again = build_index(str(videos), str(out), _spec(model), resume=True, workers=0, progress=False)
    assert (again["already"], again["indexed"], again["shards"]) == (6, 0, [])


def test_a_second_writer_of_a_rank_is_refused(built, tmp_path):
    """Two writers of rank 0 would both number their shards from 0 and replace each other's."""
    videos, reference, model, good = built
    out = tmp_path / "index"
    store.prepare_dir(str(out))
    with held_lock(out / "shards" / ".r0000.lock"):  # what another running writer holds
        with pytest.raises(ConfigError, match=f"--out {out}: process 4242 is writing this index as rank 0, and a "
                                              f"second writer would replace its shards"):
            build_index(str(videos), str(out), _spec(model), workers=0, progress=False)
        assert store.manifests(str(out)) == []
        # Another rank has a lock of its own.
        summary = build_index(str(videos), str(out), _spec(model), workers=0, progress=False, rank=1, world_size=2)
        assert summary["indexed"] + summary["failed"] == summary["share"] > 0
    # The other writer has ended: rank 0 can write, and each run lets go of its lock when it ends.
    for _ in range(2):
        build_index(str(videos), str(out), _spec(model), resume=True, workers=0, progress=False, rank=0,
                    world_size=2)
    assert sorted(vectors_by_path(out)) == good and not (out / "shards" / ".r0000.lock").exists()


def test_a_nan_embedding_is_recorded_as_a_failure_not_indexed(built, tmp_path):
    """An encoder that overflowed (fp16) for one video: that video is recorded with the reason, not searched."""
    videos, reference, model, good = built
    encoder = load_encoder(_spec(model))
    encode = encoder.encode_video

    def overflows_on_the_second(video, mask):
        emb = encode(video, mask)
        emb[1 % len(emb)] = float("nan")
        return emb

    encoder.encode_video = overflows_on_the_second
    out = tmp_path / "index"
    summary = build_index(str(videos), str(out), _spec(model), model=encoder, batch_size=2, workers=0,
                          progress=False)
    contents = load_contents(str(out))
    nan = [r for r in contents.failed if "NaN or Inf embedding" in r["reason"]]
    assert len(nan) == 3 and summary["failed"] == 4 and summary["indexed"] == 2  # 6 files, 2 a batch; 1 broken
    assert np.isfinite(contents.vectors).all() and len(contents.vectors) == len(contents.records) == 2
    want = vectors_by_path(reference)
    for record, vector in zip(contents.records, contents.vectors):
        np.testing.assert_allclose(vector, want[record["path"]], atol=FP16_ATOL, rtol=0)


@pytest.mark.slow  # two command-line runs in fresh processes
def test_resume_after_sigkill(built, tmp_path):
    """A real kill: SIGKILL once the first shard is committed, then --resume completes the index."""
    videos, reference, model, good = built
    out = tmp_path / "index"
    env = process_env(OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "tempme_fast", *index_argv(videos, out, model, "--shard-size", "1",
                                                             "--batch-size", "1")]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not store.manifests(str(out)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(store.manifests(str(out)))
    assert committed >= 1
    done = subprocess.run(argv + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{committed} already in the index" in done.stdout
    got, want = vectors_by_path(out), vectors_by_path(reference)
    assert sorted(got) == sorted(want)
    for path in want:
        np.testing.assert_allclose(got[path], want[path], atol=FP16_ATOL, rtol=0)


def test_adding_videos_encodes_only_the_new_ones(built, tmp_path, capsys):
    videos, reference, model, good = built
    out = tmp_path / "index"
    shutil.copytree(reference, out)
    later = make_video(tmp_path / "later.mp4", seed=11)
    listing = tmp_path / "videos.txt"  # the indexed folder's files and one new video
    listing.write_text("\n".join(list_videos(str(videos)) + [later]) + "\n")
    assert main(index_argv(listing, out, model, "--resume")) == 0
    assert "1 video(s) indexed, 0 unreadable (recorded with their reason), 6 already" in capsys.readouterr().out
    assert len(load_contents(str(out)).records) == 6 and len(store.manifests(str(out))) == 2


@pytest.mark.slow  # two command-line runs in fresh processes
def test_two_processes_split_the_work(built, tmp_path):
    """RANK/WORLD_SIZE as torchrun sets them: disjoint shards whose union is the single-process index."""
    videos, reference, model, good = built
    out = tmp_path / "index"
    procs = []
    for rank in range(2):
        env = process_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "tempme_fast", *index_argv(videos, out, model)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    for rank, (p, (stdout, stderr)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, stderr
        assert f"rank {rank}/2" in stdout
    by_rank = [[r["path"] for m in store.manifests(str(out)) if os.path.basename(m).startswith(f"r000{k}-")
                for r in store.read_manifest(m)] for k in range(2)]
    assert by_rank[0] and by_rank[1] and not set(by_rank[0]) & set(by_rank[1])
    got, want = vectors_by_path(out), vectors_by_path(reference)
    assert sorted(got) == sorted(want)
    for path in want:
        np.testing.assert_allclose(got[path], want[path], atol=FP16_ATOL, rtol=0)
    assert len(load_contents(str(out)).failed) == 1


def test_bad_inputs_are_refused_with_a_reason(built, tmp_path, capsys):
    videos, reference, model, good = built
    empty = tmp_path / "empty"
    empty.mkdir()
    assert refused(index_argv(empty, tmp_path / "a", model))
    assert "holds no video files" in capsys.readouterr().err
    assert refused(index_argv(tmp_path / "nowhere", tmp_path / "a", model))
    assert "does not exist" in capsys.readouterr().err

    copy = tmp_path / "index"
    shutil.copytree(reference, copy)
    assert refused(index_argv(videos, copy, model))
    assert "--resume" in capsys.readouterr().err
    # Growing an index with another encoder would mix embedding spaces.
    assert refused(["index", str(videos), "--out", str(copy), "--model", model, "--frames", "4", "--no-merge",
                    "--resume", "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert "another encoder" in err and "merge: index True, requested False" in err
    # The schedule's differing entries only, and advice for growing it (not for querying it).
    assert refused(index_argv(videos, copy, model, "--resume", "--cross-ratio", "0.4"))
    err = capsys.readouterr().err
    assert "(config.cross_ratio: index 0.3, requested 0.4). Add videos with the settings it was built with" in err
    # Text queries longer than the text tower's positions could never be encoded: refused before any video is.
    fresh = tmp_path / "long_queries"
    assert refused(index_argv(videos, fresh, model, "--context-length", "33"))
    assert "context_length=33 (--context-length) exceeds the text tower's 32 positions" in capsys.readouterr().err
    assert not fresh.exists()  # nor the empty folders made for it


def test_out_that_cannot_be_written(built, tmp_path, capsys):
    videos, reference, model, good = built
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert refused(index_argv(videos, blocker / "index", model))
    err = capsys.readouterr().err
    assert f"--out {blocker / 'index'}" in err and "cannot write" in err
    # The summary's file is checked before any video is encoded (it failed after all of them, in a traceback).
    out = tmp_path / "index"
    for where, says in ((blocker / "s.json", "cannot create the folder"), (out, "is the --out folder"),
                        (out / "index.json", "(its header index.json)"), (out / "shards" / "s.json", "(shards/)"),
                        (out / "search" / "s.json", "(search/)")):
        assert refused(index_argv(videos, out, model, "--json", str(where)))
        assert says in capsys.readouterr().err
        assert not out.exists()
    # Nor, through a link, the header of an index that exists (the summary replaced it: the index was lost).
    header = reference / "index.json"
    before = header.read_bytes()
    (tmp_path / "link.json").symlink_to(header)
    assert refused(index_argv(videos, reference, model, "--json", str(tmp_path / "link.json")))
    assert "is a file of the --out index (its header index.json)" in capsys.readouterr().err
    assert header.read_bytes() == before
    deep = tmp_path / "new" / "summary.json"
    assert main(index_argv(videos, out, model, "--json", str(deep))) == 0
    assert json.loads(deep.read_text())["indexed"] == len(good)


def test_bad_sizes_are_refused_before_the_folder_or_the_model(built, tmp_path, monkeypatch):
    from tempme_fast.index import build

    videos, _, _, _ = built
    monkeypatch.setattr(build, "load_encoder", lambda *a, **k: pytest.fail("the model was built"))
    for option, value in (("batch_size", 0), ("workers", -1), ("shard_size", 0), ("shard_size", 2.5)):
        with pytest.raises(ValueError, match=f"{option}={value!r} must be an int >= "):
            build_index(str(videos), str(tmp_path / "index"), **{option: value})
    assert not (tmp_path / "index").exists()


def test_list_files_and_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.mp4", "a.MKV", "sub/c.webm", ".hidden.mp4", "readme.md"):
        (tmp_path / name).write_bytes(b"x")
    assert list_videos(str(tmp_path)) == [str(tmp_path / n) for n in ("a.MKV", "b.mp4", "sub/c.webm")]
    (tmp_path / "list.txt").write_text("# my clips\nb.mp4\n\nsub/c.webm\nb.mp4\n/elsewhere/x.mp4\n")
    assert list_videos(str(tmp_path / "list.txt")) == [str(tmp_path / "b.mp4"), str(tmp_path / "sub/c.webm"),
                                                       "/elsewhere/x.mp4"]
    (tmp_path / "list.csv").write_text("video_path,caption\nb.mp4,hi\n")
    assert list_videos(str(tmp_path / "list.csv")) == [str(tmp_path / "b.mp4")]
    (tmp_path / "list.jsonl").write_text(json.dumps({"video_path": "sub/c.webm"}) + "\n")
    assert list_videos(str(tmp_path / "list.jsonl")) == [str(tmp_path / "sub/c.webm")]
    (tmp_path / "bad.csv").write_text("path\nb.mp4\n")
    with pytest.raises(ValueError, match="video_path"):
        list_videos(str(tmp_path / "bad.csv"))
    with pytest.raises(ValueError, match="neither a folder nor a video list"):
        list_videos(str(tmp_path / "readme.md"))
    # A header with spaces around its names reads as tempme eval reads it; a broken JSON line, or a
    # video_path that is not a string, is refused naming its line (a JSONDecodeError or TypeError before).
    (tmp_path / "spaced.csv").write_text("caption , video_path \nhi,b.mp4\n")
    assert list_videos(str(tmp_path / "spaced.csv")) == [str(tmp_path / "b.mp4")]
    for text, says in (('{"video_path": "b.mp4"}\n{"video_path": "c.mp4"\n', "broken.jsonl:2: not valid JSON"),
                       ('{"video_path": null}\n', "broken.jsonl:1: each line must be an object with a 'video_path' "
                                                   "string")):
        (tmp_path / "broken.jsonl").write_text(text)
        with pytest.raises(ConfigError, match=re.escape(says)):
            list_videos(str(tmp_path / "broken.jsonl"))


@pytest.mark.parametrize("count", [0, 1, 5, 17])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_rank_shares_are_disjoint_and_complete(count, world):
    paths = [f"v{i}.mp4" for i in range(count)]
    shares = [rank_share(paths, r, world) for r in range(world)]
    assert sorted(p for s in shares for p in s) == sorted(paths)
    assert sum(len(s) for s in shares) == count
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert shares == [rank_share(list(paths), r, world) for r in range(world)]


def test_rank_share_errors(monkeypatch):
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        rank_share([], 2, 2)
    monkeypatch.setenv("WORLD_SIZE", "two")
    from tempme_fast.index.sources import launch_rank

    with pytest.raises(ValueError, match="WORLD_SIZE"):
        launch_rank()
