"""apply_tempme / encode_video against an independent implementation of the spec, and the patch's contract."""
import copy

import open_clip
import pytest
import torch

from kit import HALF_DTYPES, parametrize_dtypes, pickled_afresh
from spec_tempme import encode_video_spec
from tempme_fast import TempMeConfig, apply_tempme, remove_tempme
from tempme_fast.encoder import embed_frames, frame_features
from tempme_fast.model import run_blocks
from tiny import TINY_CONFIG, tiny_clip, video


def _randomise_frame_pos(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.visual.tempme_frame_pos.values():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))


def _rel_err(a, b):
    return ((a.double() - b.double()).norm(dim=-1) / b.double().norm(dim=-1)).max().item()


@pytest.mark.parametrize("config", [
    TINY_CONFIG,
    TINY_CONFIG.replace(prop_attn=False, frame_pos=False),
    TempMeConfig(frames=4, imgme_r=2, clip_layers=(1,), clip_groups=(4,), cross_ratio=0.5, intra_ratio=0.2),
    TempMeConfig(frames=6, imgme_r=1, clip_layers=(2, 3), clip_groups=(3, 2)),
], ids=["tiny", "no-prop-no-pos", "one-join-of-4", "groups-3-2"])
def test_tiny_model_matches_spec(config):
    model = apply_tempme(tiny_clip(), config, backend="torch")
    if config.frame_pos:
        _randomise_frame_pos(model)
    v = video(3, config.frames)
    mask = torch.ones(3, config.frames, dtype=torch.bool)
    mask[1, -1] = False
    with torch.no_grad():
        got = model.encode_video(v, mask)
        want = encode_video_spec(copy.deepcopy(model).double(), v, config, mask)
    assert got.shape == (3, 24) and got.dtype == torch.float32
    assert _rel_err(got, want) < 1e-5


@pytest.mark.slow
def test_vit_b32_12_frames_matches_spec():
    model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
    apply_tempme(model, backend="torch")
    _randomise_frame_pos(model)
    v = video(2, 12, image_size=224)
    with torch.no_grad():
        got = model.encode_video(v)
        want = encode_video_spec(copy.deepcopy(model).double(), v, TempMeConfig())
    assert _rel_err(got, want) < 1e-4


def test_unmerged_config_is_per_frame_clip():
    model = tiny_clip()
    v = video(2, 4)
    with torch.no_grad():
        frames = torch.nn.functional.normalize(model.encode_image(v.flatten(0, 1)), dim=-1)
        want = frames.view(2, 4, -1).mean(1)
        apply_tempme(model, TempMeConfig.unmerged(4))
        got = model.encode_video(v)
        # The TempMe block loop with nothing to merge is open_clip's forward too.
        loop = frame_features(model.visual, run_blocks(model, embed_frames(model.visual, v.flatten(0, 1))), 2)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(loop.flatten(0, 1), model.visual(v.flatten(0, 1)), rtol=1e-5, atol=1e-5)


