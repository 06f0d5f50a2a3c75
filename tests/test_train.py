"""Loss, training step, Trainer (exact resume, atomic checkpoints), mixed precision, the CLI, Triton grads."""
import argparse
import json
import logging
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from kit import HALF_DTYPES, held_lock, parametrize_dtypes
from tempme_fast import apply_tempme
from tempme_fast.checkpoint import atomic_save
from tempme_fast.errors import ConfigError, TrainingDiverged
from tempme_fast.lora import add_lora, lora_config, lora_layers, mark_trainable
from tempme_fast.retrieval import SyntheticPairs
from tempme_fast.train import contrastive_loss, cosine_schedule, make_optimizer, train_step, unpack_batch
from tempme_fast.trainer import TrainConfig, Trainer
from tiny import TINY_ARGS, TINY_CONFIG, tiny_clip


pytestmark = pytest.mark.usefixtures("one_thread")


def _pairs(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    videos = torch.randn(n, 4, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 999, (n, 16), generator=g)
    tokens[:, 10] = 999  # EOT: the highest id, where CLIP's text pooling reads
    tokens[:, 11:] = 0
    return videos, tokens


def _model(mode="lora", backend="torch", seed=0):
    model = apply_tempme(tiny_clip(seed=seed), TINY_CONFIG, backend=backend).train()
    if mode == "lora":
        add_lora(model, rank=4)
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():  # non-zero B and frame_pos, so every trainable weight gets a gradient
            for lora in lora_layers(model).values():
                lora.lora_b.copy_(0.1 * torch.randn(lora.lora_b.shape, generator=g))
            for p in model.visual.tempme_frame_pos.values():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    mark_trainable(model, mode)
    return model


def test_contrastive_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    v, t = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    scale = torch.tensor(2.0)
    logits = scale.exp() * F.normalize(t, dim=-1) @ F.normalize(v, dim=-1).T
    log_t2v = logits.log_softmax(dim=1).diagonal()
    log_v2t = logits.log_softmax(dim=0).diagonal()
    want = -(log_t2v.mean() + log_v2t.mean()) / 2
    torch.testing.assert_close(contrastive_loss(3 * v, t, scale), want)
    assert contrastive_loss(v, v, torch.tensor(5.0)) < 0.1  # perfect pairs, sharp temperature
    with pytest.raises(ValueError, match="must both be"):
        contrastive_loss(v, t[:4], scale)


def test_cosine_schedule_warmup_then_decay():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_schedule(opt, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.05


@pytest.mark.parametrize("mode, lr", [("lora", 1e-2), ("full", 1e-3)])
def test_a_few_steps_reduce_the_loss(mode, lr):
    torch.manual_seed(0)
    model = _model(mode)
    opt = make_optimizer(model, lr=lr, weight_decay=0.0)
    batch = _pairs(6)
    losses = [train_step(model, batch, opt).loss for _ in range(8)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_weight_decay_groups():
    model = _model("full")
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.2)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert any(p is model.logit_scale for p in no_decay["params"])


def test_batch_layouts_and_short_tokens():
    model = _model()
    videos, tokens = _pairs(3)
    mask = torch.ones(3, 4, dtype=torch.bool)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    a = train_step(model, (videos, tokens), opt).loss
    b = train_step(model, {"video": videos, "tokens": tokens, "mask": mask}, opt).loss
    # Tokens shorter than the text context are zero-padded: same features, as CLIP attends causally.
    c = train_step(model, (videos, tokens[:, :12], mask), opt).loss
    assert a == b == pytest.approx(c, rel=1e-6)
    with pytest.raises(TypeError, match=r"batch must be \(video, tokens\)"):
        unpack_batch([videos])
    with pytest.raises(ValueError, match=r"tokens must be a \[B, L\] tensor with B=3"):
        unpack_batch((videos, tokens[:2]))


def test_grad_checkpointing_gives_the_same_gradients():
    def grads(checkpointing):
        model = _model()
        model.set_grad_checkpointing(checkpointing)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        loss = train_step(model, _pairs(3), opt).loss
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (l0, g0), (l1, g1) = grads(False), grads(True)
    assert l0 == l1 and g0.keys() == g1.keys() and len(g0) == 12
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-5, atol=1e-7)


@parametrize_dtypes(HALF_DTYPES)
def test_mixed_precision_step(dtype):
    model = _model()
    opt = make_optimizer(model, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(30):  # fp16: the scaler skips steps (inf gradients) until its scale fits
        result = train_step(model, _pairs(3), opt, scaler=scaler, autocast_dtype=dtype, grad_clip=1.0)
        if torch.isfinite(torch.tensor(result.grad_norm)):
            break
    assert torch.isfinite(torch.tensor(result.loss)) and result.grad_norm > 0
    fp32 = train_step(_model(), _pairs(3), torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)).loss
    assert result.loss == pytest.approx(fp32, rel=0.05)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before) and all(p.dtype == torch.float32 for p in model.parameters())


