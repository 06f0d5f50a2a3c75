"""``ops.add_norm``: a residual add and the LayerNorm after it in one op, and where the encoder uses it.

The Triton forward reads ``x`` and the residual once and writes the sum and its LayerNorm; the
backward is torch. Checked against the reference twin (``reference.add_norm``): the sum bit for
bit (as ``x + residual``), the LayerNorm against ``reference.layer_norm`` of the same sum, every
gradient against the twin run by autograd, and the encoder against its unfused blocks.
"""
import pytest
import torch
from torch import nn

from tempme_fast import apply_tempme, ops
from tempme_fast.encoder import block_forward, class_block_forward, embed_frames, frame_features
from tempme_fast.model import block_function, encoder_options, layer_steps, next_norm, run_blocks
from tempme_fast.ops import reference as ref
from tempme_fast.ops import triton_norm, triton_ops
from kit import dtype_layout_cases
from tiny import TINY_CONFIG, tiny_clip, video
# nan_outputs and tiling are fixtures: imported, pytest finds them in this module too.
from test_triton_ops import DTYPES, make_tokens, nan_outputs, tiling  # noqa: F401,F811
# The LayerNorm and gradient tolerances, and the parameters, of merge_norm's tests: the same LayerNorm.
from test_merge_norm import GRAD_TOL, NORM_TOL, _norm_params, assert_layer_norm_stats

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("nan_outputs")]

def _check_sum(got, x, residual, what):
    want = x + residual
    if got.dtype == torch.bfloat16 and not got.is_cuda:
        # Triton's interpreter truncates float32 -> bfloat16 (a GPU and torch round to nearest even).
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2 ** -7, msg=what)
    else:
        assert torch.equal(got, want), what


# (B', N, D): one class token per clip (the trimmed last block), ViT widths, widths that are no
# power of two, a single row.
@pytest.mark.parametrize("b, n, d, dtype, layout",
                         dtype_layout_cases([(3, 1, 768), (2, 50, 768), (4, 7, 96), (1, 1, 1024), (2, 33, 80)]))
def test_add_norm_matches_reference(b, n, d, dtype, layout, device):
    g = torch.Generator().manual_seed(b * n + d)
    x = make_tokens(b, n, d, dtype, layout, device, g)
    residual = make_tokens(b, n, d, dtype, "contiguous" if layout != "contiguous" else "transposed", device, g)
    weight, bias = _norm_params(d, dtype, device, g)
    out, ln = ops.add_norm(x, residual, weight, bias, 1e-5, backend="triton")
    assert out.dtype == ln.dtype == dtype and out.shape == ln.shape == (b, n, d)
    assert out.is_contiguous() and ln.is_contiguous()
    _check_sum(out, x, residual, "sum")
    atol, rtol = NORM_TOL[dtype]
    assert not ln.isnan().any(), "ln: NaN (an output element was never written)"
    torch.testing.assert_close(ln.cpu(), ref.layer_norm(out.cpu(), weight.cpu(), bias.cpu(), 1e-5), atol=atol,
                               rtol=rtol, msg="ln")
    want_out, want_ln = ops.add_norm(x.cpu(), residual.cpu(), weight.cpu(), bias.cpu(), 1e-5, backend="torch")
    assert torch.equal(want_out, x.cpu() + residual.cpu())
    assert torch.equal(want_ln, ref.layer_norm(want_out, weight.cpu(), bias.cpu(), 1e-5))


def test_add_norm_many_programs(tiling, device):
    """Several programs (and, with ``gpu-tiles``, the GPU's 4096-element tiles) over rows of two clips."""
    g = torch.Generator().manual_seed(2)
    x = make_tokens(3, 29, 200, torch.float32, "transposed", device, g)
    residual = make_tokens(3, 29, 200, torch.float32, "sliced", device, g)
    weight, bias = _norm_params(200, torch.float32, device, g)
    out, ln = triton_norm.add_norm(x, residual, weight, bias, 1e-6)
    assert torch.equal(out, x + residual)
    torch.testing.assert_close(ln.cpu(), ref.layer_norm(out.cpu(), weight.cpu(), bias.cpu(), 1e-6), atol=2e-5,
                               rtol=2e-5)


def test_add_norm_tiles_fit_the_gpu_tile():
    tiles = {"ViT-B": triton_norm._add_norm_tiles(600, 768, 2), "ViT-L": triton_norm._add_norm_tiles(600, 1024, 2),
             "fp32": triton_norm._add_norm_tiles(600, 768, 4)}
    if not triton_ops._interpreting():
        assert tiles["ViT-B"] == dict(BLOCK_T=4, BLOCK_D=1024, num_warps=4)
        assert tiles["ViT-L"] == dict(BLOCK_T=4, BLOCK_D=1024, num_warps=4)
        assert tiles["fp32"]["num_warps"] == 8
    for t in tiles.values():
        assert t["BLOCK_D"] >= 768


