"""``ops.merge_norm``: the merge and the LayerNorm of its output (the block's ``ln_2``) in one op.

The Triton forward writes the LayerNorm from the merge kernel's output stage; its backward
composes the LayerNorm gradient (aten's) with the merge's backward kernel. Checked against the
reference twin (``reference.merge_norm``) and, for the merged tokens, against float64.
"""
import pytest
import torch
from torch import nn

from tempme_fast import ops
from tempme_fast.ops import accuracy
from tempme_fast.ops import reference as ref
from tempme_fast.ops import triton_ops
# nan_outputs and tiling are fixtures: imported, pytest finds them in this module too.
from test_triton_ops import DTYPES, _sizes, assert_close, make_tokens, nan_outputs, random_plan, tiling  # noqa: F401,F811

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("nan_outputs")]

# (atol, rtol) of the LayerNorm stage against reference.layer_norm of the same merged tokens.
NORM_TOL = accuracy.NORM_TOL
# (atol, rtol) of gradients against the reference twin run by autograd in the same dtype.
GRAD_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (8e-2, 5e-2)}


def _norm_params(d, dtype, device, generator):
    weight = (1 + 0.5 * torch.randn(d, generator=generator)).to(dtype).to(device)
    bias = (0.5 * torch.randn(d, generator=generator)).to(dtype).to(device)
    return weight, bias


def _cases():
    shapes = [(2, 7, 1, 32, 2), (3, 50, 1, 64, 24), (1, 197, 1, 768, 2), (2, 131, 2, 1024, 40),
              (3, 10, 2, 96, 4)]
    layouts = ("contiguous", "transposed", "sliced")
    cases = []
    for i, (b, n, c, d, r) in enumerate(shapes):
        for name, dtype in DTYPES.items():
            layout = layouts[(i + len(name)) % 3]
            cases.append(pytest.param(b, n, c, d, r, dtype, layout, id=f"B{b}-N{n}-c{c}-D{d}-r{r}-{name}-{layout}"))
    return cases


@pytest.mark.parametrize("b, n, c, d, r, dtype, layout", _cases())
def test_merge_norm_matches_reference(b, n, c, d, r, dtype, layout, device):
    g = torch.Generator().manual_seed(n * 7 + d)
    x = make_tokens(b, n, d, dtype, layout, device, g)
    size = _sizes(b, n, "BN1-fp32", dtype, device, g)
    plan = random_plan(b, n, c, r, device, g)
    weight, bias = _norm_params(d, dtype, device, g)
    out, size_out, ln = ops.merge_norm(x, size, plan, weight, bias, 1e-5, backend="triton")

    plan64 = ref.MergePlan(*(t.cpu() for t in plan[:3]), n, c)
    want_x, want_size = ref.merge(x.cpu().double(), size.cpu().double(), plan64)
    assert out.dtype == dtype and ln.dtype == dtype and ln.shape == want_x.shape
    assert_close(out, want_x, dtype, "merged x")
    assert_close(size_out, want_size, size.dtype, "merged size")
    atol, rtol = NORM_TOL[dtype]
    assert not ln.isnan().any(), "ln: NaN (an output element was never written)"
    torch.testing.assert_close(ln.cpu(), ref.layer_norm(out.cpu(), weight.cpu(), bias.cpu(), 1e-5),
                               atol=atol, rtol=rtol, msg="ln")


# (atol scaled by the statistic's magnitude, rtol) of the statistics a LayerNorm kernel writes against
# aten's LayerNorm of the same tokens: both sum in the accumulation dtype, in different orders.
STATS_TOL = {torch.float64: (1e-12, 1e-12)}


