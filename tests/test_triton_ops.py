"""Triton merge ops against the PyTorch reference, small shapes, runnable in Triton's interpreter.

Without a GPU, conftest.py sets TRITON_INTERPRET=1 before triton is imported and the kernels run
on CPU tensors; with one, the same tests run compiled kernels on CUDA tensors.
Every output buffer the launchers allocate is filled with NaN (indices with a sentinel) first,
so an element a kernel never writes fails the comparison.
"""
import itertools

import pytest
import torch

from tempme_fast import ops
from tempme_fast.ops import reference as ref
from tempme_fast.ops import triton_ops

from kit import DTYPES, SCORE_TOL, VALUE_TOL, assert_close, fill_outputs_with_nan

pytestmark = pytest.mark.interpreter

# Score gaps below this count as ties when drawing "tie-free" inputs: 100x the fp32 error.
TIE_GAP = 1e-5


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    fill_outputs_with_nan(monkeypatch, triton_ops)


@pytest.fixture(params=["tiles16", "gpu-tiles"])
def tiling(request, monkeypatch):
    """Several tiles per clip in the interpreter, which otherwise gives a program a whole clip.

    ``tiles16``: every tile 16 wide, so each multi-tile loop runs many times. ``gpu-tiles``: the
    launchers believe they are on a GPU, so the GPU's tile sizes and its fp16 ``tl.dot`` path run.
    """
    if request.param == "tiles16":
        monkeypatch.setattr(triton_ops, "INTERPRETER_BLOCK", 16)
    else:
        monkeypatch.setattr(triton_ops, "_interpreting", lambda: False)
    return request.param


# ---------------------------------------------------------------------------------------------
# Cases: every (N, c) pair with at least two patches, every dtype; B', D and layout rotate so
# each value of each shows up without a full cartesian product.
# ---------------------------------------------------------------------------------------------

TOKENS = (7, 10, 50, 197)
PROTECTED = (1, 2, 12)


def _cases():
    rows, widths = itertools.cycle((1, 3)), itertools.cycle((8, 64, 96))
    layouts = itertools.cycle(("contiguous", "transposed", "sliced"))
    cases = []
    for n, c in itertools.product(TOKENS, PROTECTED):
        if n - c < 2:
            continue
        for name, dtype in DTYPES.items():
            b, d, layout = next(rows), next(widths), next(layouts)
            cases.append(pytest.param(b, n, c, d, dtype, layout, id=f"B{b}-N{n}-c{c}-D{d}-{name}-{layout}"))
    return cases


def make_tokens(b, n, d, dtype, layout, device, generator):
    """A ``[b, n, d]`` tensor with the given memory layout (values do not depend on the layout)."""
    x = torch.randn(b, n, d, generator=generator).to(dtype)
    if layout == "transposed":  # token-major memory: stride(0) < stride(1)
        return x.transpose(0, 1).contiguous().to(device).transpose(0, 1)
    if layout == "sliced":  # channel stride 2, as a view into a wider buffer
        wide = torch.zeros(b, n, 2 * d, dtype=dtype)
        wide[..., ::2] = x
        return wide.to(device)[..., ::2]
    return x.to(device)


def similarity64(metric, protected):
    """Float64 cosine similarities ``[B', Na, Nb]``, as the reference computes them."""
    a_pos, b_pos = ref.split_positions(metric.shape[1], protected, metric.device)
    m = metric.double()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return m[:, a_pos] @ m[:, b_pos].transpose(1, 2)


def tie_free_metric(b, n, c, d, dtype, layout, device, seed=0, group=1):
    """A random metric whose best matches and score ranking have no near-ties (gaps > TIE_GAP).

    With ``group > 1`` the ties are checked on the joined clips (``reference.join_clips``).
    """
    for attempt in range(200):
        g = torch.Generator().manual_seed(seed * 1000 + attempt)
        metric = make_tokens(b, n, d, dtype, layout, device, g)
        sim = similarity64(ref.join_clips(metric.cpu(), group, c), c * group)
        top2 = sim.topk(min(2, sim.shape[-1]), dim=-1).values
        best_gap = (top2[..., 0] - top2[..., -1]) if sim.shape[-1] > 1 else torch.ones_like(top2[..., 0])
        ranked = top2[..., 0].sort(dim=-1).values
        rank_gap = ranked.diff(dim=-1)
        if best_gap.min() > TIE_GAP and (rank_gap.numel() == 0 or rank_gap.min() > TIE_GAP):
            return metric
    raise AssertionError(f"no tie-free metric found for {(b, n, c, d)}")


def random_plan(b, n, c, r, device, generator, hub=False):
    """A valid plan with arbitrary (not score-derived) choices; ``hub`` sends everything to 2 B tokens."""
    na, nb = ref.split_sizes(n, c)
    perm = torch.stack([torch.randperm(na, generator=generator) for _ in range(b)])
    merged, kept = perm[:, :r], perm[:, r:].sort(dim=-1).values
    dst = torch.randint(0, min(nb, 2) if hub else nb, (b, r), generator=generator)
    return ref.MergePlan(merged.to(device), dst.to(device), kept.to(device), n, c)


def _plan_with_counts(counts, n, c, device, generator):
    """A plan whose row ``i`` sends ``counts[i][j]`` merged tokens to B token ``j`` (the same ``r`` a row),
    its merged tokens in random order."""
    dst = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in counts])
    plan = random_plan(len(counts), n, c, dst.shape[1], device, generator)
    return plan._replace(dst=dst[:, torch.randperm(dst.shape[1], generator=generator)].to(device))


