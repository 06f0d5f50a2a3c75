"""Mistakes a user makes on the command line end in one line on stderr and exit status 2, before
any work; bugs keep their traceback."""
import json
import os
import re
import stat
import subprocess
import sys
import time

import pytest

from kit import ROOT, held_lock, process_env
from tempme_fast import errors
from tempme_fast.cli import main
from tiny import TINY_ARGS


def _run(*argv, env=None, timeout=120):
    """``python -m tempme_fast ARGV`` in a fresh process: what a user sees."""
    return subprocess.run([sys.executable, "-m", "tempme_fast", *argv], capture_output=True, text=True,
                          env=process_env(**(env or {})), timeout=timeout, cwd=ROOT)


def _one_line_error(result, command, *fragments):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"tempme {command}: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_subprocess_device_threads_and_resnet():
    _one_line_error(_run("bench", "--device", "gpu"), "bench", "--device 'gpu' is not a device",
                    "valid: auto, cpu, cuda, cuda:N")
    _one_line_error(_run("bench", "--threads", "-2"), "bench", "--threads: -2 is not a positive integer")
    # The model is refused from its config, before anything reads it or downloads weights for it.
    _one_line_error(_run("bench", "--model", "RN50", "--pretrained", "openai"), "bench",
                    "RN50 is a ResNet, not a ViT with a class token")