def _resume_run(tmp_path, stop_at=None, resume=False):
    """2 epochs of 4 batches from a shuffling DataLoader (its order comes from the global RNG)."""
    torch.manual_seed(123)
    model = _model()
    videos, tokens = _pairs(8)
    data = DataLoader(TensorDataset(videos, tokens), batch_size=2, shuffle=True)
    config = TrainConfig(epochs=2, lr=5e-3, warmup=0.25, save_every=1, max_steps=stop_at)
    trainer = Trainer(model, data, config, output_dir=str(tmp_path), progress=False,
                      resume="auto" if resume else None)
    history = trainer.fit()
    return trainer, history


@pytest.mark.parametrize("stop_at", [5, 4], ids=["mid-epoch", "epoch-end"])
def test_resume_gives_the_same_next_losses_as_an_uninterrupted_run(tmp_path, stop_at):
    # At an epoch's end too: the next epoch's order was drawn from a fresh process's RNG, not the checkpoint's.
    full, full_history = _resume_run(tmp_path / "full")
    assert [r["step"] for r in full_history] == list(range(1, 9)) and full.epoch == 2
    _, first = _resume_run(tmp_path / "cut", stop_at=stop_at)  # stops as a killed run
    assert [r["step"] for r in first] == list(range(1, stop_at + 1))
    torch.manual_seed(999)  # (what the process does before it resumes does not matter)
    resumed, rest = _resume_run(tmp_path / "cut", resume=True)
    assert [r["step"] for r in rest] == list(range(stop_at + 1, 9))
    # bitwise: same data order, optimiser moments, schedule and RNG
    assert [r["loss"] for r in first + rest] == [r["loss"] for r in full_history]
    assert [r["lr"] for r in first + rest] == [r["lr"] for r in full_history]
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n
    log = [json.loads(line) for line in open(tmp_path / "cut" / "train_log.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 9))
    assert sorted(os.listdir(tmp_path / "cut")) == ["last.pt", "train_log.jsonl"]


def test_resume_refuses_another_run(tmp_path):
    _resume_run(tmp_path, stop_at=2)
    with pytest.raises(ValueError, match="mode='lora'"):
        Trainer(_model("full"), [_pairs(2)] * 4, TrainConfig(mode="full", epochs=2), output_dir=str(tmp_path),
                progress=False, resume="auto")
    # Without resume, a new run would replace that checkpoint and append to its log.
    with pytest.raises(ValueError, match=r"already holds a training run \(last.pt, train_log.jsonl\); continue it "
                                         r"with resume='auto'"):
        Trainer(_model(), [_pairs(2)] * 4, TrainConfig(epochs=2), output_dir=str(tmp_path), progress=False)
    # The restored optimiser would bring back the saved learning rate and weight decay: others are refused.
    videos, tokens = _pairs(8)
    data = DataLoader(TensorDataset(videos, tokens), batch_size=2, shuffle=True)
    with pytest.raises(ValueError, match=r"trained with lr=0.005, weight_decay=0.2; this run has lr=0.001, "
                                         r"weight_decay=0.5, which the optimiser's restored state would override"):
        Trainer(_model(), data, TrainConfig(epochs=2, lr=1e-3, weight_decay=0.5, warmup=0.25),
                output_dir=str(tmp_path), progress=False, resume="auto")


def test_resume_of_another_runs_checkpoint_into_a_folder_that_holds_a_run_is_refused(tmp_path, monkeypatch):
    """It replaced that run's last.pt and spliced the two runs into one log."""
    _resume_run(tmp_path / "x", stop_at=2)
    _resume_run(tmp_path / "y", stop_at=3)
    before = {p.name: p.read_bytes() for p in (tmp_path / "x").iterdir()}
    with pytest.raises(ConfigError, match=f"output_dir={tmp_path / 'x'} holds another run \\(last.pt, train_log.jsonl"
                                          f"\\), which continuing {tmp_path / 'y' / 'last.pt'} there would replace"):
        Trainer(_model(), [_pairs(2)] * 4, TrainConfig(epochs=2, lr=5e-3, warmup=0.25), output_dir=str(tmp_path / "x"),
                progress=False, resume=str(tmp_path / "y" / "last.pt"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "x").iterdir()} == before
    # The folder's own checkpoint, by any path, and another run's into an empty folder, resume.
    monkeypatch.chdir(tmp_path)
    for out, resume in (("x", "x/../x/last.pt"), ("z", "y/last.pt")):
        trainer = Trainer(_model(), [_pairs(2)] * 4, TrainConfig(epochs=2, lr=5e-3, warmup=0.25), output_dir=out,
                          progress=False, resume=resume)
        assert trainer.step == {"x": 2, "z": 3}[out]


def test_resume_refuses_a_schedule_or_loss_scaler_it_cannot_continue(tmp_path, caplog):
    _resume_run(tmp_path, stop_at=2)
    videos, tokens = _pairs(8)
    data = DataLoader(TensorDataset(videos, tokens), batch_size=2, shuffle=True)
    resume = dict(output_dir=str(tmp_path), progress=False, resume="auto")
    # Another warm-up: the restored step meets the new schedule and the learning rate jumps.
    with pytest.raises(ConfigError, match=r"trained with warmup=0.25; this run has warmup=0.5, which the restored "
                                          r"learning-rate schedule would jump to"):
        Trainer(_model(), data, TrainConfig(epochs=2, lr=5e-3, warmup=0.5), **resume)
    # fp16 keeps a loss scaler that an fp32 checkpoint has none of (a raw GradScaler error before).
    with pytest.raises(ConfigError, match=r"trained with precision='fp32'; this run has precision='fp16', and fp16's "
                                          r"loss scaler is part of the run's state"):
        Trainer(_model(), data, TrainConfig(epochs=2, lr=5e-3, warmup=0.25, precision="fp16"), **resume)
    # A change that may rescue a run goes ahead, said.
    with caplog.at_level(logging.WARNING, logger="tempme_fast"):
        trainer = Trainer(_model(), data, TrainConfig(epochs=2, lr=5e-3, warmup=0.25, grad_clip=1.0), **resume)
    assert trainer.step == 2 and "trained with grad_clip=None; it continues with grad_clip=1.0" in caplog.text


def test_lora_settings_are_those_of_the_lora_that_trains():
    """A model's own LoRA (an official checkpoint's) trained whatever lora_rank said, and the checkpoint
    recorded lora_rank as given."""
    trainer = Trainer(_model(), [_pairs(2)], TrainConfig(epochs=1), progress=False)
    assert (trainer.config.lora_rank, trainer.config.lora_scale) == (4, 1.0)
    with pytest.raises(ConfigError, match=r"lora_rank=8: the model already has LoRA of rank=4 scale=1.0"):
        Trainer(_model(), [_pairs(2)], TrainConfig(epochs=1, lora_rank=8), progress=False)
    with pytest.raises(ConfigError, match=r"lora_rank=4 and lora_scale=2.0 set up LoRA: not with mode='full'"):
        Trainer(_model("full"), [_pairs(2)], TrainConfig(mode="full", lora_rank=4, lora_scale=2.0), progress=False)
    config = TrainConfig(epochs=1)
    trainer = Trainer(apply_tempme(tiny_clip(), TINY_CONFIG, backend="torch"), [_pairs(2)], config, progress=False)
    assert lora_config(trainer.model)["rank"] == 8 and trainer.config.lora_rank == 8
    assert config.lora_rank is None  # (the caller's config is left as it was)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_weights_are_refused(dtype):
    """AdamW rounded most updates of 16-bit weights away: 4% of bf16 weights moved in 3 steps."""
    with pytest.raises(ConfigError, match=f"the trainable weight .* is {str(dtype)[6:]}: updates this small would "
                                          f"round away; give the model float32 weights"):
        Trainer(_model("full").to(dtype), [_pairs(2)], TrainConfig(mode="full", epochs=1), progress=False)


def test_steps_per_epoch_below_the_data_says_what_is_left_out(caplog):
    with caplog.at_level(logging.WARNING, logger="tempme_fast"):
        Trainer(_model(), [_pairs(2)] * 6, TrainConfig(epochs=1, steps_per_epoch=2), progress=False)
    assert "steps_per_epoch=2: each epoch trains on the first 2 of the data's 6 batches, the rest never" in caplog.text


def test_resume_refuses_other_run_info(tmp_path):
    """What the run depends on beyond the config (batch size, weights, data) must match its checkpoint."""
    data = [_pairs(2)] * 4
    Trainer(_model(), data, TrainConfig(epochs=1, max_steps=1), output_dir=str(tmp_path), progress=False,
            run_info={"batch_size": 2, "weights": "openai"}).fit()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["run"] == {"batch_size": 2, "weights": "openai"}
    with pytest.raises(ValueError, match=r"trained with batch_size=2; this run has batch_size=3, and a resumed run "
                                         r"must continue the same one: resume with the run's own values"):
        Trainer(_model(), data, TrainConfig(epochs=1), output_dir=str(tmp_path), progress=False, resume="auto",
                run_info={"batch_size": 3, "weights": "openai"})
    # Keys that only one side has are not compared (a checkpoint of an earlier release has none).
    trainer = Trainer(_model(), data, TrainConfig(epochs=1), output_dir=str(tmp_path), progress=False,
                      resume="auto", run_info={"batch_size": 2, "seed": 1})
    assert trainer.step == 1
    with pytest.raises(TypeError, match="run_info must be a mapping with str keys"):
        Trainer(_model(), data, TrainConfig(epochs=1), progress=False, run_info=[("batch_size", 2)])


def test_resume_auto_without_a_checkpoint_starts_a_fresh_log(tmp_path):
    """A run stopped before its first checkpoint left only log lines: its steps run again, logged once."""
    (tmp_path / "train_log.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    trainer = Trainer(_model(), [_pairs(2)] * 2, TrainConfig(epochs=1), output_dir=str(tmp_path), progress=False,
                      resume="auto")
    trainer.fit()
    log = [json.loads(line) for line in open(tmp_path / "train_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2] and log[0]["loss"] != 9.0


def test_a_second_run_in_a_folder_that_one_trains_in_is_refused(tmp_path, tiny_model_file):
    """Two runs writing one folder would replace each other's checkpoint and mix their logs."""
    out = tmp_path / "run"
    out.mkdir()
    with held_lock(out / Trainer.LOCK):
        for resume in (None, "auto"):
            with pytest.raises(ConfigError, match=f"output_dir={out}: process 4242 is training in this folder, and a "
                                                  f"second run would replace its checkpoint and mix the logs"):
                Trainer(_model(), [_pairs(2)] * 2, TrainConfig(epochs=1), output_dir=str(out), progress=False,
                        resume=resume)
        with pytest.raises(ConfigError, match=f"--output {out}: process 4242 is training in this folder"):
            _cli(["--model", tiny_model_file, "--synthetic", "4", "--batch-size", "2", *TINY_ARGS, "--output",
                  str(out), "--no-progress"])
    assert os.listdir(out) == [Trainer.LOCK]  # the other writer's, left as a killed writer leaves it

    # fit() holds the lock while it trains and lets go of it (and removes the file) at the end.
    seen = []

    def batches():
        for batch in [_pairs(2)] * 2:
            with pytest.raises(ConfigError, match=f"process {os.getpid()} is training"):
                with Trainer.writing(str(out)):
                    pass
            seen.append(True)
            yield batch

    trainer = Trainer(_model(), batches(), TrainConfig(epochs=1, steps_per_epoch=2), output_dir=str(out),
                      progress=False)
    assert len(trainer.fit()) == 2 and seen == [True, True]
    assert sorted(os.listdir(out)) == ["last.pt", "train_log.jsonl"]


def _nan_at(step, n=2):
    """Batches whose ``step``-th (1-based) videos are NaN, as an overflow makes them."""
    batches = [_pairs(n, seed=k) for k in range(4)]
    batches[step - 1][0][:] = float("nan")
    return batches


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_a_diverged_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, mode):
    """A NaN loss whose gradients the optimiser applied: the run stops there, and no checkpoint of the NaN
    weights replaces the last good one (before, training went on and the next save wrote them over it)."""
    trainer = Trainer(_model(mode), _nan_at(3), TrainConfig(mode=mode, epochs=1, steps_per_epoch=4, save_every=1),
                      output_dir=str(tmp_path), progress=False)
    with pytest.raises(TrainingDiverged, match=rf"step 3: the loss is nan and the optimiser has applied its gradients, "
                                               rf"so the weights are no longer usable and no checkpoint is written from "
                                               rf"them; the last checkpoint written, {tmp_path}/last.pt, is kept"):
        trainer.fit()
    kept = torch.load(tmp_path / "last.pt", weights_only=True)
    assert kept["step"] == 2 and all(torch.isfinite(w).all() for w in kept["model"].values())
    assert [json.loads(line)["step"] for line in open(tmp_path / "train_log.jsonl")] == [1, 2, 3]
    # The weights went bad without a bad loss here (another process's batch, under DDP): not written either.
    with torch.no_grad():
        next(p for p in trainer.model.parameters() if p.requires_grad).fill_(float("inf"))
    with pytest.raises(TrainingDiverged, match="step 3: the weights hold NaN or Inf"):
        trainer.save_checkpoint()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "train_log.jsonl"]


def test_a_skipped_fp16_step_is_not_a_divergence(tmp_path):
    """fp16 with a loss scaler: a non-finite step is skipped (the weights unchanged) and the run goes on."""
    trainer = Trainer(_model(), _nan_at(2), TrainConfig(epochs=1, steps_per_epoch=4, precision="fp16"),
                      progress=False)
    assert trainer.scaler.is_enabled() and len(trainer.fit()) == 4
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_data_that_runs_out_is_not_trained_on_silently(caplog):
    """Data shorter than steps_per_epoch: the schedule counts batches that never come. Before, a generator trained
    its one epoch of many and the run reported every epoch done; a short list ended each epoch early unnoticed."""
    def batches():
        for k in range(2):
            yield _pairs(2, seed=k)

    trainer = Trainer(_model(), batches(), TrainConfig(epochs=3, steps_per_epoch=2), progress=False)
    with pytest.raises(ConfigError, match=r"epoch 1 of the data ended after 0 of steps_per_epoch=2 batches: nothing "
                                          r"to train on. A one-shot iterator \(a generator\) is empty after its first "
                                          r"epoch"):
        trainer.fit()
    assert trainer.step == 2
    trainer = Trainer(_model(), [_pairs(2, seed=k) for k in range(2)], TrainConfig(epochs=2, steps_per_epoch=3),
                      progress=False)
    with caplog.at_level("WARNING", logger="tempme_fast.trainer"):
        assert len(trainer.fit()) == 4
    short = [r.getMessage() for r in caplog.records if "of the data ended" in r.getMessage()]
    assert short == [f"epoch {e} of the data ended after 2 of steps_per_epoch=3 batches; the learning-rate schedule "
                     f"counts 6 steps in all, so it will not run its course: give steps_per_epoch=2, or data of that "
                     f"many batches" for e in (0, 1)]


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"a": torch.ones(2)}, path)
    with pytest.raises(Exception):
        atomic_save({"a": lambda: None}, path)  # a lambda cannot be pickled
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert torch.equal(torch.load(path)["a"], torch.ones(2))


