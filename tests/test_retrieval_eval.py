"""From .mp4 files to metrics: evaluate_retrieval with an oracle encoder, then `tempme eval` end to end."""
import argparse
import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("av")

import tempme_fast
from tempme_fast import TempMeConfig
from tempme_fast.errors import ConfigError
from tempme_fast.loading import create_model
from tempme_fast.retrieval.cli import add_eval_arguments, run_eval
from tempme_fast.retrieval.data import Caption, RetrievalSplit, load_msrvtt, load_split
from tempme_fast.retrieval.evaluate import NoReadableVideos, evaluate_retrieval, format_results
from tempme_fast.retrieval.video import VideoProcessor, write_video

H, W = 48, 64
# 12 layers so the released schedule (joins at layers 8, 9, 10) applies; 64 px, patch 16: 17 tokens/frame.
TINY = {"embed_dim": 32, "quick_gelu": True,
        "vision_cfg": {"image_size": 64, "layers": 12, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
CAPTIONS = ["a dog runs on the grass", "a man cooks pasta in a kitchen", "cars race on a track",
            "a woman sings on stage", "two kids play football"]


def make_video(path, seconds, fps, red):
    rng = np.random.default_rng(red)

    def frames():
        for _ in range(int(seconds * fps)):
            img = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
            img[..., 0] = red  # the red channel names the video
            yield img
    return write_video(str(path), frames(), fps)


@pytest.fixture(scope="module")
def msrvtt(tmp_path_factory):
    """MSR-VTT layout with 5 test videos of 3 to 20 s; the third is truncated."""
    root = tmp_path_factory.mktemp("data") / "MSRVTT"
    videos = root / "videos"
    videos.mkdir(parents=True)
    for k, seconds in enumerate([3, 20, 6, 4, 14]):
        path = make_video(videos / f"video{7020 + k}.mp4", seconds, 2, red=40 * (k + 1))
        if k == 2:
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[:len(data) // 2])
    with open(root / "MSRVTT_JSFUSION_test.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "vid_key", "video_id", "sentence"])
        for k, sentence in enumerate(CAPTIONS):
            writer.writerow([f"ret{k}", f"msr{7020 + k}", f"video{7020 + k}", sentence])
    return root


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tempme-tiny-test.json"
    path.write_text(json.dumps(TINY))
    return str(path)


class ToTensor:
    def __call__(self, image):
        arr = np.asarray(image.resize((8, 8)), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class Oracle(nn.Module):
    """Knows which video is which (red channel) and which caption is which (its tokens)."""

    def __init__(self, token_ids):
        super().__init__()
        self.visual = nn.Module()
        self.visual.conv1 = nn.Conv2d(3, 4, 1)
        self.token_ids = token_ids

    def encode_video(self, video, mask):
        k = torch.round(video[:, 0, 0].mean(dim=(1, 2)) * 255 / 40).long() - 1
        return 3.0 * nn.functional.one_hot(k, 8).float()

    def encode_text(self, tokens):
        k = torch.tensor([self.token_ids[tuple(t.tolist())] for t in tokens])
        return nn.functional.one_hot(k, 8).float()


def test_ids_keep_captions_on_their_videos(msrvtt):
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    ids = {tuple(t.tolist()): k for k, t in enumerate(tokenizer(CAPTIONS, context_length=32))}
    split = load_msrvtt(msrvtt)
    result = evaluate_retrieval(Oracle(ids), split, VideoProcessor(ToTensor(), frames=12), tokenizer,
                                batch_size=2, dsl=True, progress=False)
    # The corrupt video sits in the middle of a batch; had anything shifted, ranks would break.
    for key in ("t2v", "v2t"):
        assert result["metrics"][key]["R@1"] == 100.0 and result["metrics"][key]["MnR"] == 1.0
        assert result["dsl"][key]["R@1"] == 100.0
    d = result["dataset"]
    assert (d["videos"], d["videos_evaluated"], d["captions_evaluated"], d["skipped"]) == (5, 4, 4, 1)
    assert d["skipped_videos"][0]["video_id"] == "video7022"
    assert d["skipped_videos"][0]["path"].endswith("video7022.mp4") and d["skipped_videos"][0]["reason"]
    assert "DSL" in format_results(result)


def test_no_readable_video_is_an_error(tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 100)
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"video_path": "bad.mp4", "caption": "x"}) + "\n")
    with pytest.raises(NoReadableVideos, match="bad.mp4"):
        evaluate_retrieval(Oracle({}), load_split(tmp_path / "pairs.jsonl"), VideoProcessor(ToTensor()),
                           lambda texts, context_length: None, progress=False)


def test_settings_that_cannot_work_are_refused_before_any_video_is_decoded(tmp_path, tiny_config, monkeypatch):
    from tempme_fast.retrieval import evaluate

    monkeypatch.setattr(evaluate, "encode_videos", lambda *a, **k: pytest.fail("videos were encoded"))
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"video_path": "v.mp4", "caption": "x"}) + "\n")
    split = load_split(tmp_path / "pairs.jsonl")
    model = tempme_fast.apply_tempme(create_model(tiny_config), tempme_fast.TempMeConfig(frames=12))
    tokenizer = lambda texts, context_length: None  # noqa: E731
    with pytest.raises(ConfigError, match="text_batch_size=0 must be an int >= 1"):
        evaluate_retrieval(model, split, VideoProcessor.for_model(model, 12), tokenizer, text_batch_size=0)
    with pytest.raises(ConfigError, match="the processor samples 8 frames a video, the model's TempMeConfig takes "
                                          "frames=12"):
        evaluate_retrieval(model, split, VideoProcessor.for_model(model, 8), tokenizer)
    # A tokenizer of another vocabulary: an IndexError (a device-side assert on a GPU) once the videos were encoded.
    with pytest.raises(ConfigError, match=r"the tokenizer \(function\) makes token ids up to 50000, but the text "
                                          r"tower's vocabulary has 49408 \(model.token_embedding\): the model's "
                                          r"config and its tokenizer do not match"):
        evaluate_retrieval(model, split, VideoProcessor.for_model(model, 12),
                           lambda texts, context_length: torch.full((len(texts), context_length), 50000))
    # A temperature dual_softmax refuses (it did so once every video was encoded), and a video no caption names
    # (the metrics found it only then, as a column number).
    for bad in (float("inf"), True, 0):
        with pytest.raises(ConfigError, match=f"dsl_temperature={bad!r} must be a positive finite number"):
            evaluate_retrieval(model, split, VideoProcessor.for_model(model, 12), tokenizer, dsl=True,
                               dsl_temperature=bad)
    bare = RetrievalSplit("by-hand", {"v": "v.mp4", "w": "w.mp4"}, [Caption("c0", "v", "x")])
    with pytest.raises(ConfigError, match=r"1 video\(s\) of by-hand have no caption, e.g. 'w' \(w.mp4\)"):
        evaluate_retrieval(model, bare, VideoProcessor.for_model(model, 12), tokenizer)