def test_subprocess_offline_pretrained_fails_fast(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HOME": str(tmp_path)}
    start = time.perf_counter()
    result = _run("eval", "--data", "nowhere.csv", "--pretrained", "openai", env=env)
    _one_line_error(result, "eval", "--data nowhere.csv")
    result = _run("bench", "--pretrained", "openai", env=env)
    _one_line_error(result, "bench", "not in the Hugging Face cache", "HF_HUB_OFFLINE",
                    "--pretrained path/to/weights.pt")
    # No download attempt, hence no timeout: only the two start-ups of the interpreter.
    assert time.perf_counter() - start < 100


@pytest.mark.parametrize("argv, fragments", [
    (["--pretrained", "opeanai"], ["'opeanai' is not an open_clip tag of ViT-B-32-quickgelu", "openai",
                                   "local weights file"]),
    (["--pretrained", "no/such/weights.pt"], ["no/such/weights.pt: no such file"]),
    (["--model", "coca_ViT-B-32"], ["attentional pooling (as CoCa does), not the class token"]),
    (["--model", "ViT-B-16-SigLIP"], ["timm vision tower"]),
    (["--device", "cuda:7"], ["--device cuda:7"]),
    (["--frames", "10"], ["frames=10 is not divisible by the clip groups (2, 2, 3)"]),
    (["--device", "cpu", "--cuda-graph"], ["--cuda-graph times video encoders on a CUDA device",
                                           "the device is cpu"]),
    (["--device", "cpu", "--cuda-graph", "--image"], ["--cuda-graph", "not with --image"]),
    # An option of the other mode is refused, not ignored.
    (["--tome-r", "4"], ["--tome-r sets ToMe's r for images: add --image"]),
    (["--image", "--tome-r", "-1"], ["argument --tome-r: -1 is not an integer >= 0"]),
    (["--image", "--frames", "8"], ["--frames shapes the video encoder; --image times encode_image"]),
    (["--image", "--budget", "0.5", "--full-last-block"], ["--budget, --full-last-block shape the video encoder"]),
], ids=["tag", "file", "coca", "timm", "gpu-index", "frames", "graph-cpu", "graph-image", "tome-r-video",
        "tome-r-negative", "image-frames", "image-budget"])
def test_bench_errors_in_one_line(argv, fragments, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--no-progress", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tempme bench: error: ")
    for fragment in fragments:
        assert fragment in err


def test_unreachable_download_host_fails_fast(monkeypatch, tmp_path):
    """Not offline by setting, but the host does not answer: the probe says so, no download starts."""
    from tempme_fast import weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(weights, "_hf_cached", lambda hub: None)
    monkeypatch.setattr(weights, "_reachable", lambda host, *a, **k: f"{host}: Name or service not known")
    with pytest.raises(errors.WeightsUnavailableError, match="cannot be reached .*Name or service not known"):
        weights.check_pretrained("ViT-B-32-quickgelu", "openai")
    monkeypatch.setattr(weights, "_hf_cached", lambda hub: "/cache/weights.bin")
    weights.check_pretrained("ViT-B-32-quickgelu", "openai")  # cached: no probe, no error


def test_the_probe_goes_where_the_download_would(monkeypatch):
    """Behind HTTPS_PROXY=http://proxy:3128 the probe knocked on proxy:443, found nothing and refused weights that
    open_clip would have downloaded; NO_PROXY was not read."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    from tempme_fast import weights

    endpoint = urlparse(constants.ENDPOINT)
    direct = (endpoint.hostname, endpoint.port or 443)
    probed = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(weights, "_hf_cached", lambda hub: None)
    monkeypatch.setattr(weights, "_reachable", lambda host, port=443, **k: probed.append((host, port)))
    for proxy, no_proxy, hop in (("http://proxy.example:3128", "", ("proxy.example", 3128)),
                                 ("proxy.example:8080", "", ("proxy.example", 8080)),
                                 ("http://proxy.example:3128", endpoint.hostname, direct), ("", "", direct)):
        monkeypatch.setenv("HTTPS_PROXY", proxy)
        monkeypatch.setenv("NO_PROXY", no_proxy)
        monkeypatch.delenv("https_proxy", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        weights.check_pretrained("ViT-B-32-quickgelu", "openai")
        assert probed.pop() == hop


def test_output_paths_are_made_or_refused_before_the_run(tiny_model_file, tmp_path, capsys):
    deep = tmp_path / "a" / "b" / "bench.json"
    assert main(["bench", "--model", tiny_model_file, "--batch", "1", "--repeats", "1", "--warmup", "0",
                 "--device", "cpu", "--no-progress", "--json", str(deep), *TINY_ARGS]) == 0
    assert json.loads(deep.read_text())["batch"] == 1
    capsys.readouterr()
    blocker = tmp_path / "file"
    blocker.write_text("")
    for command, argv, says in (("bench", ["--json", str(blocker / "x.json")], "cannot create the folder"),
                                ("bench", ["--json", str(tmp_path)], "is a folder; give a file path"),
                                ("eval", ["--data", "d.csv", "--json", str(blocker / "x.json")],
                                 "cannot create the folder"),
                                ("train", ["--synthetic", "4", "--batch-size", "4", "--output", str(blocker)],
                                 "is a file; give a folder")):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--model", tiny_model_file, *argv])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err and f"tempme {command}: error: " in err


@pytest.mark.parametrize("command, argv, says", [
    ("eval", ["--split", "train"], "--split picks an MSR-VTT split; --data CSV is a generic list, whose every row"),
    ("eval", ["--train-list", "t.csv"], "--train-list picks an MSR-VTT split"),
    ("eval", ["--data", "DIR", "--train-list", "t.csv"], "--train-list lists the videos of --split train; this is "
                                                         "--split test"),
    ("train", ["--split", "test"], "--split picks an MSR-VTT split"),
    ("eval", ["--dsl-temperature", "50"], "--dsl-temperature sets the dual-softmax re-ranking's temperature: add "
                                          "--dsl"),
    ("eval", ["--dsl", "--dsl-temperature", "inf"], "argument --dsl-temperature: inf is not a positive finite number"),
    ("eval", ["--sample-fps", "nan"], "argument --sample-fps: nan is not a finite number >= 0"),
    ("index", ["--sample-fps", "inf"], "argument --sample-fps: inf is not a finite number >= 0"),
    ("eval", ["--cross-ratio", "nan"], "argument --cross-ratio: nan is not a finite number"),
    ("train", ["--mode", "full", "--lora-rank", "4"], "--lora-rank sets up LoRA: not with --mode full"),
    ("train", ["--lora-scale", "0"], "lora_scale=0.0 must be a finite non-zero number"),
    ("train", ["--weight-decay", "-0.1"], "argument --weight-decay: -0.1 is not a finite number >= 0"),
    ("eval", ["--no-merge", "--imgme-r", "1"], "--no-merge runs the unmerged model: leave out --imgme-r"),
    ("train", ["--no-merge", "--budget", "0.5"], "--no-merge runs the unmerged model: leave out --budget"),
], ids=["eval-split-generic", "eval-train-list-generic", "eval-train-list-test", "train-split-generic",
        "dsl-temperature-alone", "dsl-temperature-inf", "fps-nan", "index-fps-inf", "ratio-nan", "full-lora-rank",
        "lora-scale-zero", "weight-decay", "eval-no-merge-knob", "train-no-merge-budget"])
def test_options_that_cannot_apply_are_refused(command, argv, says, tiny_model_file, tmp_path, capsys,
                                               monkeypatch):
    """An option that would be ignored, or a number no run can use, ends in one line before any model is built."""
    from tempme_fast import loading

    monkeypatch.setattr(loading, "create_model", lambda *a, **k: pytest.fail("a model was built"))
    csv = tmp_path / "pairs.csv"
    csv.write_text("video_path,caption\nmissing.mp4,a cat\n")
    argv = [{"CSV": str(csv), "DIR": str(tmp_path)}.get(a, a) for a in argv]
    says = says.replace("CSV", str(csv))
    where = {"eval": ["--data", str(csv)], "train": ["--data", str(csv), "--batch-size", "1"],
             "index": [str(tmp_path), "--out", str(tmp_path / "index")]}[command]
    with pytest.raises(SystemExit) as exit_:
        main([command, *where, "--model", tiny_model_file, *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and says in err, err


def test_an_output_file_never_replaces_an_input(tiny_model_file, tmp_path, capsys):
    """--json or --out naming a file the command reads (a typo away) is refused, and the file is kept."""
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("video_path,caption\nmissing.mp4,a cat\n")
    listed = tmp_path / "videos.txt"
    listed.write_text("missing.mp4\n")
    model_text = open(tiny_model_file).read()
    for command, argv, says in (
            ("eval", ["--data", str(pairs), "--json", str(pairs)], "is the --data file the command reads"),
            ("eval", ["--data", str(pairs), "--json", tiny_model_file], "is the --model file the command reads"),
            ("bench", ["--json", tiny_model_file], "is the --model file the command reads"),
            ("index", [str(listed), "--out", str(tmp_path / "i"), "--json", str(listed)],
             "is the video list the command reads")):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--model", tiny_model_file, *argv])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and says in err and "writing it would replace that file" in err, err
    assert pairs.read_text().startswith("video_path,caption") and listed.read_text() == "missing.mp4\n"
    assert open(tiny_model_file).read() == model_text


def test_ctrl_c_ends_in_one_line_that_says_what_is_kept(tmp_path, monkeypatch, capsys):
    from tempme_fast.index import build

    def interrupted(videos, out, *args, **kwargs):
        os.makedirs(os.path.join(out, "shards"))  # what a run leaves before its first shard
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "build_index", interrupted)
    out = tmp_path / "new" / "index"
    assert main(["index", str(tmp_path), "--out", str(out)]) == 130
    assert capsys.readouterr().err == ("tempme index: interrupted; the shards written so far are kept: run the same "
                                       "command with --resume to continue\n")


def test_a_refused_command_leaves_no_folder_behind(tiny_model_file, tmp_path, capsys):
    """Folders made for --json and --output are removed again, while empty, when the command fails later."""
    kept = tmp_path / "kept"
    kept.mkdir()
    for command, argv in (("eval", ["--data", str(tmp_path / "d.csv"), "--json", str(tmp_path / "e" / "f" / "x.json")]),
                          ("train", ["--synthetic", "4", "--batch-size", "4", "--context-length", "40",
                                     "--backend", "torch", "--output", str(tmp_path / "t" / "run"), *TINY_ARGS]),
                          ("train", ["--synthetic", "4", "--batch-size", "4", "--context-length", "40",
                                     "--backend", "torch", "--output", str(kept), *TINY_ARGS])):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--model", tiny_model_file, *argv])
        assert exit_.value.code == 2, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "tiny-vit.json"]  # kept: it was there before


def test_new_folders_keeps_what_holds_a_file_and_what_was_there(tmp_path):
    from tempme_fast.outputs import make_folders, new_folders, prepare_output_dir

    (tmp_path / "old").mkdir()
    with pytest.raises(KeyError), new_folders():
        prepare_output_dir(str(tmp_path / "old" / "a" / "b"), "--output")
        make_folders(str(tmp_path / "c" / "d"))
        (tmp_path / "c" / "file").write_text("result")
        raise KeyError("the command failed")
    # old/a/b were made and are empty: removed; c holds a file: kept with it, only c/d went.
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["c", "c/file", "old"]
    with new_folders() as made:
        make_folders(str(tmp_path / "x" / "y"))
    assert (tmp_path / "x" / "y").is_dir()  # no failure: kept
    made.remove_empty()  # what a command that fails by its exit status calls
    assert not (tmp_path / "x").exists()
    make_folders(str(tmp_path / "z"))  # outside new_folders: nothing recorded, nothing removed
    assert (tmp_path / "z").is_dir()


def test_json_outputs_are_written_whole_or_not_at_all(tiny_model_file, tmp_path, monkeypatch, capsys):
    import threading

    from tempme_fast.checkpoint import atomic_write
    from tempme_fast.outputs import prepare_output_file, write_json

    out = tmp_path / "bench.json"
    out.write_text('{"earlier": "run"}')
    argv = ["bench", "--model", tiny_model_file, "--batch", "1", "--repeats", "1", "--warmup", "0", "--device", "cpu",
            "--no-progress", "--json", str(out), *TINY_ARGS]

    def killed_while_writing(path, write):  # the file is half written when the kill comes
        def half(f):
            f.write(b'{"command": ')
            raise KeyboardInterrupt
        atomic_write(path, half)

    monkeypatch.setattr("tempme_fast.checkpoint.atomic_write", killed_while_writing)
    assert main(argv) == 130
    assert out.read_text() == '{"earlier": "run"}' and sorted(p.name for p in tmp_path.iterdir()) == [
        "bench.json", "tiny-vit.json"]  # the earlier result, and no temporary file left
    monkeypatch.undo()
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json(str(out), {"rows": [object()]})
    assert out.read_text() == '{"earlier": "run"}'
    link = tmp_path / "link.json"
    link.symlink_to(out)
    write_json(str(link), {"rows": []})
    assert link.is_symlink() and json.loads(out.read_text()) == {"rows": []}
    # A pipe (as /dev/stdout can be) is written in place, and its folder need not be writable.
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    read = []
    reader = threading.Thread(target=lambda: read.append(pipe.read_text()))
    reader.start()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: real_access(p, mode) and os.fspath(p) != str(tmp_path))
    assert prepare_output_file(str(pipe), "--json") == str(pipe)
    write_json(str(pipe), {"x": 1})
    reader.join(timeout=10)
    assert read == ['{\n  "x": 1\n}\n'] and stat.S_ISFIFO(os.stat(pipe).st_mode)


def test_json_to_stdout_follows_the_table(tiny_model_file, tmp_path):
    """``--json /dev/stdout``, into a pipe and into a file: the table, then the JSON. /dev/stdout leads to a pipe
    that has no path to replace (a first atomic write failed there, after the whole run)."""
    argv = ["bench", "--model", tiny_model_file, "--batch", "1", "--repeats", "1", "--warmup", "0", "--device", "cpu",
            "--no-progress", "--json", "/dev/stdout", *TINY_ARGS]
    piped = _run(*argv)
    with open(tmp_path / "all.txt", "w") as out:
        subprocess.run([sys.executable, "-m", "tempme_fast", *argv], stdout=out, stderr=subprocess.DEVNULL,
                       env=process_env(), timeout=120, cwd=ROOT, check=True)
    for text in (piped.stdout, (tmp_path / "all.txt").read_text()):
        table, _, record = text.partition("\n{")
        assert "open_clip (unmerged)" in table and json.loads("{" + record)["batch"] == 1, piped.stderr


def test_exclusive_keeps_one_writer(tmp_path, monkeypatch):
    pytest.importorskip("fcntl")
    from tempme_fast.outputs import exclusive

    lock = tmp_path / ".lock"
    lock.write_text("977\n")  # left by a killed writer: nobody holds it
    with exclusive(str(lock), lambda holder: f"{holder} writes here"):
        assert lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(errors.ConfigError, match=f"^process {os.getpid()} writes here$"):
            with exclusive(str(lock), lambda holder: f"{holder} writes here"):
                pass
    assert not lock.exists()
    with held_lock(lock, pid=""):
        with pytest.raises(errors.ConfigError, match="^another process writes here$"):  # no pid written yet
            with exclusive(str(lock), lambda holder: f"{holder} writes here"):
                pass
    monkeypatch.setitem(sys.modules, "fcntl", None)  # as on Windows
    with pytest.warns(UserWarning, match="not locked \\(no fcntl here\\); run one writer at a time"):
        with exclusive(str(lock), lambda holder: f"{holder} writes here"):
            pass


def test_a_tokenizer_the_text_tower_cannot_embed_is_refused_before_the_videos(tiny_model_file, tmp_path, capsys,
                                                                                   monkeypatch):
    # The tiny model embeds 1,000 token ids; open_clip's tokenizer for a config of its name is CLIP's (49,408):
    # an IndexError, or a device-side assert on a GPU, after every video was encoded.
    from tempme_fast.retrieval import evaluate

    monkeypatch.setattr(evaluate, "encode_videos", lambda *a, **k: pytest.fail("videos were encoded"))
    for k in range(2):
        (tmp_path / f"v{k}.mp4").write_bytes(b"")
    data = tmp_path / "pairs.csv"
    data.write_text("video_path,caption\nv0.mp4,a dog\nv1.mp4,a cat\n")
    listing = tmp_path / "videos.txt"
    listing.write_text("v0.mp4\nv1.mp4\n")
    common = ["--model", tiny_model_file, *TINY_ARGS, "--context-length", "12", "--workers", "0", "--no-progress"]
    says = ("the tokenizer (SimpleTokenizer) makes token ids up to 49407, but the text tower's vocabulary has 1000 "
            "(model.token_embedding): the model's config and its tokenizer do not match")
    for command, argv in (("eval", ["--data", str(data)]),
                          ("train", ["--data", str(data), "--batch-size", "2", "--output", str(tmp_path / "run")]),
                          ("index", [str(listing), "--out", str(tmp_path / "index")])):
        with pytest.raises(SystemExit) as exit_:
            main([command, *common, *argv])
        assert exit_.value.code == 2, command
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"tempme {command}: error: {says}" in err, err
    assert not (tmp_path / "index").exists() and not (tmp_path / "run").exists()


def test_the_triton_backend_on_a_cpu_outside_the_interpreter_is_refused_before_the_model(tiny_model_file, tmp_path,
                                                                                         capsys, monkeypatch):
    """It failed at the first forward, in a traceback, after the model was built (and, for eval, videos decoded)."""
    from tempme_fast import loading

    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(loading, "create_model", lambda *a, **k: pytest.fail("a model was built"))
    csv = tmp_path / "pairs.csv"
    csv.write_text("video_path,caption\nmissing.mp4,a cat\n")
    for command, argv in (("bench", ["--backends", "torch", "triton"]), ("eval", ["--data", str(csv), "--backend",
                                                                                  "triton"]),
                          ("train", ["--synthetic", "4", "--batch-size", "2", "--backend", "triton", "--output",
                                     str(tmp_path / "run")])):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--model", tiny_model_file, "--device", "cpu", *argv])
        err = capsys.readouterr().err
        option = "--backends" if command == "bench" else "--backend"
        assert exit_.value.code == 2 and err.count("\n") == 1, err
        assert f"{option} triton: backend='triton' got a tensor on cpu: Triton runs on CUDA tensors, or on the CPU " \
               f"only in interpreter mode" in err, err


def test_model_configs_and_ignored_options_are_refused_in_one_line(tiny_model_file, tmp_path, capsys, monkeypatch):
    """A misspelt key in a JSON model config was open_clip's traceback; patch dropout in a config was refused only
    after its weights were read (and `tempme schedule` printed a plan for it); `train --synthetic` ignored the data
    options, and `bench --image` ignored --derived."""
    from tempme_fast import loading

    config = json.loads(open(tiny_model_file).read())
    typo = dict(config, vision_cfg={**config["vision_cfg"], "patch_szie": 8})
    dropout = dict(config, vision_cfg={**config["vision_cfg"], "patch_dropout": 0.5})
    for name, body in (("typo", typo), ("dropout", dropout)):
        (tmp_path / f"{name}.json").write_text(json.dumps(body))
    monkeypatch.setattr(loading, "create_model", lambda *a, **k: pytest.fail("a model was built"))
    for argv, says in (
            (["schedule", "--model", str(tmp_path / "typo.json")],
             "vision_cfg holds ['patch_szie'], which this open_clip's CLIPVisionCfg does not take"),
            (["schedule", "--model", str(tmp_path / "dropout.json")], "drops patches in training (patch_dropout=0.5)"),
            (["train", "--model", tiny_model_file, "--synthetic", "4", "--batch-size", "2", "--split", "test",
              "--max-videos", "1", "--output", str(tmp_path / "run")],
             "--split, --max-videos pick videos of --data: not with --synthetic"),
            (["bench", "--image", "--model", tiny_model_file, "--derived"], "--derived shapes the video encoder")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and says in err, err


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only input errors become one line: any other exception propagates."""
    import tempme_fast.bench as bench

    def broken(*args, **kwargs):
        raise TypeError("Value after * must be an iterable, not int")

    monkeypatch.setattr(bench, "bench_model", broken)
    monkeypatch.setattr("tempme_fast.loading.create_model", lambda *a, **k: None)
    with pytest.raises(TypeError, match="iterable"):
        main(["bench", "--no-progress"])


def test_error_types():
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.UnsupportedModelError, TypeError) and issubclass(errors.UnsupportedModelError,
                                                                              errors.TempMeError)
    with pytest.raises(errors.ConfigError, match=r"^--data x: boom$"):
        with errors.as_config_error("--data x"):
            raise ValueError("boom")
    with pytest.raises(KeyError):
        with errors.as_config_error("--data x"):
            raise KeyError("a bug")


