"""Half precision at the extremes: large activations and large sizes neither overflow nor change the merge order.

Both backends accumulate in float32 (float64 for float64 input): squared norms and dot products of
the metric, ``size * x`` sums and the division by the merged size, with one rounding to the
input dtype on store. So a float16 token of magnitude 3e4 standing for 600 patches (600 * 3e4 =
1.8e7, far beyond float16's 65504) merges without overflow, and a float16/bfloat16 metric gives
the plan its float32 copy gives. The limit is float32's: metric entries beyond ~1e18 overflow the
squared norm (bfloat16 and float32 inputs only; float16 cannot hold them).
"""
import pytest
import torch

from kit import DTYPES, HALF_DTYPES, VALUE_TOL
from tempme_fast import TempMeConfig, apply_tempme, ops
from tempme_fast.encoder import ClipState, EncoderOptions, block_forward, embed_frames
from tempme_fast.model import run_blocks
from tempme_fast.ops import reference as ref
from tempme_fast.schedule import LayerPlan
from tiny import TINY_CONFIG, tiny_clip, video

pytestmark = pytest.mark.interpreter

BACKENDS = ["torch", "triton"]


def rel_tol(dtype: torch.dtype) -> float:
    """One rounding of the result to the dtype, relative to the result's magnitude."""
    return VALUE_TOL[dtype][1]


SCALES = {torch.float16: [1e-2, 1.0, 3e4], torch.bfloat16: [1e-6, 1.0, 1e4, 1e15]}


def _tie_free_metric(b, n, c, r, d, dtype, seed, gap=1e-4):
    """A metric (rounded to ``dtype``) whose plan no near-tie decides: each A token's best B token
    beats its second by ``gap``, and the r-th ranked A token beats the next by ``gap``."""
    for attempt in range(100):
        g = torch.Generator().manual_seed(seed * 100 + attempt)
        metric = torch.randn(b, n, d, generator=g).to(dtype)
        a, bb = ref.split_positions(n, c)
        m = metric.double() / metric.double().norm(dim=-1, keepdim=True)
        sim = m[:, a] @ m[:, bb].transpose(1, 2)
        top2 = sim.topk(2, dim=-1).values
        ranked = top2[..., 0].sort(dim=-1, descending=True).values
        if (top2[..., 0] - top2[..., 1]).min() > gap and (ranked[:, r - 1] - ranked[:, r]).min() > gap:
            return metric
    raise AssertionError("no tie-free metric")


def _outcome(plan):
    """What a plan does, whatever order it lists the merged tokens in: (merged, their dst) sorted, kept."""
    merged, order = plan.merged.sort(dim=-1)
    return merged, plan.dst.gather(1, order), plan.kept


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", HALF_DTYPES)
def test_half_metric_with_large_activations_keeps_the_merge_order(name, backend):
    dtype = HALF_DTYPES[name]
    n, c, r = 50, 1, 12
    base = _tie_free_metric(2, n, c, r, 64, dtype, seed=1)
    for scale in SCALES[dtype]:
        # Scaling by a power of two keeps the values (but float16 subnormals) exact, so the cosine
        # similarities stay those of the base metric, well clear of ties.
        metric = base * 2.0 ** int(torch.log2(scale / base.double().abs().max()).floor())  # largest entry ~scale
        assert torch.isfinite(metric).all()
        scores, dst = ops.best_match(metric, c, backend=backend)
        assert torch.isfinite(scores).all() and scores.dtype == torch.float32
        ref_scores, _ = ref.best_match(metric.double(), c)
        assert (scores.double() - ref_scores).abs().max() < 1e-5, scale
        want = _outcome(ref.match(metric.double(), r, c))
        assert torch.equal(want[0], _outcome(ref.match(base.double(), r, c))[0])
        got = _outcome(ops.match(metric, r, c, backend=backend))
        fp32 = _outcome(ops.match(metric.float(), r, c, backend=backend))
        for field, a, b, w in zip(("merged", "dst", "kept"), got, fp32, want):
            assert torch.equal(a, w) and torch.equal(b, w), (scale, field)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, magnitude", [("fp16", 3e4), ("bf16", 1e30), ("fp32", 1e30)])
def test_merge_of_600_patch_tokens_does_not_overflow(name, magnitude, backend):
    dtype = DTYPES[name]
    g = torch.Generator().manual_seed(3)
    n, c, r = 197, 1, 98
    x = ((torch.rand(2, n, 48, generator=g) * 2 - 1) * magnitude).to(dtype)
    top = 2.0 ** int(torch.tensor(magnitude).log2().floor())
    x[:, :, 0] = top  # a channel at the top of the range in every token (a power of two: exact sums)
    size = torch.randint(1, 20, (2, n, 1), generator=g).float()
    size[:, 1::3] = 600.0  # tokens that already stand for 600 patches
    # Everything merges into B tokens 0 and 1: sums of 49 terms up to 600 * magnitude.
    na, _ = ref.split_sizes(n, c)
    plan = ref.MergePlan(torch.arange(r).expand(2, -1), (torch.arange(r) % 2).expand(2, -1),
                         torch.arange(r, na).expand(2, -1), n, c)
    out, out_size = ops.merge(x, size, plan, backend=backend)
    want, want_size = ref.merge(x.double(), size.double(), plan)
    assert torch.isfinite(out).all() and out.dtype == dtype
    assert torch.equal(out_size.double(), want_size)  # integers below 2**24: exact in float32
    assert out_size.max() > 600 * 10
    # Error relative to the inputs' magnitude: the merged values are averages of terms that big.
    err = ((out.double() - want).abs().max() / magnitude).item()
    assert err <= rel_tol(dtype), err
    assert torch.equal(out[:, :, 0], torch.full_like(out[:, :, 0], top))  # a merge of equal values