def plan_from_scores(scores, dst, r):
    """The reference's ranking (``reference.match``) applied to given scores."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    merged = order[:, :r]
    return merged, dst.gather(1, merged), order[:, r:].sort(dim=-1).values


# ---------------------------------------------------------------------------------------------
# best_match
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b, n, c, d, dtype, layout", _cases())
def test_best_match(b, n, c, d, dtype, layout, device):
    metric = tie_free_metric(b, n, c, d, dtype, layout, device)
    scores, dst = ops.best_match(metric, c, backend="triton")
    ref_scores, ref_dst = ref.best_match(metric.cpu().double(), c)
    assert scores.dtype == torch.float32 and dst.dtype == torch.int64
    assert torch.equal(dst.cpu(), ref_dst)
    diff = (scores.double().cpu() - ref_scores).abs().max().item()
    assert diff <= SCORE_TOL[dtype], f"max abs score diff {diff:.3g}"


def test_best_match_float64(device):
    metric = tie_free_metric(3, 50, 1, 8, torch.float64, "contiguous", device)
    scores, dst = ops.best_match(metric, 1, backend="triton")
    ref_scores, ref_dst = ref.best_match(metric.cpu(), 1)
    assert scores.dtype == torch.float64
    assert torch.equal(dst.cpu(), ref_dst)
    assert (scores.cpu() - ref_scores).abs().max() <= SCORE_TOL[torch.float64]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_best_match_ties_and_zero_rows(dtype, device):
    """Duplicated tokens make exact ties (lowest B index wins); all-zero rows score 0 against all.

    Every vector has four entries of +-1 and zeros elsewhere: its norm is 2, its normalised entries
    +-0.5 and every cosine a multiple of 1/4, all exact in any summation order (BLAS blocking, tensor
    cores, the interpreter's numpy), so ties are ties in every implementation and the tie rules of
    both the argmax and the ranking decide the result.
    """
    g = torch.Generator().manual_seed(1)
    n, c = 41, 1
    pool = torch.zeros(7, 16)
    for v in pool:
        v[torch.randperm(16, generator=g)[:4]] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
    # A tokens (even positions) copy one of 3 vectors, B tokens one of 4 others.
    pick = torch.where(torch.arange(n) % 2 == 0, torch.randint(0, 3, (2, n), generator=g),
                       torch.randint(3, 7, (2, n), generator=g))
    metric = pool[pick].to(dtype)
    metric[0, 4] = 0  # A token 1 (odd c: A tokens sit at even positions) with zero norm
    metric[1, 3] = 0  # B token 1 with zero norm
    metric = metric.to(device)
    scores, dst = triton_ops.best_match(metric, c)
    ref_scores, ref_dst = ref.best_match(metric.cpu(), c)
    assert torch.equal(dst.cpu(), ref_dst)
    assert torch.equal(scores.cpu(), ref_scores)
    assert scores[0, 1].item() == 0.0 and dst[0, 1].item() == 0
    plan = triton_ops.match(metric, 15, c)
    expected = ref.match(metric.cpu(), 15, c)
    for name in ("merged", "dst", "kept"):
        assert torch.equal(getattr(plan, name).cpu(), getattr(expected, name)), name


# ---------------------------------------------------------------------------------------------
# match
# ---------------------------------------------------------------------------------------------

def _match_cases():
    cases = []
    for param in _cases():
        b, n, c, d, dtype, layout = param.values
        for r in sorted({0, 1, ref.max_r(n, c)}):
            cases.append(pytest.param(b, n, c, d, dtype, layout, r, id=f"{param.id}-r{r}"))
    return cases


@pytest.mark.parametrize("b, n, c, d, dtype, layout, r", _match_cases())
def test_match(b, n, c, d, dtype, layout, r, device):
    metric = tie_free_metric(b, n, c, d, dtype, layout, device, seed=r)
    plan = ops.match(metric, r, c, backend="triton")
    expected = ref.match(metric.cpu().double(), r, c)
    assert (plan.tokens, plan.protected, plan.r) == (n, c, r)
    for name in ("merged", "dst", "kept"):
        got = getattr(plan, name)
        assert got.dtype == torch.int64, name
        assert torch.equal(got.cpu(), getattr(expected, name)), name
    _check_grouping(plan, expected)


def _check_grouping(plan, expected):
    """The grouping by destination that the match writes with the plan equals the reference's."""
    _, nb = ref.split_sizes(expected.tokens, expected.protected)
    src, offsets = ref.group_sources(expected.merged, expected.dst, nb)
    assert plan.src.dtype == plan.offsets.dtype == torch.int64
    assert torch.equal(plan.src.cpu(), src), "src"
    assert torch.equal(plan.offsets.cpu(), offsets), "offsets"


def tie_free_keys(b, n, c, heads, d, dtype, device, seed=0):
    """Every head's keys ``[b, n, heads * d]`` as the encoder hands them to the match: a token-major
    view of a ``q | k | v`` projection, whose mean over heads has no near-ties."""
    for attempt in range(200):
        g = torch.Generator().manual_seed(seed * 1000 + attempt)
        qkv = torch.randn(b, n, 3 * heads * d, generator=g).to(dtype)
        keys = qkv[..., heads * d:2 * heads * d]
        sim = similarity64(ref.head_mean(keys, heads), c)
        top2 = sim.topk(min(2, sim.shape[-1]), dim=-1).values
        ranked = top2[..., 0].sort(dim=-1).values
        if (top2[..., 0] - top2[..., -1]).min() > TIE_GAP and ranked.diff(dim=-1).min() > TIE_GAP:
            return qkv.to(device)[..., heads * d:2 * heads * d]
    raise AssertionError(f"no tie-free keys found for {(b, n, c, heads, d)}")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("b, n, c, heads, d", [(3, 50, 1, 12, 16), (2, 41, 2, 4, 8), (1, 97, 12, 6, 16),
                                               (2, 33, 1, 5, 24), (2, 29, 0, 3, 80), (2, 29, 1, 16, 8)], ids=str)
def test_match_averaging_heads(b, n, c, heads, d, dtype, tiling, device, monkeypatch):
    """The match of the keys averaged over heads, taken as the kernel reads them (``heads=``), equals the
    reference's match of ``head_mean``: index for index, every A tile kept (``d`` in one channel chunk) or
    chunked, whole or partial steps of heads."""
    if tiling == "gpu-tiles" and dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("the GPU's bf16 tl.dot path: the interpreter's bf16 tl.dot is broken (triton 3.8)")
    keys = tie_free_keys(b, n, c, heads, d, dtype, device)
    r = ref.max_r(n, c) // 2
    mean = ref.head_mean(keys.cpu(), heads)
    assert torch.equal(mean, keys.cpu().unflatten(-1, (heads, d)).mean(dim=2))
    plan = ops.match(keys, r, c, backend="triton", heads=heads)
    expected = ref.match(mean.double(), r, c)
    for name in ("merged", "dst", "kept"):
        assert torch.equal(getattr(plan, name).cpu(), getattr(expected, name)), name
    _check_grouping(plan, expected)
    scores, dst = ops.best_match(keys, c, backend="triton", heads=heads)
    ref_scores, ref_dst = ref.best_match(mean.double(), c)
    assert torch.equal(dst.cpu(), ref_dst)
    assert (scores.double().cpu() - ref_scores).abs().max().item() <= SCORE_TOL[dtype]
    # The torch backend takes the same mean, and so does the Triton path that averages before matching.
    assert torch.equal(ops.match(keys, r, c, backend="torch", heads=heads).merged, ref.match(mean, r, c).merged)
    monkeypatch.setattr(triton_ops, "HEADS_IN_MATCH", False)
    assert torch.equal(ops.match(keys, r, c, backend="triton", heads=heads).merged.cpu(), expected.merged)


@pytest.mark.parametrize("loads", [1, 2, 4, 5])
def test_match_averaging_heads_in_steps(loads, device, monkeypatch):
    """Ten heads loaded ``HEAD_LOADS`` at a time at most (steps of 1, 2, 2 and 5 heads): the same plan."""
    monkeypatch.setattr(triton_ops, "HEAD_LOADS", loads)
    keys = tie_free_keys(2, 45, 1, 10, 8, torch.float32, device, seed=loads)
    expected = ref.match(ref.head_mean(keys.cpu(), 10).double(), 11, 1)
    plan = ops.match(keys, 11, 1, backend="triton", heads=10)
    for name in ("merged", "dst", "kept"):
        assert torch.equal(getattr(plan, name).cpu(), getattr(expected, name)), name


@pytest.mark.parametrize("na, r, levels", [(1, 0, 3), (1, 1, 3), (17, 8, 3), (98, 49, 5), (98, 97, 2), (300, 150, 7)],
                         ids=lambda v: str(v))
def test_match_plan_ties(na, r, levels, device):
    """Scores drawn from a few levels: most comparisons tie, lower A index must come first."""
    g = torch.Generator().manual_seed(na + r)
    scores = (torch.randint(0, levels, (3, na), generator=g) / levels).float()
    dst = torch.randint(0, 1000, (3, na), generator=g)
    merged, merged_dst, kept = triton_ops.match_plan_forward(scores.to(device), dst.to(device), r)
    for got, want in zip((merged, merged_dst, kept), plan_from_scores(scores, dst, r)):
        assert torch.equal(got.cpu(), want)


def test_each_thread_has_its_own_match_scratch():
    """Two threads serving one GPU, each on its own stream, may launch matches at once: a shared scratch would mix
    their counters and partials (tests/test_triton_cuda.py runs two such threads on a GPU)."""
    import threading

    cpu = torch.device("cpu")
    mine, _ = triton_ops._match_scratch(cpu, 8, (4, 2), torch.float32)
    assert triton_ops._match_scratch(cpu, 8, (4, 2), torch.float32)[0] is mine  # the same thread: reused
    theirs = []
    worker = threading.Thread(target=lambda: theirs.append(triton_ops._match_scratch(cpu, 8, (4, 2), torch.float32)))
    worker.start()
    worker.join()
    assert theirs[0][0].data_ptr() != mine.data_ptr()
    assert triton_ops.scratch_buffers()[cpu][0].data_ptr() == mine.data_ptr()


@pytest.mark.parametrize("plan", ["sorted", "counted"])
@pytest.mark.parametrize("na, r", [(5, 2), (20, 0), (20, 20), (64, 30), (130, 129), (257, 100)],
                         ids=lambda v: str(v))
def test_match_plan_signs_zeros_and_extremes(na, r, plan, device, monkeypatch):
    """The sorted plan's int64 keys order negative scores, -0.0 against 0.0 (equal, so lower index
    first), subnormals and the largest floats as the reference's float sort does; the counted plan
    (float64 scores, long rows) agrees on the same rows."""
    if plan == "counted":
        monkeypatch.setattr(triton_ops, "PLAN_SORT_LIMIT", 0)
        monkeypatch.setattr(triton_ops, "INTERPRETER_BLOCK", 16)
    else:
        monkeypatch.setattr(triton_ops, "PLAN_SORT_MIN", 1)
    assert (triton_ops._plan_sort_block(na, torch.float32) > 0) == (plan == "sorted")
    g = torch.Generator().manual_seed(na * 7 + r)
    tiny = torch.finfo(torch.float32).tiny
    big = torch.finfo(torch.float32).max
    levels = torch.tensor([-big, -1.5, -1.0, -tiny / 4, -0.0, 0.0, tiny / 4, tiny, 0.25, 1.0, big])
    scores = levels[torch.randint(0, len(levels), (3, na), generator=g)]
    dst = torch.randint(0, 500, (3, na), generator=g)
    merged, merged_dst, kept = triton_ops.match_plan_forward(scores.to(device), dst.to(device), r)
    for got, want in zip((merged, merged_dst, kept), plan_from_scores(scores, dst, r)):
        assert torch.equal(got.cpu(), want)


def test_match_sorted_plan_orders_negative_best_scores(device, monkeypatch):
    """The match's own sorted plan, whose int64 keys carry each A token's best B token in their low bits, on
    rows where half the A tokens point away from every B token: their best scores are negative (the keys'
    high bits negative), and they rank below the others as the reference's sort puts them, with their B tokens."""
    monkeypatch.setattr(triton_ops, "PLAN_SORT_MIN", 1)
    na = 37
    for attempt in range(200):
        g = torch.Generator().manual_seed(attempt)
        metric = torch.randn(2, 75, 24, generator=g)
        metric[:, 2:, 0] += 8.0  # every unprotected token leans along the first axis ...
        metric[:, 2::4, 0] -= 16.0  # ... but every other A token (positions 2, 6, ...) the other way
        sim = similarity64(metric, 2)
        best = sim.max(dim=-1).values
        top2 = sim.topk(2, dim=-1).values
        if (top2[..., 0] - top2[..., 1]).min() > TIE_GAP and best.sort(dim=-1).values.diff(dim=-1).min() > TIE_GAP:
            break
    assert best.shape[-1] == na and min((best < 0).sum(), (best > 0).sum()) >= best.numel() // 3
    plan = triton_ops.match(metric.to(device), 30, 2)
    expected = ref.match(metric.double(), 30, 2)
    for name in ("merged", "dst", "kept"):
        assert torch.equal(getattr(plan, name).cpu(), getattr(expected, name)), name
    _check_grouping(plan, expected)


@pytest.mark.parametrize("grouping", ["sorted", "sorted-int64", "counted"])
@pytest.mark.parametrize("path", ["sorted", "counted"])
def test_match_plan_paths_equal_reference(path, grouping, device, monkeypatch):
    """The match kernel's plan in its last program per clip, by either path: sorted (forced here
    on a short row) and counted (float64 metrics, short and long rows), walked in 16-wide steps;
    then its grouping by destination, sorted (with int32 keys, and with the int64 keys of rows whose
    key fields do not fit 31 bits: forced here by wider sort and histogram widths) or (rows too wide
    to sort) counted in 16 x 16 tiles."""
    if path == "counted":
        monkeypatch.setattr(triton_ops, "PLAN_SORT_LIMIT", 0)
    else:
        monkeypatch.setattr(triton_ops, "PLAN_SORT_MIN", 1)
    if grouping == "counted":
        monkeypatch.setattr(triton_ops, "GROUP_SORT_LIMIT", 0)
    monkeypatch.setattr(triton_ops, "INTERPRETER_BLOCK", 16)
    assert (triton_ops._grouping_widths(30, 37, 36)["GROUP_BLOCK"] > 0) == grouping.startswith("sorted")
    if grouping == "sorted-int64":  # 2048 * 512 * 2048 = 2^31 keys: int64
        monkeypatch.setattr(triton_ops, "_grouping_widths", lambda r, na, nb: {"GROUP_BLOCK": 512, "GROUP_BINS": 2048})
    _check_plan(tie_free_metric(2, 75, 2, 24, torch.float32, "contiguous", device, seed=5), 30, 2)


def _check_plan(metric, r, protected):
    """The Triton match's plan and grouping on a tie-free ``metric`` equal the float64 reference's; the plan."""
    plan = triton_ops.match(metric, r, protected)
    expected = ref.match(metric.cpu().double(), r, protected)
    for name in ("merged", "dst", "kept"):
        assert torch.equal(getattr(plan, name).cpu(), getattr(expected, name)), name
    _check_grouping(plan, expected)
    return plan


@pytest.mark.parametrize("grouping", ["sorted", "counted"])
def test_match_grouping_of_a_hub(grouping, device, monkeypatch):
    """Every A token's best match is B token 0 (one destination takes all r sources, in rank
    order) and the other B tokens take none: the grouping's longest run and its empty runs."""
    if grouping == "counted":
        monkeypatch.setattr(triton_ops, "GROUP_SORT_LIMIT", 0)
        monkeypatch.setattr(triton_ops, "INTERPRETER_BLOCK", 16)
    n, c, d = 41, 1, 24
    metric = torch.zeros(2, n, d)
    metric[:, 0, 1] = 1.0  # the class token
    a_pos, b_pos = ref.split_positions(n, c)
    metric[:, a_pos, 0] = 1.0
    metric[:, a_pos, 2] = torch.arange(len(a_pos)) * 0.01 + torch.arange(2)[:, None] * 0.003  # distinct scores
    metric[:, b_pos[0], 0] = 1.0
    metric[:, b_pos[1:], 0] = -1.0
    metric[:, b_pos[1:], 3 + torch.arange(len(b_pos) - 1) % (d - 3)] = 1.0
    metric = metric.to(device)
    plan = triton_ops.match(metric, 17, c)
    expected = ref.match(metric.cpu().double(), 17, c)
    assert torch.equal(expected.dst, torch.zeros_like(expected.dst))
    for name in ("merged", "dst", "kept"):
        assert torch.equal(getattr(plan, name).cpu(), getattr(expected, name)), name
    _check_grouping(plan, expected)


# ---------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------

def _merge_cases():
    cases = []
    size_kinds = itertools.cycle(("BN1-fp32", "BN-fp32", "BN1-xdtype"))
    for param in _cases():
        b, n, c, d, dtype, layout = param.values
        for r in sorted({1, ref.max_r(n, c)}):
            kind = next(size_kinds)
            cases.append(pytest.param(b, n, c, d, dtype, layout, r, kind, id=f"{param.id}-r{r}-size{kind}"))
    return cases


def _sizes(b, n, kind, dtype, device, generator):
    size = torch.randint(1, 5, (b, n, 1), generator=generator).to(torch.float32)
    if kind.endswith("xdtype"):
        size = size.to(dtype)
    if kind.startswith("BN-"):
        size = size[..., 0]
    return size.to(device)


def _check_merge(x, size, plan, dtype, generator):
    """Forward values, sizes and the gradient for a random upstream gradient, against float64."""
    x = x.detach().requires_grad_()
    out, size_out = ops.merge(x, size, plan, backend="triton")
    x64 = x.detach().cpu().double().requires_grad_()
    plan64 = ref.MergePlan(*(t.cpu() for t in plan[:3]), plan.tokens, plan.protected)
    ref_out, ref_size = ref.merge(x64, size.cpu().double(), plan64)
    assert out.dtype == x.dtype and out.shape == ref_out.shape
    assert size_out.dtype == size.dtype and size_out.shape == ref_size.shape
    assert_close(out, ref_out, x.dtype, "merged x")
    assert_close(size_out, ref_size, size.dtype, "merged size")
    grad = torch.randn(out.shape, generator=generator).to(x.dtype)
    out.backward(grad.to(out.device))
    ref_out.backward(grad.double())
    assert_close(x.grad, x64.grad, x.dtype, "grad x")


@pytest.mark.parametrize("b, n, c, d, dtype, layout, r, size_kind", _merge_cases())
def test_merge(b, n, c, d, dtype, layout, r, size_kind, device):
    g = torch.Generator().manual_seed(n * 100 + r)
    x = make_tokens(b, n, d, dtype, layout, device, g)
    size = _sizes(b, n, size_kind, dtype, device, g)
    _check_merge(x, size, random_plan(b, n, c, r, device, g), dtype, g)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_merge_hub(dtype, device):
    """Many A tokens into the same two B tokens: each B token sums a long list of sources."""
    g = torch.Generator().manual_seed(7)
    x = make_tokens(2, 197, 64, dtype, "contiguous", device, g)
    size = _sizes(2, 197, "BN1-fp32", dtype, device, g)
    _check_merge(x, size, random_plan(2, 197, 1, 98, device, g, hub=True), dtype, g)


def test_clips_and_tokens_past_a_grid_axis(device, monkeypatch):
    """With 2 programs allowed along a grid's second and third axes (a GPU allows 65535): the match spreads 5 clips
    over both (2 x 3, the sixth program returning at once) and the merge takes token tiles wide enough for 2 of
    them an axis; plans, grouping, merged tokens and gradients as the reference's."""
    monkeypatch.setattr(triton_ops, "GRID_AXIS_LIMIT", 2)
    monkeypatch.setattr(triton_ops, "INTERPRETER_BLOCK", 8)
    plan = _check_plan(tie_free_metric(5, 41, 1, 16, torch.float32, "contiguous", device, seed=9), 12, 1)
    assert triton_ops._axis_tiles({"BLOCK_T": 8}, 41 - 12) == {"BLOCK_T": 16}
    g = torch.Generator().manual_seed(9)
    x = make_tokens(5, 41, 16, torch.float16, "contiguous", device, g)
    _check_merge(x, _sizes(5, 41, "BN1-fp32", torch.float16, device, g), plan, torch.float16, g)


def test_merge_r0_reorders(device):
    """r = 0 (which ops.merge short-circuits) still gives the reference's token order."""
    g = torch.Generator().manual_seed(3)
    x = make_tokens(3, 10, 8, torch.float32, "sliced", device, g)
    size = _sizes(3, 10, "BN-fp32", torch.float32, device, g)
    plan = random_plan(3, 10, 2, 0, device, g)
    out, size_out = triton_ops.merge(x, size, plan)
    ref_out, ref_size = ref.merge(x.cpu().double(), size.cpu(), ref.MergePlan(*(t.cpu() for t in plan[:3]), 10, 2))
    # Nothing merges, so every token is copied bit for bit (the reference's (x * s) / s may round).
    assert torch.equal(out.cpu(), ref_out.float()) and torch.equal(size_out.cpu(), ref_size)


def test_merge_gradcheck(device):
    # Small: every gradcheck evaluation is a kernel launch in the interpreter.
    g = torch.Generator().manual_seed(5)
    n, c = 8, 1
    x = torch.randn(2, n, 2, generator=g, dtype=torch.float64).to(device).requires_grad_()
    size = torch.randint(1, 4, (2, n), generator=g).double().to(device)
    plan = random_plan(2, n, c, 3, device, g, hub=True)
    assert torch.autograd.gradcheck(lambda t: triton_ops.merge(t, size, plan)[0], (x,))


# ---------------------------------------------------------------------------------------------
# join_merge: the ClipMe join fused into the cross-clip merge
# ---------------------------------------------------------------------------------------------

def _join_cases():
    cases = []
    shapes = [(4, 2, 10, 1, 8), (6, 3, 17, 1, 16), (4, 2, 25, 2, 24), (3, 3, 9, 0, 8)]  # (F, g, N, c, D)
    layouts = itertools.cycle(("contiguous", "transposed", "sliced"))
    for (f, grp, n, c, d), (name, dtype) in itertools.product(shapes, DTYPES.items()):
        layout = next(layouts)
        for r in sorted({0, 1, ref.max_r(n * grp, c * grp)}):
            cases.append(pytest.param(f, grp, n, c, d, dtype, layout, r,
                                      id=f"B2-F{f}-g{grp}-N{n}-c{c}-D{d}-{name}-{layout}-r{r}"))
    return cases


def _reference_join_merge(x, size, group, protected, r, frame_pos):
    """The unfused composition ``join_merge`` replaces, in float64."""
    joined = ref.join_clips(x, group, protected, frame_pos)
    metric = ref.join_clips(x.detach(), group, protected)
    plan = ref.match(metric, r, protected * group)
    return ref.merge(joined, ref.join_clips(size, group, protected), plan)


@pytest.mark.parametrize("f, group, n, c, d, dtype, layout, r", _join_cases())
def test_join_merge(f, group, n, c, d, dtype, layout, r, device):
    x = tie_free_metric(2 * f, n, c, d, dtype, layout, device, seed=r, group=group).requires_grad_()
    g = torch.Generator().manual_seed(f * n + r)
    size = _sizes(2 * f, n, "BN1-fp32", dtype, device, g)
    frame_pos = (0.1 * torch.randn(1, f, 1, d, generator=g)).to(dtype).to(device).requires_grad_()
    out, size_out, plan = triton_ops.join_merge(x, size, group, c, r, frame_pos)
    _check_grouping(plan, ref.match(ref.join_clips(x.detach().cpu().double(), group, c), r, c * group))
    x64 = x.detach().cpu().double().requires_grad_()
    pos64 = frame_pos.detach().cpu().double().requires_grad_()
    ref_out, ref_size = _reference_join_merge(x64, size.cpu().double(), group, c, r, pos64)
    assert out.shape == ref_out.shape and out.dtype == dtype
    assert_close(out, ref_out, dtype, "merged x")
    assert_close(size_out, ref_size, torch.float32, "merged size")
    grad = torch.randn(out.shape, generator=g).to(dtype)
    gx, gpos = torch.autograd.grad(out, (x, frame_pos), grad.to(device))
    ref_gx, ref_gpos = torch.autograd.grad(ref_out, (x64, pos64), grad.double())
    assert_close(gx, ref_gx, dtype, "grad x")
    # E[k]'s gradient sums the 2 * n gradients of its tokens, each rounded once: a random walk.
    atol, rtol = VALUE_TOL[dtype]
    torch.testing.assert_close(gpos.cpu().double(), ref_gpos, atol=4 * atol * (2 * n) ** 0.5, rtol=rtol)


def test_join_merge_without_pos(device):
    x = tie_free_metric(4, 12, 1, 8, torch.float32, "contiguous", device, group=2)
    size = torch.ones(4, 12, device=device)
    out, size_out, _ = triton_ops.join_merge(x, size, 2, 1, 7)
    ref_out, ref_size = _reference_join_merge(x.cpu().double(), size.cpu().double(), 2, 1, 7, None)
    assert_close(out, ref_out, torch.float32, "merged x")
    assert_close(size_out, ref_size, torch.float32, "merged size")


@pytest.mark.parametrize("kwargs, message", [
    (dict(group=3), "groups of 3"),
    (dict(r=12), "r=12"),
    (dict(frame_pos=torch.zeros(1, 3, 1, 8)), "frame_pos"),
    (dict(size=torch.ones(4, 11)), "size"),
], ids=["group", "r", "frame_pos", "size"])
def test_join_merge_errors(kwargs, message):
    """Bad arguments are refused at the op boundary, before the Triton path is reached."""
    args = dict(x=torch.zeros(4, 12, 8), size=torch.ones(4, 12), group=2, protected=1, r=11,
                frame_pos=torch.zeros(1, 2, 1, 8)) | kwargs
    with pytest.raises(ValueError, match=message):
        ops.join_merge(**args, backend="triton")


def test_join_merge_gradcheck(device):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 4, 2, generator=g, dtype=torch.float64).to(device).requires_grad_()
    frame_pos = torch.randn(1, 2, 1, 2, generator=g, dtype=torch.float64).to(device).requires_grad_()
    size = torch.randint(1, 4, (4, 4, 1), generator=g).double().to(device)
    # The plan is fixed (matching is not differentiable, and the perturbed x must not re-plan).
    merged, dst, kept, src, offsets = triton_ops.match_forward(x.detach(), 3, 1, 2)
    assert torch.autograd.gradcheck(
        lambda t, p: triton_ops.MergeFunction.apply(t, size, merged, dst, kept, 1, 2, p, src, offsets)[0],
        (x, frame_pos))