def eval_args(*argv):
    parser = argparse.ArgumentParser(prog="tempme eval")
    add_eval_arguments(parser)
    return parser.parse_args(list(argv))


def test_tempme_eval_end_to_end(msrvtt, tiny_config, tmp_path, capsys):
    out = tmp_path / "result.json"
    code = run_eval(eval_args("--data", str(msrvtt), "--model", tiny_config, "--workers", "0",
                              "--batch-size", "2", "--dsl", "--json", str(out), "--no-progress"))
    captured = capsys.readouterr()
    printed = captured.out
    with capsys.disabled():
        print("\n" + printed)
    assert code == 0, captured.err
    for text in ("text-to-video", "video-to-text", "(DSL)", "R@1", "R@5", "R@10", "MdR", "MnR", "R-Sum",
                 "GFLOPs/video", "videos/s", "video7022"):
        assert text in printed
    result = json.loads(out.read_text())
    assert result["dataset"]["videos_evaluated"] == 4 and result["dataset"]["skipped"] == 1
    for key in ("t2v", "v2t"):
        m = result["metrics"][key]
        assert set(m) == {"R@1", "R@5", "R@10", "MdR", "MnR", "R-Sum"}
        assert 1.0 <= m["MdR"] <= 4.0 and 1.0 <= m["MnR"] <= 4.0 and m["R@5"] == 100.0
        assert set(result["dsl"][key]) == set(m)
    assert "dual-softmax" in result["dsl"]["label"]
    cost = result["cost"]
    assert cost["gflops_per_video"] > 0 and cost["videos_per_s"] > 0 and cost["end_to_end_videos_per_s"] > 0
    assert result["settings"]["tempme"]["config"]["clip_layers"] == [8, 9, 10]
    assert result["settings"]["frames"] == 12 and result["settings"]["context_length"] == 32


