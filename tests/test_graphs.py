"""``GraphedVideoEncoder``: encode_video replayed from a CUDA graph equals the eager forward."""
import pytest
import torch

from tempme_fast import GraphedVideoEncoder, apply_tempme
from tiny import TINY_CONFIG, tiny_clip, video


def test_refuses_a_model_not_on_cuda():
    model = apply_tempme(tiny_clip(), TINY_CONFIG, backend="torch")
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedVideoEncoder(model, batch=1)
    with pytest.raises(TypeError, match="apply_tempme"):
        GraphedVideoEncoder(tiny_clip(), batch=1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch, masked", [(1, False), (3, True)], ids=["B1", "B3-masked"])
def test_graph_equals_eager(batch, masked, dtype):
    model = apply_tempme(tiny_clip(), TINY_CONFIG, backend="triton").to(device="cuda", dtype=dtype)
    encoder = GraphedVideoEncoder(model, batch=batch, masked=masked, normalize=True)
    for seed in (1, 2):  # replays with new data: the graph reads the inputs, not what it was captured on
        v = video(batch, TINY_CONFIG.frames, seed=seed, dtype=dtype).cuda()
        mask = torch.ones(batch, TINY_CONFIG.frames, dtype=torch.bool, device="cuda") if masked else None
        if masked:
            mask[-1, -1] = False
        with torch.no_grad():
            want = model.encode_video(v, mask, normalize=True)
        got = encoder(v, mask)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="captured shape"):
        encoder(torch.zeros(batch + 1, TINY_CONFIG.frames, 3, 32, 32, device="cuda", dtype=dtype), mask)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_replays_every_variant_from_a_graph():
    """``tempme bench --cuda-graph``: both variants timed from graphs, the model left unpatched."""
    from tempme_fast.bench import bench_model

    model = tiny_clip().to(device="cuda", dtype=torch.float16)
    rows = bench_model(model, TINY_CONFIG, batch=2, device=torch.device("cuda"), dtype=torch.float16,
                       backends=["triton"], repeats=2, progress=False, cuda_graph=True)
    assert [row.backend for row in rows] == ["-", "triton"]
    assert all(row.latency_ms > 0 for row in rows)
    assert not hasattr(model, "tempme")


def test_weights_watch_tells_a_replaced_or_moved_weight_from_an_in_place_update():
    """What the graphed encoder checks before each replay (its graph reads the weights' captured addresses)."""
    from tempme_fast.graphs import WeightsWatch

    model = apply_tempme(tiny_clip(), TINY_CONFIG, backend="torch")
    watch = WeightsWatch(model)
    assert watch.changed() is None
    with torch.no_grad():  # in place: the same memory, seen by a graph
        model.visual.conv1.weight.mul_(2)
    model.load_state_dict(model.state_dict())
    assert watch.changed() is None
    model.visual.ln_post.bias.data = model.visual.ln_post.bias.data.clone()  # what .to(...) and .half() do
    assert watch.changed() == "bias"
    watch = WeightsWatch(model)
    model.visual.proj = torch.nn.Parameter(model.visual.proj.detach().clone())
    assert watch.changed() == "proj"
    watch = WeightsWatch(model)
    model.load_state_dict(model.state_dict(), assign=True)
    assert watch.changed() is not None
    watch = WeightsWatch(model)
    model.double()
    assert watch.changed() is not None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_refuses_to_replay_over_moved_weights():
    model = apply_tempme(tiny_clip(), TINY_CONFIG, backend="triton").to(device="cuda")
    encoder = GraphedVideoEncoder(model, batch=1)
    v = video(1, TINY_CONFIG.frames, seed=3).cuda()
    with torch.no_grad():
        model.visual.conv1.weight.mul_(0.5)  # in place: the replay sees it
        want = model.encode_video(v)
    torch.testing.assert_close(encoder(v), want, rtol=0, atol=0)
    model.half()
    with pytest.raises(RuntimeError, match="replaced or moved since this encoder captured"):
        encoder(v)
