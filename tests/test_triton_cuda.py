"""Triton merge ops on a GPU at the real TempMe sizes (ViT-B/16, 12 frames, 32 videos): skipped without CUDA.

The shapes are the ones the model meets: per-frame merges on ``[32 * 12, 197, 768]`` and the
cross-clip merges after each join. At these sizes random inputs are never tie-free, so best-match
indices are compared where the float64 reference has a clear winner, and the plan is compared
exactly against the reference's ranking of the kernel's own scores.
"""
import pytest
import torch

from tempme_fast import ops
from tempme_fast.ops import reference as ref
from tempme_fast.ops import triton_ops
from tempme_fast.ops.accuracy import NORM_TOL

from kit import DTYPES, REAL_SHAPES, REAL_WIDTH, VALUE_TOL, assert_close, fill_outputs_with_nan

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Scores at these sizes sum hundreds of fp32 products: a looser bound than the kit's small shapes.
SCORE_TOL = 2e-5
SHAPES = REAL_SHAPES
WIDTH = REAL_WIDTH


@pytest.fixture(autouse=True)
def nan_outputs(monkeypatch):
    fill_outputs_with_nan(monkeypatch, triton_ops)


def random_plan(b, n, c, r, generator):
    na, nb = ref.split_sizes(n, c)
    perm = torch.rand(b, na, generator=generator, device="cuda").argsort(dim=-1)
    # Destinations skewed to the first B tokens, so some B tokens gather many sources.
    dst = (torch.rand(b, r, generator=generator, device="cuda") ** 4 * nb).long()
    return ref.MergePlan(perm[:, :r], dst, perm[:, r:].sort(dim=-1).values, n, c)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("b, n, c, ch, r", SHAPES)
def test_best_match_and_plan(b, n, c, ch, r, dtype):
    g = torch.Generator(device="cuda").manual_seed(n)
    metric = torch.randn(b, n, ch, generator=g, device="cuda").to(dtype)
    scores, dst = ops.best_match(metric, c, backend="triton")
    a_pos, b_pos = ref.split_positions(n, c, "cuda")
    m = metric.double()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    sim = m[:, a_pos] @ m[:, b_pos].transpose(1, 2)
    top2 = sim.topk(2, dim=-1).values
    assert (scores.double() - top2[..., 0]).abs().max() <= SCORE_TOL
    clear = (top2[..., 0] - top2[..., 1]) > 1e-4
    assert torch.equal(dst[clear], sim.argmax(dim=-1)[clear])
    # Where the winner is not clear, the kernel's choice must still be a best match within rounding.
    chosen = sim.gather(-1, dst.unsqueeze(-1)).squeeze(-1)
    assert (top2[..., 0] - chosen).max() <= SCORE_TOL

    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    merged, merged_dst, kept = triton_ops.match_plan_forward(scores, dst, r)
    assert torch.equal(merged, order[:, :r])
    assert torch.equal(merged_dst, dst.gather(1, order[:, :r]))
    assert torch.equal(kept, order[:, r:].sort(dim=-1).values)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("b, n, c, ch, r", SHAPES)
def test_merge(b, n, c, ch, r, dtype):
    g = torch.Generator(device="cuda").manual_seed(n + r)
    x = torch.randn(b, n, WIDTH, generator=g, device="cuda").to(dtype).requires_grad_()
    size = torch.randint(1, 8, (b, n, 1), generator=g, device="cuda").float()
    plan = random_plan(b, n, c, r, g)
    out, size_out = ops.merge(x, size, plan, backend="triton")
    x64 = x.detach().double().requires_grad_()
    ref_out, ref_size = ref.merge(x64, size.double(), plan)
    assert_close(out, ref_out, dtype, "merged x")
    assert_close(size_out, ref_size, torch.float32, "merged size")
    grad = torch.randn(out.shape, generator=g, device="cuda").to(dtype)
    out.backward(grad)
    ref_out.backward(grad.double())
    assert_close(x.grad, x64.grad, dtype, "grad x")