def test_random_weights_are_the_same_in_every_run(tiny_config):
    """Without --pretrained the weights come from a fixed seed (a smoke run repeats its numbers), drawn without
    moving the caller's random state."""
    from tempme_fast.retrieval.cli import build_model

    args = eval_args("--data", "unused", "--model", tiny_config)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = build_model(args).state_dict()
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn from the caller's generator
    torch.manual_seed(456)  # another caller state: the same weights
    second = build_model(args).state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_a_nan_embedding_stops_the_evaluation_at_its_batch(msrvtt, monkeypatch):
    """A model that overflows: named at the batch that shows it, not as a NaN similarity once all is encoded."""
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    oracle = Oracle({tuple(t.tolist()): k for k, t in enumerate(tokenizer(CAPTIONS, context_length=32))})
    encode, batches = oracle.encode_video, []

    def overflows_in_the_second_batch(video, mask):
        batches.append(len(video))
        emb = encode(video, mask)
        if len(batches) == 2:
            emb[-1] = float("inf")
        return emb

    monkeypatch.setattr(oracle, "encode_video", overflows_in_the_second_batch)
    split = load_msrvtt(msrvtt)
    with pytest.raises(ConfigError, match=r"the model made a NaN or Inf embedding for the video 'video\d+' \(1 of this "
                                          r"batch of \d; the model runs in torch.float32"):
        evaluate_retrieval(oracle, split, VideoProcessor(ToTensor(), frames=12), tokenizer, batch_size=2,
                           progress=False)
    assert len(batches) == 2  # stopped there
    # Texts too: a text tower that overflows is named with the caption.
    monkeypatch.setattr(oracle, "encode_video", encode)
    monkeypatch.setattr(oracle, "encode_text", lambda tokens: torch.full((len(tokens), 8), float("nan")))
    with pytest.raises(ConfigError, match=r"NaN or Inf embedding for the text '.+' \(4 of this batch of 4"):
        evaluate_retrieval(oracle, split, VideoProcessor(ToTensor(), frames=12), tokenizer, batch_size=2,
                           progress=False)


def test_encoding_keeps_no_autograd_graph(msrvtt, tiny_config):
    """encode_videos and encode_texts run without gradients (a helper put between a decorator and its function
    took the decorator once): the embeddings of a model that trains are plain tensors."""
    import open_clip

    from tempme_fast.retrieval.evaluate import encode_texts, encode_videos

    model = tempme_fast.apply_tempme(create_model(tiny_config)).train()
    videos = encode_videos(model, load_msrvtt(msrvtt), VideoProcessor.for_model(model), batch_size=2, progress=False)
    texts = encode_texts(model, CAPTIONS[:2], open_clip.get_tokenizer("ViT-B-32"), progress=False)
    assert not videos["embeddings"].requires_grad and not texts.requires_grad and torch.is_grad_enabled()


