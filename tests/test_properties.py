"""Property-based tests (hypothesis): random valid shapes and configs, both backends, the spec's invariants.

Op level: random ``B'``, ``N`` (odd and even), protected counts, ``r`` and dtypes. The Triton
backend (the interpreter without a GPU) and the torch backend plan identically and both merge as
an independent per-clip oracle (``spec_tempme._merge_clip``, written from the spec alone) does:
same output order, same sizes, values within one rounding. Random metrics are drawn tie-free
(score gaps far above rounding) unless ties are the point, and then the ties are exact by
construction (duplicated vectors).

Model level: random schedules on a tiny ViT. The backends agree; sizes add up to the original
token count of every clip; a video's embedding does not depend on its batch; the frame mask
takes padded frames out of the final average exactly, while they still shape the joined clips.

The examples are few (the Triton interpreter costs a few ms per program) and ``database=None``
keeps the suite from writing a ``.hypothesis`` folder.
"""

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kit import ALL_DTYPES, VALUE_TOL
from spec_tempme import _merge_clip
from tempme_fast import TempMeConfig, apply_tempme, ops
from tempme_fast.encoder import embed_frames, frame_features
from tempme_fast.model import run_blocks
from tempme_fast.ops import reference as ref
from tiny import tiny_clip, video

pytestmark = pytest.mark.interpreter

TIE_GAP = 1e-4  # far above the fp32 rounding of a cosine similarity