@pytest.mark.parametrize("name", HALF_DTYPES)
def test_proportional_attention_with_large_sizes(name):
    dtype = HALF_DTYPES[name]
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 97, 32, generator=g) * 4 for _ in range(3))
    size = torch.randint(1, 40, (2, 97, 1), generator=g).float()
    size[:, ::7] = 600.0
    want = ops.attention(q.double(), k.double(), v.double(), size.double())
    got = ops.attention(q.to(dtype), k.to(dtype), v.to(dtype), size)
    assert torch.isfinite(got).all()
    err = (got.double() - want).abs().max().item()
    assert err <= 30 * rel_tol(dtype) * want.abs().max().item(), err


def _big_state(dtype, seed=5):
    """Joined clips of a tiny ViT as ClipMe's last join sees them: large activations, sizes up to 600."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(4, 17, 64, generator=g) * 2e3).to(dtype)
    size = torch.randint(1, 30, (4, 17, 1), generator=g).float()
    size[:, 2::4] = 600.0
    return ClipState(x, size, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", HALF_DTYPES)
def test_clipme_block_in_half_precision_matches_fp32(name, backend):
    dtype = HALF_DTYPES[name]
    model = tiny_clip()
    block = model.visual.transformer.resblocks[3]
    plan = LayerPlan(layer=3, kind="clipme", clips_in=2, tokens_in=17, protected_in=1, group=2, r_cross=10, r=2)
    pos = torch.randn(1, 2, 1, 64, generator=torch.Generator().manual_seed(6))
    options = EncoderOptions(backend=backend)
    state = _big_state(dtype)
    with torch.no_grad():
        want = block_forward(block.double(), ClipState(state.x.double(), state.size.double(), 1), plan,
                             pos.double(), options)
        got = block_forward(block.to(dtype), state, plan, pos.to(dtype), options)
    assert got.x.dtype == dtype and torch.isfinite(got.x).all()
    assert got.size.dtype == torch.float32 and torch.equal(got.size.double(), want.size)
    # The cross-clip plan is made on the input itself, which is exact in every dtype; so the sizes
    # above agree token for token. The values carry a few roundings of magnitude 2e3.
    err = ((got.x.double() - want.x).abs().max() / want.x.abs().max()).item()
    assert err <= 4 * rel_tol(dtype), err


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", HALF_DTYPES)
def test_half_precision_encoder_with_large_activations(name, backend):
    """ln_pre scaled up 1000x: the residual stream runs at ~1e3 through every merge."""
    dtype = HALF_DTYPES[name]
    model = tiny_clip()
    with torch.no_grad():
        model.visual.ln_pre.weight.mul_(1e3)
        model.visual.ln_pre.bias.mul_(1e3)
    apply_tempme(model, TINY_CONFIG, backend=backend, trim_last_block=False)  # the state below keeps every token
    v = video(1, 4, seed=2)
    with torch.no_grad():
        want = model.encode_video(v)
        model.to(dtype)
        got = model.encode_video(v.to(dtype))
        state = run_blocks(model, embed_frames(model.visual, v.to(dtype).flatten(0, 1)))
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert state.size.dtype == torch.float32 and torch.equal(state.size.sum(dim=(1, 2)), torch.full((1,), 68.0))
    assert state.x.abs().max() > 100  # the activations really are large
    assert torch.nn.functional.cosine_similarity(got.float(), want, dim=-1).min() > 0.98


def test_model_sizes_stay_float32_at_600_patches():
    """ViT-B/32's 12 frames end as 97 tokens; with every merge forced into few tokens sizes reach
    hundreds, where float16 would stop counting exactly at 2048 and bfloat16 at 256."""
    model = tiny_clip().to(torch.bfloat16)
    config = TempMeConfig(frames=6, imgme_r=4, clip_layers=(2, 3), clip_groups=(3, 2), cross_ratio=0.9,
                          intra_ratio=0.3)
    apply_tempme(model, config, backend="torch", trim_last_block=False)  # the state below keeps every token
    v = video(1, 6, dtype=torch.bfloat16)
    with torch.no_grad():
        state = run_blocks(model, embed_frames(model.visual, v.flatten(0, 1)))
        _, sources = model.encode_video(v, return_sources=True)
    assert state.size.dtype == torch.float32
    assert state.size.sum().item() == 6 * 17
    assert torch.equal(state.size.view(1, -1).long(), sources.sizes())
