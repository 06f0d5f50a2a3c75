"""What an index's videos and encoder are, by content: weights and JSON configs that changed, files that changed
or that two paths reach, the unmerged baseline, and the model's own tokenizer."""
import json
import os
import shutil

import pytest
import torch

pytest.importorskip("av")

from index_helpers import INDEX_MODEL, SCHEDULE_ARGS, built, index_argv, make_video, refused  # noqa: F401
from tempme_fast.cli import main
from tempme_fast.config import TempMeConfig
from tempme_fast.index import IndexSpec, VideoIndex, build_index, list_videos, load_contents
from tempme_fast.retrieval.cli import model_tokenizer
from tempme_fast.retrieval.evaluate import encode_texts

TINY_SCHEDULE = TempMeConfig(frames=4, imgme_r=1, clip_layers=(2, 3), clip_groups=(2, 2))  # (SCHEDULE_ARGS)


def _spec(model, **kwargs):
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_SCHEDULE.__dict__.items()}
    return IndexSpec(model=str(model), frames=4, config=config, **kwargs)


def _weights(path, seed, model):
    from tempme_fast.loading import create_model

    torch.manual_seed(seed)
    torch.save(create_model(model).state_dict(), path)
    return str(path)


def test_weights_and_model_configs_count_by_content(built, tmp_path, monkeypatch, capsys):
    """Both were recorded by name: a replaced weights file or an edited JSON config encoded queries, or videos
    added by --resume, with another model than the index holds, without a word."""
    videos, _, model, good = built
    monkeypatch.chdir(tmp_path)
    shutil.copy(model, "model.json")
    _weights("weights.pt", 1, "model.json")
    os.mkdir("clips")
    for path in good[:2]:
        shutil.copy(path, "clips")
    base = ["--workers", "0", "--no-progress", *SCHEDULE_ARGS]
    assert main(["index", "clips", "--out", "idx", "--model", "model.json", "--pretrained", "weights.pt", *base]) == 0
    spec = json.load(open("idx/index.json"))["spec"]
    # Files are named by where they lie (queries from any folder find them) and by their content.
    assert spec["pretrained"] == str(tmp_path / "weights.pt") and spec["model"] == str(tmp_path / "model.json")
    assert len(spec["pretrained_sha256"]) == 64 and len(spec["model_sha256"]) == 64
    capsys.readouterr()
    # The same files, moved, are the same encoder.
    os.mkdir("moved")
    shutil.copy("weights.pt", "moved/w.pt")
    assert main(["search", "idx", "a dog", "-k", "1", "--pretrained", "moved/w.pt", "--json"]) == 0
    capsys.readouterr()
    os.rename("weights.pt", "weights.bak")  # not named, and gone: said so in one line
    assert refused(["search", "idx", "a dog"])
    assert (f"pretrained {tmp_path / 'weights.pt'}, which the index was built with, is not there any more: name the "
            f"file where it lies now (--pretrained)" in capsys.readouterr().err)
    os.rename("weights.bak", "weights.pt")

    _weights("weights.pt", 2, "model.json")
    assert refused(["search", "idx", "a dog"])
    assert (f"pretrained {tmp_path / 'weights.pt'} has changed since the index was built (its SHA-256 differs)"
            in capsys.readouterr().err)
    shutil.copy(good[2], "clips")
    assert refused(["index", "clips", "--out", "idx", "--model", "model.json", "--pretrained", "weights.pt", "--resume",
                    *base])
    assert "built with another encoder (pretrained: index" in capsys.readouterr().err
    shutil.copy("moved/w.pt", "weights.pt")  # restored: the index grows again
    config = json.load(open("model.json"))
    config["vision_cfg"]["layers"] = 3
    json.dump(config, open("model.json", "w"))
    assert refused(["index", "clips", "--out", "idx", "--model", "model.json", "--pretrained", "moved/w.pt",
                    "--resume", *base])
    assert "built with another encoder (model: index" in capsys.readouterr().err
    assert len(load_contents("idx").records) == 2


