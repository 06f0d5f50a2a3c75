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
