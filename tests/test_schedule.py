import pytest

from tempme_fast import TempMeConfig, token_schedule

SPEC_B32 = [50, 48, 46, 44, 42, 40, 38, 36, 34, 68, 48, 44, 88, 62, 56, 168, 118, 107, 97]


def test_vit_b32_matches_spec():
    schedule = token_schedule(TempMeConfig(), depth=12, tokens_per_frame=50)
    assert schedule.token_counts() == SPEC_B32
    assert schedule.output_tokens == 97 and schedule.output_clips == 1
    assert [p.clips_in for p in schedule.layers] == [12] * 9 + [6, 3, 1]
    assert [p.kind for p in schedule.layers] == ["imgme"] * 8 + ["clipme"] * 3 + ["intra"]
    assert schedule.layers[10].protected_out == 12


def test_vit_b16_counts():
    s = token_schedule(TempMeConfig(), depth=12, tokens_per_frame=197)
    # 8 image-merging layers remove 2 each; join 2: 362 -> -108 -> 254 -> -25 -> 229; ...
    assert s.token_counts()[:9] == [197 - 2 * i for i in range(9)]
    p8 = s.layers[8]
    assert (p8.tokens_joined, p8.r_cross, p8.r) == (362, 108, 25)
    assert s.output_tokens == s.layers[-1].tokens_out
    assert s.output_tokens < 12 * 197 * 0.25


def test_unmerged_schedule_changes_nothing():
    s = token_schedule(TempMeConfig.unmerged(12), depth=12, tokens_per_frame=50)
    assert s.token_counts() == [50]
    assert s.output_tokens == 600 and s.output_clips == 12
    assert not TempMeConfig.unmerged().merges and TempMeConfig().merges


def test_clamp_to_half_of_unprotected_tokens():
    s = token_schedule(TempMeConfig(imgme_r=30, clip_layers=(), clip_groups=()), depth=3, tokens_per_frame=50)
    assert s.token_counts() == [50, 26, 14, 8]


def test_frames_beyond_groups_leave_several_clips():
    s = token_schedule(TempMeConfig(frames=24), depth=12, tokens_per_frame=50)
    assert s.output_clips == 2 and s.output_tokens == 2 * 97


@pytest.mark.parametrize("kwargs, message", [
    (dict(frames=10), "frames=10 is not divisible by the clip groups (2, 2, 3) whose product is 12"),
    (dict(clip_groups=(2, 2)), "same length"),
    (dict(clip_layers=(8, 8, 10)), "strictly increasing"),
    (dict(clip_groups=(1, 2, 6)), ">= 2"),
    (dict(imgme_r=-1), "imgme_r=-1"),
    (dict(cross_ratio=1.0), "cross_ratio=1.0"),
    (dict(intra_ratio=-0.1), "intra_ratio=-0.1"),
    (dict(frames=0), "frames=0"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TempMeConfig(**kwargs)


def test_config_type_errors():
    with pytest.raises(TypeError, match="imgme_r"):
        TempMeConfig(imgme_r=2.5)
    with pytest.raises(TypeError, match="clip_layers"):
        TempMeConfig(clip_layers=(8.0, 9, 10))


def test_config_against_model_depth():
    with pytest.raises(ValueError, match=r"model has 6 layers \(valid: 0..5\)"):
        token_schedule(TempMeConfig(), depth=6, tokens_per_frame=50)