# ---------------------------------------------------------------------------------------------
# Several tiles per clip (the GPU's tiling, walked in the interpreter)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, c, d, r", [(131, 1, 40, 65), (50, 12, 150, 19), (67, 2, 24, 1), (307, 1, 16, 40)],
                         ids=lambda v: str(v))
def test_multi_tile(n, c, d, r, tiling, device):
    metric = tie_free_metric(2, n, c, d, torch.float16, "transposed", device, seed=11)
    scores, dst = triton_ops.best_match(metric, c)
    ref_scores, ref_dst = ref.best_match(metric.cpu().double(), c)
    assert torch.equal(dst.cpu(), ref_dst)
    assert (scores.double().cpu() - ref_scores).abs().max() <= SCORE_TOL[torch.float16]
    plan = triton_ops.match(metric, r, c)
    expected = ref.match(metric.cpu().double(), r, c)
    for name in ("merged", "dst", "kept"):
        assert torch.equal(getattr(plan, name).cpu(), getattr(expected, name)), name
    g = torch.Generator().manual_seed(2)
    x = make_tokens(2, n, d, torch.bfloat16, "sliced", device, g)
    _check_merge(x, _sizes(2, n, "BN1-fp32", torch.bfloat16, device, g), random_plan(2, n, c, r, device, g, hub=True),
                 torch.bfloat16, g)