def test_refusals_of_built_models_say_what_pools():
    """The model check of a built model (a model that did not come through --model) says what is wrong."""
    import open_clip

    from tempme_fast import apply_tempme

    vision = open_clip.model.CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32,
                                           attentional_pool=True)
    text = open_clip.model.CLIPTextCfg(context_length=16, vocab_size=1000, width=32, heads=2, layers=1)
    coca_like = open_clip.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text)
    with pytest.raises(errors.UnsupportedModelError) as err:
        apply_tempme(coca_like)
    assert "attentional pooling (as CoCa does), not the class token" in str(err.value)
    assert "pool_type" not in str(err.value)


def test_bad_model_and_checkpoint_files(tmp_path):
    from tempme_fast.loading import create_model, load_checkpoint

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(errors.ConfigError, match="broken.json: not a JSON model config"):
        create_model(str(broken))
    # JSON, but not a model config: refused as such (it was a KeyError in `schedule`, open_clip's error in `bench`).
    for name, text, says in (("part.json", '{"embed_dim": 8}', "; it lacks vision_cfg, text_cfg"),
                             ("list.json", "[1, 2]", "; it lacks embed_dim, vision_cfg, text_cfg"),
                             ("flat.json", '{"embed_dim": 8, "vision_cfg": 3, "text_cfg": {}}', "")):
        (tmp_path / name).write_text(text)
        for command in ("schedule", "bench"):
            with pytest.raises(SystemExit) as exit_:
                main([command, "--model", str(tmp_path / name)])
            assert exit_.value.code == 2
        with pytest.raises(errors.ConfigError, match=re.escape(f"{name}: not an open_clip model config (an object "
                                                               f"with embed_dim, vision_cfg and text_cfg{says}")):
            create_model(str(tmp_path / name))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(errors.ConfigError, match="garbage.pt: not a file torch.load can read"):
        load_checkpoint(None, str(garbage))
    with pytest.raises(errors.ConfigError, match="no such file"):
        load_checkpoint(None, str(tmp_path / "missing.pt"))


