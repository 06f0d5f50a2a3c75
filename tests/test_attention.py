"""Proportional attention: the Triton kernel and the folded-bias SDPA path against the reference.

Truth is ``reference.attention(..., "eager")`` in float64; every candidate runs in the test dtype
and is compared, forward and every gradient (q, k, v and size), with a tolerance per dtype.
Without a GPU the kernel runs in Triton's interpreter; the ``cuda`` tests repeat the comparison at
real ViT shapes and check that the folded path runs on SDPA's flash kernel.
"""
import pytest
import torch
import torch.nn.functional as F

from tempme_fast import apply_tempme, encoder, ops
from tempme_fast.ops import accuracy, attention_impl, reference, triton_attention
from kit import DTYPES, timed_once
from tiny import TINY_CONFIG, tiny_clip, video

# Max-abs error allowed, relative to the largest reference value of the same tensor.
TOLERANCE = accuracy.ATTENTION_TOL
CANDIDATES = ("triton", "fold")


@pytest.fixture
def nan_outputs(monkeypatch):
    """Kernel outputs start as NaN, so an element the kernel never writes fails the comparison."""
    def new_output(shape, dtype, device):
        if dtype.is_floating_point:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.empty(shape, dtype=dtype, device=device)
    monkeypatch.setattr(triton_attention, "_new_output", new_output)


def make_inputs(rows, heads, tokens, head_dim, dtype, device, seed=0, queries=None):
    """q ``[rows, heads, queries, d]`` (``queries`` defaults to ``tokens``), k, v ``[rows, heads, tokens, d]``,
    the keys' sizes and an output gradient."""
    g = torch.Generator().manual_seed(seed)
    queries = tokens if queries is None else queries
    q, k, v = (torch.randn(rows, heads, n, head_dim, generator=g).to(device=device, dtype=dtype)
               for n in (queries, tokens, tokens))
    # Sizes up to 30 give biases up to log(30) = 3.4: enough to move the softmax well away from plain attention.
    size = torch.randint(1, 31, (rows, tokens, 1), generator=g).float().to(device)
    grad = torch.randn(rows, heads, queries, head_dim, generator=g).to(device=device, dtype=dtype)
    return q, k, v, size, grad


