"""`tempme search`: queries by video and by text against brute force, FAISS kinds, no FAISS, refusals."""
import json
import logging
import re
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("av")

from index_helpers import built, refused  # noqa: F401
from tempme_fast.cli import main
from tempme_fast.index import (FaissMissing, SpecMismatch, VectorSearch, VideoIndex, brute_force, load_contents,
                               load_encoder, search_index)

FP16_ATOL = 1e-3  # stored vectors are fp16


def _search_json(capsys, *argv):
    assert main(["search", *argv, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_a_query_longer_than_the_text_length_is_searched_with_a_warning(built, caplog):
    """CLIP reads a text's first ``context_length`` tokens; a longer query was cut without a word."""
    import open_clip

    from tempme_fast.retrieval.evaluate import encode_texts

    videos, index, model, good = built
    long = "a dog " * 30 + "catches a frisbee"
    with caplog.at_level(logging.WARNING, logger="tempme_fast"):
        search_index(str(index), "a dog catches a frisbee", k=1)
        assert "longer than" not in caplog.text
        search_index(str(index), long, k=1)
    assert "the text is longer than 32 tokens, and only the first 32 are read (65 tokens: 'a dog a dog" in caplog.text
    caplog.clear()
    encoder, tokenizer = load_encoder(load_contents(str(index)).spec), open_clip.get_tokenizer("ViT-B-32")
    with caplog.at_level(logging.WARNING, logger="tempme_fast"):
        texts = encode_texts(encoder, ["a dog", long, "a cat " * 9], tokenizer, context_length=16, progress=False)
    assert texts.shape[0] == 3 and not texts.requires_grad  # (no autograd graph of the text tower is kept)
    assert "2 of 3 texts are longer than 16 tokens, and only the first 16 are read (64+ tokens: 'a dog a dog" \
           in caplog.text and "the text tower takes up to 32 (context_length)" in caplog.text


def test_a_video_finds_itself_first(built, capsys):
    videos, index, model, good = built
    for path in (good[0], good[3]):
        hits = _search_json(capsys, str(index), "--like", path, "-k", "3")
        assert [h["rank"] for h in hits] == [1, 2, 3]
        assert hits[0]["path"] == path and hits[0]["score"] == pytest.approx(1.0, abs=FP16_ATOL)
        assert hits[0]["frames"] == 4 and hits[1]["score"] < hits[0]["score"] - 2 * FP16_ATOL


def test_text_query_scores_equal_brute_force(built, capsys):
    import open_clip

    videos, index, model, good = built
    query = "a dog catches a frisbee"
    contents = load_contents(str(index))
    encoder = load_encoder(contents.spec)
    tokens = open_clip.get_tokenizer("ViT-B-32")([query], context_length=32)
    with torch.no_grad():
        text = F.normalize(encoder.encode_text(tokens), dim=-1)[0].numpy()
    scores = contents.vectors.astype(np.float32) @ text
    order = np.argsort(-scores, kind="stable")[:3]

    hits = search_index(str(index), query, k=3)
    assert [h.rank for h in hits] == [1, 2, 3]
    assert [h.path for h in hits] == [contents.records[i]["path"] for i in order]
    np.testing.assert_allclose([h.score for h in hits], scores[order], atol=1e-5, rtol=0)
    printed = _search_json(capsys, str(index), query, "-k", "3")
    assert [(h["path"], h["rank"]) for h in printed] == [(h.path, h.rank) for h in hits]
    np.testing.assert_allclose([h["score"] for h in printed], [h.score for h in hits], atol=1e-6)
    # More results asked than videos exist: all of them, ranked.
    assert [h.rank for h in search_index(str(index), query, k=50)] == [1, 2, 3, 4, 5]
    assert main(["search", str(index), query, "-k", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "score", "path"] and len(table) == 3


def test_a_different_encoder_is_refused(built, capsys):
    import open_clip

    videos, index, model, good = built
    assert refused(["search", str(index), "a dog", "--model", "ViT-B-32"])
    err = capsys.readouterr().err
    assert "another encoder" in err and "ViT-B-32" in err and "model: index" in err
    other = open_clip.CLIP(embed_dim=16, vision_cfg=open_clip.model.CLIPVisionCfg(layers=1, width=32, patch_size=8,
                                                                                  image_size=32, head_width=32),
                           text_cfg=open_clip.model.CLIPTextCfg(context_length=32, width=32, heads=2, layers=1))
    with pytest.raises(SpecMismatch, match="16-d embeddings but the index .* holds 24-d"):
        VideoIndex.open(str(index), model=other)


def test_search_input_errors(built, tmp_path, capsys):
    videos, index, model, good = built
    assert refused(["search", str(index)])
    assert "exactly one" in capsys.readouterr().err
    assert refused(["search", str(index), "a dog", "--like", good[0]])
    assert "exactly one" in capsys.readouterr().err
    assert refused(["search", str(tmp_path), "a dog"])
    assert "not a video index" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", str(index), "a dog", "-k", "0"])
    assert refused(["search", str(index), "--like", str(tmp_path / "missing.mp4")])
    assert "missing.mp4" in capsys.readouterr().err
    # A tuning option of another index type is refused, not ignored.
    for argv, says in ((["--nprobe", "4"], "--nprobe tunes --index-type ivf, not --index-type exact"),
                       (["--index-type", "ivf", "--ef-search", "8"], "--ef-search tunes --index-type hnsw, not "
                                                                     "--index-type ivf"),
                       (["--index-type", "hnsw", "--nlist", "2"], "--nlist tunes --index-type ivf")):
        assert refused(["search", str(index), "a dog", *argv])
        assert says in capsys.readouterr().err


def test_a_damaged_index_is_refused_in_one_line(built, tmp_path, capsys):
    """Every file of an index is written whole; one edited or damaged by something else is named, with what to
    do, where it was a traceback (KeyError, TypeError, JSONDecodeError, numpy's ValueError)."""
    videos, index, model, good = built
    header_edits = {"cut": lambda text: text[:40], "a list": lambda text: "[1]",
                    "no embed_dim": lambda text: json.dumps({k: v for k, v in json.loads(text).items()
                                                             if k != "embed_dim"}),
                    "bad schedule": lambda text: text.replace('"imgme_r": 1', '"imgme_r": "x"')}
    for what, edit in header_edits.items():
        copy = tmp_path / what
        shutil.copytree(index, copy)
        (copy / "index.json").write_text(edit((copy / "index.json").read_text()))
        assert refused(["search", str(copy), "a dog"]), what
        err = capsys.readouterr().err
        assert f"{copy / 'index.json'}: the index's header is damaged or was edited" in err and err.count("\n") == 1
    shard = sorted((index / "shards").glob("*.jsonl"))[0].name
    for what, damage in (("manifest", lambda c: (c / "shards" / shard).write_text('{"path": 3}\n')),
                         ("vectors", lambda c: (c / "shards" / shard.replace(".jsonl", ".npy")).write_bytes(b"x"))):
        copy = tmp_path / what
        shutil.copytree(index, copy)
        damage(copy)
        assert refused(["search", str(copy), "a dog"]), what
        err = capsys.readouterr().err
        assert str(copy / "shards" / shard) in err and "run tempme index with --resume" in err, err
        assert err.count("\n") == 1


def _unit(n, d, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, d))
    x = centres[rng.integers(0, 20, n)] + 0.3 * rng.standard_normal((n, d))  # clustered, like real embeddings
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_brute_force_orders_by_score_then_id():
    vectors = np.array([[1, 0], [0, 1], [1, 0], [0.6, 0.8]], np.float32)
    scores, ids = brute_force(vectors, np.array([[1, 0]], np.float32), 3)
    assert ids.tolist() == [[0, 2, 3]] and scores[0].tolist() == pytest.approx([1, 1, 0.6])


def test_faiss_kinds_against_brute_force():
    pytest.importorskip("faiss")
    vectors, queries = _unit(3000, 32), _unit(20, 32, seed=1)
    want_scores, want_ids = brute_force(vectors, queries, 10)
    scores, ids = VectorSearch(vectors, "exact").search(queries, 10)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert (ids == want_ids).mean() > 0.99  # only near-ties may swap
    ivf = VectorSearch(vectors, "ivf", nlist=16, nprobe=16)  # every cell scanned: exact
    scores, ids = ivf.search(queries, 10)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    for kind, options in (("ivf", {"nprobe": 4}), ("hnsw", {})):
        _, ids = VectorSearch(vectors, kind, **options).search(queries, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, want_ids)])
        assert recall > 0.8, (kind, recall)
    with pytest.raises(ValueError, match="nlist=5000"):
        VectorSearch(vectors, "ivf", nlist=5000)