def test_float32_match_products_on_a_gpu(monkeypatch):
    """A float32 metric's match takes tf32x3 products on a GPU (DOT_MODE 3), float32 FMA products with
    FP32_PRODUCTS="ieee" (1), at the same tiles; 16-bit metrics keep their own products; a bad setting
    is named. Over one chunk of at most 64 channels (keys averaged over heads), tf32x3 takes 64 x 64 x 64
    tiles at 8 warps."""
    monkeypatch.setattr(triton_ops, "_interpreting", lambda: False)
    tiles = triton_ops._match_tiles(32, 433, 433, 768, torch.float32)
    assert tiles["DOT_MODE"] == 3 and (tiles["BLOCK_A"], tiles["BLOCK_B"], tiles["BLOCK_C"]) == (64, 32, 16)
    assert tiles["num_warps"] == 4
    one_chunk = triton_ops._match_tiles(32, 433, 433, 64, torch.float32)
    assert (one_chunk["BLOCK_A"], one_chunk["BLOCK_B"], one_chunk["BLOCK_C"], one_chunk["num_warps"]) == (64, 64, 64, 8)
    assert triton_ops._match_tiles(32, 433, 433, 768, torch.float16)["DOT_MODE"] == 0
    monkeypatch.setattr(triton_ops, "FP32_PRODUCTS", "ieee")
    assert triton_ops._match_tiles(32, 433, 433, 768, torch.float32) == dict(tiles, DOT_MODE=1)
    assert triton_ops._match_tiles(32, 433, 433, 64, torch.float32)["BLOCK_C"] == 16  # FMA products: 16 wide
    monkeypatch.setattr(triton_ops, "FP32_PRODUCTS", "tf32")
    with pytest.raises(ValueError, match="FP32_PRODUCTS='tf32'"):
        triton_ops._match_tiles(32, 433, 433, 768, torch.float32)