def test_every_reader_of_torch_files_refuses_one_it_cannot_read(tmp_path):
    """A file of another kind, and one whose pickle holds objects other than tensors and plain values,
    are a ConfigError naming the argument and the file, not torch's traceback."""
    import argparse

    import torch

    from tempme_fast.checkpoint import load_file
    from tempme_fast.lora import load_lora
    from tempme_fast.official import load_official_checkpoint
    from tiny import tiny_clip

    text = tmp_path / "captions.csv"
    text.write_text("video_path,caption\n")
    pickled = tmp_path / "namespace.pt"
    torch.save(argparse.Namespace(lr=1e-3), pickled)
    with pytest.raises(errors.ConfigError, match=r"^--resume .*captions.csv: not a file torch.load can read"):
        load_file(text, "--resume")
    with pytest.raises(errors.ConfigError, match=r"namespace.pt: not a file torch.load can read \(with weights_only="
                                                 r"True it reads tensors and plain values only; this file holds"):
        load_file(pickled, "--checkpoint")
    with pytest.raises(errors.ConfigError, match=r"^LoRA file .*captions.csv: not a file torch.load can read"):
        load_lora(None, text)
    with pytest.raises(errors.ConfigError, match=r"^checkpoint .*captions.csv: not a file torch.load can read"):
        load_official_checkpoint(tiny_clip(), str(text))
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2), tensor)
    with pytest.raises(ValueError, match=r"tensor.pt: expected a state dict of name -> tensor, found a Tensor"):
        load_official_checkpoint(tiny_clip(), str(tensor))
    with pytest.raises(ValueError, match=r"not a LoRA file saved by save_lora \(format='Tensor'"):
        load_lora(None, tensor)
    # What a failed download leaves: the unpickler raised IndexError or KeyError on it, past the ConfigError.
    for body in ("Repository not found", "<html>404</html>", "{}", "hello"):
        page = tmp_path / "page.pt"
        page.write_text(body)
        with pytest.raises(errors.ConfigError, match=r"^--checkpoint .*page.pt: not a file torch.load can read"):
            load_file(page, "--checkpoint")