def test_built_indexes_are_cached(built, tmp_path):
    pytest.importorskip("faiss")
    vectors, queries = _unit(800, 16), _unit(5, 16, seed=3)
    cache = str(tmp_path / "hnsw.faiss")
    first = VectorSearch(vectors, "hnsw", cache=cache).search(queries, 5)
    again = VectorSearch(vectors, "hnsw", cache=cache)
    assert again.index.ntotal == 800
    for a, b in zip(first, again.search(queries, 5)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="holds 800 vectors, not 10"):
        VectorSearch(vectors[:10], "hnsw", cache=cache)
    videos, index, model, good = built
    hits = VideoIndex.open(str(index), "ivf", nlist=1).search_video(good[2], 2)
    assert hits[0].path == good[2] and len(list((index / "search").glob("ivf-*.faiss"))) == 1


def test_a_cached_search_index_is_never_used_for_other_vectors(built, tmp_path):
    """The cache was named by the manifests' names and sizes: an index built again in place with other weights
    (or other videos under the same paths) has the same manifests, and searched the old vectors."""
    pytest.importorskip("faiss")
    videos, index, model, good = built
    copy = tmp_path / "index"
    shutil.copytree(index, copy)
    query = VideoIndex.open(str(copy), "exact").contents.vectors[:1].astype(np.float32)
    VideoIndex.open(str(copy), "ivf", nlist=1)  # builds and keeps the IVF index
    for npy in (copy / "shards").glob("*.npy"):
        vectors = np.load(npy)
        np.save(npy, vectors[::-1].copy())  # the same shapes and manifests, other vectors
    exact = VideoIndex.open(str(copy), "exact").searcher.search(query, 3)[1]
    ivf = VideoIndex.open(str(copy), "ivf", nlist=1)
    np.testing.assert_array_equal(ivf.searcher.search(query, 3)[1], exact)
    assert len(list((copy / "search").glob("ivf-*.faiss"))) == 1  # the stale one removed