def test_atomic_save_writes_through_a_link_and_keeps_the_mode(tmp_path):
    """A linked last.pt became a regular file beside a stale target, and a 0600 checkpoint became 0644."""
    (tmp_path / "big").mkdir()
    target = tmp_path / "big" / "last.pt"
    atomic_save({"step": 1}, target)
    os.chmod(target, 0o600)
    link = tmp_path / "last.pt"
    link.symlink_to(target)
    atomic_save({"step": 2}, link)
    assert link.is_symlink() and torch.load(target, weights_only=True) == {"step": 2}
    assert (target.stat().st_mode & 0o777) == 0o600
    assert sorted(os.listdir(tmp_path / "big")) == ["last.pt"]  # (no temporary file left)


def test_train_config_errors():
    with pytest.raises(ValueError, match="mode='half' is not one of"):
        TrainConfig(mode="half")
    with pytest.raises(ValueError, match=r"warmup=1.5 must be in \[0, 1\)"):
        TrainConfig(warmup=1.5)
    assert TrainConfig().lr == 6e-4 and TrainConfig(mode="full").lr == 1e-5
    for field, value, says in (("lora_scale", 0.0, "a finite non-zero number"),
                               ("lora_scale", float("nan"), "a finite non-zero number"),
                               ("lr", float("inf"), "finite and > 0"),
                               ("weight_decay", float("inf"), "finite and >= 0"),
                               # (AdamW's: an IndexError or TypeError when the optimiser was made, before)
                               ("betas", (0.9,), "two numbers in"), ("betas", (1.0, 0.9), "two numbers in"),
                               ("betas", "ab", "two numbers in"), ("eps", -1.0, "finite and >= 0"),
                               ("eps", float("nan"), "finite and >= 0")):
        with pytest.raises(ValueError, match=re.escape(f"{field}={value!r} must be {says}")):
            TrainConfig(**{field: value})
    assert TrainConfig(betas=[0.9, 0.99]).betas == (0.9, 0.99)
    with pytest.raises(TypeError, match="apply_tempme"):
        Trainer(tiny_clip(), [_pairs(2)], progress=False)


