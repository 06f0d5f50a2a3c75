"""tempme_fast.tome's ToMe / TempMe merge functions against the token-group twin (tests/tome_twin.py)."""
import pytest
import torch

import tome_twin as twin
from kit import ALL_DTYPES, assert_close, fill_outputs_with_nan, parametrize_dtypes
from tempme_fast import tome
from tempme_fast.tome import tempme_compat

BACKENDS = ["torch", "triton"]
TOME_CASES = [(False, False), (True, False), (True, True)]


def _close(got, want, dtype, what="value"):
    """The ops' per-dtype tolerance of a merged value against the float64 twin (kit.VALUE_TOL)."""
    assert_close(got, want, dtype, what)


def _inputs(rows, tokens, channels, dtype, seed, device):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(rows, tokens, 6, generator=g).to(device)
    x = torch.randn(rows, tokens, channels, generator=g).to(device=device, dtype=dtype)
    size = (torch.rand(rows, tokens, 1, generator=g) * 3 + 0.5).round().to(device)
    return metric, x, size


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    """Kernel outputs start as NaN: an element a kernel never writes fails the test."""
    from tempme_fast.ops import triton_ops
    fill_outputs_with_nan(monkeypatch, triton_ops)


@pytest.mark.parametrize("class_token", [False, True])
def test_segment_kernel_in_small_tiles(device, monkeypatch, class_token):
    """Tiles of 2 tokens x 2 channels walk every multi-tile loop of the segment kernel."""
    from tempme_fast.ops import triton_ops
    monkeypatch.setattr(triton_ops, "INTERPRETER_BLOCK", 2)
    monkeypatch.setattr(triton_ops, "GPU_BLOCK_TOKENS", 2)
    monkeypatch.setattr(triton_ops, "GPU_BLOCK_CHANNELS", 2)
    metric, x, size = _inputs(2, 13, 5, torch.float32, 17, device)
    merge, _ = tome.bipartite_soft_matching(metric, 5, class_token, backend="triton")
    groups = [twin.tome_groups(metric[b].cpu(), 5, class_token) for b in range(2)]
    for mode in ("sum", "mean"):
        _close(merge(x, mode).cpu(), twin.reduce_groups(x.cpu(), groups, mode), torch.float32, mode)
    y, s = tome.merge_wavg(merge, x, size)
    want_y, want_s = twin.wavg_groups(x.cpu(), size.cpu(), groups)
    _close(y.cpu(), want_y, torch.float32, "wavg")
    _close(s.cpu(), want_s, torch.float32, "size")


@pytest.mark.parametrize("class_token,distill_token", TOME_CASES, ids=["plain", "cls", "cls+dist"])
@pytest.mark.parametrize("tokens,r", [(9, 3), (10, 4), (17, 100), (8, 0), (5, 1)], ids=lambda v: str(v))
def test_bipartite_modes_match_twin(backend, device, class_token, distill_token, tokens, r):
    metric, x, _ = _inputs(2, tokens, 5, torch.float32, tokens * 7 + r, device)
    merge, unmerge = tome.bipartite_soft_matching(metric, r, class_token, distill_token, backend=backend)
    groups = [twin.tome_groups(metric[b].cpu(), r, class_token, distill_token) for b in range(2)]
    for mode in ("mean", "sum", "amax", "amin"):
        _close(merge(x, mode=mode).cpu(), twin.reduce_groups(x.cpu(), groups, mode), torch.float32, mode)
    y = merge(x)
    _close(unmerge(y).cpu(), twin.unmerge_groups(y.cpu(), groups, tokens), torch.float32, "unmerge")


@pytest.mark.parametrize("class_token,distill_token", TOME_CASES, ids=["plain", "cls", "cls+dist"])
def test_heads_match_on_the_keys_averaged_over_heads(backend, device, class_token, distill_token):
    """``heads=H`` on every head's keys, token-major (a strided view, as an attention's packed projection
    gives them): the merge of ToMe's metric, the keys averaged over heads."""
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(3, 21, 3, 4, 6, generator=g).to(device)  # [B, N, q|k|v, heads, d]
    keys = qkv[:, :, 1].flatten(2)
    x = torch.randn(3, 21, 5, generator=g).to(device)
    metric = qkv[:, :, 1].mean(dim=2)
    merge, unmerge = tome.bipartite_soft_matching(keys, 6, class_token, distill_token, backend=backend, heads=4)
    groups = [twin.tome_groups(metric[b].cpu(), 6, class_token, distill_token) for b in range(3)]
    _close(merge(x).cpu(), twin.reduce_groups(x.cpu(), groups, "mean"), torch.float32, "mean")
    want, _ = tome.bipartite_soft_matching(metric, 6, class_token, distill_token, backend=backend)
    assert torch.equal(merge(x), want(x))


