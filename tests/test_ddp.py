"""DDP on 2 CPU processes (gloo) equals one process on the combined batch: loss, gradients, update."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tempme_fast import apply_tempme
from tempme_fast.distributed import all_gather_with_grad, cleanup, init_distributed, wrap_ddp
from tempme_fast.lora import add_lora, lora_layers, mark_trainable
from tempme_fast.train import VideoTextForward, train_step
from tiny import TINY_CONFIG, tiny_clip

# Rank 0 takes 3 pairs, rank 1 takes 2: uneven shares exercise the padded gather.
SHARES = (slice(0, 3), slice(3, 5))
MODES = ("lora", "full")


def _model(mode):
    model = apply_tempme(tiny_clip(seed=0), TINY_CONFIG, backend="torch").train()
    if mode == "lora":
        add_lora(model, rank=4)
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for lora in lora_layers(model).values():
                lora.lora_b.copy_(0.1 * torch.randn(lora.lora_b.shape, generator=g))
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for p in model.visual.tempme_frame_pos.values():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    mark_trainable(model, mode)
    return model


def _pairs(n=5):
    g = torch.Generator().manual_seed(1)
    videos = torch.randn(n, 4, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 999, (n, 16), generator=g)
    tokens[:, 9] = 999
    tokens[:, 10:] = 0
    return videos, tokens


def _step(model, batch):
    # SGD: the update is the (averaged) gradient itself, so the parameters compare as tightly as it.
    clip = getattr(getattr(model, "module", model), "clip", model)
    opt = torch.optim.SGD([p for p in clip.parameters() if p.requires_grad], lr=1.0)
    result = train_step(model, batch, opt)
    grads = {n: p.grad.clone() for n, p in clip.named_parameters() if p.grad is not None}
    params = {n: p.detach().clone() for n, p in clip.named_parameters() if p.requires_grad}
    return {"loss": result.loss, "grads": grads, "params": params}


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = init_distributed(device="cpu")
    assert (info.rank, info.world_size) == (rank, world) and dist.get_backend() == "gloo"
    out = {}
    try:
        x = torch.arange(2 * (rank + 1), dtype=torch.float32).view(rank + 1, 2).requires_grad_()
        gathered = all_gather_with_grad(x)
        (gathered.sum(dim=1) * torch.arange(1.0, 4.0)).sum().backward()
        out["gather"] = gathered.detach(), x.grad
        videos, tokens = _pairs()
        for mode in MODES:
            out[mode] = _step(wrap_ddp(VideoTextForward(_model(mode))), (videos[SHARES[rank]], tokens[SHARES[rank]]))
        # As Trainer(config=TrainConfig(compile=...)) wraps it under DDP: compiled around DDP.
        compiled = torch.compile(wrap_ddp(VideoTextForward(_model("lora"))), backend="aot_eager", dynamic=False)
        out["lora-compiled"] = _step(compiled, (videos[SHARES[rank]], tokens[SHARES[rank]]))
    finally:
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        cleanup()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(out_dir)), nprocs=2, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(2)]


def test_all_gather_with_grad_concatenates_and_routes_gradients(ranks):
    want = torch.tensor([[0.0, 1.0], [0.0, 1.0], [2.0, 3.0]])
    for rank, out in enumerate(ranks):
        gathered, grad = out["gather"]
        torch.testing.assert_close(gathered, want)
        # Each rank's loss weights row i by (i + 1); the gradient of a row is the sum over both ranks.
        rows = torch.tensor([1.0]) if rank == 0 else torch.tensor([2.0, 3.0])
        torch.testing.assert_close(grad, 2 * rows[:, None].expand(-1, 2))


@pytest.mark.parametrize("mode", MODES + ("lora-compiled",))
def test_ddp_equals_one_process_on_the_combined_batch(ranks, mode):
    torch.set_num_threads(1)
    single = _step(_model(mode.split("-")[0]), _pairs())
    for out in ranks:
        got = out[mode]
        assert got["loss"] == pytest.approx(single["loss"], rel=1e-6, abs=1e-6)
        assert got["grads"].keys() == single["grads"].keys() and len(got["grads"]) > 0
        # Sums over the batch run in another order (per rank, then across ranks): tolerance relative to
        # each gradient's largest entry.
        for n, g in single["grads"].items():
            scale = g.abs().max().item()
            assert scale > 0, n
            torch.testing.assert_close(got["grads"][n], g, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{n}: {m}")
        for n, p in single["params"].items():
            scale = single["grads"][n].abs().max().item()
            torch.testing.assert_close(got["params"][n], p, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{n}: {m}")


def _trainer_worker(rank, world, port, out_dir):
    """Two processes that disagree: one has no readable video in a batch, one alone got Ctrl-C."""
    from tempme_fast.trainer import TrainConfig, Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    init_distributed(device="cpu")
    out = {}
    try:
        videos, tokens = _pairs(4)
        pairs = [(videos[i:j], tokens[i:j]) for i, j in ((0, 1), (1, 2), (0, 2), (2, 4))]
        unreadable = {"index": torch.zeros(0, dtype=torch.long), "video_id": [], "path": [],
                      "skipped": [{"index": 0, "video_id": "v", "path": "v.mp4", "reason": "corrupt"}]}
        # Batch 1: one pair on each process, two in all (trains); batches 2 and 3: none on one process.
        own = [pairs[0], pairs[1], unreadable, pairs[2], pairs[3]] if rank == 0 else \
            [pairs[1], unreadable, pairs[0], pairs[2], pairs[3]]

        def batches(epoch):
            for i, batch in enumerate(own):
                if rank == 0 and i == 3:
                    trainer._stop_requested = True  # as a Ctrl-C reaching this process only
                yield batch

        trainer = Trainer(_model("lora"), batches, TrainConfig(epochs=1, steps_per_epoch=5), progress=False)
        history = trainer.fit()
        out = {"steps": [r["step"] for r in history], "skipped": trainer.skipped_batches,
               "interrupted": trainer.interrupted}
    finally:
        torch.save(out, os.path.join(out_dir, f"trainer{rank}.pt"))
        cleanup()


def test_processes_skip_and_stop_together(tmp_path):
    mp.spawn(_trainer_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        out = torch.load(tmp_path / f"trainer{rank}.pt")
        assert out == {"steps": [1, 2], "skipped": 2, "interrupted": True}, rank