def test_16bit_match_over_hidden_channels_takes_128_wide_chunks_on_a_gpu(monkeypatch):
    """A 16-bit match over a join's hidden channels walks them 128 at a time on a GPU (half the chunks of its
    64 x 64 tiles, in turn in each program); over the 64 channels of keys averaged over heads, or a head dim
    up to 255, it keeps one 64-wide chunk's tiles, and the interpreter and float32 keep theirs."""
    for dtype in (torch.float16, torch.bfloat16):
        monkeypatch.setattr(triton_ops, "_interpreting", lambda: False)
        join = triton_ops._match_tiles(32, 433, 433, 768, dtype)
        assert (join["BLOCK_A"], join["BLOCK_B"], join["BLOCK_C"], join["num_warps"], join["DOT_MODE"]) == \
            (64, 64, 128, 8, 0)
        assert triton_ops._match_tiles(1, 84, 84, 1024, dtype)["BLOCK_C"] == 128
        for channels in (64, 80, 255):
            assert triton_ops._match_tiles(32, 433, 433, channels, dtype)["BLOCK_C"] == 64, channels
        assert triton_ops._match_tiles(32, 433, 433, 768, torch.float32)["BLOCK_C"] == 16
        monkeypatch.setattr(triton_ops, "_interpreting", lambda: True)
        assert triton_ops._match_tiles(32, 433, 433, 768, dtype)["BLOCK_C"] == 64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_merge_wide_feature_slices(dtype, device, monkeypatch):
    """With programs to spare, the forward's GPU tiling doubles its feature slice to 256 for 16-bit
    features, in 8-token tiles (not for fp32, whose 128-wide slice spills on sm_80): here forced by a GPU
    that 1 program fills, on clips of 10 token tiles whose merged tokens all go to two B tokens."""
    monkeypatch.setattr(triton_ops, "_interpreting", lambda: False)
    monkeypatch.setattr(triton_ops, "GPU_FILL", 1)
    assert triton_ops._merge_fwd_tiles(2, 80, 256, dtype.itemsize) == dict(BLOCK_T=8, BLOCK_D=256, num_warps=4)
    assert triton_ops._merge_fwd_tiles(2, 80, 256, 4)["BLOCK_D"] == 64
    # With the LayerNorm: one token a program at 2 warps, but 4-token tiles at 8 warps for a join's.
    assert triton_ops._merge_norm_tiles(2, 80, 768, dtype.itemsize, False) == dict(BLOCK_T=1, BLOCK_D=1024,
                                                                                   num_warps=2)
    assert triton_ops._merge_norm_tiles(2, 80, 768, dtype.itemsize, True) == dict(BLOCK_T=4, BLOCK_D=1024,
                                                                                  num_warps=8)
    g = torch.Generator().manual_seed(21)
    x = make_tokens(2, 101, 256, dtype, "contiguous", device, g)
    _check_merge(x, _sizes(2, 101, "BN1-fp32", dtype, device, g), random_plan(2, 101, 1, 21, device, g, hub=True),
                 dtype, g)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", ["hub", "spread", "join"])