@pytest.mark.parametrize("class_token,distill_token", TOME_CASES, ids=["plain", "cls", "cls+dist"])
@parametrize_dtypes(ALL_DTYPES)
def test_merge_wavg_values_and_gradients(backend, device, class_token, distill_token, dtype):
    tokens, r = 11, 4
    metric, x, size = _inputs(3, tokens, 7, dtype, 3, device)
    merge, _ = tome.bipartite_soft_matching(metric, r, class_token, distill_token, backend=backend)
    groups = [twin.tome_groups(metric[b].cpu(), r, class_token, distill_token) for b in range(3)]
    x = x.requires_grad_()
    y, s = tome.merge_wavg(merge, x, size)
    x64 = x.detach().cpu().double().requires_grad_()
    want_y, want_s = twin.wavg_groups(x64, size.cpu(), groups)
    _close(y.detach().cpu(), want_y.detach(), dtype, "x")
    _close(s.cpu(), want_s.detach(), torch.float32, "size")
    upstream = torch.randn(want_y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (y.double() * upstream.to(device)).sum().backward()
    (want_y * upstream).sum().backward()
    _close(x.grad.cpu(), x64.grad, dtype, "grad")
    assert y.dtype == dtype and s.dtype == size.dtype


def test_merge_wavg_default_size_and_chained_layers(backend, device):
    """Sizes from a first merge feed a second one: the sizes count original tokens."""
    metric, x, _ = _inputs(2, 13, 4, torch.float32, 11, device)
    merge, _ = tome.bipartite_soft_matching(metric, 3, True, backend=backend)
    y, s = tome.merge_wavg(merge, x)
    assert s.dtype == x.dtype and tuple(s.shape) == (2, 10, 1)
    merge2, _ = tome.bipartite_soft_matching(y, 4, True, backend=backend)
    y2, s2 = tome.merge_wavg(merge2, y, s)
    assert torch.equal(s2.sum(dim=1).cpu(), torch.full((2, 1), 13.0))
    g1 = [twin.tome_groups(metric[b].cpu(), 3, True) for b in range(2)]
    g2 = [twin.tome_groups(y[b].detach().cpu(), 4, True) for b in range(2)]
    flat = [[[p for o in g for p in g1[b][o]] for g in g2[b]] for b in range(2)]
    _close(y2.cpu(), twin.wavg_groups(x.cpu(), torch.ones(2, 13, 1), flat)[0], torch.float32)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_merge_gradients(backend, device, mode):
    metric, x, _ = _inputs(2, 12, 6, torch.float32, 21, device)
    merge, unmerge = tome.bipartite_soft_matching(metric, 5, backend=backend)
    groups = [twin.tome_groups(metric[b].cpu(), 5) for b in range(2)]
    x = x.requires_grad_()
    x64 = x.detach().cpu().double().requires_grad_()
    upstream = torch.randn(2, 12, 6, dtype=torch.float64)
    (unmerge(merge(x, mode)).double() * upstream.to(device)).sum().backward()
    (twin.unmerge_groups_differentiable(twin.reduce_groups(x64, groups, mode), groups, 12) * upstream).sum().backward()
    _close(x.grad.cpu(), x64.grad, torch.float32, "grad")


def test_merge_source_tracks_groups(backend, device):
    metric, x, _ = _inputs(2, 10, 3, torch.float32, 8, device)
    merge, _ = tome.bipartite_soft_matching(metric, 4, True, backend=backend)
    source = tome.merge_source(merge, x)
    groups = [twin.tome_groups(metric[b].cpu(), 4, True) for b in range(2)]
    want = torch.zeros(2, 6, 10)
    for b in range(2):
        for o, g in enumerate(groups[b]):
            want[b, o, g] = 1.0
    assert torch.equal(source.cpu(), want)


@pytest.mark.parametrize("k,tokens", [(2, 10), (3, 10), (4, 9)])
def test_kth_matches_twin(backend, device, k, tokens):
    metric, x, _ = _inputs(2, tokens, 5, torch.float32, k, device)
    merge, unmerge = tome.kth_bipartite_soft_matching(metric, k, backend=backend)
    groups = [twin.kth_groups(metric[b].cpu(), k) for b in range(2)]
    for mode in ("mean", "sum", "amax"):
        _close(merge(x, mode).cpu(), twin.reduce_groups(x.cpu(), groups, mode), torch.float32, mode)
    y = merge(x)
    _close(unmerge(y).cpu(), twin.unmerge_groups(y.cpu(), groups, (tokens // k) * k), torch.float32, "unmerge")
    _close(tome.merge_wavg(merge, x)[0].cpu(), twin.wavg_groups(x.cpu(), torch.ones(2, tokens, 1), groups)[0],
           torch.float32, "wavg")


def test_random_matches_twin_with_the_same_seed(backend, device):
    metric, x, _ = _inputs(2, 9, 5, torch.float32, 4, device)
    torch.manual_seed(123)
    merge, unmerge = tome.random_bipartite_soft_matching(metric, 4, backend=backend)
    torch.manual_seed(123)
    order = torch.rand(2, 9, 1, device=device).argsort(dim=1)[..., 0].cpu()
    groups = [twin.split_groups(metric[b].cpu(), order[b, :4].tolist(), order[b, 4:].tolist()) for b in range(2)]
    _close(merge(x, "sum").cpu(), twin.reduce_groups(x.cpu(), groups, "sum"), torch.float32)
    y = merge(x)
    _close(unmerge(y).cpu(), twin.unmerge_groups(y.cpu(), groups, 9), torch.float32, "unmerge")


@pytest.mark.parametrize("cls_num", [0, 1, 2, 3])
def test_tempme_compat_matches_twin(backend, device, cls_num):
    tokens, r = 14, 4
    metric, x, size = _inputs(2, tokens, 5, torch.float32, cls_num, device)
    merge, unmerge = tempme_compat.bipartite_soft_matching(metric, r, cls_num, r_f=None, backend=backend)
    assert unmerge is None
    groups = [twin.bipartite_groups(metric[b].cpu(), r, cls_num, kept_by_score=False) for b in range(2)]
    _close(merge(x, "mean").cpu(), twin.reduce_groups(x.cpu(), groups, "mean"), torch.float32, "mean")
    y, s = tome.merge_wavg(merge, x, size)
    want_y, want_s = twin.wavg_groups(x.cpu(), size.cpu(), groups)
    _close(y.cpu(), want_y, torch.float32, "wavg")
    _close(s.cpu(), want_s, torch.float32, "size")


def test_ties_break_to_lower_indices(backend, device):
    """Every score equal: the lowest A indices merge, each into B token 0."""
    metric = torch.ones(1, 8, 4, device=device)
    x = torch.arange(8.0, device=device).view(1, 8, 1)
    merge, _ = tome.bipartite_soft_matching(metric, 2, backend=backend)
    # A = 0, 2, 4, 6 (scores tied): A 0 and 2 merge into B 0 (token 1); kept 4, 6 in rank order.
    assert merge(x, "sum").flatten().tolist() == [4.0, 6.0, 1.0 + 0.0 + 2.0, 3.0, 5.0, 7.0]


def test_no_op_returns_input(backend, device):
    metric, x, _ = _inputs(2, 6, 3, torch.float32, 0, device)
    for merge, unmerge in (tome.bipartite_soft_matching(metric, 0, backend=backend),
                           tome.bipartite_soft_matching(metric[:, :2], 5, True, backend=backend),
                           tome.kth_bipartite_soft_matching(metric, 1, backend=backend),
                           tome.random_bipartite_soft_matching(metric, -1, backend=backend)):
        assert merge(x, "amax") is x and unmerge(x) is x
        y, s = tome.merge_wavg(merge, x)
        assert y is x and torch.equal(s, torch.ones(2, 6, 1, device=device))


def test_foreign_merge_callable_gets_tomes_definition():
    x = torch.arange(12.0).view(1, 4, 3)

    def pair_merge(t, mode="mean"):  # merges tokens 0 and 1
        return torch.cat([t[:, :2].sum(1, keepdim=True), t[:, 2:]], dim=1)
    y, s = tome.merge_wavg(pair_merge, x)
    assert s.flatten().tolist() == [2.0, 1.0, 1.0] and torch.allclose(y[0, 0], x[0, :2].mean(0))


@pytest.mark.parametrize("call,match", [
    (lambda m: tome.bipartite_soft_matching(m[0], 2), "3 dims"),
    (lambda m: tome.bipartite_soft_matching(m.long(), 2), "dtype"),
    (lambda m: tome.bipartite_soft_matching(m, 2.0), "r must be an int"),
    (lambda m: tome.bipartite_soft_matching(m, True), "r must be an int"),
    (lambda m: tome.bipartite_soft_matching(m, 2, distill_token=True), "needs class_token"),
    (lambda m: tome.bipartite_soft_matching(m, 2, backend="cuda"), "backend"),
    (lambda m: tome.bipartite_soft_matching(m[:, :, :0], 2), "empty"),
    (lambda m: tome.bipartite_soft_matching(m, 2, heads=3), "heads=3 must divide the metric's 4 channels"),
    (lambda m: tome.bipartite_soft_matching(m, 0, heads=0), "heads=0 must be >= 1"),
    (lambda m: tome.bipartite_soft_matching(m, 2, heads=2.0), "heads must be an int"),
    (lambda m: tome.bipartite_soft_matching(m, 2)[0](m[:, :5]), r"\[2, 8, C\]"),
    (lambda m: tome.bipartite_soft_matching(m, 2)[0](m, mode="max"), "mode"),
    (lambda m: tome.bipartite_soft_matching(m, 2)[1](m), "N_out"),
    (lambda m: tome.merge_wavg(tome.bipartite_soft_matching(m, 2)[0], m, torch.ones(2, 8)), "size"),
    (lambda m: tome.kth_bipartite_soft_matching(m, 9), "k=9"),
    (lambda m: tome.random_bipartite_soft_matching(m, 8), "r=8"),
    (lambda m: tempme_compat.bipartite_soft_matching(m, 2, 7, 0), "cls_num=7"),
    (lambda m: tempme_compat.bipartite_soft_matching(m, 4, 1, 0), r"r=4 must be <= \(N - cls_num\) // 2 = 3"),
])
def test_bad_input_raises_clear_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(torch.randn(2, 8, 4))


def test_triton_backend_refuses_cpu_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine")
    with pytest.raises(ValueError, match="backend='triton'"):
        tome.bipartite_soft_matching(torch.randn(1, 8, 4), 2, backend="triton")


@pytest.mark.parametrize("backend_name,examples", [("torch", 40), ("triton", 8)])
def test_random_shapes_match_twin(backend_name, examples, device):
    """Any N, r (clamped or not), protected tokens and channel count: values, sizes and round trips."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=examples, deadline=None, derandomize=True)
    @given(rows=st.integers(1, 3), tokens=st.integers(2, 24), r=st.integers(-2, 14), case=st.sampled_from(TOME_CASES),
           channels=st.integers(1, 9), seed=st.integers(0, 2 ** 16))
    def check(rows, tokens, r, case, channels, seed):
        class_token, distill_token = case
        if int(class_token) + int(distill_token) > tokens - 2:
            return
        metric, x, size = _inputs(rows, tokens, channels, torch.float32, seed, device)
        merge, unmerge = tome.bipartite_soft_matching(metric, r, class_token, distill_token, backend=backend_name)
        groups = [twin.tome_groups(metric[b].cpu(), r, class_token, distill_token) for b in range(rows)]
        y, s = tome.merge_wavg(merge, x, size)
        want_y, want_s = twin.wavg_groups(x.cpu(), size.cpu(), groups)
        _close(y.cpu(), want_y, torch.float32, "wavg")
        _close(s.cpu(), want_s, torch.float32, "size")
        _close(unmerge(y).cpu(), twin.unmerge_groups(y.cpu(), groups, tokens), torch.float32, "unmerge")
    check()