@pytest.mark.parametrize("dtype", {**DTYPES, "fp64": torch.float64}.values(), ids=[*DTYPES, "fp64"])
def test_add_norm_writes_the_layer_norm_statistics(dtype, device):
    """With ``stats`` (a training forward) the launch also writes the LayerNorm's statistics of the
    sum, which the backward uses instead of recomputing them; without, it returns the two outputs."""
    g = torch.Generator().manual_seed(17)
    x, residual = (make_tokens(3, 9, 80, dtype, layout, device, g) for layout in ("contiguous", "transposed"))
    weight, bias = _norm_params(80, dtype, device, g)
    out, ln, stats = triton_norm.add_norm_forward(x, residual, weight, bias, 1e-5, True)
    assert_layer_norm_stats(stats, out, 1e-5, "add_norm")
    plain = triton_norm.add_norm_forward(x, residual, weight, bias, 1e-5)
    assert len(plain) == 2 and torch.equal(plain[0], out) and torch.equal(plain[1], ln)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_add_norm_gradients_match_reference(dtype, device):
    """A random upstream gradient on both outputs: the gradients of x, residual (x's), weight and bias."""
    b, n, d = 2, 13, 64
    g = torch.Generator().manual_seed(11)
    tensors = [make_tokens(b, n, d, dtype, "contiguous", "cpu", g), make_tokens(b, n, d, dtype, "contiguous", "cpu", g),
               *_norm_params(d, dtype, "cpu", g)]
    upstream = [torch.randn(b, n, d, generator=g).to(dtype) for _ in range(2)]
    grads = {}
    for backend, dev in (("triton", device), ("torch", "cpu")):
        leaves = [t.detach().to(dev).requires_grad_() for t in tensors]
        out, ln = ops.add_norm(*leaves, 1e-5, backend=backend)
        torch.autograd.backward((out, ln), [t.to(dev) for t in upstream])
        grads[backend] = [t.grad.cpu() for t in leaves]
    assert torch.equal(grads["triton"][0], grads["triton"][1])
    atol, rtol = GRAD_TOL[dtype]
    for name, got, want in zip(("x", "residual", "weight", "bias"), grads["triton"], grads["torch"]):
        assert got.dtype == dtype and not got.isnan().any(), name
        torch.testing.assert_close(got, want, atol=atol * want.abs().max().item(), rtol=rtol, msg=f"grad {name}")


def test_add_norm_gradcheck_and_one_output(device):
    g = torch.Generator().manual_seed(5)
    x, residual = (torch.randn(2, 5, 6, generator=g, dtype=torch.float64).to(device).requires_grad_()
                   for _ in range(2))
    weight, bias = (torch.randn(6, generator=g, dtype=torch.float64).to(device).requires_grad_() for _ in range(2))
    assert torch.autograd.gradcheck(lambda *t: triton_norm.add_norm(*t, 1e-5), (x, residual, weight, bias))
    # Only one output used: the other's gradient is None in the backward.
    for pick in (0, 1):
        got = torch.autograd.grad(triton_norm.add_norm(x, residual, weight, bias, 1e-5)[pick].sum(), (x, residual))
        want = torch.autograd.grad(ref.add_norm(x, residual, weight, bias, 1e-5)[pick].sum(), (x, residual))
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e)