def assert_layer_norm_stats(stats, normed, eps, what):
    """``stats [2, B', N, 1]`` (means, reciprocal standard deviations) are aten's LayerNorm statistics
    of ``normed [B', N, D]`` (the rounded tokens the kernel normalised), in the accumulation dtype."""
    work = ref.accumulation_dtype(normed.dtype)
    assert stats.shape == (2, *normed.shape[:2], 1) and stats.dtype == work, what
    assert stats[0].is_contiguous() and stats[1].is_contiguous(), what
    _, mean, rstd = torch.ops.aten.native_layer_norm(normed.cpu().to(work), [normed.shape[-1]], None, None, eps)
    atol, rtol = STATS_TOL.get(work, (1e-6, 1e-5))
    for name, got, want in (("mean", stats[0], mean), ("rstd", stats[1], rstd)):
        torch.testing.assert_close(got.cpu(), want, atol=atol * want.abs().max().item(), rtol=rtol,
                                   msg=f"{what}: {name}")


@pytest.mark.parametrize("dtype", {**DTYPES, "fp64": torch.float64}.values(), ids=[*DTYPES, "fp64"])
@pytest.mark.parametrize("group", [1, 3], ids=["merge", "join"])
def test_merge_norm_writes_the_layer_norm_statistics(dtype, group, device):
    """With ``stats`` (what a training forward asks for) the launch also writes the LayerNorm's mean
    and reciprocal standard deviation per merged token, which its backward passes to aten's
    LayerNorm gradient instead of recomputing them; without, it writes and returns none."""
    b, n, c, d, r = 2, 40, 1, 96, 11
    g = torch.Generator().manual_seed(21)
    x = make_tokens(b * group, n, d, dtype, "contiguous", device, g)
    size = _sizes(b * group, n, "BN1-fp32", dtype, device, g)
    weight, bias = _norm_params(d, dtype, device, g)
    frame_pos = (torch.randn(1, group, 1, d, generator=g) * 0.1).to(dtype).to(device) if group > 1 else None
    merged, dst, kept, src, offsets = triton_ops.match_forward(x, r, c, group)
    args = (x, size, merged, dst, kept, weight, bias, 1e-5, c, group, frame_pos, None, src, offsets)
    out, size_out, _, ln, stats = triton_ops.merge_norm_forward(*args, True)
    assert_layer_norm_stats(stats, out, 1e-5, "merge_norm")
    plain = triton_ops.merge_norm_forward(*args)
    assert len(plain) == 4 and torch.equal(plain[0], out) and torch.equal(plain[3], ln)


def _residual_case(seed, b, n, c, d, r, dtype, device, residual_layout="contiguous"):
    """``(x, residual, size, plan, weight, bias)`` of a merge step after attention (a hub plan)."""
    g = torch.Generator().manual_seed(seed)
    x = make_tokens(b, n, d, dtype, "contiguous", device, g)
    residual = make_tokens(b, n, d, dtype, residual_layout, device, g)
    size = _sizes(b, n, "BN1-fp32", dtype, device, g)
    plan = random_plan(b, n, c, r, device, g, hub=True)
    return (x, residual, size, plan) + _norm_params(d, dtype, device, g)


