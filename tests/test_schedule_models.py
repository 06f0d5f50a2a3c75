"""Derived schedules on real models: encode_video equals the spec twin, predicted FLOPs equal measured."""
import copy

import open_clip
import pytest
import torch

from spec_tempme import encode_video_spec
from tempme_fast import TempMeConfig, apply_tempme, remove_tempme
from tempme_fast.derive import costed
from tempme_fast.flops import measure_flops, model_flops
from tempme_fast.geometry import ViTGeometry
from tiny import tiny_clip, video

PATCH = 8  # tiny models: 8x8 patches, so an image of 8 * grid pixels gives a grid x grid patch grid


def _tiny(depth, grid):
    return tiny_clip(layers=depth, image_size=PATCH * grid)


def _randomise_frame_pos(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in getattr(model.visual, "tempme_frame_pos", {}).values():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))


def _rel_err(a, b):
    return ((a.double() - b.double()).norm(dim=-1) / b.double().norm(dim=-1)).max().item()


# (depth, grid, frames, flops_ratio): every depth and grid once, primes, one frame, and two budgets.
CASES = {
    "L12-g7-6f": (12, 7, 6, None),
    "L12-g7-1f": (12, 7, 1, None),
    "L12-g14-4f-budget0.5": (12, 14, 4, 0.5),
    "L24-g14-5f": (24, 14, 5, None),
    "L24-g7-8f-budget0.6": (24, 7, 8, 0.6),
    "L32-g16-3f": (32, 16, 3, None),
}


@pytest.mark.parametrize("case", CASES)
def test_derived_schedule_matches_spec(case, one_thread):
    depth, grid, frames, budget = CASES[case]
    model = _tiny(depth, grid)
    config = TempMeConfig.for_model(model, frames=frames, flops_ratio=budget)
    assert config.merges
    apply_tempme(model, config, backend="torch")
    _randomise_frame_pos(model)
    v = video(2, frames, image_size=PATCH * grid)
    with torch.no_grad():
        got = model.encode_video(v)
        want = encode_video_spec(copy.deepcopy(model).double(), v, config)
    assert got.shape == (2, 24) and torch.isfinite(got).all()
    assert _rel_err(got, want) < 1e-5


@pytest.mark.interpreter
@pytest.mark.parametrize("depth, grid, frames", [
    (12, 7, 6),
    pytest.param(24, 14, 4, marks=pytest.mark.slow),  # a minute each in the interpreter
    pytest.param(32, 16, 2, marks=pytest.mark.slow),
], ids=["L12-g7-6f", "L24-g14-4f", "L32-g16-2f"])
def test_derived_schedule_triton_equals_torch(device, depth, grid, frames):
    model = _tiny(depth, grid)
    config = TempMeConfig.for_model(model, frames=frames)
    apply_tempme(model, config, backend="torch").to(device)
    _randomise_frame_pos(model)
    v = video(1, frames, image_size=PATCH * grid).to(device)
    with torch.no_grad():
        want = model.encode_video(v)
        apply_tempme(model, config, backend="triton")
        got = model.encode_video(v)
    assert _rel_err(got, want) < 1e-5


@pytest.mark.parametrize("depth, grid, frames, budget", [(12, 7, 12, 0.5), (24, 14, 8, 0.55), (32, 16, 4, 0.6)],
                         ids=["L12-g7", "L24-g14", "L32-g16"])
def test_tiny_budget_ratio_equals_measured(depth, grid, frames, budget, one_thread):
    model = _tiny(depth, grid)
    config = TempMeConfig.for_model(model, frames=frames, flops_ratio=budget)
    predicted = costed(ViTGeometry.from_model(model), config)
    measured = {}
    for name, cfg in (("tempme", config), ("unmerged", TempMeConfig.unmerged(frames))):
        apply_tempme(model, cfg)
        measured[name] = measure_flops(model).total
        assert model_flops(model).total == pytest.approx(measured[name], rel=1e-9)
        model = remove_tempme(model)
    assert predicted.ratio <= budget
    assert measured["tempme"] / measured["unmerged"] == pytest.approx(predicted.ratio, rel=0.01)


@pytest.mark.slow
def test_vit_b32_budget_half_ratio_equals_measured():
    model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
    config = TempMeConfig.for_model(model, flops_ratio=0.5)
    assert config == TempMeConfig.for_model("ViT-B-32-quickgelu", flops_ratio=0.5)
    predicted = costed(ViTGeometry.from_model(model), config)
    measured = {}
    for name, cfg in (("tempme", config), ("unmerged", TempMeConfig.unmerged(12))):
        apply_tempme(model, cfg)
        measured[name] = measure_flops(model).gflops
        model = remove_tempme(model)
    assert 0.48 < predicted.ratio <= 0.5
    assert measured["tempme"] / measured["unmerged"] == pytest.approx(predicted.ratio, rel=0.01)
    assert measured["tempme"] == pytest.approx(predicted.gflops, rel=0.01)