def test_mask_averages_valid_frames_only():
    model = apply_tempme(tiny_clip(), TINY_CONFIG)
    v = video(2, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    with torch.no_grad():
        got = model.encode_video(v, mask)
        state = run_blocks(model, embed_frames(model.visual, v.flatten(0, 1)))
        feats = torch.nn.functional.normalize(frame_features(model.visual, state, 2), dim=-1)
    torch.testing.assert_close(got[0], feats[0, :2].mean(0))
    torch.testing.assert_close(got[1], feats[1].mean(0))
    normed = model.encode_video(v, mask, normalize=True)
    torch.testing.assert_close(normed.norm(dim=-1), torch.ones(2))


def test_embedding_does_not_depend_on_the_batch():
    model = apply_tempme(tiny_clip(), TINY_CONFIG)
    v = video(5, 4)
    with torch.no_grad():
        together = model.encode_video(v)
        alone = torch.cat([model.encode_video(v[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_apply_remove_round_trip():
    model = tiny_clip()
    keys = list(model.state_dict())
    cls = type(model)
    v, text = video(1, 4), torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        image_before, text_before = model.encode_image(v[0]), model.encode_text(text)
    apply_tempme(model, TINY_CONFIG)
    assert hasattr(model, "encode_video") and isinstance(model, cls)
    new_keys = set(model.state_dict()) - set(keys)
    assert new_keys == {"visual.tempme_frame_pos.2", "visual.tempme_frame_pos.3"}
    assert model.visual.tempme_frame_pos["2"].shape == (1, 4, 1, 64)
    assert model.visual.tempme_frame_pos["3"].shape == (1, 2, 1, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(v[0]), image_before, rtol=0, atol=0)
        torch.testing.assert_close(model.encode_text(text), text_before, rtol=0, atol=0)
    # Re-applying the same config only switches the backend; another config is refused.
    apply_tempme(model, TINY_CONFIG, backend="torch")
    assert model.tempme.backend == "torch"
    with pytest.raises(ValueError, match="already patched with a different TempMeConfig"):
        apply_tempme(model, TINY_CONFIG.replace(imgme_r=2))
    remove_tempme(model)
    assert type(model) is cls and not hasattr(model, "encode_video") and not hasattr(model, "tempme")
    assert list(model.state_dict()) == keys
    with pytest.raises(ValueError, match="not patched"):
        remove_tempme(model)


def test_state_dict_round_trip():
    model = apply_tempme(tiny_clip(), TINY_CONFIG)
    _randomise_frame_pos(model)
    state = copy.deepcopy(model.state_dict())
    fresh = apply_tempme(tiny_clip(seed=5), TINY_CONFIG)
    fresh.load_state_dict(state)
    v = video(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode_video(v), model.encode_video(v), rtol=0, atol=0)


def test_whole_patched_model_pickles(monkeypatch):
    # torch.save(model) of a patched model failed: its class, made at run time, was not importable by name.
    model = apply_tempme(tiny_clip(), TINY_CONFIG)
    _randomise_frame_pos(model)
    assert type(copy.deepcopy(model)) is type(model)
    loaded = pickled_afresh(model, monkeypatch)
    assert type(loaded).__name__ == "TempMeCLIP" and type(loaded) is not type(model)
    assert loaded.tempme == model.tempme and isinstance(loaded, open_clip.CLIP)
    v = video(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_video(v), model.encode_video(v), rtol=0, atol=0)
    assert type(apply_tempme(tiny_clip(), TINY_CONFIG)) is type(loaded)  # one class per original class
    assert type(remove_tempme(loaded)) is open_clip.CLIP and not hasattr(loaded, "encode_video")


@parametrize_dtypes(HALF_DTYPES)
def test_half_precision_close_to_fp32(dtype):
    model = apply_tempme(tiny_clip(), TINY_CONFIG)
    v = video(2, 4)
    with torch.no_grad():
        want = model.encode_video(v)
        model.to(dtype)
        got = model.encode_video(v.to(dtype))
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got.float(), want, dim=-1).min() > 0.98


def test_gradients_reach_weights_and_frame_pos_with_and_without_checkpointing():
    def grads(checkpointing):
        model = apply_tempme(tiny_clip(), TINY_CONFIG).train()
        _randomise_frame_pos(model)
        model.visual.set_grad_checkpointing(checkpointing)
        model.encode_video(video(2, 4)).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert "visual.tempme_frame_pos.2" in plain and plain["visual.tempme_frame_pos.2"].abs().sum() > 0
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in plain
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], ckpt[name])


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_layer_scale_and_activation_variants(quick_gelu):
    model = apply_tempme(tiny_clip(quick_gelu=quick_gelu, ls_init_value=0.5), TINY_CONFIG)
    v = video(2, 4)
    with torch.no_grad():
        got = model.encode_video(v)
        want = encode_video_spec(copy.deepcopy(model).double(), v, TINY_CONFIG)
    assert _rel_err(got, want) < 1e-5


@pytest.mark.slow
def test_vit_b16_runs_and_l14_schedules():
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    apply_tempme(model)
    assert model.tempme.schedule.tokens_per_frame == 197
    with torch.no_grad():
        out = model.encode_video(video(1, 12, image_size=224))
    assert out.shape == (1, 512) and torch.isfinite(out).all()
    large = apply_tempme(open_clip.create_model("ViT-L-14-quickgelu", pretrained=None), TempMeConfig(clip_layers=(16, 18, 20)))
    assert large.tempme.schedule.tokens_per_frame == 257 and len(large.tempme.schedule.layers) == 24
    assert large.visual.tempme_frame_pos["16"].shape == (1, 12, 1, 1024)


@pytest.mark.parametrize("make_input, exc, message", [
    (lambda: (video(2, 4)[0],), ValueError, r"shape \[B, T, 3, H, W\]"),
    (lambda: (video(2, 6),), ValueError, "T=6 frames but the TempMeConfig expects frames=4"),
    (lambda: (video(0, 4),), ValueError, "empty batch"),
    (lambda: (video(1, 4, image_size=48),), ValueError, "3x48x48 but the model takes 3x32x32"),
    (lambda: ((video(1, 4) * 255).to(torch.uint8),), TypeError, "float frames"),
    (lambda: (video(2, 4), torch.ones(2, 5)), ValueError, r"mask must be a tensor of shape \[B, T\] = \[2, 4\]"),
    (lambda: (video(2, 4), torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])), ValueError, "no valid frame"),
    (lambda: ([1, 2],), TypeError, "must be a torch.Tensor"),
])
def test_encode_video_input_errors(make_input, exc, message):
    model = apply_tempme(tiny_clip(), TINY_CONFIG)
    with pytest.raises(exc, match=message):
        model.encode_video(*make_input())


def test_apply_errors():
    with pytest.raises(ValueError, match=r"clip_layers=\(8, 9, 10\) reaches layer 10, but the model has 4 layers"):
        apply_tempme(tiny_clip(), TempMeConfig())
    with pytest.raises(ValueError, match="backend='gpu'"):
        apply_tempme(tiny_clip(), TINY_CONFIG, backend="gpu")
    with pytest.raises(TypeError, match="without .visual"):
        apply_tempme(torch.nn.Linear(2, 2))
    model = tiny_clip()
    model.visual.patch_dropout = open_clip.transformer.PatchDropout(0.5)
    with pytest.raises(ValueError, match="patch dropout"):
        apply_tempme(model, TINY_CONFIG)