def test_trainer_refuses_an_output_dir_it_cannot_write_and_auto_resume_without_one(tmp_path):
    """A file (or an unwritable place) as ``output_dir`` failed at the first step's log line; ``resume='auto'``
    without an ``output_dir`` started a new run, silently."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for where, says in ((blocker, "is a file; give a folder"), (blocker / "run", "cannot create the folder")):
        with pytest.raises(ValueError, match=f"output_dir {re.escape(str(where))}.*{says}"):
            Trainer(_model(), [_pairs(2)], TrainConfig(epochs=1), output_dir=str(where), progress=False)
    with pytest.raises(ValueError, match="resume='auto' continues the run in output_dir"):
        Trainer(_model(), [_pairs(2)], TrainConfig(epochs=1), progress=False, resume="auto")
    Trainer(_model(), [_pairs(2)], TrainConfig(epochs=1), output_dir=str(tmp_path / "new" / "run"), progress=False)
    assert (tmp_path / "new" / "run").is_dir()


def test_synthetic_pairs_shard_the_global_batch():
    one = SyntheticPairs(8, 4, frames=2, image_size=8, context_length=6, vocab_size=50, seed=3)
    halves = [SyntheticPairs(8, 4, frames=2, image_size=8, context_length=6, vocab_size=50, seed=3, rank=r,
                             world_size=2) for r in range(2)]
    for d in (one, *halves):
        d.set_epoch(1)
    for whole, a, b in zip(one, *halves):
        assert torch.equal(whole[0], torch.cat([a[0], b[0]])) and torch.equal(whole[1], torch.cat([a[1], b[1]]))
    tokens = next(iter(one))[1]
    assert (tokens.argmax(dim=1) == (tokens == 49).int().argmax(dim=1)).all()  # EOT is the largest id


def _cli(argv):
    from tempme_fast.train_cli import add_train_arguments, run_train
    parser = argparse.ArgumentParser(prog="tempme train")
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))


def test_cli_trains_on_synthetic_data_and_resumes(tmp_path, tiny_model_file, capsys):
    out = tmp_path / "run"
    args = ["--model", tiny_model_file, "--synthetic", "8", "--batch-size", "4", "--frames", "4", "--epochs", "2",
            "--context-length", "12", "--imgme-r", "1", "--clip-layers", "2", "3", "--clip-groups", "2", "2",
            "--lr", "1e-3", "--output", str(out), "--no-progress", "--backend", "torch"]
    assert _cli(args + ["--max-steps", "3"]) == 0
    assert "trainable" in capsys.readouterr().out
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ConfigError, match=re.escape(f"--output {out} already holds a training run (last.pt, "
                                                    f"train_log.jsonl, model.pt, lora.pt); continue it with --resume")):
        _cli(args)  # a new run there would replace this one's files
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _cli(args + ["--resume", "auto"]) == 0
    log = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert sorted(os.listdir(out)) == ["last.pt", "lora.pt", "model.pt", "train_log.jsonl"]
    # model.pt is a plain state dict (LoRA merged) that `tempme eval --checkpoint` loads
    from tempme_fast.loading import create_model
    from tempme_fast.loading import load_checkpoint
    model = apply_tempme(create_model(tiny_model_file), TINY_CONFIG.replace(cross_ratio=0.3, intra_ratio=0.1))
    load_checkpoint(model, str(out / "model.pt"))


def test_cli_needs_data_or_synthetic():
    with pytest.raises(ConfigError, match="exactly one of --data PATH and --synthetic N"):
        _cli(["--epochs", "1"])


@pytest.mark.parametrize("data, extra, message", [
    ("missing.csv", [], "does not exist"),
    ("notes.txt", [], "unknown annotation format '.txt'"),
    ("empty.csv", [], "no rows"),
    ("gone.csv", [], "none of the 2 video files exists"),
    ("two.csv", ["--batch-size", "4"], "2 captions, fewer than one batch of --batch-size 4"),
    (None, ["--synthetic", "3", "--batch-size", "4"], "--synthetic 3: fewer pairs than one batch of --batch-size 4"),
])
def test_cli_rejects_bad_data_before_building_a_model(tmp_path, monkeypatch, data, extra, message):
    (tmp_path / "notes.txt").write_text("not annotations\n")
    (tmp_path / "empty.csv").write_text("video_path,caption\n")
    (tmp_path / "gone.csv").write_text(f"video_path,caption\n{tmp_path}/a.mp4,a dog\n{tmp_path}/b.mp4,a cat\n")
    (tmp_path / "two.csv").write_text(f"video_path,caption\n{tmp_path}/c.mp4,a dog\n{tmp_path}/c.mp4,a cat\n")
    (tmp_path / "c.mp4").write_bytes(b"")
    from tempme_fast import train_cli

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the data were checked")
    monkeypatch.setattr(train_cli, "_build_model", no_model)
    out = tmp_path / "run"
    where = [] if data is None else ["--data", str(tmp_path / data)]
    prefix = "" if data is None else re.escape(f"--data {tmp_path / data}: ") + ".*"
    with pytest.raises(ConfigError, match=prefix + re.escape(message)):
        _cli(where + extra + ["--output", str(out), "--epochs", "1"])
    assert not out.exists()


def test_cli_refuses_a_context_length_past_the_text_tower(tmp_path, tiny_model_file):
    with pytest.raises(ConfigError, match=r"context_length=40 \(--context-length\) exceeds the text tower's"):
        _cli(["--model", tiny_model_file, "--synthetic", "4", "--batch-size", "4", "--context-length", "40",
              "--output", str(tmp_path / "run"), "--no-progress", "--backend", "torch", *TINY_ARGS])


def test_trainer_skips_batches_without_readable_videos():
    videos, tokens = _pairs(4)
    good = {"video": videos[:2], "tokens": tokens[:2], "mask": torch.ones(2, 4, dtype=torch.bool)}
    broken = {"index": torch.zeros(0, dtype=torch.long), "video_id": [], "path": [],
              "skipped": [{"index": 0, "video_id": "v0", "path": "v0.mp4", "reason": "corrupt"}]}
    trainer = Trainer(_model(), [good, broken, good], TrainConfig(epochs=1), progress=False)
    history = trainer.fit()
    assert [r["step"] for r in history] == [1, 2] and trainer.epoch == 1


@pytest.mark.interpreter
def test_triton_backend_gradients_equal_torch(device):
    """LoRA on both towers, a whole train step: every parameter gradient equal across backends."""
    grads = {}
    for backend in ("torch", "triton"):
        model = _model("full", backend=backend).to(device)
        add_lora(model, rank=2)
        with torch.no_grad():
            for lora in lora_layers(model).values():
                lora.lora_b.normal_(0, 0.1, generator=torch.Generator(device).manual_seed(0))
        mark_trainable(model, "full")
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        loss = train_step(model, _pairs(2), opt).loss
        grads[backend] = loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    (lt, gt), (lk, gk) = grads["torch"], grads["triton"]
    assert lt == pytest.approx(lk, rel=1e-5)
    assert gt.keys() == gk.keys() and any("lora_a" in n for n in gt) and "visual.tempme_frame_pos.2" in gt
    for n in gt:
        torch.testing.assert_close(gk[n], gt[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def _trained(compile_backend, steps=3):
    torch.manual_seed(5)
    videos, tokens = _pairs(6)
    batches = [(videos[i:i + 2], tokens[i:i + 2]) for i in range(0, 6, 2)]
    trainer = Trainer(_model(), batches, TrainConfig(epochs=1, lr=5e-3, warmup=0.0, compile=compile_backend),
                      progress=False)
    return trainer, trainer.fit()


def test_compiled_training_follows_eager_training():
    """``TrainConfig(compile=...)``: both towers' forward, and their backward, compiled; the same losses and
    weights as eager training, step after step (aot_eager on the CPU: no C++ compiler needed)."""
    eager, eager_history = _trained(None)
    compiled, compiled_history = _trained("aot_eager")
    assert eager.forward_model is eager.model
    assert type(compiled.forward_model).__name__ == "OptimizedModule"
    assert [r["step"] for r in compiled_history] == [1, 2, 3]
    for want, got in zip(eager_history, compiled_history):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    for (n, p), (_, q) in zip(eager.model.named_parameters(), compiled.model.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)
    assert "_orig_mod" not in "".join(compiled.checkpoint_state()["model"])


def test_compile_option_names_a_backend():
    with pytest.raises(ConfigError, match=r"compile='tensorrtt' is not a torch.compile backend; valid: None .*induc"):
        TrainConfig(compile="tensorrtt")
    with pytest.raises(ConfigError, match="compile=True is not a torch.compile backend"):
        TrainConfig(compile=True)
    assert TrainConfig(compile="inductor").compile == "inductor"
    parser = argparse.ArgumentParser()
    from tempme_fast.train_cli import _train_config, add_train_arguments
    add_train_arguments(parser)
    assert _train_config(parser.parse_args(["--compile"]), "fp32").compile == "inductor"
    assert _train_config(parser.parse_args(["--compile", "aot_eager"]), "fp32").compile == "aot_eager"
    assert _train_config(parser.parse_args([]), "fp32").compile is None


def test_the_dataset_of_a_dataloader_is_told_the_epoch():
    """PairDataset draws its random captions per epoch: the Trainer tells a DataLoader's dataset which one."""
    class Pairs(TensorDataset):
        epochs = []

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

    data = DataLoader(Pairs(*_pairs(4)), batch_size=2)
    Trainer(_model(), data, TrainConfig(epochs=2), progress=False).fit()
    assert Pairs.epochs == [0, 1]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_mid_epoch_resume_skips_the_consumed_batches_without_loading_them(tmp_path, workers):
    """The replay decoded every video the epoch had consumed (an epoch's worth of decoding near its end)."""
    class Counted(TensorDataset):
        items_depend_on_index = True  # (as PairDataset: no worker draws random numbers for an item)
        loaded = []

        def __getitem__(self, index):
            Counted.loaded.append(index)
            return super().__getitem__(index)

    def run(out, stop_at=None, resume=False):
        torch.manual_seed(123)
        data = DataLoader(Counted(*_pairs(12)), batch_size=2, shuffle=True, num_workers=workers)
        trainer = Trainer(_model(), data, TrainConfig(epochs=2, lr=5e-3, save_every=1, max_steps=stop_at),
                          output_dir=str(out), progress=False, resume="auto" if resume else None)
        return trainer.fit()

    whole = run(tmp_path / "whole")
    first = run(tmp_path / "cut", stop_at=10)  # 4 of epoch 1's 6 batches
    Counted.loaded.clear()
    rest = run(tmp_path / "cut", resume=True)
    assert [r["loss"] for r in first + rest] == [r["loss"] for r in whole]
    if not workers:  # (the workers' loads happen in their own processes)
        assert len(Counted.loaded) == 2 * 2  # the 2 batches left, not the 4 consumed before them