def forward_backward(fn, q, k, v, size, grad):
    """``fn``'s output and the gradients of ``(out * grad).sum()`` for q, k, v and size (if not None)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    size = None if size is None else size.detach().requires_grad_()
    out = fn(*leaves, size)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves] + ([] if size is None else [size.grad])


def truth(q, k, v, size, grad):
    return forward_backward(lambda *a: reference.attention(*a, "eager"), *(t.double() for t in (q, k, v)),
                            None if size is None else size.double(), grad.double())


def assert_close_to(got, want, dtype, names=("out", "dq", "dk", "dv", "dsize")):
    for name, a, b in zip(names, got, want):
        assert not a.isnan().any(), f"{name}: NaN (an element was never written)"
        err = (a.double() - b).abs().max().item()
        scale = b.abs().max().item()
        # The floor: where the true gradient is 0 (one token: dq = dk = 0), rounding leaves a trace.
        assert err <= TOLERANCE[dtype] * max(scale, 0.1), f"{name}: max abs error {err:.3g} (largest {scale:.3g})"


def candidate(impl, backend="triton"):
    return lambda q, k, v, size: ops.attention(q, k, v, size, impl=impl, backend=backend)


SHAPES = [(2, 3, 17, 64), (1, 2, 1, 64), (2, 2, 50, 80), (1, 1, 197, 64), (3, 1, 33, 32), (1, 2, 40, 48),
          (1, 1, 24, 96), (1, 1, 20, 128), (1, 2, 9, 8)]


@pytest.mark.interpreter
@pytest.mark.parametrize("impl", CANDIDATES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=[f"B{b}-H{h}-N{n}-D{d}" for b, h, n, d in SHAPES])
def test_candidate_equals_reference(device, nan_outputs, impl, dtype, shape):
    q, k, v, size, grad = make_inputs(*shape, dtype, device)
    assert_close_to(forward_backward(candidate(impl), q, k, v, size, grad), truth(q, k, v, size, grad), dtype)


# (rows, heads, queries, keys, head dim): fewer queries than keys (a last block's class tokens), more,
# one query, and queries and keys over several interpreter tiles.
CROSS_SHAPES = [(2, 3, 5, 17, 64), (1, 2, 12, 50, 80), (2, 2, 40, 9, 32), (1, 1, 1, 70, 64), (2, 1, 3, 197, 64)]


@pytest.mark.interpreter
@pytest.mark.parametrize("impl", CANDIDATES + ("sdpa",))
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", CROSS_SHAPES, ids=[f"B{b}-H{h}-M{m}-N{n}-D{d}" for b, h, m, n, d in CROSS_SHAPES])
def test_fewer_or_more_queries_than_keys(device, nan_outputs, impl, dtype, shape):
    """``M`` queries against ``N`` keys, forward and every gradient (the kernel once read only ``M`` keys)."""
    rows, heads, queries, keys, head_dim = shape
    q, k, v, size, grad = make_inputs(rows, heads, keys, head_dim, dtype, device, seed=7, queries=queries)
    assert_close_to(forward_backward(candidate(impl), q, k, v, size, grad), truth(q, k, v, size, grad), dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("impl", CANDIDATES + ("sdpa", "eager"))
def test_query_attention_equals_attention_of_its_heads(device, impl):
    """``ops.query_attention(q, kv, heads)``: the packed projections split into heads, ``ops.attention``,
    heads concatenated; forward and the gradients of q, kv and size."""
    g = torch.Generator().manual_seed(9)
    rows, queries, tokens, heads, head_dim = 2, 3, 21, 2, 32
    q = torch.randn(rows, queries, heads * head_dim, generator=g).to(device).requires_grad_()
    kv = torch.randn(rows, tokens, 2 * heads * head_dim, generator=g).to(device).requires_grad_()
    size = (torch.randint(1, 9, (rows, tokens), generator=g).float().to(device)).requires_grad_()
    results = []
    for fn in (lambda: ops.query_attention(q, kv, heads, size, impl=impl, backend="triton"),
               lambda: ops.attention(q.view(rows, queries, heads, head_dim).transpose(1, 2),
                                     *kv.view(rows, tokens, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0),
                                     size, impl="eager", backend="torch").transpose(1, 2).flatten(2)):
        out = fn()
        results.append([out, *torch.autograd.grad(out.square().sum(), (q, kv, size))])
    assert results[0][0].shape == (rows, queries, heads * head_dim)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, error, message", [
    (lambda: (torch.randn(2, 3, 64), torch.randn(2, 9, 64), 2), ValueError, r"kv must have shape \[B', N, 2 \* D\]"),
    (lambda: (torch.randn(2, 3, 64), torch.randn(3, 9, 128), 2), ValueError, "kv must have shape"),
    (lambda: (torch.randn(2, 3, 63), torch.randn(2, 9, 126), 2), ValueError, "divisible by heads=2"),
    (lambda: (torch.randn(2, 3, 64), torch.randn(2, 9, 128).half(), 2), TypeError, "kv has dtype"),
    (lambda: (torch.randn(2, 3, 64), torch.randn(2, 9, 128), 0), ValueError, "heads"),
])
def test_query_attention_refuses_bad_arguments(make, error, message):
    q, kv, heads = make()
    with pytest.raises(error, match=message):
        ops.query_attention(q, kv, heads)
    with pytest.raises(ValueError, match="size must have shape"):
        ops.query_attention(torch.randn(2, 3, 64), torch.randn(2, 9, 128), 2, torch.ones(2, 3))


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("queries, keys", [(20, 70), (48, 64), (16, 16), (32, 70), (20, 64), (16, 5)])
def test_fewer_queries_than_keys_over_many_tiles(queries, keys, dtype, device, nan_outputs, monkeypatch):
    """16-token tiles: query tiles against key tiles (the forward, dQ and dK/dV loops), and the
    inference forward that takes the log in the kernel. With 16-bit operands the loops walk the full
    tiles without masks and then a partial last one: counts that fill whole tiles (no partial tile),
    one full tile alone, one partial tile alone, and a mix; float32 walks them all masked."""
    monkeypatch.setattr(triton_attention, "INTERPRETER_BLOCK", 16)
    if device == "cuda":
        monkeypatch.setattr(triton_attention, "GPU_FWD_BLOCKS", {64: (16, 16)})
        monkeypatch.setattr(triton_attention, "GPU_BWD_BLOCKS", {64: (16, 16)})
        monkeypatch.setattr(triton_attention, "DKDV_QUERY_BLOCK", 16)
    q, k, v, size, grad = make_inputs(2, 2, keys, 64, dtype, device, seed=8, queries=queries)
    want = truth(q, k, v, size, grad)
    assert_close_to(forward_backward(candidate("triton"), q, k, v, size, grad), want, dtype)
    with torch.no_grad():
        assert_close_to([candidate("triton")(q, k, v, size)], want[:1], dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("size_dtype", [torch.float32, torch.float16], ids=["size-fp32", "size-fp16"])
def test_inference_takes_the_log_in_the_kernel(device, nan_outputs, dtype, size_dtype, monkeypatch):
    """Without a gradient to track, the kernel reads the sizes and takes their log itself (no bias
    tensor, no log op) and writes no log-sum-exp: the reference's output within the dtype's tolerance."""
    calls, lses = [], []
    launcher = triton_attention.attention_forward

    def spy(*args, **kwargs):
        calls.append((kwargs.get("log_bias"), kwargs.get("keep_lse")))
        out, lse = launcher(*args, **kwargs)
        lses.append(lse)
        return out, lse
    monkeypatch.setattr(triton_attention, "attention_forward", spy)
    q, k, v, size, grad = make_inputs(2, 3, 41, 64, dtype, device, seed=4)
    with torch.no_grad():
        out = candidate("triton")(q, k, v, size.to(size_dtype))
        plain = candidate("triton")(q, k, v, None)
    assert calls == [(True, False), (None, False)] and lses == [None, None]
    assert_close_to([out], truth(q, k, v, size, grad)[:1], dtype)
    assert_close_to([plain], truth(q, k, v, None, grad)[:1], dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_the_kernels_log_of_the_sizes_over_their_range(device, nan_outputs, dtype):
    """Inference takes ``log(size)`` in the kernel (on a GPU by the hardware's ``lg2.approx``, in the
    interpreter by ``tl.log2``). Sizes from 0 (the key gets no weight) through small fractions to ``1e30``
    (the key takes all of it), over two key tiles, give the float64 reference's output. Runs on the GPU too."""
    q, k, v, _, grad = make_inputs(3, 2, 70, 64, dtype, device, seed=5)
    g = torch.Generator().manual_seed(6)
    size = torch.empty(3, 70, 1)
    size[0].uniform_(-9, -4, generator=g).exp_()  # 1.2e-4 .. 1.8e-2: a key of size 0 given 1e-3 would show
    size[1].uniform_(-9, 9, generator=g).exp_()  # 1.2e-4 .. 8.1e3
    size[2].uniform_(0, 3, generator=g).exp_()
    size[0, 3] = size[0, 66] = size[2, 0] = 0.0  # in both tiles, and the first key of a row
    size[2, 40] = 1e30
    size = size.to(device)
    with torch.no_grad():
        out = candidate("triton")(q, k, v, size)
    want = truth(q, k, v, size, grad)[:1]
    assert_close_to([out], want, dtype)
    # What the reference gives there: the keys of size 0 left out, the key of size 1e30 all its row sees.
    keep = [i for i in range(70) if i not in (3, 66)]
    q0, k0, v0 = (t[:1].double() for t in (q, k, v))
    dropped = reference.attention(q0, k0[:, :, keep], v0[:, :, keep], size[:1, keep].double(), "eager")
    assert (want[0][:1] - dropped).abs().max() < 1e-12
    assert (want[0][2] - v[2, :, 40:41].double()).abs().max() < 1e-6