def test_merge_gathered_by_product(kind, dtype, device, monkeypatch):
    """The merge forward with each tile's sources gathered SRC_BLOCK at a time and summed by a product (a
    candidate of the GPU suite's tile sweeps, ``merge:BTxBDxW-gN``): merged tokens all sent to 2 B tokens
    (many chunks of 16 in one tile) or spread over all of them, against the float64 reference; and a ClipMe
    join (sources read through the join, the position embedding and a residual added), against the
    library's gather, which the join tests hold to the reference."""
    library = triton_ops._merge_fwd_tiles

    def by_product(*args):
        return dict(library(*args), BLOCK_T=16, BLOCK_D=32, SRC_BLOCK=16)
    g = torch.Generator().manual_seed(31)
    if kind != "join":
        x = make_tokens(3, 75, 40, dtype, "sliced", device, g)
        monkeypatch.setattr(triton_ops, "_merge_fwd_tiles", by_product)
        _check_merge(x, _sizes(3, 75, "BN1-fp32", dtype, device, g),
                     random_plan(3, 75, 2, 30, device, g, hub=kind == "hub"), dtype, g)
        return
    f, group, n, c, d, r = 4, 2, 25, 1, 40, 20
    x = make_tokens(2 * f, n, d, dtype, "contiguous", device, g)
    residual = make_tokens(2 * f, n, d, dtype, "transposed", device, g)
    size = _sizes(2 * f, n, "BN-fp32", dtype, device, g)
    frame_pos = (0.1 * torch.randn(1, f, 1, d, generator=g)).to(dtype).to(device)
    plan = random_plan(2 * f // group, n * group, c * group, r, device, g, hub=True)

    def merge():
        return triton_ops.merge_forward(x, size, plan.merged, plan.dst, plan.kept, c, group, frame_pos,
                                        residual=residual)[:2]
    want_x, want_size = merge()
    monkeypatch.setattr(triton_ops, "_merge_fwd_tiles", by_product)
    got_x, got_size = merge()
    assert_close(got_x, want_x.double(), dtype, "merged x")
    assert torch.equal(got_size, want_size)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", ["hub", "spread", "join"])
def test_merge_copies_first(kind, dtype, device, monkeypatch):
    """The merge forward that copies a tile's tokens with no sources first and merges the rest ``SPLIT_T`` at
    a time (candidates of the GPU suite's tile sweeps, ``merge:BTxBDxW-pN`` and ``norm:BTxW-pN``) writes the
    whole-tile path's bits, alone and with the LayerNorm after it (its statistics too): merged tokens all
    sent to 2 B tokens or spread over all of them, with a feature slice narrower than the features (the
    plain merge against the float64 reference as well); and a ClipMe join (the position embedding and a
    residual added, sources read through the join), with and without the B tokens' own sizes."""
    merge_tiles, norm_tiles = triton_ops._merge_fwd_tiles, triton_ops._merge_norm_tiles

    def tiles(split):
        extra = dict(SPLIT_T=split) if split else {}
        monkeypatch.setattr(triton_ops, "_merge_fwd_tiles",
                            lambda *args: dict(merge_tiles(*args), BLOCK_T=16, BLOCK_D=32, **extra))
        monkeypatch.setattr(triton_ops, "_merge_norm_tiles", lambda *args: dict(norm_tiles(*args), BLOCK_T=8,
                                                                                **extra))
    g = torch.Generator().manual_seed(33)
    d = 40
    norm = (torch.randn(d, generator=g).to(dtype).to(device), torch.randn(d, generator=g).to(dtype).to(device), 1e-5)
    if kind != "join":
        x = make_tokens(3, 75, d, dtype, "sliced", device, g)
        residual = make_tokens(3, 75, d, dtype, "transposed", device, g)
        size = _sizes(3, 75, "BN1-fp32", dtype, device, g)
        plan = random_plan(3, 75, 2, 30, device, g, hub=kind == "hub")

        def merges():
            return (*ops.merge(x, size, plan, backend="triton"),
                    *ops.merge_norm(x, size, plan, *norm, residual=residual, backend="triton"))
        tiles(0)
        want = merges()
        tiles(4)
        _check_merge(x, size, plan, dtype, g)
        for got, expected in zip(merges(), want):
            assert torch.equal(got, expected)
        return
    f, group, n, c, r = 4, 2, 25, 1, 20
    x = make_tokens(2 * f, n, d, dtype, "contiguous", device, g)
    residual = make_tokens(2 * f, n, d, dtype, "transposed", device, g)
    frame_pos = (0.1 * torch.randn(1, f, 1, d, generator=g)).to(dtype).to(device)
    plan = random_plan(2 * f // group, n * group, c * group, r, device, g, hub=True)
    for size_dtype in (torch.float32, torch.float16):  # float16 sizes: the B tokens' sizes written apart
        size = _sizes(2 * f, n, "BN-fp32", dtype, device, g).to(size_dtype)

        def merges():
            alone = triton_ops.merge_forward(x, size, plan.merged, plan.dst, plan.kept, c, group, frame_pos,
                                             residual=residual)
            normed = triton_ops.merge_forward(x, size, plan.merged, plan.dst, plan.kept, c, group, frame_pos,
                                              norm=norm, residual=residual, stats=True)
            return [t for t in (*alone, *normed) if t is not None]  # b_size: None for float32 sizes
        tiles(0)
        want = merges()
        tiles(2)
        got = merges()
        assert len(got) == len(want) == (8 if size_dtype == torch.float16 else 6)
        for got_t, expected in zip(got, want):
            assert torch.equal(got_t, expected)


@pytest.mark.parametrize("kind,dtype", [(kind, dtype) for kind in ("hub", "join") for dtype in DTYPES.values()]
                         + [("spread", torch.float32)], ids=lambda v: str(v).replace("torch.", ""))
def test_merge_gathers_chunks_of_sources(kind, dtype, device, monkeypatch):
    """The merge forward that gathers each token's sources ``SRC_CHUNK`` (2, 4 or 8) a step, and with one token a
    program gathers them as scalars, each step's indices loaded during the step before (the library's tiles where
    B tokens gather many sources, and the sweeps' ``-cN`` candidates; with the tokens without sources copied
    first, ``-p1-c4``), writes the bits of the gather one source at a time over a tile of tokens: merged tokens,
    sizes, the LayerNorm after the merge and its statistics. Merged tokens sent to a few B tokens (8 or 12
    sources: whole steps; 7, 5, 3: steps with a remainder) or spread over all of them; a ClipMe join (the position
    embedding and a residual added, sources read through the join), with float16 sizes for float32 tokens
    (the B tokens' sizes written apart)."""
    merge_tiles, norm_tiles = triton_ops._merge_fwd_tiles, triton_ops._merge_norm_tiles

    def tiles(block_t, chunk, split=0):
        extra = dict(SPLIT_T=split) if split else {}
        monkeypatch.setattr(triton_ops, "_merge_fwd_tiles", lambda *args: dict(
            merge_tiles(*args[:4]), BLOCK_T=block_t, BLOCK_D=32, SRC_CHUNK=chunk, **extra))
        monkeypatch.setattr(triton_ops, "_merge_norm_tiles", lambda *args: dict(
            norm_tiles(*args[:5]), BLOCK_T=block_t, SRC_CHUNK=chunk, **extra))
    g = torch.Generator().manual_seed(35)
    d = 40
    norm = (torch.randn(d, generator=g).to(dtype).to(device), torch.randn(d, generator=g).to(dtype).to(device), 1e-5)
    # (tokens, sources a step, SPLIT_T): the last copies its 8 tokens first, then gathers each B token's alone
    candidates = ((1, 1), (1, 2), (1, 4), (1, 8), (4, 2), (4, 8), (8, 4, 1), (8, 8, 1))
    if kind != "join":
        x = make_tokens(2, 51, d, dtype, "sliced", device, g)
        residual = make_tokens(2, 51, d, dtype, "transposed", device, g)
        size = _sizes(2, 51, "BN1-fp32", dtype, device, g)
        plan = _plan_with_counts(((8, 7, 5), (12,) + (1,) * 8), 51, 2, device, g) if kind == "hub" else \
            random_plan(2, 51, 2, 20, device, g)

        def merges():
            return (*ops.merge(x, size, plan, backend="triton"),
                    *ops.merge_norm(x, size, plan, *norm, residual=residual, backend="triton"))
        tiles(8, 1)
        want = merges()
        for candidate in candidates:
            tiles(*candidate)
            for got, expected in zip(merges(), want):
                assert torch.equal(got, expected), candidate
        _check_merge(x, size, plan, dtype, g)
        return
    f, group, n, c = 4, 2, 15, 1
    x = make_tokens(f, n, d, dtype, "contiguous", device, g)
    residual = make_tokens(f, n, d, dtype, "transposed", device, g)
    frame_pos = (0.1 * torch.randn(1, f, 1, d, generator=g)).to(dtype).to(device)
    plan = _plan_with_counts(((8, 3, 1), (4, 4, 2, 2)), n * group, c * group, device, g)
    size = _sizes(f, n, "BN-fp32", dtype, device, g).to(torch.float16 if dtype == torch.float32 else torch.float32)

    def merges():
        alone = triton_ops.merge_forward(x, size, plan.merged, plan.dst, plan.kept, c, group, frame_pos,
                                         residual=residual)
        normed = triton_ops.merge_forward(x, size, plan.merged, plan.dst, plan.kept, c, group, frame_pos,
                                          norm=norm, residual=residual, stats=True)
        return [t for t in (*alone, *normed) if t is not None]
    tiles(8, 1)
    want = merges()
    assert len(want) == (8 if size.dtype == torch.float16 else 6)
    for candidate in candidates:
        tiles(*candidate)
        got = merges()
        for got_t, expected in zip(got, want):
            assert torch.equal(got_t, expected), candidate


def test_merge_tiles_gather_many_sources(monkeypatch):
    """On a GPU a merge whose B tokens gather many sources (every merge of the schedules but the image merges
    of their first layers) takes one token a program over every feature, 128 bits a thread (256 for a 16-bit
    merge after attention, at the 2 warps of its other tiles), its sources gathered 4 a step (2 for 32-bit
    features); the others keep their tiles, and so do float64 merges."""
    monkeypatch.setattr(triton_ops, "_interpreting", lambda: False)
    assert not triton_ops._many_sources(2, 98) and not triton_ops._many_sources(2, 24)  # ViT-B/16, B/32 layer 0
    assert triton_ops._many_sources(25, 127) and triton_ops._many_sources(4, 24)  # their intra merges at layer 8
    gather = dict(BLOCK_T=1, BLOCK_D=1024, SRC_CHUNK=4)
    assert triton_ops._merge_fwd_tiles(32, 867, 768, 2, True) == dict(gather, num_warps=4)
    assert triton_ops._merge_norm_tiles(32, 607, 768, 2, False, True) == dict(gather, num_warps=2)
    assert triton_ops._merge_norm_tiles(32, 607, 768, 2, True, True) == dict(gather, num_warps=4)
    assert triton_ops._merge_norm_tiles(32, 607, 1024, 2, True, True) == dict(gather, num_warps=4)  # ViT-L/14
    for pos in (False, True):
        assert triton_ops._merge_norm_tiles(32, 607, 768, 4, pos, True) == dict(gather, num_warps=8, SRC_CHUNK=2)
        assert "SRC_CHUNK" not in triton_ops._merge_norm_tiles(32, 195, 768, 4, pos, False)
    assert triton_ops._merge_fwd_tiles(32, 867, 768, 4, True) == dict(gather, num_warps=8, SRC_CHUNK=2)
    assert "SRC_CHUNK" not in triton_ops._merge_fwd_tiles(32, 195, 768, 2, False)
    assert "SRC_CHUNK" not in triton_ops._merge_fwd_tiles(32, 195, 768, 4, False)
    assert triton_ops._merge_norm_tiles(32, 195, 768, 2, False, False) == dict(BLOCK_T=1, BLOCK_D=1024,
                                                                               num_warps=2)
    for pos in (False, True):  # float64 (checks, not speed) keeps its tiles
        assert "SRC_CHUNK" not in triton_ops._merge_norm_tiles(32, 607, 768, 8, pos, True)
    assert "SRC_CHUNK" not in triton_ops._merge_fwd_tiles(32, 867, 768, 8, True)


def test_join_merge_multi_tile(tiling, device):
    # fp16: x is also the metric, and the interpreter's bf16 tl.dot (the GPU path) is broken.
    x = tie_free_metric(8, 25, 1, 40, torch.float16, "sliced", device, seed=3, group=2).requires_grad_()
    g = torch.Generator().manual_seed(12)
    size = _sizes(8, 25, "BN-fp32", torch.float16, device, g)
    frame_pos = torch.randn(1, 4, 1, 40, generator=g).to(torch.float16).to(device).requires_grad_()
    out, size_out, _ = triton_ops.join_merge(x, size, 2, 1, 20, frame_pos)
    x64 = x.detach().cpu().double().requires_grad_()
    ref_out, ref_size = _reference_join_merge(x64, size.cpu().double(), 2, 1, 20, frame_pos.detach().cpu().double())
    assert_close(out, ref_out, torch.float16, "merged x")
    assert_close(size_out, ref_size, torch.float32, "merged size")
    grad = torch.randn(out.shape, generator=g).to(torch.float16)
    (gx,) = torch.autograd.grad(out, x, grad.to(device))
    (ref_gx,) = torch.autograd.grad(ref_out, x64, grad.double())
    assert_close(gx, ref_gx, torch.float16, "grad x")


# ---------------------------------------------------------------------------------------------
# Determinism, custom ops, torch.compile
# ---------------------------------------------------------------------------------------------

def test_deterministic(device):
    g = torch.Generator().manual_seed(9)
    metric = make_tokens(3, 197, 64, torch.float16, "contiguous", device, g)
    x = make_tokens(3, 197, 96, torch.float32, "contiguous", device, g)
    size = _sizes(3, 197, "BN1-fp32", torch.float32, device, g)
    grad = torch.randn(3, 197 - 60, 96, generator=g).to(device)
    runs = []
    for _ in range(2):
        plan = triton_ops.match(metric, 60, 1)
        xr = x.clone().requires_grad_()
        out, size_out = triton_ops.merge(xr, size, plan)
        out.backward(grad)
        runs.append((plan.merged, plan.dst, plan.kept, out, size_out, xr.grad))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_opcheck(device):
    g = torch.Generator().manual_seed(4)
    metric = make_tokens(2, 20, 8, torch.float32, "contiguous", device, g)
    x = make_tokens(2, 20, 8, torch.float32, "contiguous", device, g)
    size = _sizes(2, 20, "BN1-fp32", torch.float32, device, g)
    plan = random_plan(2, 20, 1, 5, device, g)
    torch.library.opcheck(torch.ops.tempme.best_match, (metric, 1))
    torch.library.opcheck(torch.ops.tempme.match, (metric, 5, 1))
    torch.library.opcheck(torch.ops.tempme.merge_fwd, (x, size, plan.merged, plan.dst, plan.kept, 1))
    out, size_out, b_size = torch.ops.tempme.merge_fwd(x, size, plan.merged, plan.dst, plan.kept, 1)
    assert b_size.numel() == 0  # float32 sizes: the B tokens' merged sizes are size_out's last Nb
    b_size = triton_ops.merged_b_sizes(size_out, b_size, ref.split_sizes(20, 1)[1])
    torch.library.opcheck(torch.ops.tempme.merge_bwd,
                          (torch.randn_like(out), size, b_size, plan.merged, plan.dst, plan.kept, 1, 20))
    # Sizes in another dtype than the accumulation's: the forward writes them apart.
    half_size = size.half()
    torch.library.opcheck(torch.ops.tempme.merge_fwd, (x, half_size, plan.merged, plan.dst, plan.kept, 1))
    _, _, b_size = torch.ops.tempme.merge_fwd(x, half_size, plan.merged, plan.dst, plan.kept, 1)
    assert b_size.shape == (2, ref.split_sizes(20, 1)[1]) and b_size.dtype == torch.float32
    torch.library.opcheck(torch.ops.tempme.merge_bwd,
                          (torch.randn_like(out), half_size, b_size, plan.merged, plan.dst, plan.kept, 1, 20))
    # The joined form: 4 clips of 10 tokens read as 2 clips of 20, plus a position embedding.
    joined = tuple(t.reshape(4, 10, *t.shape[2:]) for t in (metric, x, size))
    frame_pos = torch.randn(1, 2, 1, 8, generator=g).to(device)
    torch.library.opcheck(torch.ops.tempme.match, (joined[0], 5, 1, 2))
    torch.library.opcheck(torch.ops.tempme.merge_fwd,
                          (joined[1], joined[2], plan.merged, plan.dst, plan.kept, 1, 2, frame_pos))
    # With the grouping that the match writes (views of its one buffer).
    grouped = triton_ops.match(metric, 5, 1)
    torch.library.opcheck(torch.ops.tempme.merge_fwd, (x, size, *grouped[:3], 1, 1, None, *grouped[5:]))


def test_compile_fullgraph(device):
    """match+merge, join_merge, match+merge compile as one graph; eager results and gradients.

    On the CPU this uses the ``aot_eager`` backend: it traces through Dynamo, the fake kernels and
    AOTAutograd just like inductor does, without inductor's half-minute C++ build.
    """
    def two_merges(metric, x, size, frame_pos):
        plan = ops.match(metric, 5, 1, backend="triton")
        x, size = ops.merge(x, size, plan, backend="triton")
        x, size, _ = triton_ops.join_merge(x, size, 2, 1, 4, frame_pos)
        plan = ops.match(x, 3, 2, backend="triton")
        x, size = ops.merge(x, size, plan, backend="triton")
        return x * 2, size

    torch._dynamo.reset()
    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(two_merges, fullgraph=True, backend=backend)
    g = torch.Generator().manual_seed(8)
    metric = make_tokens(4, 20, 8, torch.float32, "contiguous", device, g)
    x = make_tokens(4, 20, 8, torch.float32, "contiguous", device, g).requires_grad_()
    size = _sizes(4, 20, "BN1-fp32", torch.float32, device, g)
    frame_pos = torch.randn(1, 2, 1, 8, generator=g).to(device).requires_grad_()
    results = []
    for fn in (compiled, two_merges):
        out, size_out = fn(metric, x, size, frame_pos)
        grads = torch.autograd.grad(out.square().sum(), (x, frame_pos))
        results.append((out, size_out) + grads)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("rows, r, nb", [(3, 17, 9), (2, 40, 5), (1, 1, 1), (2, 0, 4), (2, 45, 40)], ids=str)
def test_merge_index_is_a_stable_sort_by_destination(rows, r, nb, device, monkeypatch):
    """The grouping that merge_forward fuses, written out: src sorted by (destination, rank), offsets
    the start of each destination's run. With 41 offsets and 16-wide blocks, three programs each
    group their own destinations (the last one writes ``offsets[nb] = r``)."""
    monkeypatch.setattr(triton_ops, "INTERPRETER_BLOCK", 16)
    g = torch.Generator().manual_seed(rows * 100 + r)
    dst = torch.randint(0, nb, (rows, r), generator=g)
    merged = torch.stack([torch.randperm(50, generator=g)[:r] for _ in range(rows)])
    src, offsets = triton_ops.merge_index(merged.to(device), dst.to(device), nb)
    order = torch.sort(dst, dim=1, stable=True).indices
    assert torch.equal(src.cpu().long(), merged.gather(1, order))
    starts = torch.stack([torch.searchsorted(torch.sort(d).values, torch.arange(nb + 1)) for d in dst])
    assert torch.equal(offsets.cpu().long(), starts)