def test_checkpoint_and_baseline(msrvtt, tiny_config, tmp_path, capsys):
    """A saved TempMe checkpoint evaluates to the numbers of the model it came from; --no-merge costs more."""
    torch.manual_seed(0)
    model = tempme_fast.apply_tempme(create_model(tiny_config))
    with torch.no_grad():
        for p in model.visual.tempme_frame_pos.values():
            p.normal_(std=0.5)
    ckpt = tmp_path / "tempme.pt"
    torch.save(model.state_dict(), ckpt)
    import open_clip

    direct = evaluate_retrieval(model, load_msrvtt(msrvtt), VideoProcessor.for_model(model),
                                open_clip.get_tokenizer("ViT-B-32"), workers=2, batch_size=3, progress=False)
    merged, base = tmp_path / "merged.json", tmp_path / "base.json"
    assert run_eval(eval_args("--data", str(msrvtt), "--model", tiny_config, "--checkpoint", str(ckpt),
                              "--workers", "0", "--json", str(merged), "--no-progress")) == 0
    assert json.loads(merged.read_text())["metrics"] == direct["metrics"]

    weights = tmp_path / "plain_clip.pt"
    torch.save(create_model(tiny_config).state_dict(), weights)
    assert run_eval(eval_args("--data", str(msrvtt), "--model", tiny_config, "--pretrained", str(weights),
                              "--no-merge", "--workers", "0", "--json", str(base), "--no-progress")) == 0
    merged_cost, base_cost = (json.loads(p.read_text())["cost"] for p in (merged, base))
    assert merged_cost["gflops_per_video"] < base_cost["gflops_per_video"]

    # A TempMe checkpoint does not fit the unmerged model, nor one that joins clips at other layers: the error
    # says why.
    with pytest.raises(ConfigError, match="--merge"):
        run_eval(eval_args("--data", str(msrvtt), "--model", tiny_config, "--checkpoint", str(ckpt),
                           "--no-merge", "--workers", "0", "--no-progress"))
    with pytest.raises(ConfigError, match="of other joining layers: give the --frames and schedule it was trained"):
        run_eval(eval_args("--data", str(msrvtt), "--model", tiny_config, "--checkpoint", str(ckpt),
                           "--clip-layers", "7", "9", "10", "--workers", "0", "--no-progress"))


def test_eval_input_errors(msrvtt, tiny_config, tmp_path, capsys):
    with pytest.raises(ConfigError, match="nowhere"):
        run_eval(eval_args("--data", str(tmp_path / "nowhere"), "--model", tiny_config))
    with pytest.raises(ConfigError, match="frames=8"):
        run_eval(eval_args("--data", str(msrvtt), "--model", tiny_config, "--frames", "8"))
    (tmp_path / "pairs.csv").write_text("video_path,caption\nbroken.mp4,something\n")
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 64)
    assert run_eval(eval_args("--data", str(tmp_path / "pairs.csv"), "--model", tiny_config, "--workers", "0",
                              "--no-progress")) == 1
    assert "broken.mp4" in capsys.readouterr().err


def test_a_context_length_past_the_text_tower_is_refused_before_any_video_is_encoded(msrvtt, tiny_config,
                                                                                     monkeypatch):
    from tempme_fast.retrieval import evaluate

    def no_videos(*args, **kwargs):
        raise AssertionError("videos were encoded before the context length was checked")
    monkeypatch.setattr(evaluate, "encode_videos", no_videos)
    with pytest.raises(ConfigError, match=r"context_length=33 \(--context-length\) exceeds the text tower's 32 "
                                          r"positions; give at most 32"):
        run_eval(eval_args("--data", str(msrvtt), "--model", tiny_config, "--context-length", "33", "--workers",
                           "0", "--no-progress"))


