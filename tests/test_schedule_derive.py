"""Derived schedules and FLOPs budgets (tempme_fast/derive.py), from the rules alone: no model runs."""
import math

import pytest

from tempme_fast import TempMeConfig, token_schedule
from tempme_fast.derive import (MAX_FRAMES, budget_candidate, budget_ladder, clip_groups_for, costed,
                                derive_config)
from tempme_fast.geometry import ViTGeometry

# Depth 12/24/32 and 7x7, 14x14, 16x16 patch grids, at ViT-B widths (the rules only read depth and tokens).
GEOMETRIES = {f"L{depth}-g{grid}": ViTGeometry(depth=depth, tokens_per_frame=1 + grid * grid, width=768,
                                               mlp_width=3072, heads=12, patch_size=16, embed_dim=512)
              for depth in (12, 24, 32) for grid in (7, 14, 16)}


def test_released_schedule_for_vit_b32_at_12_frames():
    for name in ("ViT-B-32", "ViT-B-32-quickgelu"):
        assert TempMeConfig.for_model(name) == TempMeConfig()
        assert isinstance(TempMeConfig.for_model(name).imgme_r, int)
    # The budget search passes through the released schedule: its own ratio gives it back.
    released = costed(ViTGeometry.from_name("ViT-B-32"), TempMeConfig())
    assert TempMeConfig.for_model("ViT-B-32", flops_ratio=released.ratio) == TempMeConfig()


@pytest.mark.parametrize("frames, groups", [(1, ()), (2, (2,)), (8, (2, 2, 2)), (12, (2, 2, 3)), (13, (13,)),
                                            (14, (2, 7)), (64, (2,) * 6), (81, (3,) * 4), (128, (2,) * 7)])
def test_clip_groups(frames, groups):
    assert clip_groups_for(frames) == groups


@pytest.mark.parametrize("name", GEOMETRIES)
def test_every_frame_count_gives_a_valid_schedule(name):
    geometry = GEOMETRIES[name]
    n = geometry.tokens_per_frame
    for frames in range(1, MAX_FRAMES + 1):
        config = derive_config(geometry, frames)
        schedule = token_schedule(config, geometry.depth, n)
        assert math.prod(config.clip_groups) == frames and schedule.output_clips == 1
        assert all(g in (2, 3) for g in config.clip_groups if g <= 3)
        if config.clip_layers:  # joins in the last layers, one intra-clip layer after them
            assert config.clip_layers[-1] == geometry.depth - 2
            assert config.clip_layers == tuple(range(config.clip_layers[0], geometry.depth - 1))
        imgme = [p for p in schedule.layers if p.kind == "imgme"]
        assert all(p.r == config.imgme_r_at(p.layer) for p in imgme), "derived r must never be clamped"
        assert max(p.r for p in imgme) - min(p.r for p in imgme) <= 1
        kept = imgme[-1].tokens_out  # a frame keeps the released share (34 of 50) at the first join
        assert abs(kept / n - 34 / 50) <= 0.5 / n


def test_per_layer_imgme_r_for_vit_b16():
    config = TempMeConfig.for_model("ViT-B-16")
    # 197 tokens keep round(197 * 0.68) = 134: 63 removed over 8 layers, the extra ones first.
    assert config.imgme_r == (8, 8, 8, 8, 8, 8, 8, 7)
    assert token_schedule(config, 12, 197).token_counts() == [
        197, 189, 181, 173, 165, 157, 149, 141, 134, 268, 188, 170, 340, 238, 215, 645, 452, 407, 367]


@pytest.mark.parametrize("model, frames, budget, tokens_out, ratio", [
    ("ViT-B-32", 12, 0.5, 49, 0.4903),
    ("ViT-B-16", 12, 0.45, 151, 0.4498),
    ("ViT-B-16", 32, 0.45, 301, 0.4499),
    ("ViT-L-14", 64, 0.45, 241, 0.4484),
])
def test_budget_schedules_are_reproducible(model, frames, budget, tokens_out, ratio):
    geometry = ViTGeometry.from_name(model)
    candidate = budget_candidate(geometry, frames, budget)
    assert candidate.schedule.output_tokens == tokens_out
    assert candidate.ratio == pytest.approx(ratio, abs=1e-4)
    again = TempMeConfig.for_model(model, frames=frames, flops_ratio=budget)
    assert again == candidate.config
    assert token_schedule(again, geometry.depth, geometry.tokens_per_frame) == candidate.schedule