def test_an_approximate_search_that_returns_fewer_than_k_says_so(built, tmp_path, capsys):
    pytest.importorskip("faiss")
    videos, index, model, good = built
    copy = tmp_path / "index"
    shutil.copytree(index, copy)
    # One cell a video, one cell scanned: one result, and a note on what to raise.
    for argv, found, note in (
            (["--index-type", "ivf", "--nlist", "5", "--nprobe", "1"], 1,
             "note: 1 of the 3 results asked for: the IVF search reached no more videos; raise --nprobe"),
            ([], 3, "")):  # exact search always fills k
        assert main(["search", str(copy), "--like", good[0], "-k", "3", "--json", *argv]) == 0
        printed = capsys.readouterr()
        hits = [json.loads(line) for line in printed.out.splitlines()]
        assert len(hits) == found and hits[0]["path"] == good[0]
        assert (note in printed.err) if note else "note:" not in printed.err, printed.err


def test_without_faiss(built, monkeypatch, capsys):
    videos, index, model, good = built
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    vectors, queries = _unit(500, 16), _unit(3, 16, seed=2)
    exact = VectorSearch(vectors, "exact")
    assert exact.backend == "numpy"
    for got, want in zip(exact.search(queries, 7), brute_force(vectors, queries, 7)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(FaissMissing, match="pip install faiss-cpu"):
        VectorSearch(vectors, "hnsw")
    hits = _search_json(capsys, str(index), "--like", good[1], "-k", "2")
    assert hits[0]["path"] == good[1]
    assert refused(["search", str(index), "a dog", "--index-type", "ivf"])
    err = capsys.readouterr().err
    assert "IVF index needs FAISS" in err and "pip install faiss-cpu" in err
    assert main(["search", str(index), "a dog", "-k", "1"]) == 0
    assert "FAISS is not installed; exact search runs in NumPy" in capsys.readouterr().err


def test_vector_search_errors():
    vectors = _unit(10, 8)
    with pytest.raises(ValueError, match="kind='flat'"):
        VectorSearch(vectors, "flat")
    with pytest.raises(ValueError, match="non-empty"):
        VectorSearch(vectors[:0])
    # Checked before FAISS sees them: hnsw_m=0 aborts the process there, nprobe=0 fails at the first query.
    for kind, options, says in (("hnsw", {"hnsw_m": 0}, "hnsw_m=0"), ("hnsw", {"ef_search": -1}, "ef_search=-1"),
                                ("ivf", {"nprobe": 0}, "nprobe=0"), ("ivf", {"nprobe": 2.5}, "nprobe=2.5"),
                                ("ivf", {"nlist": 0}, "nlist=0"), ("ivf", {"train_size": 0}, "train_size=0")):
        with pytest.raises(ValueError, match=re.escape(says) + " must be an int >= 1"):
            VectorSearch(vectors, kind, **options)
    search = VectorSearch(vectors, use_faiss=False)
    with pytest.raises(ValueError, match="k=0"):
        search.search(vectors[:1], 0)
    with pytest.raises(ValueError, match="8-d"):
        search.search(np.zeros((1, 4), np.float32), 1)
    # A NaN query (a model that overflowed) had no results from FAISS and NaN scores from the exact search.
    queries = vectors[:3].copy()
    queries[2, 1] = np.nan
    for searcher in (search, VectorSearch(vectors)):
        with pytest.raises(ValueError, match=r"queries hold NaN or Inf \(query 2 of 3\)"):
            searcher.search(queries, 2)


def test_vector_queries_may_be_tensors(built):
    videos, index, model, good = built
    opened = VideoIndex.open(str(index))
    queries = torch.from_numpy(load_contents(str(index)).vectors[:2].astype(np.float32))
    want = opened.search_vectors(queries.numpy(), k=3)
    # model.encode_text's output as it comes: bf16, and part of an autograd graph.
    got = opened.search_vectors(queries.bfloat16().requires_grad_(), k=3)
    assert [[h.path for h in hits] for hits in got] == [[h.path for h in hits] for hits in want]
    assert [hits[0].path for hits in got] == [r["path"] for r in load_contents(str(index)).records[:2]]
