"""The last block trimmed to its class tokens (``apply_tempme(trim_last_block=True)``, the default)
against the same block run in full: the same embedding and gradients, fewer FLOPs, no last merge."""
import copy

import pytest
import torch

from tempme_fast import TempMeConfig, apply_tempme, ops
from tempme_fast.encoder import block_forward, class_block_forward, embed_frames
from tempme_fast.flops import measure_flops, model_flops
from tempme_fast.model import block_function, run_blocks
from tiny import TINY_CONFIG, tiny_clip, video

CONFIGS = {
    # Layer 3, the last, joins two clips and merges across them before its attention.
    "join-at-last-layer": TINY_CONFIG,
    "intra-last": TempMeConfig(frames=4, imgme_r=1, clip_layers=(1, 2), clip_groups=(2, 2), cross_ratio=0.3,
                               intra_ratio=0.2),
    "imgme-only": TempMeConfig(frames=2, imgme_r=3, clip_layers=(), clip_groups=()),
    "no-prop-attn": TINY_CONFIG.replace(prop_attn=False),
}


def _pair(config, dtype=torch.float64, backend="torch", attention="auto", **model_kw):
    """The same random model patched twice: trimmed and in full."""
    base = tiny_clip(**model_kw).to(dtype)
    full = apply_tempme(copy.deepcopy(base), config, backend=backend, attention=attention, trim_last_block=False)
    trimmed = apply_tempme(base, config, backend=backend, attention=attention)
    if hasattr(full.visual, "tempme_frame_pos"):
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in full.visual.tempme_frame_pos.items():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
                trimmed.visual.tempme_frame_pos[name].copy_(p)
    return trimmed, full


@pytest.mark.parametrize("name", CONFIGS)
def test_trimmed_last_block_gives_the_full_embedding(name):
    config = CONFIGS[name]
    trimmed, full = _pair(config, ls_init_value=0.5)
    v = video(3, config.frames).double()
    mask = torch.ones(3, config.frames, dtype=torch.bool)
    mask[2, -1] = False
    with torch.no_grad():
        got, want = trimmed.encode_video(v, mask), full.encode_video(v, mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_trimmed_state_holds_the_class_tokens_of_the_full_state():
    trimmed, full = _pair(TINY_CONFIG)
    frames = video(2, 4).double().flatten(0, 1)
    with torch.no_grad():
        got = run_blocks(trimmed, embed_frames(trimmed.visual, frames))
        want = run_blocks(full, embed_frames(full.visual, frames))
    c = want.protected
    assert got.protected == c and got.x.shape == (want.x.shape[0], c, want.x.shape[2])
    torch.testing.assert_close(got.x, want.x[:, :c], rtol=1e-10, atol=1e-10)
    assert torch.equal(got.size, want.size[:, :c])


@pytest.mark.parametrize("name", ["join-at-last-layer", "intra-last"])
def test_trimmed_last_block_gives_the_full_gradients(name):
    config = CONFIGS[name]
    grads = []
    v = video(2, config.frames).double()
    for model in _pair(config):
        model.train()
        model.encode_video(v).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    trimmed, full = grads
    assert trimmed.keys() == full.keys()
    for n in full:
        torch.testing.assert_close(trimmed[n], full[n], rtol=1e-9, atol=1e-11, msg=n)


def test_trimmed_last_block_runs_no_merge_after_attention(monkeypatch):
    """intra-last: the last layer's merge after attention is the one match the trim leaves out."""
    config = CONFIGS["intra-last"]
    assert config.merges and TINY_CONFIG.merges
    counts = []
    match = ops.match
    for model in _pair(config):
        calls = []
        monkeypatch.setattr(ops, "match", lambda *a, **kw: calls.append(1) or match(*a, **kw))
        with torch.no_grad():
            model.encode_video(video(1, config.frames).double())
        counts.append(len(calls))
    last = model.tempme.schedule.layers[-1]
    assert last.r > 0 and counts[0] == counts[1] - 1


@pytest.mark.interpreter
@pytest.mark.parametrize("attention", ["triton", "fold", "sdpa", "eager"])
def test_trimmed_last_block_on_the_triton_backend(device, attention):
    trimmed, full = _pair(TINY_CONFIG, torch.float32, "triton", attention)
    trimmed.to(device), full.to(device)
    v = video(2, 4).to(device)
    with torch.no_grad():
        got, want = trimmed.encode_video(v), full.encode_video(v)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)


def test_class_block_refuses_source_tracking():
    model = apply_tempme(tiny_clip(), TINY_CONFIG, backend="torch")
    state = embed_frames(model.visual, video(1, 4).flatten(0, 1), track_videos=1)
    block, plan = model.visual.transformer.resblocks[0], model.tempme.schedule.layers[0]
    with pytest.raises(ValueError, match="sources"):
        class_block_forward(block, state, plan, None, None)


def test_executed_flops_count_the_trimmed_block():
    trimmed, full = _pair(TINY_CONFIG)
    tempme, executed = model_flops(trimmed), model_flops(trimmed, executed=True)
    assert tempme.layers[:-1] == executed.layers[:-1] and executed.layers[-1] < tempme.layers[-1]
    assert model_flops(full, executed=True).total == tempme.total  # nothing trimmed
    assert measure_flops(trimmed, executed=True).total == pytest.approx(executed.total, rel=1e-9)
    assert measure_flops(trimmed).total == pytest.approx(tempme.total, rel=1e-9)


def test_the_unmerged_config_runs_its_last_block_in_full():
    """Its encode_video is open_clip's forward, so the block loop (bench_model's per-layer baseline,
    the FLOPs count) keeps every block in full too."""
    model = apply_tempme(tiny_clip(), TempMeConfig.unmerged(4), backend="torch")
    state = embed_frames(model.visual, video(1, 4).flatten(0, 1))
    assert block_function(model, len(model.tempme.schedule.layers) - 1, state) is block_forward
    assert model_flops(model, executed=True).total == model_flops(model).total
    assert measure_flops(model, executed=True).total == pytest.approx(measure_flops(model).total, rel=1e-9)


def test_trim_last_block_must_be_a_bool():
    with pytest.raises(TypeError, match="trim_last_block must be a bool"):
        apply_tempme(tiny_clip(), TINY_CONFIG, trim_last_block="yes")