# derandomize: CI runs the same examples every time (a failure reproduces; nothing flakes).
FEW = settings(max_examples=30, deadline=None, database=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
FEWER = settings(FEW, max_examples=6)


@st.composite
def op_cases(draw, max_tokens=40):
    n = draw(st.integers(3, max_tokens))
    c = draw(st.integers(0, min(12, n - 2)))
    r = draw(st.integers(0, ref.max_r(n, c)))
    b = draw(st.integers(1, 3))
    d = draw(st.sampled_from([2, 3, 8, 16]))
    dtype = draw(st.sampled_from(list(ALL_DTYPES.values())))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return b, n, c, r, d, dtype, seed


def _similarity64(metric, c):
    a, b = ref.split_positions(metric.shape[1], c)
    m = metric.double()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    return m[:, a] @ m[:, b].transpose(1, 2)


def _tie_free(metric, c, r):
    """No near-tie decides the plan: each A token's best B token, and the cut after the r-th A token."""
    sim = _similarity64(metric, c)
    if sim.shape[-1] > 1:
        top2 = sim.topk(2, dim=-1).values
        if (top2[..., 0] - top2[..., 1]).min() <= TIE_GAP:
            return False
    best = sim.max(dim=-1).values.sort(dim=-1, descending=True).values
    return r == 0 or r == best.shape[1] or bool((best[:, r - 1] - best[:, r]).min() > TIE_GAP)


def _assert_plans_equal(plan, want):
    for name in ("merged", "dst", "kept"):
        assert torch.equal(getattr(plan, name).cpu(), getattr(want, name).cpu()), name


def _check_against_oracle(x, size, metric, plan, out, out_size, dtype, exact_untouched=True):
    """Per clip: the spec oracle's values and sizes; class, kept and untouched B tokens copied bit for bit.

    ``r = 0`` is a no-op (the spec): the tokens come back as they were, in their original order.
    """
    c, r = plan.protected, plan.r
    if r == 0:
        assert out is x and out_size is size
        return
    a_pos, b_pos = ref.split_positions(plan.tokens, c)
    nk = a_pos.numel() - r
    for i in range(x.shape[0]):
        want, want_size = _merge_clip(x[i].double(), size[i, :, 0].double(), metric[i].double(), r, c)
        assert torch.equal(out_size[i, :, 0].double(), want_size)  # small integers: exact
        err = (out[i].double() - want).abs().max().item()
        # fp32 here: a few sources per token, so tighter than the kit's bound for many-source sums.
        atol, rtol = (2e-6, 2e-6) if dtype == torch.float32 else VALUE_TOL[dtype]
        assert err <= atol + rtol * want.abs().max().item(), err
        assert torch.equal(out[i, :c], x[i, :c])
        assert torch.equal(out[i, c:c + nk], x[i, a_pos[plan.kept[i]]])
        if exact_untouched:
            untouched = torch.ones(b_pos.numel(), dtype=torch.bool)
            untouched[plan.dst[i]] = False
            assert torch.equal(out[i, c + nk:][untouched], x[i, b_pos][untouched])


@FEW
@given(op_cases())
def test_match_and_merge_agree_with_the_oracle_on_both_backends(case):
    b, n, c, r, d, dtype, seed = case
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(b, n, d, generator=g).to(dtype)
    assume(_tie_free(metric, c, r))
    x = torch.randn(b, n, 6, generator=g).to(dtype)
    size = torch.randint(1, 9, (b, n, 1), generator=g).float()
    plans = {backend: ops.match(metric, r, c, backend=backend) for backend in ("torch", "triton")}
    _assert_plans_equal(plans["triton"], plans["torch"])
    plan = plans["torch"]
    # A valid plan: merged and kept partition set A, kept increasing, merged by score (highest first).
    na, nb = ref.split_sizes(n, c)
    assert torch.equal(torch.cat([plan.merged, plan.kept], 1).sort(1).values, torch.arange(na).expand(b, -1))
    assert (plan.kept.diff(dim=1) > 0).all() and ((plan.dst >= 0) & (plan.dst < nb)).all()
    scores, _ = ref.best_match(metric.double(), c)
    assert (scores.gather(1, plan.merged).diff(dim=1) <= 0).all()
    for backend in ("torch", "triton"):
        out, out_size = ops.merge(x, size, plan, backend=backend)
        assert out.shape == (b, n - r, 6) and out.dtype == dtype
        assert torch.equal(out_size.sum(1), size.sum(1))  # sizes add up to the clip's token count
        _check_against_oracle(x, size, metric, plan, out, out_size, dtype, exact_untouched=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_untouched_b_tokens_are_copied_bit_for_bit(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 41, 64, generator=g)
    size = torch.randint(1, 50, (4, 41, 1), generator=g).float()
    plan = ref.match(torch.randn(4, 41, 8, generator=g), 3, 1)
    out, _ = ops.merge(x, size, plan, backend=backend)
    _, b_pos = ref.split_positions(41, 1)
    nk = ref.split_sizes(41, 1)[0] - 3
    for i in range(4):
        untouched = torch.ones(b_pos.numel(), dtype=torch.bool)
        untouched[plan.dst[i]] = False
        assert torch.equal(out[i, 1 + nk:][untouched], x[i, b_pos][untouched])


@FEW
@given(op_cases(), st.integers(-6, 6))
def test_merging_identical_tokens_is_exact(case, exponent):
    """Every token equal: each merged token must come back bit for bit, in every dtype, on both backends.

    Values are small integers times a power of two and sizes at most 600, so every product and
    partial sum is exact in the fp32 accumulator and the division returns the value exactly.
    """
    b, n, c, r, d, dtype, seed = case
    g = torch.Generator().manual_seed(seed)
    token = torch.randint(-15, 16, (b, 1, 6), generator=g).to(dtype) * 2.0 ** exponent
    x = token.expand(b, n, 6).contiguous()
    size = torch.randint(1, 601, (b, n, 1), generator=g).float()
    plan = ops.match(torch.randn(b, n, d, generator=g).to(dtype), r, c, backend="torch")
    for backend in ("torch", "triton"):
        out, out_size = ops.merge(x, size, plan, backend=backend)
        assert torch.equal(out, token.expand(b, n - r, 6)), backend
        assert torch.equal(out_size.sum(1), size.sum(1))


@FEW
@given(op_cases(), st.integers(2, 5))
def test_exact_ties_break_to_the_lowest_index_on_both_backends(case, pool):
    """Tokens copied from a few vectors tie exactly; the spec's tie rules (lowest B index, then lower A
    index first) must decide, identically on both backends and in the oracle.

    The vectors are signs on 1, 4 or 16 channels times a power of two: their norms are powers of
    two, so every cosine similarity is an exact dyadic number in any implementation and in any
    dtype, and equal vectors tie exactly (1.0) instead of within rounding.
    """
    b, n, c, r, _, dtype, seed = case
    g = torch.Generator().manual_seed(seed)
    d = 16
    vectors = torch.zeros(pool, d)
    for k in range(pool):
        support = torch.randperm(d, generator=g)[:int(torch.tensor([1, 4, 16])[k % 3])]
        signs = torch.randint(0, 2, (support.numel(),), generator=g) * 2 - 1
        vectors[k, support] = signs.float() * 2.0 ** int(torch.randint(-3, 4, (1,), generator=g))
    metric = vectors[torch.randint(0, pool, (b, n), generator=g)].to(dtype)
    plan = ops.match(metric, r, c, backend="torch")
    _assert_plans_equal(ops.match(metric, r, c, backend="triton"), plan)
    x = torch.randn(b, n, 4, generator=g, dtype=torch.float64)
    size = torch.randint(1, 5, (b, n, 1), generator=g).double()
    out, out_size = ops.merge(x, size, plan, backend="torch")
    _check_against_oracle(x, size, metric, plan, out, out_size, torch.float64, exact_untouched=False)


# ---------------------------------------------------------------------------------------------
# Model level
# ---------------------------------------------------------------------------------------------

JOINS = {1: [()], 2: [(), (2,)], 3: [(), (3,)], 4: [(), (2,), (4,), (2, 2)], 6: [(), (2,), (3,), (2, 3), (3, 2), (6,)]}


@st.composite
def configs(draw):
    frames = draw(st.sampled_from(sorted(JOINS)))
    groups = draw(st.sampled_from(JOINS[frames]))
    layers = tuple(sorted(draw(st.lists(st.integers(0, 3), min_size=len(groups), max_size=len(groups), unique=True))))
    imgme_layers = layers[0] if layers else 4
    imgme_r = draw(st.integers(0, 16 // (imgme_layers + 1)))
    return TempMeConfig(frames=frames, imgme_r=imgme_r, clip_layers=layers, clip_groups=groups,
                        cross_ratio=draw(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.9])),
                        intra_ratio=draw(st.sampled_from([0.0, 0.1, 0.3])),
                        frame_pos=draw(st.booleans()), prop_attn=draw(st.booleans()))


def _patched(config, backend="torch", dtype=torch.float32, seed=0):
    model = apply_tempme(tiny_clip(seed=seed).to(dtype), config, backend=backend)
    if hasattr(model.visual, "tempme_frame_pos"):
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.visual.tempme_frame_pos.values():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


@FEWER
@given(configs(), st.integers(0, 1000))
def test_model_backends_agree(config, seed):
    """float64, so no score lands within rounding of a tie: the plans, hence the sources, must be equal."""
    model = _patched(config, "torch", torch.float64, seed)
    v = video(1, config.frames, seed=seed).double()
    with torch.no_grad():
        want, want_sources = model.encode_video(v, return_sources=True)
        apply_tempme(model, config, backend="triton")
        got, got_sources = model.encode_video(v, return_sources=True)
    assert torch.equal(got_sources.assignment, want_sources.assignment)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@settings(FEW, max_examples=20)
@given(configs(), st.integers(0, 1000))
def test_model_invariants(config, seed):
    model = _patched(config, seed=seed)
    v = video(5, config.frames, seed=seed)
    with torch.no_grad():
        state = run_blocks(model, embed_frames(model.visual, v.flatten(0, 1), track_videos=5))
        together, sources = model.encode_video(v, return_sources=True)
        alone = [model.encode_video(v[i:i + 1], return_sources=True) for i in range(5)]
    schedule = model.tempme.schedule
    assert state.x.shape[1] == schedule.output_tokens_per_clip
    # Sizes add up to the original tokens of every final clip, and the tracked sources agree.
    per_clip = config.frames // schedule.output_clips * schedule.tokens_per_frame
    assert torch.equal(state.size.sum(dim=(1, 2)), torch.full((state.x.shape[0],), float(per_clip)))
    assert torch.equal(state.size.view(5, -1).long(), sources.sizes())
    # A video's embedding (and its merges) do not depend on the other videos in the batch.
    for i, (emb, src) in enumerate(alone):
        assert torch.equal(src.assignment[0], sources.assignment[i])
        torch.testing.assert_close(emb[0], together[i], rtol=1e-5, atol=1e-6)


@settings(FEW, max_examples=15)
@given(configs(), st.integers(0, 1000), st.data())
def test_mask_removes_padded_frames_from_the_average_only(config, seed, data):
    assume(config.frames > 1)
    model = _patched(config, seed=seed)
    valid = data.draw(st.integers(1, config.frames - 1))
    v = video(2, config.frames, seed=seed)
    v[:, valid:] = 0  # zero padding, as the retrieval loaders pad
    mask = torch.arange(config.frames).expand(2, -1) < valid
    with torch.no_grad():
        got = model.encode_video(v, mask)
        features = frame_features(model.visual, run_blocks(model, embed_frames(model.visual, v.flatten(0, 1))), 2)
        want = torch.nn.functional.normalize(features, dim=-1)[:, :valid].mean(dim=1)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        # The padded frames' content: invisible without joins, part of the joined clips with them.
        other = v.clone()
        other[:, valid:] = 1.0
        changed = model.encode_video(other, mask)
    # Frames share a clip with the k * prod(groups) frames of their final clip: the padded frames
    # reach the real ones exactly when a final clip holds both.
    frames_per_clip = config.frames // model.tempme.schedule.output_clips
    if valid % frames_per_clip == 0:
        assert torch.equal(changed, got)
    else:
        assert not torch.equal(changed, got)


def test_batch_of_one_and_five_agree_at_vit_b32_frame_size():
    """The invariant at the real token count (50 per frame) on the default schedule's shape, cheaply:
    ViT-B/32 geometry with 2 layers of width 64."""
    vision = dict(layers=2, width=64, head_width=32, patch_size=32, image_size=224)
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=open_clip.model.CLIPVisionCfg(**vision),
                           text_cfg=open_clip.model.CLIPTextCfg(context_length=8, vocab_size=100, width=32, heads=2,
                                                                layers=1)).eval()
    config = TempMeConfig(frames=4, imgme_r=2, clip_layers=(1,), clip_groups=(4,))
    apply_tempme(model, config, backend="torch")
    v = video(5, 4, image_size=224, seed=2)
    with torch.no_grad():
        together, sources = model.encode_video(v, return_sources=True)
        for i in range(5):
            emb, src = model.encode_video(v[i:i + 1], return_sources=True)
            assert torch.equal(src.assignment[0], sources.assignment[i])
            torch.testing.assert_close(emb[0], together[i], rtol=1e-5, atol=1e-6)
    assert sources.tokens == model.tempme.schedule.output_tokens