def test_more_clips_than_a_grid_axis_holds():
    """70000 clips, past the 65535 programs of a CUDA grid's second and third axes: the match (its plan and
    grouping), the merge with and without its LayerNorm, and the merge's gradient, against the reference."""
    g = torch.Generator(device="cuda").manual_seed(70000)
    b, n, c, r, width = 70000, 11, 1, 3, 16
    metric = torch.randn(b, n, 8, generator=g, device="cuda")
    plan = ops.match(metric, r, c, backend="triton")
    want = ref.match(metric.double(), r, c)
    # (Random float32 metrics of 8 channels hold a few near-ties in 70000 clips: the plans agree on the others.)
    same = (plan.merged == want.merged).all(dim=1) & (plan.dst == want.dst).all(dim=1)
    assert same.float().mean() > 0.99
    assert torch.equal(plan.kept[same], want.kept[same])
    x = torch.randn(b, n, width, generator=g, device="cuda").half().requires_grad_()
    size = torch.randint(1, 8, (b, n, 1), generator=g, device="cuda").float()
    out, size_out = ops.merge(x, size, plan, backend="triton")
    x64 = x.detach().double().requires_grad_()
    ref_out, ref_size = ref.merge(x64, size.double(), plan)
    assert_close(out, ref_out, torch.float16, "merged x")
    assert_close(size_out, ref_size, torch.float32, "merged size")
    grad = torch.randn(out.shape, generator=g, device="cuda").half()
    out.backward(grad)
    ref_out.backward(grad.double())
    assert_close(x.grad, x64.grad, torch.float16, "grad x")
    weight, bias = (torch.randn(width, generator=g, device="cuda").half() for _ in range(2))
    _, _, ln = ops.merge_norm(x.detach(), size, plan, weight, bias, 1e-5, backend="triton")
    _, _, ref_ln = ref.merge_norm(x64.detach(), size.double(), plan, weight.double(), bias.double(), 1e-5)
    atol, rtol = NORM_TOL[torch.float16]
    torch.testing.assert_close(ln.double(), ref_ln, atol=atol, rtol=rtol)


