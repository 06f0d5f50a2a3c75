"""No lost work in training: a default run folder, periodic checkpoints, skipped degenerate
batches, a checkpoint and a resume command on Ctrl-C, a warning on random weights."""
import json
import logging
import os
import signal

import pytest
import torch

from tempme_fast.cli import main
from tempme_fast.trainer import DEFAULT_SAVE_EVERY, TrainConfig, Trainer
from test_train import _model, _pairs
from tiny import TINY_ARGS

pytestmark = pytest.mark.usefixtures("one_thread")


def _train_argv(model_file, *extra):
    return ["train", "--model", model_file, "--synthetic", "8", "--batch-size", "2", "--epochs", "1",
            "--context-length", "12", "--no-progress", "--backend", "torch", "--device", "cpu", *TINY_ARGS, *extra]


def test_default_run_folder_is_named_first_and_keeps_the_model(tiny_model_file, tmp_path, monkeypatch, capsys,
                                                                 caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="tempme_fast"):
        assert main(_train_argv(tiny_model_file, "--max-steps", "1")) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("tempme train: writing to runs/train-")
    folder = first.split("writing to ", 1)[1].split(" ", 1)[0]
    assert {"model.pt", "lora.pt", "last.pt"} <= set(os.listdir(tmp_path / folder))
    assert "RANDOM weights" in caplog.text


def _batch(n, seed=1):
    videos, tokens = _pairs(n, seed)
    return {"video": videos, "tokens": tokens, "mask": torch.ones(n, 4, dtype=torch.bool)}


def test_batches_with_fewer_than_two_pairs_are_skipped_and_counted(caplog):
    # One pair gives loss 0 whatever the weights; it must not count as a step.
    data = [_batch(2), _batch(1), _batch(3), _batch(1)]
    trainer = Trainer(_model(), data, TrainConfig(epochs=1), progress=False)
    with caplog.at_level(logging.WARNING, logger="tempme_fast"):
        history = trainer.fit()
    assert [r["step"] for r in history] == [1, 2] and all(r["loss"] > 0 for r in history)
    assert trainer.skipped_batches == 2 and "1 readable pair(s), a contrastive step needs 2" in caplog.text


def test_checkpoints_every_n_steps_by_default(tmp_path, monkeypatch):
    assert TrainConfig().save_every == DEFAULT_SAVE_EVERY
    saved = []
    monkeypatch.setattr(Trainer, "save_checkpoint", lambda self, path=None: saved.append(self.step))
    Trainer(_model(), [_pairs(2)] * 5, TrainConfig(epochs=1, save_every=2), output_dir=str(tmp_path),
            progress=False).fit()
    assert saved == [2, 4, 5]  # every 2 steps, then the epoch end


def _interrupt_at(monkeypatch, step):
    """Deliver a real SIGINT to this process during train step ``step``."""
    import tempme_fast.trainer as trainer_module

    calls = []
    real = trainer_module.train_step

    def step_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", step_then_ctrl_c)


def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_resumes_exactly(tmp_path, monkeypatch, caplog):
    # Python's own handler, or SIG_IGN where the tests run in the background (nohup, `cmd &`).
    handler = signal.getsignal(signal.SIGINT)
    data = [_pairs(2, seed) for seed in range(4)]
    whole = Trainer(_model(), data, TrainConfig(epochs=1), progress=False).fit()
    _interrupt_at(monkeypatch, 2)
    cut = Trainer(_model(), data, TrainConfig(epochs=1), output_dir=str(tmp_path), progress=False)
    first = cut.fit()
    assert cut.interrupted and [r["step"] for r in first] == [1, 2]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="tempme_fast"):
        rest = Trainer(_model(), data, TrainConfig(epochs=1), output_dir=str(tmp_path), progress=False,
                       resume="auto").fit()
    assert f"resumed from checkpoint {tmp_path / 'last.pt'} at step 2" in caplog.text
    assert [r["loss"] for r in first + rest] == [r["loss"] for r in whole]
    assert signal.getsignal(signal.SIGINT) is handler  # the handler is put back