@pytest.mark.parametrize("hip", [None, "6.2"], ids=["nvidia", "rocm"])
def test_the_fast_log_is_asked_for_on_nvidia_gpus_only(monkeypatch, hip):
    """``FAST_LOG`` (inline PTX ``lg2.approx``) goes to the attention kernels where they compile for an NVIDIA
    GPU; ROCm and the interpreter get ``tl.log2``. Launches stubbed (``benchmarks.host.gpu_like``), recorded."""
    from benchmarks import host

    monkeypatch.setattr(torch.version, "hip", hip)
    q, k, v, size, grad = make_inputs(2, 2, 17, 64, torch.float16, "cpu")
    counts = host.Counts()
    with host.gpu_like(counts):
        candidate("triton")(q, k, v, size)
        forward_backward(candidate("triton"), q, k, v, size, grad)
    launches = [kwargs for kernel, _, _, kwargs, _ in counts.calls if kernel.fn.__name__.startswith("_attention")]
    assert len(launches) == 4  # inference forward; training forward, dQ and dK/dV passes
    assert {kw["FAST_LOG"] for kw in launches} == {hip is None}
    assert triton_attention._constexprs(q)["FAST_LOG"] is (not triton_attention._interpreting() and hip is None)


@pytest.mark.interpreter
def test_sizes_matter_more_than_the_tolerance(device):
    """The comparisons above could not pass with the bias ignored."""
    q, k, v, size, grad = make_inputs(2, 2, 17, 64, torch.float16, device)
    with_bias = candidate("triton")(q, k, v, size)
    without = candidate("triton")(q, k, v, None)
    assert (with_bias - without).abs().max() > 100 * TOLERANCE[torch.float16]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_kernel_without_bias_equals_plain_attention(device, nan_outputs, dtype):
    q, k, v, _, grad = make_inputs(2, 2, 19, 64, dtype, device)
    got = forward_backward(lambda q, k, v, s: triton_attention.attention(q, k, v, None), q, k, v, None, grad)
    assert_close_to(got, truth(q, k, v, None, grad), dtype)