# (clips per video before the join, tokens per clip, class tokens per clip, group, r): layers 8, 9, 10.
JOINS = [
    pytest.param(12, 181, 1, 2, 108, id="F12-N181-c1-g2-r108"),
    pytest.param(6, 229, 2, 2, 137, id="F6-N229-c2-g2-r137"),
    pytest.param(3, 289, 4, 3, 260, id="F3-N289-c4-g3-r260"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("f, n, c, group, r", JOINS)
def test_join_merge(f, n, c, group, r, dtype):
    """The fused join + cross merge equals matching and merging the materialised joined clips."""
    g = torch.Generator(device="cuda").manual_seed(f)
    x = torch.randn(32 * f, n, WIDTH, generator=g, device="cuda").to(dtype).requires_grad_()
    size = torch.randint(1, 8, (32 * f, n, 1), generator=g, device="cuda").float()
    frame_pos = (0.1 * torch.randn(1, f, 1, WIDTH, generator=g, device="cuda")).to(dtype).requires_grad_()
    joined = ref.join_clips(x.detach(), group, c)
    # The same kernel reads the same values either way, so the plans agree bit for bit.
    merged, dst, kept, _, _ = triton_ops.match_forward(x.detach(), r, c, group)
    plan = ops.match(joined, r, c * group, backend="triton")
    assert torch.equal(merged, plan.merged) and torch.equal(dst, plan.dst) and torch.equal(kept, plan.kept)

    out, size_out, _ = triton_ops.join_merge(x, size, group, c, r, frame_pos)
    x64 = x.detach().double().requires_grad_()
    pos64 = frame_pos.detach().double().requires_grad_()
    ref_out, ref_size = ref.merge(ref.join_clips(x64, group, c, pos64), ref.join_clips(size.double(), group, c), plan)
    assert_close(out, ref_out, dtype, "merged x")
    assert_close(size_out, ref_size, torch.float32, "merged size")
    grad = torch.randn(out.shape, generator=g, device="cuda").to(dtype)
    gx, gpos = torch.autograd.grad(out, (x, frame_pos), grad)
    ref_gx, ref_gpos = torch.autograd.grad(ref_out, (x64, pos64), grad.double())
    assert_close(gx, ref_gx, dtype, "grad x")
    # E[k]'s gradient sums the 32 * n gradients of its tokens, each rounded once: a random walk.
    atol, rtol = VALUE_TOL[dtype]
    torch.testing.assert_close(gpos.double(), ref_gpos, atol=4 * atol * (32 * n) ** 0.5, rtol=rtol)


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_pipelined_gather_writes_the_same_bits(stages, dtype, monkeypatch):
    """The merge forward with its gather of the merged sources software-pipelined (``SRC_STAGES``, a
    candidate of the GPU suite's tile sweeps) writes what the library's gather writes, bit for bit:
    the same sums in the same order, with and without the LayerNorm and the residual add."""
    g = torch.Generator(device="cuda").manual_seed(stages)
    b, n, c, r = 192, 362, 2, 108
    x = torch.randn(b, n, WIDTH, generator=g, device="cuda").to(dtype)
    residual = torch.randn(b, n, WIDTH, generator=g, device="cuda").to(dtype)
    size = torch.randint(1, 8, (b, n, 1), generator=g, device="cuda").float()
    weight, bias = (torch.randn(WIDTH, generator=g, device="cuda").to(dtype) for _ in range(2))
    plan = random_plan(b, n, c, r, g)  # destinations skewed: some B tokens gather many sources

    def both():
        return (*ops.merge(x, size, plan, backend="triton"),
                *ops.merge_norm(x, size, plan, weight, bias, 1e-5, residual=residual, backend="triton"))
    want = both()
    for name in ("_merge_fwd_tiles", "_merge_norm_tiles"):
        library = getattr(triton_ops, name)
        monkeypatch.setattr(triton_ops, name, lambda *args, _tiles=library: dict(_tiles(*args), SRC_STAGES=stages))
    for got, expected in zip(both(), want):
        assert torch.equal(got, expected)


def _merge_forwards(b, n, c, r, dtype, generator, norm=False):
    """Random inputs of a merge of ``b`` clips of ``n`` tokens (``c`` class tokens, ``r`` merged, destinations
    skewed) and a call of the merge forward on them, without and with a residual add: ``[(x, size)] * 2``;
    with ``norm``, the merge with the LayerNorm after it and its statistics (the training forward), each
    call ``(x, size, ln, stats)``."""
    x = torch.randn(b, n, WIDTH, generator=generator, device="cuda").to(dtype)
    residual = torch.randn(b, n, WIDTH, generator=generator, device="cuda").to(dtype)
    size = torch.randint(1, 8, (b, n, 1), generator=generator, device="cuda").float()
    plan = random_plan(b, n, c, r, generator)
    ln = (torch.randn(WIDTH, generator=generator, device="cuda").to(dtype),
          torch.randn(WIDTH, generator=generator, device="cuda").to(dtype), 1e-5) if norm else None

    def both():
        outs = [triton_ops.merge_forward(x, size, *plan[:3], c, norm=ln, stats=norm),
                triton_ops.merge_forward(x, size, *plan[:3], c, norm=ln, residual=residual, stats=norm)]
        return [(*out[:2], *out[3:]) for out in outs]  # b_size: None with float32 sizes
    return both


@pytest.mark.parametrize("spec", ["merge:32x256x8-p8", "merge:32x128x4-p8", "merge:16x256x4-p4", "merge:8x1024x4-p1-c4",
                                  "merge:8x256x1-p1-c4", "norm:4x4-p1", "norm:4x8-p1", "norm:8x8-p1", "norm:4x4-p1-c4"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_copies_first_writes_the_same_bits(spec, dtype, monkeypatch):
    """The merge forward that copies the tokens without sources first and merges the others ``SPLIT_T`` at a
    time (the ``-pN`` candidates of the GPU suite's tile sweeps; with ``-c4`` those gather 4 sources a step) writes
    the merged tokens and sizes that the library's tiles write, bit for bit, at a ViT-B/16 image merge (few sources
    a tile) and join (sources in most blocks, skewed), with and without the residual add. ``norm:`` also writes the
    LayerNorm after it and its statistics: those sum each row over a tile of another shape (``SPLIT_T`` rows, or
    the whole tile), whose reduction order on a GPU is not the library tiles' (the H200 showed last-place
    differences), so they are held to the LayerNorm's tolerance against the library's, not to its bits."""
    from benchmarks.bench_ops import parse_tiles

    g = torch.Generator(device="cuda").manual_seed(len(spec))
    kind, tiles = parse_tiles(spec)
    for b, n, c, r in ((384, 197, 1, 2), (32, 867, 12, 260)):
        both = _merge_forwards(b, n, c, r, dtype, g, norm=kind == "norm")
        want = both()
        with monkeypatch.context() as patched:
            if kind == "merge":
                patched.setattr(triton_ops, "_merge_fwd_tiles", lambda *args: dict(tiles))
            else:
                patched.setattr(triton_ops, "_merge_norm_tiles", lambda *args: dict(tiles, BLOCK_D=1024))
            got = both()
        for got_outs, want_outs in zip(got, want):
            assert len(got_outs) == len(want_outs) == (4 if kind == "norm" else 2)
            assert torch.equal(got_outs[0], want_outs[0]) and torch.equal(got_outs[1], want_outs[1])
            if kind == "norm":
                atol, rtol = NORM_TOL[dtype]
                torch.testing.assert_close(got_outs[2], want_outs[2], atol=atol, rtol=rtol)
                atol, rtol = NORM_TOL[torch.float32]
                torch.testing.assert_close(got_outs[3], want_outs[3], atol=atol, rtol=rtol)


@pytest.mark.parametrize("norm", [False, True], ids=["merge", "norm"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_chunked_gather_writes_the_same_bits(norm, dtype, monkeypatch):
    """The library's tiles where B tokens gather many sources (one token a program, its sources gathered 4 a
    step, as scalars) write the merged tokens and sizes of a tile of tokens that gathers one source at a time,
    bit for bit, and so do the sweeps' tiles that gather 8 a step (``SRC_CHUNK = 8``), at a ViT-B/16 intra merge
    and join of 32 videos and that join at one video (destinations skewed), with and without the residual add.
    With the LayerNorm, it and its statistics sum each row over another layout (one token at 2 or 4 warps, or 4
    tokens at 8), so they are held to its tolerance."""
    g = torch.Generator(device="cuda").manual_seed(17)
    for b, n, c, r in ((32, 607, 12, 60), (32, 867, 12, 260), (1, 867, 12, 260)):
        both = _merge_forwards(b, n, c, r, dtype, g, norm=norm)
        want = both()
        _, nb = ref.split_sizes(n, c)
        assert triton_ops._many_sources(r, nb)
        one_at_a_time = dict(BLOCK_T=4, BLOCK_D=1024, num_warps=8) if norm else \
            dict(BLOCK_T=8, BLOCK_D=256, num_warps=4)
        eight_a_step = dict(BLOCK_T=1, BLOCK_D=1024, num_warps=4, SRC_CHUNK=8) if norm else \
            dict(BLOCK_T=1, BLOCK_D=128, num_warps=1, SRC_CHUNK=8)
        for tiles in (one_at_a_time, eight_a_step):
            with monkeypatch.context() as patched:
                patched.setattr(triton_ops, "_merge_norm_tiles" if norm else "_merge_fwd_tiles",
                                lambda *args, tiles=tiles: tiles)
                got = both()
            for got_outs, want_outs in zip(got, want):
                assert torch.equal(got_outs[0], want_outs[0]) and torch.equal(got_outs[1], want_outs[1]), tiles
                if norm:
                    atol, rtol = NORM_TOL[dtype]
                    torch.testing.assert_close(got_outs[2], want_outs[2], atol=atol, rtol=rtol)
                    atol, rtol = NORM_TOL[torch.float32]
                    torch.testing.assert_close(got_outs[3], want_outs[3], atol=atol, rtol=rtol)


@pytest.mark.parametrize("tiles", [(16, 128, 4, 16), (32, 256, 8, 32)], ids=["16x128x4-g16", "32x256x8-g32"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_gather_by_product_merges_as_the_library(tiles, dtype, monkeypatch):
    """The merge forward with a tile's sources gathered SRC_BLOCK at a time and summed by a float32 product
    (``merge:BTxBDxW-gN`` of the GPU suite's tile sweeps) writes the library's merged tokens within the
    value tolerance and the same sizes, at a ViT-B/16 join's size with skewed destinations, with and
    without the residual add, and the same bits on a second run."""
    g = torch.Generator(device="cuda").manual_seed(tiles[0])
    both = _merge_forwards(32, 867, 12, 260, dtype, g)
    want = both()
    block_t, block_d, warps, src_block = tiles
    monkeypatch.setattr(triton_ops, "_merge_fwd_tiles", lambda *args: dict(BLOCK_T=block_t, BLOCK_D=block_d,
                                                                           num_warps=warps, SRC_BLOCK=src_block))
    got = both()
    for (got_x, got_size), (want_x, want_size) in zip(got, want):
        assert_close(got_x, want_x.double(), dtype, "merged x")
        assert torch.equal(got_size, want_size)
    for (again_x, _), (got_x, _) in zip(both(), got):
        assert torch.equal(again_x, got_x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_deterministic(dtype):
    """Repeated forward and backward runs at ViT-B/16 12-frame size give the same bits."""
    g = torch.Generator(device="cuda").manual_seed(0)
    b, n, c, r = 192, 362, 2, 108
    x = torch.randn(b, n, WIDTH, generator=g, device="cuda").to(dtype)
    size = torch.randint(1, 8, (b, n, 1), generator=g, device="cuda").float()
    grad = torch.randn(b, n - r, WIDTH, generator=g, device="cuda").to(dtype)
    runs = []
    for _ in range(3):
        plan = ops.match(x, r, c, backend="triton")
        xr = x.clone().requires_grad_()
        out, size_out = ops.merge(xr, size, plan, backend="triton")
        out.backward(grad)
        runs.append((plan.merged, plan.dst, plan.kept, out, size_out, xr.grad))
    for run in runs[1:]:
        for first, again in zip(runs[0], run):
            assert torch.equal(first, again)


def test_two_threads_at_once():
    """Matches launched by two threads, each on its own stream, without waiting for each other (two threads
    serving one GPU) give what each gives alone: each thread has its own scratch (counters and partials)."""
    import threading

    g = torch.Generator(device="cuda").manual_seed(2)
    # Late-layer shapes (3 joined clips of 645 tokens): few clips, so B is split into ranges whose partials
    # and counters live in the scratch.
    metrics = [torch.randn(2, 645, 64, generator=g, device="cuda", dtype=torch.float16) for _ in range(2)]
    want = [ops.match(m, 193, 3, backend="triton") for m in metrics]
    torch.cuda.synchronize()
    got, start = [[], []], threading.Barrier(2)

    def serve(k):
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            start.wait()
            for _ in range(50):
                got[k].append(ops.match(metrics[k], 193, 3, backend="triton"))
        stream.synchronize()

    threads = [threading.Thread(target=serve, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k in range(2):
        assert len(got[k]) == 50
        for plan in got[k]:
            assert torch.equal(plan.merged, want[k].merged) and torch.equal(plan.dst, want[k].dst)
            assert torch.equal(plan.kept, want[k].kept)


def test_cuda_graph_capture():
    """match + merge never read back to the host: the forward captures into a CUDA graph and replays."""
    g = torch.Generator(device="cuda").manual_seed(1)
    b, n, c, r = 384, 197, 1, 2
    metric = torch.randn(b, n, 64, generator=g, device="cuda", dtype=torch.float16)
    x = torch.randn(b, n, WIDTH, generator=g, device="cuda", dtype=torch.float16)
    size = torch.ones(b, n, 1, device="cuda")

    def step():
        plan = ops.match(metric, r, c, backend="triton")
        return ops.merge(x, size, plan, backend="triton")

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, size_out = step()
    metric.copy_(torch.randn(b, n, 64, generator=g, device="cuda", dtype=torch.float16))
    x.copy_(torch.randn(b, n, WIDTH, generator=g, device="cuda", dtype=torch.float16))
    graph.replay()
    want, want_size = step()
    assert torch.equal(out, want) and torch.equal(size_out, want_size)


def test_compile_reduce_overhead():
    """Two match+merge steps under torch.compile(fullgraph=True, mode="reduce-overhead")."""
    def two_merges(metric, x, size):
        plan = ops.match(metric, 2, 1, backend="triton")
        x, size = ops.merge(x, size, plan, backend="triton")
        plan = ops.match(x, 20, 1, backend="triton")
        return ops.merge(x, size, plan, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(two_merges, fullgraph=True, mode="reduce-overhead")
    g = torch.Generator(device="cuda").manual_seed(2)
    metric = torch.randn(384, 197, 64, generator=g, device="cuda", dtype=torch.float16)
    x = torch.randn(384, 197, WIDTH, generator=g, device="cuda", dtype=torch.float16)
    size = torch.ones(384, 197, 1, device="cuda")
    for _ in range(3):  # warm-up runs, then the recorded graph replays
        out, size_out = compiled(metric, x, size)
    want, want_size = two_merges(metric, x, size)
    assert torch.equal(out, want) and torch.equal(size_out, want_size)


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m", [36480, 547], ids=["ViT-B16-L0-x16", "ViT-B16-L10-x1"])
def test_linear_act_at_the_mlps_shapes(m, dtype, act):
    """``ops.linear_act`` at the c_fc of ViT-B/16 (768 -> 3072), at layer 0 of 16 videos (128 x 128 tiles) and
    layer 10 of one (64 x 128): within twice the error of torch's own ops in the same dtype against float64,
    and the same bits on a second call."""
    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, 768, generator=g, device="cuda").to(dtype)
    weight = (torch.randn(3072, 768, generator=g, device="cuda") / 768 ** 0.5).to(dtype)
    bias = torch.randn(3072, generator=g, device="cuda").to(dtype)
    got = ops.linear_act(x, weight, bias, act, backend="triton")
    want = ref.linear_act(x.double(), weight.double(), bias.double(), act)
    own = (ref.linear_act(x, weight, bias, act).double() - want).abs().max().item()
    assert (got.double() - want).abs().max().item() <= 2 * own
    assert torch.equal(ops.linear_act(x, weight, bias, act, backend="triton"), got)