@pytest.mark.parametrize("with_residual", [False, True], ids=["x", "x+residual"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_merge_norm_gradients_match_reference(dtype, with_residual, device):
    """A random upstream gradient on both outputs: the gradients of x, weight, bias and (with a
    residual) the residual, whose gradient is x's (they are summed first)."""
    b, n, c, d, r = 2, 50, 1, 64, 20
    x, residual, size, plan, weight, bias = _residual_case(11, b, n, c, d, r, dtype, device)
    g = torch.Generator().manual_seed(1)
    upstream = [torch.randn(b, n - r, d, generator=g).to(dtype) for _ in range(2)]
    names = ("x", "weight", "bias") + (("residual",) if with_residual else ())
    grads = {}
    for backend, dev in (("triton", device), ("torch", "cpu")):
        leaves = [t.detach().to(dev).requires_grad_() for t in (x, weight, bias, residual)[:len(names)]]
        plan_dev = ref.MergePlan(*(t.to(dev) for t in plan[:3]), n, c)
        out, _, ln = ops.merge_norm(leaves[0], size.to(dev), plan_dev, leaves[1], leaves[2], 1e-5, backend=backend,
                                    residual=leaves[3] if with_residual else None)
        torch.autograd.backward((out, ln), [t.to(dev) for t in upstream])
        grads[backend] = [t.grad.cpu() for t in leaves]
    if with_residual:
        assert torch.equal(grads["triton"][0], grads["triton"][3])
    atol, rtol = GRAD_TOL[dtype]
    for name, got, want in zip(names, grads["triton"], grads["torch"]):
        assert got.dtype == dtype and not got.isnan().any(), name
        torch.testing.assert_close(got, want, atol=atol * want.abs().max().item(), rtol=rtol, msg=f"grad {name}")


@pytest.mark.parametrize("used", ["merged", "norm", "norm-frozen"])
def test_merge_norm_gradient_through_one_output(used, device):
    """An output the loss does not use gets no gradient (None, not zeros made for it): the other
    output's gradients are still the reference's; a frozen LayerNorm gets none either."""
    b, n, c, d, r = 2, 50, 1, 64, 20
    x, residual, size, plan, weight, bias = _residual_case(12, b, n, c, d, r, torch.float32, device)
    grads = {}
    for backend, dev in (("triton", device), ("torch", "cpu")):
        leaves = [t.detach().to(dev).requires_grad_(used != "norm-frozen" or i in (0, 3))
                  for i, t in enumerate((x, weight, bias, residual))]
        plan_dev = ref.MergePlan(*(t.to(dev) for t in plan[:3]), n, c)
        out, _, ln = ops.merge_norm(leaves[0], size.to(dev), plan_dev, leaves[1], leaves[2], 1e-5, backend=backend,
                                    residual=leaves[3])
        (out if used == "merged" else ln).square().sum().backward()
        grads[backend] = [None if t.grad is None else t.grad.cpu() for t in leaves]
    for name, got, want in zip(("x", "weight", "bias", "residual"), grads["triton"], grads["torch"]):
        if used != "norm" and name in ("weight", "bias"):
            assert got is None, name  # the LayerNorm is not in the loss: no gradient at all
            continue
        torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=1e-4, msg=f"grad {name}")


@pytest.mark.parametrize("dtype, weight_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                                 (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.float32)],
                         ids=["fp32", "fp64", "fp16", "bf16", "fp16-fp32-weight"])
def test_layer_norm_backward_is_autograds_of_the_reference(dtype, weight_dtype, device):
    """The backward of every Triton LayerNorm (merge_norm, join_merge_norm, add_norm) against autograd
    through ``reference.layer_norm``: bit for bit where both run aten's kernels on the same float32
    (or float64) tensors (the CPU; a weight wider than x), else within the gradient tolerance (CUDA
    takes 16-bit tensors as they are)."""
    g = torch.Generator().manual_seed(3)
    x = (2 + 3 * torch.randn(3, 9, 48, generator=g)).to(dtype).to(device)
    weight, bias = _norm_params(48, weight_dtype, device, g)
    upstream = torch.randn(3, 9, 48, generator=g).to(dtype).to(device)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    ref.layer_norm(*leaves, 1e-5).backward(upstream)
    got = triton_ops.layer_norm_backward(upstream, x, weight, 1e-5)
    assert [t.dtype for t in got[1:]] == [weight_dtype] * 2
    same_kernels = device == "cpu" or dtype in (torch.float32, torch.float64) or weight_dtype != dtype
    for name, have, want in zip(("x", "weight", "bias"), got, (t.grad for t in leaves)):
        have = have.to(want.dtype)
        if same_kernels:
            assert torch.equal(have, want), f"grad {name}"
        else:
            atol, rtol = GRAD_TOL[dtype]
            torch.testing.assert_close(have, want, atol=atol * want.abs().max().item(), rtol=rtol, msg=f"grad {name}")
    # Frozen weight and bias (LoRA): no column sums, the same input gradient.
    frozen = triton_ops.layer_norm_backward(upstream, x, weight, 1e-5, (False, False))
    assert frozen[1] is None and frozen[2] is None and torch.equal(frozen[0], got[0])


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_merge_norm_with_residual_is_the_merge_of_the_sum(dtype, device):
    """``residual=`` merges ``x + residual`` (read in place, any strides): bit for bit what merging
    the sum computed by torch gives, on both backends."""
    b, n, c, d, r = 3, 50, 1, 96, 17
    x, residual, size, plan, weight, bias = _residual_case(21, b, n, c, d, r, dtype, device, "transposed")
    for backend in ("triton", "torch"):
        got = ops.merge_norm(x, size, plan, weight, bias, 1e-5, backend=backend, residual=residual)
        want = ops.merge_norm(x + residual, size, plan, weight, bias, 1e-5, backend=backend)
        for name, a, e in zip(("x", "size", "ln"), got, want):
            if backend == "triton" and dtype == torch.bfloat16 and not a.is_cuda:
                # Triton's interpreter truncates float32 -> bfloat16 (a GPU and torch round to
                # nearest even), so its sum may sit one bfloat16 step below torch's.
                torch.testing.assert_close(a, e, atol=2e-2, rtol=2 ** -7, msg=f"{backend}: {name}")
            else:
                assert torch.equal(a, e), f"{backend}: {name}"
    r0 = ops.merge_norm(x, size, random_plan(b, n, c, 0, device, torch.Generator()), weight, bias, 1e-5,
                        backend="triton", residual=residual)
    assert torch.equal(r0[0], x + residual) and r0[1] is size


def test_merge_norm_gradcheck(device):
    g = torch.Generator().manual_seed(5)
    n, c, d = 9, 1, 4
    x = torch.randn(2, n, d, generator=g, dtype=torch.float64).to(device).requires_grad_()
    weight = torch.randn(d, generator=g, dtype=torch.float64).to(device).requires_grad_()
    bias = torch.randn(d, generator=g, dtype=torch.float64).to(device).requires_grad_()
    size = torch.randint(1, 4, (2, n), generator=g).double().to(device)
    plan = random_plan(2, n, c, 3, device, g, hub=True)

    def both(t, w, b_):
        out, _, ln = triton_ops.merge_norm(t, size, plan, w, b_, 1e-5)
        return out, ln

    # In the interpreter a full Jacobian (a forward per input element) takes minutes: random projections
    # of it there (fast_mode), the full one on a GPU.
    fast = device == "cpu"
    assert torch.autograd.gradcheck(both, (x, weight, bias), fast_mode=fast)
    residual = torch.randn(2, n, d, generator=g, dtype=torch.float64).to(device).requires_grad_()

    def with_residual(t, res, w):
        out, _, ln = triton_ops.merge_norm(t, size, plan, w, bias, 1e-5, residual=res)
        return out, ln

    assert torch.autograd.gradcheck(with_residual, (x, residual, weight), fast_mode=fast)


def test_merge_norm_multi_tile(tiling, device):
    """Several token tiles per clip (and, with ``gpu-tiles``, the GPU's 4096-element tiles)."""
    g = torch.Generator().manual_seed(2)
    b, n, c, d, r = 2, 67, 2, 64, 30
    x = make_tokens(b, n, d, torch.float32, "contiguous", device, g)
    size = _sizes(b, n, "BN-fp32", torch.float32, device, g)
    plan = random_plan(b, n, c, r, device, g)
    weight, bias = _norm_params(d, torch.float32, device, g)
    got = triton_ops.merge_norm(x, size, plan, weight, bias, 1e-6)
    want = ref.merge_norm(x.cpu(), size.cpu(), ref.MergePlan(*(t.cpu() for t in plan[:3]), n, c),
                          weight.cpu(), bias.cpu(), 1e-6)
    for name, a, e in zip(("x", "size", "ln"), got, want):
        torch.testing.assert_close(a.cpu(), e, atol=2e-5, rtol=2e-5, msg=name)


def test_reference_norm_is_the_layernorm_module():
    """The reference path of the model keeps computing exactly what ``block.ln_2`` computed (fp32)."""
    g = torch.Generator().manual_seed(1)
    norm = nn.LayerNorm(48)
    with torch.no_grad():
        norm.weight.normal_(generator=g)
        norm.bias.normal_(generator=g)
    x = torch.randn(3, 21, 48, generator=g)
    plan = random_plan(3, 21, 1, 6, "cpu", g)
    size = torch.ones(3, 21, 1)
    out, _, ln = ops.merge_norm(x, size, plan, norm.weight, norm.bias, norm.eps, backend="torch")
    assert torch.equal(ln, norm(out))


def test_merge_norm_r0_is_a_layernorm(device):
    g = torch.Generator().manual_seed(3)
    x = make_tokens(2, 10, 16, torch.float32, "contiguous", device, g)
    size = _sizes(2, 10, "BN1-fp32", torch.float32, device, g)
    weight, bias = _norm_params(16, torch.float32, device, g)
    out, size_out, ln = ops.merge_norm(x, size, random_plan(2, 10, 1, 0, device, g), weight, bias, 1e-5,
                                       backend="triton")
    assert out is x and size_out is size
    torch.testing.assert_close(ln, ref.layer_norm(x, weight, bias, 1e-5))


@pytest.mark.parametrize("change, message", [
    (dict(weight=torch.ones(15)), "weight must have shape"),
    (dict(bias=torch.ones(16, dtype=torch.int32)), "bias has dtype"),
    (dict(weight=None), "weight must be a torch.Tensor"),
    (dict(eps=0.0), "eps=0.0 must be a positive float"),
    (dict(residual=torch.ones(2, 10, 15)), "residual must have x's shape"),
    (dict(residual=torch.ones(2, 10, 16, dtype=torch.float64)), "residual has dtype"),
    (dict(residual=1.0), "residual must be None or a torch.Tensor"),
], ids=["weight-shape", "bias-dtype", "weight-none", "eps-zero", "residual-shape", "residual-dtype",
        "residual-float"])
def test_merge_norm_errors(change, message):
    g = torch.Generator().manual_seed(0)
    args = dict(x=torch.randn(2, 10, 16), size=torch.ones(2, 10), plan=random_plan(2, 10, 1, 2, "cpu", g),
                weight=torch.ones(16), bias=torch.zeros(16), eps=1e-5)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        ops.merge_norm(**args, backend="torch")


def test_merge_norm_opcheck_and_compile(device):
    """The custom op passes opcheck, and merge_norm traces in one graph with eager's gradients."""
    g = torch.Generator().manual_seed(4)
    x = make_tokens(2, 20, 8, torch.float32, "contiguous", device, g)
    size = _sizes(2, 20, "BN1-fp32", torch.float32, device, g)
    plan = random_plan(2, 20, 1, 5, device, g)
    weight, bias = _norm_params(8, torch.float32, device, g)
    torch.library.opcheck(torch.ops.tempme.merge_norm_fwd,
                          (x, size, plan.merged, plan.dst, plan.kept, weight, bias, 1e-5, 1))
    torch.library.opcheck(torch.ops.tempme.merge_norm_fwd,
                          (x, size, plan.merged, plan.dst, plan.kept, weight, bias, 1e-5, 1, 1, None, x.flip(1)))

    def block_tail(metric, x, size, weight, bias):
        plan = ops.match(metric, 5, 1, backend="triton")
        x, size, ln = ops.merge_norm(x, size, plan, weight, bias, 1e-5, backend="triton", residual=x.sin())
        return x + ln.square(), size

    torch._dynamo.reset()
    compiled = torch.compile(block_tail, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    metric = make_tokens(2, 20, 8, torch.float32, "contiguous", device, g)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    results = []
    for fn in (compiled, block_tail):
        out, size_out = fn(metric, leaves[0], size, leaves[1], leaves[2])
        results.append((out, size_out) + torch.autograd.grad(out.square().sum(), leaves))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("f, group, n, c, d, r, dtype", [
    (4, 2, 50, 1, 64, 30, torch.float32), (6, 3, 21, 2, 32, 12, torch.float16), (2, 2, 17, 4, 768, 9, torch.bfloat16),
], ids=["F4-g2-N50-D64-fp32", "F6-g3-N21-D32-fp16", "F2-g2-N17-c4-D768-bf16"])
def test_join_merge_norm_matches_reference(f, group, n, c, d, r, dtype, device):
    """ClipMe's join, cross-clip merge and ``ln_1`` in one op: values and every gradient."""
    g = torch.Generator().manual_seed(f * n + d)
    x = make_tokens(2 * f, n, d, dtype, "contiguous", device, g)
    size = _sizes(2 * f, n, "BN1-fp32", dtype, device, g)
    frame_pos = torch.randn(1, f, 1, d, generator=g).to(dtype)
    weight, bias = _norm_params(d, dtype, device, g)
    out_shape = (2 * f // group, n * group - r, d)
    upstream = [torch.randn(out_shape, generator=g).to(dtype) for _ in range(2)]
    grads, results = {}, {}
    for backend, dev in (("triton", device), ("torch", "cpu")):
        leaves = [t.detach().to(dev).requires_grad_() for t in (x, frame_pos, weight, bias)]
        out, size_out, ln, plan = ops.join_merge_norm(leaves[0], size.to(dev), group, c, r, leaves[2], leaves[3],
                                                      1e-5, leaves[1], backend=backend)
        torch.autograd.backward((out, ln), [t.to(dev) for t in upstream])
        results[backend] = [t.detach().cpu() for t in (out, size_out, ln, plan.merged, plan.dst)]
        grads[backend] = [t.grad.cpu() for t in leaves]
    got_x, got_size, got_ln, got_merged, got_dst = results["triton"]
    assert torch.equal(got_merged, results["torch"][3]) and torch.equal(got_dst, results["torch"][4])
    atol, rtol = NORM_TOL[dtype]
    assert not got_ln.isnan().any()
    torch.testing.assert_close(got_ln, ref.layer_norm(got_x, weight.cpu(), bias.cpu(), 1e-5), atol=atol, rtol=rtol)
    torch.testing.assert_close(got_x, results["torch"][0], atol=atol, rtol=rtol)
    torch.testing.assert_close(got_size, results["torch"][1])
    atol, rtol = GRAD_TOL[dtype]
    for name, got, want in zip(("x", "frame_pos", "weight", "bias"), grads["triton"], grads["torch"]):
        torch.testing.assert_close(got, want, atol=atol * want.abs().max().item(), rtol=rtol, msg=f"grad {name}")


def test_join_merge_norm_gradcheck(device):
    g = torch.Generator().manual_seed(6)
    d = 4
    x = torch.randn(4, 6, d, generator=g, dtype=torch.float64).to(device).requires_grad_()
    size = torch.randint(1, 4, (4, 6), generator=g).double().to(device)
    frame_pos = torch.randn(1, 2, 1, d, generator=g, dtype=torch.float64).to(device).requires_grad_()
    weight = torch.randn(d, generator=g, dtype=torch.float64).to(device).requires_grad_()
    bias = torch.randn(d, generator=g, dtype=torch.float64).to(device).requires_grad_()

    def fn(t, pos, w, b_):
        out, _, ln, _ = triton_ops.join_merge_norm(t, size, 2, 1, 4, pos, (w, b_, 1e-5))
        return out, ln

    assert torch.autograd.gradcheck(fn, (x, frame_pos, weight, bias), fast_mode=device == "cpu")  # as above