@pytest.mark.parametrize("name, frames", [("L12-g7", 12), ("L12-g14", 16), ("L24-g16", 64), ("L32-g14", 7),
                                          ("L12-g7", 1)])
def test_budget_is_monotone_and_tight(name, frames):
    geometry = GEOMETRIES[name]
    ladder = budget_ladder(geometry, frames)
    ratios = [c.ratio for c in ladder]
    assert all(b < a for a, b in zip(ratios, ratios[1:])), "each rung must cost less than the one before"
    previous = None
    for budget in [ratios[-1] + i * (1 - ratios[-1]) / 40 for i in range(41)]:
        chosen = budget_candidate(geometry, frames, budget)
        assert chosen.ratio <= budget
        # Closest from below: no rung of the ladder lies between the chosen ratio and the budget.
        assert not any(chosen.ratio < r <= budget for r in ratios)
        if previous is not None:  # more budget: at least as many tokens at every layer
            for p, q in zip(previous.schedule.layers, chosen.schedule.layers):
                assert q.tokens_attn >= p.tokens_attn and q.tokens_out >= p.tokens_out
            assert chosen.schedule.output_tokens >= previous.schedule.output_tokens
        previous = chosen


def test_budget_below_the_cheapest_schedule_is_refused():
    with pytest.raises(ValueError, match=r"flops_ratio=0.2 cannot be met at 12 frames .* costs 0.4\d\d of "
                                         r"the unmerged FLOPs \(valid: 0.4\d\d <= flops_ratio <= 1\)"):
        TempMeConfig.for_model("ViT-B-32", flops_ratio=0.2)


@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(frames=0), ValueError, r"frames=0 is outside the derived schedules' range \(valid: 1..128\)"),
    (dict(frames=129), ValueError, r"frames=129 .*valid: 1..128"),
    (dict(frames=12.0), TypeError, "frames must be an int"),
    (dict(flops_ratio=0.0), ValueError, r"flops_ratio=0.0 must be in \(0, 1\]"),
    (dict(flops_ratio=1.5), ValueError, r"flops_ratio=1.5 must be in \(0, 1\]"),
    (dict(flops_ratio="half"), TypeError, "flops_ratio must be a float"),
])
def test_bad_arguments(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        TempMeConfig.for_model("ViT-B-32", **kwargs)


def test_unsupported_models_are_refused():
    with pytest.raises(ValueError, match="model='no-such-vit' is not an open_clip model name"):
        TempMeConfig.for_model("no-such-vit")
    with pytest.raises(TypeError, match="timm or ResNet image tower"):
        TempMeConfig.for_model("RN50")
    with pytest.raises(TypeError, match="model_or_name must be"):
        TempMeConfig.for_model(12)
    shallow = GEOMETRIES["L12-g7"].__class__(depth=4, tokens_per_frame=50, width=64, mlp_width=256, heads=2,
                                             patch_size=8, embed_dim=24)
    with pytest.raises(ValueError, match=r"frames=16 needs 4 joins \(2, 2, 2, 2\), but a 4-layer model"):
        TempMeConfig.for_model(shallow, frames=16)


@pytest.mark.parametrize("kwargs, message", [
    (dict(imgme_r=(2, 2)), r"imgme_r=\(2, 2\) has 2 entries, but clip_layers=\(8, 9, 10\) leaves 8"),
    (dict(imgme_r=(2, -1, 2, 2, 2, 2, 2, 2)), "must be >= 0"),
])
def test_per_layer_imgme_r_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TempMeConfig(**kwargs)
    with pytest.raises(TypeError, match="imgme_r must hold ints"):
        TempMeConfig(imgme_r=(2.0,) * 8)
    with pytest.raises(ValueError, match="give 12 values"):
        token_schedule(TempMeConfig(imgme_r=(1, 1), clip_layers=(), clip_groups=()), depth=12, tokens_per_frame=50)
