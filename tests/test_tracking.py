"""Source tracking: the tracked sources partition the original tokens exactly, on both backends.

Three independent witnesses that the map is right, beyond its being a partition by construction:
the sizes the merge ops computed (every final token's size is its number of sources), the merge
ops themselves carrying one-hot rows (``ops.merge`` of one-hot rows times the merged size is the
0/1 source matrix), and a model whose blocks are the identity (every final token is then exactly
the size-weighted mean of the embedded tokens the map says it holds).
"""
import pytest
import torch

from tempme_fast import TempMeConfig, apply_tempme, ops, trace_sources, tracking
from tempme_fast.encoder import embed_frames
from tempme_fast.model import run_blocks
from tempme_fast.ops import reference as ref
from tiny import TINY_CONFIG, tiny_clip, video

CONFIGS = {
    "tiny": TINY_CONFIG,
    "join-4": TempMeConfig(frames=4, imgme_r=2, clip_layers=(1,), clip_groups=(4,), cross_ratio=0.5, intra_ratio=0.2),
    "groups-3-2": TempMeConfig(frames=6, imgme_r=1, clip_layers=(2, 3), clip_groups=(3, 2)),
    "imgme-only": TempMeConfig(frames=2, imgme_r=3, clip_layers=(), clip_groups=()),
    "unmerged": TempMeConfig.unmerged(3),
}


def _final_state(model, v, track=True):
    with torch.no_grad():
        return run_blocks(model, embed_frames(model.visual, v.flatten(0, 1), track_videos=v.shape[0] if track else None))


def _check_partition(sources: tracking.SourceMap, frames: int, tokens_per_frame: int):
    b = sources.assignment.shape[0]
    assert sources.assignment.shape == (b, frames, tokens_per_frame)
    assert sources.assignment.dtype == torch.int64
    assert sources.assignment.min() >= 0 and sources.assignment.max() < sources.tokens
    dense = sources.dense()
    assert dense.shape == (b, sources.tokens, frames * tokens_per_frame)
    # Every original token in exactly one final token; every final token holds at least one.
    assert torch.equal(dense.sum(1), torch.ones(b, frames * tokens_per_frame, dtype=torch.int64))
    assert (dense.sum(2) >= 1).all()
    # Class tokens stay alone: frame t's class token is the t-th class token of the output, by itself.
    is_cls = sources.is_class_token()
    assert int(is_cls.sum()) == frames
    cls_positions = is_cls.nonzero().flatten()
    assert torch.equal(sources.assignment[:, :, 0], cls_positions.expand(b, -1))
    assert torch.equal(sources.sizes()[:, is_cls], torch.ones(b, frames, dtype=torch.int64))
    assert not is_cls[sources.assignment[:, :, 1:]].any()


@pytest.mark.parametrize("name", CONFIGS)
def test_sources_partition_and_match_the_merged_sizes(name):
    config = CONFIGS[name]
    model = apply_tempme(tiny_clip(), config, backend="torch", trim_last_block=False)
    v = video(3, config.frames)
    with torch.no_grad():
        emb, sources = model.encode_video(v, return_sources=True)
        plain = model.encode_video(v)
        # The default trims the last block to its class tokens; tracking runs it in full.
        trimmed = apply_tempme(model, config, backend="torch").encode_video(v)
        apply_tempme(model, config, backend="torch", trim_last_block=False)
    assert torch.equal(emb, plain)  # tracking does not touch the computation
    torch.testing.assert_close(trimmed, plain, rtol=1e-5, atol=1e-6)
    _check_partition(sources, config.frames, 17)
    schedule = model.tempme.schedule
    assert (sources.clips, sources.tokens_per_clip) == (schedule.output_clips, schedule.output_tokens_per_clip)
    if config.merges:
        state = _final_state(model, v)
        assert torch.equal(state.sources, sources.assignment.flatten(1))
        # The sizes the merge ops accumulated, token by token, are the counts of tracked sources.
        assert torch.equal(state.size.view(3, -1).long(), sources.sizes())
    else:
        assert torch.equal(sources.assignment.flatten(1), torch.arange(3 * 17).expand(3, -1))


def test_identity_blocks_make_every_token_the_mean_of_its_sources():
    """With attention and MLP outputs zeroed, the blocks only merge: a final token is then the size-weighted
    mean (sizes all 1 at the start) of the embedded tokens it holds, which pins the map to the values."""
    model = tiny_clip().double()
    with torch.no_grad():
        for block in model.visual.transformer.resblocks:
            for p in (*block.attn.out_proj.parameters(), *block.mlp.c_proj.parameters()):
                p.zero_()
    config = CONFIGS["groups-3-2"].replace(frame_pos=False)
    apply_tempme(model, config, backend="torch")
    v = video(2, config.frames, seed=4).double()
    with torch.no_grad():
        start = embed_frames(model.visual, v.flatten(0, 1)).x.reshape(2, -1, 64)
    state = _final_state(model, v)
    counts = torch.zeros(2, state.x.shape[0] // 2 * state.x.shape[1], 1, dtype=torch.float64)
    counts.scatter_add_(1, state.sources.unsqueeze(-1), torch.ones(2, state.sources.shape[1], 1, dtype=torch.float64))
    sums = torch.zeros(2, counts.shape[1], 64, dtype=torch.float64)
    sums.scatter_add_(1, state.sources.unsqueeze(-1).expand(-1, -1, 64), start)
    torch.testing.assert_close(state.x.reshape(2, -1, 64), sums / counts, rtol=1e-12, atol=1e-12)


@pytest.mark.interpreter
def test_both_backends_track_the_same_sources():
    model = apply_tempme(tiny_clip().double(), TINY_CONFIG, backend="torch")
    v = video(1, 4, seed=7).double()
    _, want = model.encode_video(v, return_sources=True)
    apply_tempme(model, TINY_CONFIG, backend="triton")
    _, got = model.encode_video(v, return_sources=True)
    assert torch.equal(got.assignment, want.assignment)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n, c, r, group", [(9, 1, 3, 1), (10, 2, 4, 1), (7, 0, 3, 1), (6, 1, 3, 2), (5, 2, 2, 3)],
                         ids=lambda v: str(v))