def test_fit_again_after_ctrl_c_continues_in_the_same_process(monkeypatch):
    """The replay of the stopped epoch restored an RNG state that only a loaded checkpoint has: a TypeError."""
    from torch.utils.data import DataLoader, TensorDataset

    def run():
        torch.manual_seed(5)
        data = DataLoader(TensorDataset(*_pairs(8)), batch_size=2, shuffle=True)
        return Trainer(_model(), data, TrainConfig(epochs=2), progress=False)

    whole = run().fit()
    _interrupt_at(monkeypatch, 3)
    cut = run()
    first = cut.fit()
    assert cut.interrupted and len(first) == 3
    rest = cut.fit()
    assert [r["loss"] for r in first + rest] == [r["loss"] for r in whole]


def test_cli_ctrl_c_prints_how_to_resume(tiny_model_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _interrupt_at(monkeypatch, 1)
    assert main(_train_argv(tiny_model_file, "--output", str(out))) == 130
    text = capsys.readouterr().out
    assert f"checkpoint {out / 'last.pt'}" in text and "stopped by Ctrl-C at step 1/4" in text
    command = text.split("continue with:\n", 1)[1].strip()
    assert command.startswith("tempme train --model") and command.endswith(f"--output {out} --resume auto")
    assert not (out / "model.pt").exists()
    # The training state is not a model file: eval says which files to pass instead.
    from tempme_fast.errors import ConfigError
    from tempme_fast.loading import create_model, load_checkpoint
    from tempme_fast.model import apply_tempme
    from tiny import TINY_CONFIG
    with pytest.raises(ConfigError, match=r"resumable training state .* model file .*model.pt or the LoRA file"):
        load_checkpoint(apply_tempme(create_model(tiny_model_file), TINY_CONFIG), str(out / "last.pt"))
    monkeypatch.undo()
    assert main(command.split()[1:]) == 0
    log = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and (out / "model.pt").exists()


def test_cli_resume_with_another_batch_size_seed_or_data_is_refused(tiny_model_file, tmp_path, capsys):
    """16 pairs in batches of 4 make as many steps as 8 in batches of 2: the step count alone hid the change."""
    out = str(tmp_path / "run")
    assert main(_train_argv(tiny_model_file, "--output", out, "--max-steps", "1")) == 0
    capsys.readouterr()
    resume = ["--output", out, "--resume", "auto"]
    argv = _train_argv(tiny_model_file, *resume)
    at = argv.index("--synthetic")
    other = argv[:at] + ["--synthetic", "16", "--batch-size", "4"] + argv[at + 4:]
    for changed, fragment in ((other, "--batch-size=2, data='--synthetic 8'; this run has --batch-size=4, "
                                      "data='--synthetic 16', and a resumed run must continue the same one"),
                              (argv + ["--seed", "7"], "--seed=0; this run has --seed=7")):
        with pytest.raises(SystemExit) as exit_:
            main(changed)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and fragment in err, err
    assert main(argv) == 0  # the same settings resume
    log = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


def _fail_at(monkeypatch, step, draw=True):
    """Make train step ``step`` raise, after drawing a random number as a forward with dropout would."""
    import tempme_fast.trainer as trainer_module

    calls = []
    real = trainer_module.train_step

    def step_or_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            if draw:
                torch.rand(1)
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", step_or_fail)


def _shuffled_run(out, resume=False):
    """2 epochs of 3 batches in an order drawn from the global RNG at each epoch's start."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(123)
    data = DataLoader(TensorDataset(*_pairs(6)), batch_size=2, shuffle=True)
    trainer = Trainer(_model(), data, TrainConfig(epochs=2, lr=5e-3, warmup=0.25, save_every=None),
                      output_dir=out, progress=False, resume="auto" if resume else None)
    return trainer


def test_a_failed_step_leaves_a_checkpoint_of_the_last_one_that_resumes_exactly(tmp_path, monkeypatch, caplog):
    whole = _shuffled_run(None).fit()
    _fail_at(monkeypatch, 2)
    cut = _shuffled_run(str(tmp_path))
    with caplog.at_level(logging.ERROR, logger="tempme_fast"), pytest.raises(RuntimeError, match="simulated"):
        cut.fit()
    assert cut.failure_checkpoint == str(tmp_path / "last.pt")
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 1
    assert "step 2 failed (RuntimeError: CUDA out of memory (simulated)); wrote checkpoint" in caplog.text
    monkeypatch.undo()
    rest = _shuffled_run(str(tmp_path), resume=True).fit()
    # The failed step drew a random number; the checkpoint holds the states from before it, so the second
    # epoch's order, and every loss, are those of the run that never failed.
    assert [r["step"] for r in rest] == [2, 3, 4, 5, 6]
    assert [r["loss"] for r in cut.history + rest] == [r["loss"] for r in whole]


def test_a_step_that_fails_inside_the_optimiser_writes_no_checkpoint(tmp_path, caplog):
    trainer = _shuffled_run(str(tmp_path))

    def fail(optimizer, args, kwargs):
        if trainer.step == 2:
            raise RuntimeError("update failed")
    trainer.optimizer.register_step_pre_hook(fail)
    with caplog.at_level(logging.ERROR, logger="tempme_fast"), pytest.raises(RuntimeError, match="update failed"):
        trainer.fit()
    assert trainer.failure_checkpoint is None and not (tmp_path / "last.pt").exists()
    assert "failed inside the optimiser update" in caplog.text and "the last one is none" in caplog.text


def test_cli_prints_how_to_resume_after_a_failed_step(tiny_model_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _fail_at(monkeypatch, 3, draw=False)
    with pytest.raises(RuntimeError, match="simulated"):
        main(_train_argv(tiny_model_file, "--output", str(out)))
    text = capsys.readouterr().out
    assert f"step 3 failed; checkpoint {out / 'last.pt'} holds step 2/4" in text
    command = text.split("continue with:\n", 1)[1].strip()
    monkeypatch.undo()
    assert main(command.split()[1:]) == 0
    log = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


def test_resume_after_a_log_line_cut_off_by_a_kill(tmp_path, caplog):
    """A kill in the middle of a log write leaves a last line without its end; the resume stopped at it with a
    JSONDecodeError, so the run could not go on. It is now left out, and the log is rewritten whole or not at
    all. A broken line elsewhere is left out with a warning naming it."""
    data = [_pairs(2, seed) for seed in range(4)]
    whole = Trainer(_model(), data, TrainConfig(epochs=1), progress=False).fit()
    Trainer(_model(), data, TrainConfig(epochs=1, max_steps=2), output_dir=str(tmp_path), progress=False).fit()
    log_file = tmp_path / Trainer.LOG
    with open(log_file, "a") as f:
        f.write('{"step": 3, "epoch": 0, "lo')  # the line of step 3, cut off (step 3 was not checkpointed)
    with caplog.at_level(logging.WARNING, logger="tempme_fast"):
        rest = Trainer(_model(), data, TrainConfig(epochs=1), output_dir=str(tmp_path), progress=False,
                       resume="auto").fit()
    assert [r["loss"] for r in rest] == [r["loss"] for r in whole[2:]]
    assert [json.loads(line)["step"] for line in log_file.read_text().splitlines()] == [1, 2, 3, 4]
    assert "not a step record" not in caplog.text  # (a cut-off last line is what a kill leaves)

    lines = log_file.read_text().splitlines(keepends=True)
    log_file.write_text(lines[0] + "garbage\n" + "".join(lines[1:]))
    with caplog.at_level(logging.WARNING, logger="tempme_fast"):
        Trainer(_model(), data, TrainConfig(epochs=1), output_dir=str(tmp_path), progress=False, resume="auto")
    assert f"{log_file}:2: not a step record, left out of the log: 'garbage'" in caplog.text
    assert log_file.read_text().splitlines(keepends=True) == lines


def test_cli_keeps_a_finished_run_from_a_resume_that_would_replace_it(tiny_model_file, tmp_path, capsys):
    """Two ways a finished run's files were replaced without a word: a resume of another run's checkpoint into its
    folder (its log then held both runs), and --resume auto once its last.pt was deleted (it trained afresh)."""
    x, y = str(tmp_path / "x"), str(tmp_path / "y")
    assert main(_train_argv(tiny_model_file, "--output", x, "--max-steps", "2")) == 0
    assert main(_train_argv(tiny_model_file, "--output", y, "--max-steps", "1", "--seed", "1")) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in (tmp_path / "x").iterdir()}
    for extra, fragment in (
            (["--seed", "1", "--resume", os.path.join(y, "last.pt")],
             f"--output {x} holds another run (last.pt, train_log.jsonl, model.pt, lora.pt), which continuing "
             f"{y}/last.pt there would replace and mix into its log; continue that folder's own run with --resume "
             f"auto, or give an empty folder"),
            (["--resume", "auto"], f"--output {x} holds a run's model.pt and lora.pt but no last.pt to continue from: "
                                   f"--resume auto would train from the start and replace them")):
        if extra[-1] == "auto":
            os.remove(os.path.join(x, "last.pt"))
            before.pop("last.pt")
        with pytest.raises(SystemExit) as exit_:
            main(_train_argv(tiny_model_file, "--output", x, *extra))
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and fragment in err, err
        assert {p.name: p.read_bytes() for p in (tmp_path / "x").iterdir()} == before


def test_cli_full_mode_from_an_official_checkpoint_writes_a_model_eval_loads(tiny_model_file, tmp_path, capsys):
    """Its LoRA trained with every weight and was never merged: model.pt held parametrization keys that
    `tempme eval --checkpoint` refused. A --lora-rank other than the checkpoint's was ignored."""
    from tempme_fast import apply_tempme
    from tempme_fast.loading import create_model, load_checkpoint
    from tempme_fast.lora import add_lora
    from tempme_fast.official import official_key_map
    from tiny import TINY_CONFIG

    released = apply_tempme(create_model(tiny_model_file), TINY_CONFIG)
    add_lora(released, rank=4)
    state = released.state_dict()
    torch.save({name: state[key] for name, key in official_key_map(released).items()}, tmp_path / "official.pth")
    official = ["--official-checkpoint", str(tmp_path / "official.pth")]
    out = tmp_path / "full"
    assert main(_train_argv(tiny_model_file, "--output", str(out), "--mode", "full", "--max-steps", "1",
                            *official)) == 0
    assert "LoRA merged; tempme eval --checkpoint loads it" in capsys.readouterr().out
    load_checkpoint(apply_tempme(create_model(tiny_model_file), TINY_CONFIG), str(out / "model.pt"))
    with pytest.raises(SystemExit) as exit_:
        main(_train_argv(tiny_model_file, "--output", str(tmp_path / "rank"), "--lora-rank", "16", *official))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "lora_rank=16: the model already has LoRA of rank=4 scale=1.0" in err, err


def test_cli_resume_on_other_weights_of_the_same_name_is_refused(tiny_model_file, tmp_path, capsys):
    """Weights counted by their file name only: an adapter continued on other base weights without a word."""
    from tempme_fast.loading import create_model

    weights, out = tmp_path / "open_clip_model.pt", str(tmp_path / "run")
    for seed in (1, 2):
        torch.manual_seed(seed)
        torch.save(create_model(tiny_model_file).state_dict(), weights)
        if seed == 1:
            argv = _train_argv(tiny_model_file, "--output", out, "--pretrained", str(weights))
            assert main(argv + ["--max-steps", "1"]) == 0
            capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv + ["--resume", "auto"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "trained with --pretrained sha256=" in err and "this run has --pretrained sha256=" in err, err