def test_add_norm_compiles_in_one_graph(device):
    """The custom op passes opcheck, and add_norm traces in one graph with eager's values and gradients."""
    g = torch.Generator().manual_seed(4)
    x, residual = (make_tokens(2, 9, 16, torch.float32, "contiguous", device, g) for _ in range(2))
    weight, bias = _norm_params(16, torch.float32, device, g)
    torch.library.opcheck(torch.ops.tempme.add_norm_fwd, (x, residual, weight, bias, 1e-5))

    def tail(x, residual, weight, bias):
        out, ln = ops.add_norm(x, residual.sin(), weight, bias, 1e-5, backend="triton")
        return out + ln.square()

    torch._dynamo.reset()
    compiled = torch.compile(tail, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    leaves = [t.clone().requires_grad_() for t in (x, residual, weight, bias)]
    results = []
    for fn in (compiled, tail):
        out = fn(*leaves)
        results.append((out,) + torch.autograd.grad(out.square().sum(), leaves))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("change, message", [
    (dict(x=torch.ones(2, 10)), r"x must have shape \[B', N, D\]"),
    (dict(x=torch.ones(0, 10, 16)), "x is empty"),
    (dict(x=torch.ones(2, 10, 16, dtype=torch.int32)), "x has dtype torch.int32"),
    (dict(residual=None), "residual must be a torch.Tensor of x's shape"),
    (dict(residual=torch.ones(2, 10, 15)), "residual must have x's shape"),
    (dict(residual=torch.ones(2, 10, 16, dtype=torch.float64)), "residual has dtype"),
    (dict(weight=torch.ones(15)), r"weight must have shape \[D\] = \[16\]"),
    (dict(eps=-1.0), "eps=-1.0 must be a positive float"),
    (dict(backend="cuda"), "backend='cuda' is not one of"),
], ids=["x-rank", "x-empty", "x-int", "residual-none", "residual-shape", "residual-dtype", "weight-shape",
        "eps-negative", "backend"])
def test_add_norm_errors_name_the_argument(change, message):
    args = dict(x=torch.randn(2, 10, 16), residual=torch.randn(2, 10, 16), weight=torch.ones(16),
                bias=torch.zeros(16), eps=1e-5, backend="torch")
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        ops.add_norm(**args)


def test_add_norm_check_finite_names_the_tensor():
    x = torch.randn(1, 3, 4)
    residual = x.clone()
    residual[0, 1, 2] = float("inf")
    with pytest.raises(ValueError, match="residual"):
        ops.add_norm(x, residual, torch.ones(4), torch.zeros(4), 1e-5, backend="torch", check_finite=True)


# ---------------------------------------------------------------------------------------------
# The encoder: every residual add that a LayerNorm reads next goes through add_norm
# ---------------------------------------------------------------------------------------------

def _unfused_forward(model, v):
    """``encode_video``'s blocks one by one without ``next_norm``: every add and LayerNorm on its own."""
    state = embed_frames(model.visual, v.flatten(0, 1))
    options = encoder_options(model)
    for i, (block, plan, pos) in enumerate(layer_steps(model)):
        state = block_function(model, i, state)(block, state, plan, pos, options)
        assert state.normed is None
    return frame_features(model.visual, state, v.shape[0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_encoder_with_add_norm_equals_its_unfused_blocks(backend, device):
    """Fused (the default) against the blocks run without ``next_norm``: in float32 the torch backend is
    the same arithmetic (bit for bit on the CPU; on CUDA the library may pick another LayerNorm or matmul
    kernel for another layout, which rounds differently), the Triton one the same up to rounding."""
    model = apply_tempme(tiny_clip(), TINY_CONFIG, backend=backend).to(device)
    v = video(2, 4).to(device)
    with torch.no_grad():
        state = run_blocks(model, embed_frames(model.visual, v.flatten(0, 1)))
        assert state.normed is not None and state.normed[0] is model.visual.ln_post
        fused = frame_features(model.visual, state, 2)
        unfused = _unfused_forward(model, v)
    if backend == "torch" and device == "cpu":
        assert torch.equal(fused, unfused)
    else:
        torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)


def test_next_norm_skips_joins_and_the_untrimmed_last_block():
    model = apply_tempme(tiny_clip(), TINY_CONFIG, backend="torch")
    layers = model.tempme.schedule.layers
    blocks = model.visual.transformer.resblocks
    for i in range(len(layers) - 1):
        want = None if layers[i + 1].group > 1 else blocks[i + 1].ln_1
        assert next_norm(model, i, block_forward) is want
    assert any(p.group > 1 for p in layers[1:])  # the tiny schedule joins, so both cases ran
    assert next_norm(model, len(layers) - 1, class_block_forward) is model.visual.ln_post
    assert next_norm(model, len(layers) - 1, block_forward) is None


def test_a_state_normed_by_another_module_is_not_used():
    """``state.normed`` is read only by the LayerNorm that made it: a stale one is recomputed."""
    model = apply_tempme(tiny_clip(), TINY_CONFIG, backend="torch")
    block, plan, pos = next(iter(layer_steps(model)))
    state = embed_frames(model.visual, video(1, 4).flatten(0, 1))
    options = encoder_options(model)
    with torch.no_grad():
        want = block_forward(block, state, plan, pos, options)
        stale = state._replace(normed=(nn.LayerNorm(state.x.shape[-1]), torch.full_like(state.x, float("nan"))))
        got = block_forward(block, stale, plan, pos, options)
        right = state._replace(normed=(block.ln_1, block.ln_1(state.x)))
        again = block_forward(block, right, plan, pos, options)
    assert torch.equal(got.x, want.x) and torch.equal(again.x, want.x)


def test_gradient_checkpointing_keeps_no_normed_state(device):
    """Under checkpointing each block keeps only its input: no state carries a LayerNorm output, and
    the gradients equal those of the fused forward."""
    grads = []
    v = video(2, 4).to(device)
    for checkpointing in (False, True):
        model = apply_tempme(tiny_clip(), TINY_CONFIG, backend="torch").to(device)
        model.visual.set_grad_checkpointing(checkpointing)
        state = run_blocks(model, embed_frames(model.visual, v.flatten(0, 1)))
        assert (state.normed is None) == checkpointing
        out = model.encode_video(v)
        grads.append(torch.autograd.grad(out.square().sum(), model.visual.transformer.resblocks[0].ln_1.weight)[0])
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layer_scale_under_autocast_keeps_the_promoting_add(backend, device):
    """LayerScale's float32 scale on a bfloat16 branch (autocast) makes the residual float32: the add
    then promotes, as open_clip's block does, so it is not fused (a fused op keeps x's dtype); the
    embedding stays that of the float32 model up to bfloat16 rounding."""
    model = apply_tempme(tiny_clip(ls_init_value=0.5), TINY_CONFIG, backend=backend).to(device)
    v = video(2, 4).to(device)
    with torch.no_grad():
        want = model.encode_video(v)
        with torch.autocast(device, dtype=torch.bfloat16):
            got = model.encode_video(v)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    cosine = torch.nn.functional.cosine_similarity(got.float(), want, dim=-1)
    assert (cosine > 0.99).all(), cosine