def test_a_relative_checkpoint_is_found_from_another_folder(built, tmp_path, monkeypatch, capsys):
    from tempme_fast import apply_tempme
    from tempme_fast.loading import create_model

    videos, _, model, good = built
    os.mkdir(tmp_path / "proj")
    monkeypatch.chdir(tmp_path / "proj")
    torch.save(apply_tempme(create_model(model), TINY_SCHEDULE).state_dict(), "ck.pt")
    listing = tmp_path / "proj" / "clips.txt"
    listing.write_text("\n".join(good[:2]) + "\n")
    assert main(index_argv(listing, "idx", model, "--checkpoint", "ck.pt")) == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    for extra in ([], ["--checkpoint", "proj/ck.pt"]):  # the second loaded the index's relative ck.pt, not found
        assert main(["search", "proj/idx", "a dog", "-k", "1", "--json", *extra]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 1


def test_an_unmerged_index_builds_and_searches(built, tmp_path):
    """--no-merge, the baseline, failed every time: the stored schedule was passed on with merging off."""
    videos, _, model, good = built
    spec = IndexSpec(model=model, merge=False, frames=4)  # (no config: the unmerged one for 4 frames)
    summary = build_index(good[:2], str(tmp_path / "idx"), spec, workers=0, progress=False)
    assert summary["indexed"] == 2
    index = VideoIndex.open(str(tmp_path / "idx"))
    assert index.model.tempme.config.clip_layers == () and len(index.search_text("a dog", 2)) == 2


def test_search_tokenizes_with_the_json_models_own_tokenizer(built, tmp_path, monkeypatch):
    """Search asked for the tokenizer before building the model that registers its JSON config, and got open_clip's
    default one (lower-casing) for good."""
    import open_clip

    videos, _, _, good = built
    config = json.loads(json.dumps(INDEX_MODEL))
    config["text_cfg"]["tokenizer_kwargs"] = {"clean": "whitespace"}  # case kept
    model = tmp_path / "tiny-cased.json"
    model.write_text(json.dumps(config))
    build_index(good[:2], str(tmp_path / "idx"), _spec(model), workers=0, progress=False)
    # A fresh process: open_clip knows no "tiny-cased" yet, and no tokenizer is kept.
    monkeypatch.delitem(open_clip.factory._MODEL_CONFIGS, "tiny-cased")
    model_tokenizer.cache_clear()
    index = VideoIndex.open(str(tmp_path / "idx"))
    got = index.encode_text(["A Dog Runs"])
    cased = open_clip.get_tokenizer("tiny-cased")
    assert cased(["A Dog Runs"])[0].tolist() != open_clip.get_tokenizer("ViT-B-32")(["A Dog Runs"])[0].tolist()
    want = encode_texts(index.model, ["A Dog Runs"], cased, 32, progress=False).numpy()
    assert (abs(got - want)).max() < 1e-6
    model_tokenizer.cache_clear()


def test_a_file_is_one_video_however_it_is_reached(built, tmp_path, capsys):
    """Through a link to its folder, every video was encoded again and came back twice in each result list."""
    videos, reference, model, good = built
    out = tmp_path / "index"
    shutil.copytree(reference, out)
    os.symlink(videos, tmp_path / "link")
    assert list_videos(str(tmp_path / "link")) == [p.replace(str(videos), str(tmp_path / "link")) for p in
                                                   list_videos(str(videos))]
    assert main(index_argv(tmp_path / "link", out, model, "--resume")) == 0
    assert "0 video(s) indexed, 0 unreadable (recorded with their reason), 6 already" in capsys.readouterr().out
    assert build_index([good[0], str(tmp_path / "link" / os.path.relpath(good[0], videos))], str(tmp_path / "two"),
                       IndexSpec(**json.load(open(out / "index.json"))["spec"]), workers=0,
                       progress=False)["total"] == 1


def test_resume_encodes_changed_files_again_and_names_gone_ones(built, tmp_path, caplog):
    """A replaced file kept its old embedding and a deleted one was searched, and the summary said nothing."""
    videos, reference, model, good = built
    out = tmp_path / "index"
    shutil.copytree(reference, out)
    clips = tmp_path / "clips"
    os.mkdir(clips)
    copies = [shutil.copy(p, clips / f"c{k}.mp4") for k, p in enumerate(good[:3])]
    spec = IndexSpec(**json.load(open(out / "index.json"))["spec"])
    build_index(str(clips), str(tmp_path / "idx"), spec, workers=0, progress=False)
    make_video(copies[0], seed=21)  # replaced by another video
    os.remove(copies[1])
    summary = build_index(str(clips), str(tmp_path / "idx"), spec, workers=0, progress=False, resume=True)
    assert (summary["indexed"], summary["changed"], summary["already"], summary["gone"]) == (1, 1, 1, 1)
    assert "1 indexed video(s) changed since (size or modification time)" in caplog.text
    assert f"1 indexed video(s) no longer exist, e.g. {copies[1]}: search still returns them" in caplog.text
    index = VideoIndex.open(str(tmp_path / "idx"))
    assert len(index) == 3  # each path once, by its newest record
    hit = index.search_video(str(copies[0]), 1)[0]
    assert hit.path == str(copies[0]) and hit.score > 0.999