@pytest.mark.interpreter
def test_kernel_walks_many_tiles(device, nan_outputs, monkeypatch):
    """Tiles of 16 tokens: the online softmax and both backward passes loop over 4 tiles of 50 tokens."""
    monkeypatch.setattr(triton_attention, "INTERPRETER_BLOCK", 16)
    if device == "cuda":
        monkeypatch.setattr(triton_attention, "GPU_FWD_BLOCKS", {64: (16, 16)})
        monkeypatch.setattr(triton_attention, "GPU_BWD_BLOCKS", {64: (16, 16)})
    q, k, v, size, grad = make_inputs(2, 2, 50, 64, torch.float32, device)
    assert_close_to(forward_backward(candidate("triton"), q, k, v, size, grad), truth(q, k, v, size, grad),
                    torch.float32)


@pytest.mark.interpreter
def test_kernel_reads_the_encoders_strided_views(device):
    """q, k, v as the encoder makes them: views of one ``[B', N, 3, H, d]`` projection."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 21, 3, 2, 32, generator=g).to(device).requires_grad_()
    size = torch.randint(1, 9, (2, 21), generator=g).float().to(device)
    grads = []
    for impl in ("triton", "sdpa"):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = ops.attention(q, k, v, size, impl=impl, backend="triton" if impl == "triton" else "torch")
        (grad_qkv,) = torch.autograd.grad(out.square().sum(), qkv)
        grads.append((out, grad_qkv))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
def test_kernel_backward_repeats_bit_for_bit(device):
    q, k, v, size, grad = make_inputs(2, 2, 37, 64, torch.float16, device)
    first = forward_backward(candidate("triton"), q, k, v, size, grad)
    second = forward_backward(candidate("triton"), q, k, v, size, grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_auto_chooses_by_backend_and_bias():
    q = torch.zeros(1, 1, 4, 8)
    size = torch.ones(1, 4)
    assert attention_impl.choose("auto", q, size, triton_backend=True) == attention_impl.FAST_IMPL
    assert attention_impl.choose("auto", q, None, triton_backend=True) == "sdpa"  # no bias: SDPA's flash kernel
    assert attention_impl.choose("auto", q, size, triton_backend=False) == "sdpa"
    assert attention_impl.choose("auto", q.double(), size, triton_backend=True) == "sdpa"
    assert attention_impl.choose("fold", q, size, triton_backend=False) == "fold"


@pytest.mark.parametrize("head_dim, width", [(64, 72), (80, 88), (6, 8), (32, 40), (128, 136)])
def test_folded_width_is_a_multiple_of_eight_with_room_for_the_bias(head_dim, width):
    assert attention_impl.folded_width(head_dim) == width


def test_fold_keeps_the_bias_to_float32_precision_in_bfloat16():
    """The bias rides on two bfloat16 channels; one would round log(size) * 8 to a step of 1/8."""
    q, k, v, size, _ = make_inputs(1, 1, 12, 64, torch.float32, "cpu")
    size = size * 1.37  # biases that bfloat16 cannot hold exactly
    ones = torch.ones_like(q)
    got = attention_impl.folded_attention(ones.bfloat16(), k.bfloat16() * 0, v.bfloat16(), size)
    want = reference.attention(ones.double(), k.double() * 0, v.bfloat16().double(), size.double(), "eager")
    assert (got.double() - want).abs().max() < 1e-2


def test_bad_attention_arguments_are_refused():
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match="impl='flash' is not an attention implementation; valid"):
        ops.attention(q, q, q, None, impl="flash")
    with pytest.raises(TypeError, match="impl='triton' needs q, k, v of one dtype"):
        ops.attention(q.double(), q.double(), q.double(), None, impl="triton")
    with pytest.raises(ValueError, match="attention='flash' is not one of"):
        apply_tempme(tiny_clip(), TINY_CONFIG, attention="flash")


def test_unmerged_layers_get_no_bias(monkeypatch):
    """Attention gets sizes only once a merge has happened (from the schedule, no size is read)."""
    seen = []
    real, real_query = ops.self_attention, ops.query_attention

    def spy(qkv, heads, size=None, impl="auto", backend="auto", *, keys=False):
        seen.append(size is not None)
        return real(qkv, heads, size, impl=impl, backend=backend, keys=keys)

    def query_spy(q, kv, heads, size=None, impl="auto", backend="auto"):  # the trimmed last block
        seen.append(size is not None)
        return real_query(q, kv, heads, size, impl=impl, backend=backend)

    monkeypatch.setattr(encoder.ops, "self_attention", spy)
    monkeypatch.setattr(encoder.ops, "query_attention", query_spy)
    # Layer 0 merges after its attention; with imgme_r = 0 the first merge is layer 2's cross-clip merge.
    for config, expected in ((TINY_CONFIG, [False, True, True, True]),
                             (TINY_CONFIG.replace(imgme_r=0), [False, False, True, True]),
                             (TINY_CONFIG.replace(prop_attn=False), [False] * 4)):
        seen.clear()
        model = apply_tempme(tiny_clip(), config, backend="torch")
        with torch.no_grad():
            model.encode_video(video(1, 4))
        assert seen == expected, config


@pytest.mark.interpreter
@pytest.mark.parametrize("impl", CANDIDATES)
def test_whole_model_with_each_candidate_equals_mask_attention(device, impl):
    backend = "triton" if impl == "triton" else "torch"
    results = {}
    for attention in (impl, "sdpa"):
        model = apply_tempme(tiny_clip(), TINY_CONFIG, backend=backend, attention=attention).to(device).train()
        emb = model.encode_video(video(2, 4).to(device))
        emb.square().sum().backward()
        results[attention] = emb.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    (got, got_grads), (want, want_grads) = results[impl], results["sdpa"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.interpreter
def test_triton_attention_compiles_without_graph_breaks(device):
    q, k, v, size, _ = make_inputs(1, 2, 17, 32, torch.float32, device)
    fn = torch.compile(candidate("triton"), fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    torch.testing.assert_close(fn(q, k, v, size), candidate("triton")(q, k, v, size), rtol=1e-5, atol=1e-6)


@pytest.mark.interpreter
@pytest.mark.parametrize("bias_grad", [False, True], ids=["no-bias-grad", "bias-grad"])
def test_attention_custom_ops_pass_opcheck(device, bias_grad):
    """The ops torch.compile sees: schemas, fake implementations and outputs that alias nothing. Without
    a bias gradient the launcher writes none and returns None; the op returns an empty tensor there."""
    q, k, v, size, grad = make_inputs(1, 2, 9, 16, torch.float32, device)
    bias = size.log().reshape(1, 9)
    out, lse = torch.ops.tempme.attention_fwd(q, k, v, bias)
    torch.library.opcheck(torch.ops.tempme.attention_fwd, (q, k, v, bias))
    torch.library.opcheck(torch.ops.tempme.attention_bwd, (grad, q, k, v, bias, out, lse, bias_grad))
    dbias = torch.ops.tempme.attention_bwd(grad, q, k, v, bias, out, lse, bias_grad)[3]
    assert dbias.shape == ((1, 2, 9) if bias_grad else (0,))
    assert (triton_attention.attention_backward(grad, q, k, v, bias, out, lse, bias_grad)[3] is None) != bias_grad


# ---------------------------------------------------------------------------------------------
# On a GPU, at real shapes
# ---------------------------------------------------------------------------------------------

# (clips, heads, tokens, head dim): ViT-B/16 frame, a joined ViT-B/16 clip, ViT-L/14, ViT-H/14, ViT-B/32, and
# 256 tokens: whole key and query tiles only (the kernels' loops over full tiles, and none over a partial one).
CUDA_SHAPES = [(16, 12, 197, 64), (8, 12, 394, 64), (8, 16, 257, 64), (4, 16, 257, 80), (32, 12, 50, 64),
               (4, 12, 256, 64)]
# The last block's class queries: ViT-B/16 and ViT-B/32 after the joins (12 class tokens a clip), ViT-L/14,
# and 12 queries against whole key tiles only.
CUDA_CLASS_SHAPES = [(16, 12, 12, 547, 64), (32, 12, 12, 107, 64), (8, 16, 12, 700, 64), (8, 12, 12, 128, 64)]


@pytest.mark.cuda
@pytest.mark.parametrize("impl", CANDIDATES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=[f"B{b}-H{h}-N{n}-D{d}" for b, h, n, d in CUDA_SHAPES])
def test_cuda_candidate_equals_reference(nan_outputs, impl, dtype, shape):
    assert_cuda_candidate_matches(impl, *make_inputs(*shape, dtype, "cuda"))


def assert_cuda_candidate_matches(impl, q, k, v, size, grad):
    """``impl`` against float32 SDPA with the mask, forward and every gradient, at q's dtype's tolerance."""
    want = forward_backward(lambda *a: reference.attention(*a, "sdpa"), *(t.float() for t in (q, k, v)), size,
                            grad.float())
    got = forward_backward(candidate(impl), q, k, v, size, grad)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dsize"), got, want):
        assert not a.isnan().any(), name
        err = (a.float() - b).abs().max().item()
        assert err <= TOLERANCE[q.dtype] * max(b.abs().max().item(), 1e-3), f"{name}: {err:.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("impl", CANDIDATES)
@pytest.mark.parametrize("shape", CUDA_CLASS_SHAPES, ids=[f"B{b}-H{h}-M{m}-N{n}-D{d}"
                                                          for b, h, m, n, d in CUDA_CLASS_SHAPES])
def test_cuda_class_queries_equal_reference(nan_outputs, impl, shape):
    rows, heads, queries, keys, head_dim = shape
    assert_cuda_candidate_matches(impl, *make_inputs(rows, heads, keys, head_dim, torch.float16, "cuda",
                                                     queries=queries))


@pytest.mark.cuda
def test_cuda_more_clips_and_heads_than_a_grid_axis_holds(nan_outputs):
    """6000 clips of 12 heads: 72000 (clip, head) pairs, past the 65535 programs of a CUDA grid's second axis
    (ViT-B's frames of 500 videos in one batch), forward and every gradient."""
    assert_cuda_candidate_matches("triton", *make_inputs(6000, 12, 9, 16, torch.float16, "cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_fold_runs_on_the_flash_kernel(dtype):
    """The point of the fold: SDPA accepts it with only the FlashAttention backend enabled."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, size, grad = make_inputs(8, 12, 197, 64, dtype, "cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        got = forward_backward(candidate("fold"), q, k, v, size, grad)
        with pytest.raises(RuntimeError):  # the float mask is refused by the flash kernel
            F.scaled_dot_product_attention(q, k, v, attn_mask=size.view(8, 1, 1, 197).log().to(dtype))
    assert_close_to(got, truth(q, k, v, size, grad), dtype)


# ---------------------------------------------------------------------------------------------
# Benchmark row and floors
# ---------------------------------------------------------------------------------------------

def test_attention_shapes_follow_the_schedule():
    from benchmarks.bench_attention import attention_shapes

    # ViT-B/32, 12 frames: layer 1 is the first with a bias (layer 0 merges after its attention),
    # then the joined layers 8, 9, 10 (tokens per clip from the spec: 48, 62, 118).
    shapes = attention_shapes("ViT-B-32", 2)
    assert [(s.layer, s.rows, s.tokens) for s in shapes] == [(1, 24, 48), (8, 12, 48), (9, 6, 62), (10, 2, 118)]


def test_bench_attention_writes_json_lines(tmp_path, capsys):
    import json

    from benchmarks import bench_attention

    out = tmp_path / "attention.jsonl"
    assert bench_attention.main(["--device", "cpu", "--models", "ViT-B-32", "--batches", "1", "--dtypes", "fp32",
                                 "--impls", "sdpa", "fold", "--modes", "fwd", "--rep-ms", "1",
                                 "--jsonl", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["impl"] for r in rows} == {"sdpa", "fold"} and len(rows) == 2 * 4
    assert all(r["ms"] > 0 and r["bench"] == "attention" and r["device"] for r in rows)
    assert "fold" in capsys.readouterr().out


@pytest.mark.interpreter  # Triton on CPU tensors: skipped where TRITON_INTERPRET=1 is not set (a GPU machine)
def test_bench_attention_sweeps_forward_tiles(tmp_path, monkeypatch):
    """--fwd-tiles times the Triton forward per tile spec (rows ``triton:SPEC``) beside SDPA with the mask
    and without a bias; the library's tiles and launch options are back afterwards."""
    import json

    from benchmarks import bench_attention
    from tempme_fast.ops import triton_attention

    blocks, options = dict(triton_attention.GPU_FWD_BLOCKS), triton_attention._launch_options
    out = tmp_path / "tiles.jsonl"
    timed_once(monkeypatch, bench_attention)
    assert bench_attention.main(["--device", "cpu", "--models", "ViT-B-32", "--batches", "1", "--dtypes", "fp32",
                                 "--fwd-tiles", "128x64x8x3", "--rep-ms", "1", "--jsonl", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["impl"] for r in rows} == {"sdpa", "sdpa-nobias", "triton", "triton:128x64x8x3"}
    assert {r["mode"] for r in rows} == {"fwd"} and all(r["ms"] > 0 for r in rows)
    assert triton_attention.GPU_FWD_BLOCKS == blocks and triton_attention._launch_options is options
    with bench_attention.forward_tiles("128x32x8x3"):
        assert set(triton_attention.GPU_FWD_BLOCKS.values()) == {(128, 32)}
    assert triton_attention.GPU_FWD_BLOCKS == blocks


@pytest.mark.parametrize("spec", ["128x64x8", "128x64x8x0", "96x64x8x2", "axbxcxd"])
def test_bench_attention_refuses_bad_tiles(spec):
    from benchmarks import bench_attention

    with pytest.raises(ValueError, match="--fwd-tiles"):
        bench_attention.parse_tiles(spec)


def test_attention_floors_bias_vector_moves_what_plain_attention_moves():
    from benchmarks.floors import attention_bytes, attention_table

    args = (192, 12, 195, 64, 2)  # ViT-B/16 layer 1 at 16 videos, fp16
    plain = attention_bytes("none", *args)
    assert plain == 4 * 192 * 12 * 195 * 64 * 2
    assert attention_bytes("vector", *args) == plain + 192 * 195 * 4
    assert attention_bytes("fold", *args) > 2 * plain and attention_bytes("mask", *args) > 1.5 * plain
    assert "| L1 | 192 x 195 |" in attention_table("ViT-B-16", 16, "fp16", 3.0e12, 7.9e14)
