"""pytest-benchmark suite for what runs on a CPU: the reference merge ops and the CPU model path.

    pytest benchmarks/ --benchmark-only                       # run
    pytest benchmarks/ --benchmark-only --benchmark-autosave  # save, then compare with
    pytest benchmarks/ --benchmark-only --benchmark-compare
"""
import pytest
import torch

from tempme_fast import TempMeConfig, apply_tempme, ops

from .bench_ops import make_inputs
from .common import merge_shapes

SHAPES = {s.stage + str(s.layer): s for s in merge_shapes("ViT-B-32", 8)}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_match(benchmark, shape):
    metric, _, _ = make_inputs(shape, torch.float32, torch.device("cpu"))
    benchmark(ops.match, metric, shape.r, shape.protected, backend="torch")


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_merge(benchmark, shape):
    metric, x, size = make_inputs(shape, torch.float32, torch.device("cpu"))
    plan = ops.match(metric, shape.r, shape.protected, backend="torch")
    benchmark(ops.merge, x, size, plan, backend="torch")


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_merge_step_forward_backward(benchmark, shape):
    metric, x, size = make_inputs(shape, torch.float32, torch.device("cpu"))
    x.requires_grad_(True)

    def step():
        out, _ = ops.merge(x, size, ops.match(metric, shape.r, shape.protected, backend="torch"), backend="torch")
        out.sum().backward()
    benchmark(step)


@pytest.fixture(scope="module")
def vit_b32():
    import open_clip
    return open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()


@pytest.mark.parametrize("config", [TempMeConfig.unmerged(12), TempMeConfig()], ids=["unmerged", "tempme"])
def test_encode_video_vit_b32(benchmark, vit_b32, config):
    from tempme_fast import remove_tempme

    video = torch.randn(2, 12, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    apply_tempme(vit_b32, config, backend="torch")
    try:
        with torch.inference_mode():
            benchmark.pedantic(vit_b32.encode_video, args=(video,), rounds=3, warmup_rounds=1)
    finally:
        remove_tempme(vit_b32)