@pytest.mark.interpreter
def test_merge_and_join_follow_the_ops_on_one_hot_rows(n, c, r, group, backend):
    """Carry the identity matrix through ``ops.join_clips`` and ``ops.merge``: merged one-hot rows times
    the merged size are the 0/1 source matrix that ``join_sources``/``merge_sources`` describe."""
    videos, clips = 2, 2 * group
    g = torch.Generator().manual_seed(n * 10 + r)
    per_video = clips * n
    onehot = torch.eye(per_video, dtype=torch.float64).reshape(1, clips, n, per_video).repeat(videos, 1, 1, 1)
    onehot = onehot.reshape(videos * clips, n, per_video)
    size = torch.ones(videos * clips, n, 1, dtype=torch.float64)
    sources = tracking.initial_sources(videos, clips, n)
    if group > 1:
        onehot = ops.join_clips(onehot, group, c, backend=backend)
        size = ops.join_clips(size, group, c, backend=backend)
        sources = tracking.join_sources(sources, clips, n, c, group)
        n, c = n * group, c * group
    metric = torch.randn(onehot.shape[0], n, 5, generator=g, dtype=torch.float64)
    plan = ops.match(metric, r, c, backend=backend)
    merged, merged_size = ops.merge(onehot, size, plan, backend=backend)
    sources = tracking.merge_sources(sources, plan)
    dense = (merged * merged_size).reshape(videos, -1, per_video).round().long()
    expected = torch.nn.functional.one_hot(sources, dense.shape[1]).transpose(1, 2)
    assert torch.equal(dense, expected)


def test_join_sources_matches_join_clips_order():
    # 1 video, 4 clips of 3 tokens (1 class token), joined in pairs: [0, 3, 1, 2, 4, 5] and [6, 9, 7, 8, 10, 11].
    sources = tracking.join_sources(tracking.initial_sources(1, 4, 3), 4, 3, 1, 2)
    joined = ref.join_clips(torch.arange(12).view(4, 3), 2, 1).flatten()
    assert torch.equal(joined[sources[0]], torch.arange(12))


def test_trace_sources_and_batch_independence():
    model = apply_tempme(tiny_clip(), TINY_CONFIG, backend="torch")
    v = video(5, 4, seed=9)
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[2, 3] = False
    together = trace_sources(model, v, mask)
    for i in range(5):
        alone = trace_sources(model, v[i:i + 1])
        assert torch.equal(alone.assignment[0], together.assignment[i])
    grid = together.patch_grid()
    assert grid.shape == (5, 4, 4, 4)
    assert torch.equal(grid.flatten(2), together.assignment[..., 1:])
    with pytest.raises(ValueError, match="grid"):
        together.patch_grid((3, 5))


def test_tracking_is_off_by_default_and_works_with_checkpointing():
    model = apply_tempme(tiny_clip(), TINY_CONFIG, backend="torch").train()
    assert _final_state(model, video(1, 4), track=False).sources is None
    model.visual.set_grad_checkpointing(True)
    v = video(2, 4).requires_grad_()
    emb, sources = model.encode_video(v, return_sources=True)
    emb.sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all()
    _check_partition(sources, 4, 17)


def test_patch_grid_refuses_to_guess_a_grid_that_is_no_square():
    """12 patches were laid out as 3 x 4 without a word, where the model's grid was 4 x 3."""
    sources = tracking.SourceMap(torch.zeros(1, 2, 13, dtype=torch.long), 1, 13, 1)
    with pytest.raises(ValueError, match="a frame's 12 patches form no square: give grid=\\(H_p, W_p\\)"):
        sources.patch_grid()
    assert sources.patch_grid((4, 3)).shape == (1, 2, 4, 3)


def test_the_unmerged_config_refuses_a_tome_patched_tower():
    from tempme_fast import apply_tome

    model = apply_tempme(tiny_clip(), TempMeConfig.unmerged(4))
    apply_tome(model, 2)  # its forward, which the unmerged config calls, now merges
    with pytest.raises(ValueError, match="model.visual is patched by apply_tome, so the unmerged TempMe config would "
                                         "merge with ToMe; remove_tome"):
        model.encode_video(video(1, 4))