def test_pretrained_files_open_clip_cannot_load_are_named_in_one_line(tiny_model_file, tmp_path, caplog):
    """A weights file of another model, tempme's own model.pt, or another kind of file: open_clip's traceback."""
    import logging

    import torch

    from tempme_fast import apply_tempme
    from tempme_fast.loading import create_model
    from tiny import TINY_CONFIG, tiny_clip

    tempme = tmp_path / "model.pt"
    torch.save(apply_tempme(create_model(tiny_model_file), TINY_CONFIG).state_dict(), tempme)
    other = tmp_path / "other.pt"
    torch.save(tiny_clip(width=32).state_dict(), other)
    text = tmp_path / "weights.bin"
    text.write_text("not weights")
    for path, says in ((tempme, "holds a TempMe model or adapter (tempme train's model.pt or lora.pt): give it as "
                                "--checkpoint"),
                       (other, "open_clip cannot load it as tiny-vit's weights (size mismatch for "),
                       (text, "not a file torch.load can read")):
        with pytest.raises(errors.ConfigError, match=f"--pretrained {path}.*{re.escape(says)}"):
            create_model(tiny_model_file, str(path))
    # A file whose path names OpenAI, for a model that runs GELU: OpenAI CLIP was trained with QuickGELU.
    gelu = tmp_path / "gelu.json"
    gelu.write_text(open(tiny_model_file).read().replace('"quick_gelu": true', '"quick_gelu": false'))
    openai = tmp_path / "vit_b32.openai"
    openai.mkdir()
    torch.save(create_model(str(gelu)).state_dict(), openai / "open_clip_model.pt")
    with caplog.at_level(logging.WARNING, logger="tempme_fast"):
        create_model(str(gelu), str(openai / "open_clip_model.pt"))
    assert "looks like OpenAI weights, which were trained with QuickGELU, but gelu runs GELU: give --model " \
           "gelu-quickgelu" in caplog.text


def test_probe_of_an_unreachable_host_is_bounded():
    from tempme_fast import weights

    start = time.perf_counter()
    reason = weights._reachable("tempme-weights.invalid", timeout=2.0)  # .invalid never resolves
    assert reason and time.perf_counter() - start < 4.0