def test_lora_adapter_checkpoint(msrvtt, tiny_config, tmp_path):
    """A LoRA adapter (tempme_fast.lora's file format) evaluates to the numbers of the LoRA model."""
    lora = pytest.importorskip("tempme_fast.lora")
    if not all(hasattr(lora, n) for n in ("add_lora", "lora_config", "lora_state_dict", "LORA_FORMAT")):
        pytest.skip("tempme_fast.lora lacks the adapter API")
    import open_clip

    torch.manual_seed(1)
    base = create_model(tiny_config)
    weights = tmp_path / "base.pt"
    torch.save(base.state_dict(), weights)
    model = tempme_fast.apply_tempme(base)
    lora.add_lora(model, rank=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name.lower():
                p.normal_(std=0.05)
    adapter = tmp_path / "adapter.pt"
    torch.save({"format": lora.LORA_FORMAT, "version": 1, "lora": lora.lora_config(model),
                "state_dict": {k: v.detach().clone() for k, v in lora.lora_state_dict(model).items()}}, adapter)
    direct = evaluate_retrieval(model, load_msrvtt(msrvtt), VideoProcessor.for_model(model),
                                open_clip.get_tokenizer("ViT-B-32"), batch_size=4, progress=False)
    out = tmp_path / "lora.json"
    assert run_eval(eval_args("--data", str(msrvtt), "--model", tiny_config, "--pretrained", str(weights),
                              "--checkpoint", str(adapter), "--workers", "0", "--json", str(out),
                              "--no-progress")) == 0
    got = json.loads(out.read_text())["metrics"]
    for key in ("t2v", "v2t"):
        for name, value in direct["metrics"][key].items():
            assert got[key][name] == pytest.approx(value), (key, name)


def test_an_adapter_is_refused_on_another_model_or_base_and_warned_of_on_another_schedule(tiny_config, tmp_path,
                                                                                          caplog):
    """A lora.pt held only its rank, scale and tensors: a ViT-B/16 adapter loads into a ViT-B/32 (equal shapes),
    onto other base weights or random ones, and evaluated without a word."""
    from tempme_fast.loading import base_weights, load_checkpoint
    from tempme_fast.lora import add_lora, save_lora

    torch.manual_seed(1)
    weights = tmp_path / "base.pt"
    torch.save(create_model(tiny_config).state_dict(), weights)
    model = tempme_fast.apply_tempme(create_model(tiny_config, str(weights)))
    add_lora(model, rank=4)
    adapter = str(tmp_path / "lora.pt")
    save_lora(model, adapter, base=base_weights(tiny_config, str(weights)))

    def fresh(config=None, image_size=None):
        cfg = json.loads(json.dumps(TINY))
        if image_size:
            cfg["vision_cfg"]["image_size"] = image_size
        path = tmp_path / f"tempme-tiny-{image_size or 'same'}.json"
        path.write_text(json.dumps(cfg))
        return tempme_fast.apply_tempme(create_model(str(path)), config), str(path)

    other, _ = fresh()
    assert load_checkpoint(other, adapter, base_weights(tiny_config, str(weights))) == "adapter"
    # Another image tower with the same tensor shapes (128 px: 65 tokens a frame, as B/16 to B/32).
    bigger, name = fresh(image_size=128)
    with pytest.raises(ConfigError, match=r"--checkpoint .*lora.pt: the adapter was trained on another image tower: "
                                          r"tokens_per_frame 17 \(the model's 65\)"):
        load_checkpoint(bigger, adapter, base_weights(name, str(weights)))
    torch.save(create_model(tiny_config).state_dict(), tmp_path / "other.pt")  # (other random weights)
    for pretrained, says in ((None, "pretrained_sha256=None"), (str(tmp_path / "other.pt"), "pretrained_sha256='")):
        with pytest.raises(ConfigError, match=f"the adapter is a delta of other weights: trained with "
                                              f"pretrained_sha256='[0-9a-f]{{64}}', this model has {says}"):
            load_checkpoint(fresh()[0], adapter, base_weights(tiny_config, pretrained))
    with caplog.at_level(logging.WARNING, logger="tempme_fast"):
        load_checkpoint(fresh(TempMeConfig(imgme_r=1))[0], adapter, base_weights(tiny_config, str(weights)))
    assert "the adapter trained under the TempMe schedule {'imgme_r': 2}; the model runs {'imgme_r': 1}" in caplog.text
