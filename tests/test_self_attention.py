"""``ops.self_attention``: attention from the packed q | k | v projection, as the encoder calls it.

It must equal splitting the projection into ``[B', H, N, d]`` heads, :func:`ops.attention` and
concatenating the heads again, bit for bit: the Triton kernel reads the same elements through
token-major strides, and every other implementation runs that very split.
"""
import pytest
import torch

from tempme_fast import ops
from tempme_fast.ops import triton_attention
from kit import DTYPES


def split_heads(qkv: torch.Tensor, heads: int):
    rows, tokens, width = qkv.shape
    return qkv.view(rows, tokens, 3, heads, width // 3 // heads).permute(2, 0, 3, 1, 4).unbind(0)


def by_split(qkv, heads, size, impl, backend):
    """The same attention through ``ops.attention`` on ``[B', H, N, d]`` heads: ``(out [B', N, D], keys)``."""
    q, k, v = split_heads(qkv, heads)
    out = ops.attention(q, k, v, size, impl=impl, backend=backend)
    return out.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], -1), k.mean(dim=1)


def inputs(rows, tokens, heads, head_dim, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(rows, tokens, 3 * heads * head_dim, generator=g).to(device=device, dtype=dtype)
    size = torch.randint(1, 31, (rows, tokens, 1), generator=g).float().to(device)
    return qkv, size


@pytest.mark.parametrize("impl", ["sdpa", "eager", "fold"])
@pytest.mark.parametrize("with_size", [False, True], ids=["plain", "sizes"])
def test_reference_impls_equal_the_split(impl, with_size):
    qkv, size = inputs(3, 13, 2, 16, torch.float32, "cpu")
    size = size if with_size else None
    out, keys = ops.self_attention(qkv, 2, size, impl=impl, backend="torch", keys=True)
    want_out, want_keys = by_split(qkv, 2, size, impl, "torch")
    assert torch.equal(out, want_out) and torch.equal(keys, want_keys)
    assert ops.self_attention(qkv, 2, size, impl=impl, backend="torch")[1] is None


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=list(DTYPES))
@pytest.mark.parametrize("rows, tokens, heads, head_dim", [(2, 37, 3, 16), (1, 50, 2, 64)],
                         ids=lambda v: str(v))
def test_triton_token_major_equals_the_split(device, dtype, rows, tokens, heads, head_dim, monkeypatch):
    """Forward: bit for bit (one kernel, the same elements). Backward: gradients of qkv and size equal."""
    def new_output(shape, dt, dev):  # an element the kernel never writes shows up as NaN
        return torch.full(shape, float("nan"), dtype=dt, device=dev) if dt.is_floating_point else torch.empty(
            shape, dtype=dt, device=dev)
    monkeypatch.setattr(triton_attention, "_new_output", new_output)
    qkv, size = inputs(rows, tokens, heads, head_dim, dtype, device)
    with torch.no_grad():
        out, keys = ops.self_attention(qkv, heads, size, impl="triton", backend="triton", keys=True)
        want_out, want_keys = by_split(qkv, heads, size, "triton", "triton")
    assert not out.isnan().any()
    assert torch.equal(out, want_out) and torch.equal(keys, want_keys)

    assert_packed_gradients_equal_the_split(qkv, size, heads)


def assert_packed_gradients_equal_the_split(qkv, size, heads):
    """The packed projection's gradient (``SelfAttentionFunction``: the kernels write dq, dk and dv into
    one ``[B', N, 3 D]`` buffer) and the sizes' equal those through the heads' views, bit for bit."""
    grads = []
    for fn in (lambda a, s: ops.self_attention(a, heads, s, impl="triton", backend="triton")[0],
               lambda a, s: by_split(a, heads, s, "triton", "triton")[0]):
        leaf, s = qkv.detach().requires_grad_(), size.detach().requires_grad_()
        out = fn(leaf, s)
        grads.append(type(out.grad_fn).__name__)
        out.backward(torch.ones_like(out))
        grads.append((leaf.grad, s.grad))
    assert grads[0] == "SelfAttentionFunctionBackward", grads[0]
    assert grads[3][1].shape == size.shape
    assert torch.equal(grads[1][0], grads[3][0]) and torch.equal(grads[1][1], grads[3][1])


def test_bad_inputs_name_the_argument():
    qkv = torch.randn(2, 5, 48)
    with pytest.raises(ValueError, match=r"qkv must have shape \[B', N, 3 \* D\] with D divisible by heads=5"):
        ops.self_attention(qkv, 5)
    with pytest.raises(ValueError, match="qkv must have shape"):
        ops.self_attention(qkv[0], 2)
    with pytest.raises(TypeError, match="qkv must be a torch.Tensor"):
        ops.self_attention(qkv.tolist(), 2)
    with pytest.raises(ValueError, match="heads=0 must be >= 1"):
        ops.self_attention(qkv, 0)
    with pytest.raises(ValueError, match=r"size must have shape \[B', N\] or \[B', N, 1\] = \[2, 5\(, 1\)\]"):
        ops.self_attention(qkv, 2, torch.ones(2, 4))
    with pytest.raises(ValueError, match="impl='flash' is not an attention implementation"):
        ops.self_attention(qkv, 2, impl="flash")
    with pytest.raises(TypeError, match="impl='triton' needs qkv of one dtype among"):
        ops.self_attention(qkv.double(), 2, impl="triton")


@pytest.mark.cuda
@pytest.mark.parametrize("rows, tokens", [(192, 195), (96, 254), (16, 607)], ids=lambda v: str(v))
def test_triton_token_major_equals_the_split_at_vit_b16_shapes(rows, tokens):
    """The compiled kernel at the ViT-B/16 16-video shapes: token-major strides (a batch stride of
    N * 3D, a token stride of 3D) give the bits the heads-first views give."""
    qkv, size = inputs(rows, tokens, 12, 64, torch.float16, "cuda")
    with torch.inference_mode():
        out, keys = ops.self_attention(qkv, 12, size, keys=True)
        want_out, want_keys = by_split(qkv, 12, size, "triton", "auto")
    assert torch.equal(out, want_out) and torch.equal(keys, want_keys)
    assert_packed_gradients_equal_the_split(qkv, size, 12)


@pytest.mark.interpreter
@pytest.mark.parametrize("bias_grad", [False, True], ids=["no-bias-grad", "bias-grad"])
def test_packed_custom_ops_pass_opcheck(device, bias_grad):
    """``tempme::self_attention_fwd`` / ``_bwd``, what torch.compile and dispatch modes see: schemas,
    fake implementations, outputs that alias nothing (an empty tensor for a bias gradient not asked for)."""
    qkv, size = inputs(2, 9, 2, 16, torch.float32, device)
    bias = size.log()
    out, lse = torch.ops.tempme.self_attention_fwd(qkv, 2, bias)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(torch.ops.tempme.self_attention_fwd, (qkv, 2, bias))
    torch.library.opcheck(torch.ops.tempme.self_attention_bwd, (grad_out, qkv, 2, bias, out, lse, bias_grad))
    dqkv, dbias = torch.ops.tempme.self_attention_bwd(grad_out, qkv, 2, bias, out, lse, bias_grad)
    assert dqkv.shape == qkv.shape and dbias.shape == ((2, 2, 9) if bias_grad else (0,))


@pytest.mark.interpreter
def test_packed_training_path_compiles_without_graph_breaks(device):
    """``torch.compile(fullgraph=True)`` through ``SelfAttentionFunction`` and its custom ops: the output
    and the projection's gradient equal the eager ones."""
    qkv, size = inputs(2, 9, 2, 16, torch.float32, device)

    def attend(a):
        return ops.self_attention(a, 2, size, impl="triton", backend="triton")[0]
    grads = []
    for fn in (attend, torch.compile(attend, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")):
        leaf = qkv.detach().requires_grad_()
        out = fn(leaf)
        out.square().sum().backward()
        grads.append((out.detach(), leaf.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-6)


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """The aten ops an eager call dispatches (the Triton ops run their launchers under it)."""

    sees_eager_path = True

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=list(DTYPES))
def test_packed_training_takes_the_sizes_log_in_the_kernels(device, dtype):
    """Sizes that take no gradient (the encoder's) go to the kernels as they are, forward and backward,
    which take their log as they read them: no ``log`` op, and the projection's gradient as with the
    bias ``log(size)`` given (the sizes requiring grad), up to the rounding of the two logs."""
    qkv, size = inputs(2, 37, 3, 16, dtype, device)
    grads = []
    for size_grad in (False, True):
        leaf = qkv.detach().requires_grad_()
        counted = _Ops()
        with counted:
            out = ops.self_attention(leaf, 3, size.detach().requires_grad_(size_grad), impl="triton",
                                     backend="triton")[0]
        assert ("log" in counted.names) == size_grad, counted.names
        out.backward(torch.ones_like(out))
        grads.append((out.detach(), leaf.grad))
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for got, want in zip(grads[0], grads[1]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


# ``ops.query_attention(q, kv, heads, size)``: the trimmed last block's class tokens over every token's
# packed k | v projection. In training its Triton path writes q's and kv's gradients whole
# (``QueryAttentionFunction``), as the packed self-attention does.

def query_inputs(rows, queries, tokens, heads, head_dim, dtype, device, seed=0):
    qkv, size = inputs(rows, tokens, heads, head_dim, dtype, device, seed)
    width = heads * head_dim
    return qkv[:, :queries, :width].contiguous(), qkv[..., width:].contiguous(), size


def query_by_split(q, kv, heads, size):
    """The same attention through ``ops.attention`` on token-major views of the heads (the path the
    class tokens took in training before: autograd transposes and stacks the heads' gradients)."""
    rows, queries, width = q.shape
    k, v = kv.view(rows, kv.shape[1], 2, heads, width // heads).unbind(2)
    out = ops.attention(q.view(rows, queries, heads, width // heads).transpose(1, 2), k.transpose(1, 2),
                        v.transpose(1, 2), size, impl="triton", backend="triton")
    return out.transpose(1, 2).flatten(2)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=list(DTYPES))
@pytest.mark.parametrize("rows, queries, tokens, heads, head_dim", [(2, 1, 37, 3, 16), (2, 6, 50, 2, 64)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("size_grad", [False, True], ids=["sizes", "sizes-grad"])
def test_packed_query_attention_gradients_equal_the_split(device, dtype, rows, queries, tokens, heads, head_dim,
                                                          size_grad, monkeypatch):
    """Output and the gradients of q, kv (and size) as through the heads' views, every element
    written: bit for bit where the sizes take a gradient (both take ``log(size)`` as a bias); where
    they take none, no ``log`` op runs (the kernels take it) and the two logs' rounding is the
    difference."""
    def new_output(shape, dt, dev):  # an element the kernel never writes shows up as NaN
        return torch.full(shape, float("nan"), dtype=dt, device=dev) if dt.is_floating_point else torch.empty(
            shape, dtype=dt, device=dev)
    monkeypatch.setattr(triton_attention, "_new_output", new_output)
    assert_packed_query_equals_the_split(*query_inputs(rows, queries, tokens, heads, head_dim, dtype, device), heads,
                                         size_grad)


def assert_packed_query_equals_the_split(q, kv, size, heads, size_grad):
    results = []
    for packed in (True, False):
        leaves = q.detach().requires_grad_(), kv.detach().requires_grad_(), size.detach().requires_grad_(size_grad)
        counted = _Ops()
        with counted:
            if packed:
                out = ops.query_attention(*leaves[:2], heads, leaves[2], impl="triton", backend="triton")
            else:
                out = query_by_split(leaves[0], leaves[1], heads, leaves[2])
        grad_fn = type(out.grad_fn).__name__
        out.backward(torch.ones_like(out))
        results.append((grad_fn, counted.names, out.detach(), *(t.grad for t in leaves)))
    (fn, names, *got), (_, _, *want) = results
    assert fn == "QueryAttentionFunctionBackward", fn
    assert ("log" in names) == size_grad, names
    assert not got[0].isnan().any() and not got[1].isnan().any() and not got[2].isnan().any()
    tol = 0 if size_grad else {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[q.dtype]
    for a, b in zip(got, want):
        assert (a is None) == (b is None) == (a is got[3] and not size_grad)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("size_grad", [False, True], ids=["sizes", "sizes-grad"])
def test_packed_query_attention_at_vit_b16_class_token_shapes(size_grad):
    """The compiled kernels at a ViT-B/16 trimmed last block, 16 videos (12 class tokens a clip over its
    tokens): as through the heads' views."""
    assert_packed_query_equals_the_split(*query_inputs(16, 12, 547, 12, 64, torch.float16, "cuda"), 12, size_grad)


@pytest.mark.interpreter
@pytest.mark.parametrize("bias_grad", [False, True], ids=["no-bias-grad", "bias-grad"])
def test_packed_query_custom_ops_pass_opcheck(device, bias_grad):
    """``tempme::query_attention_fwd`` / ``_bwd``: schemas, fake implementations, outputs that alias
    nothing (an empty tensor for a bias gradient not asked for)."""
    q, kv, size = query_inputs(2, 3, 9, 2, 16, torch.float32, device)
    bias = size.log()
    out, lse = torch.ops.tempme.query_attention_fwd(q, kv, 2, bias)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(torch.ops.tempme.query_attention_fwd, (q, kv, 2, bias))
    torch.library.opcheck(torch.ops.tempme.query_attention_bwd, (grad_out, q, kv, 2, bias, out, lse, bias_grad))
    dq, dkv, dbias = torch.ops.tempme.query_attention_bwd(grad_out, q, kv, 2, bias, out, lse, bias_grad)
    assert dq.shape == q.shape and dkv.shape == kv.shape and dbias.shape == ((2, 2, 9) if bias_grad else (0,))
    with pytest.raises(ValueError, match="bias_grad=True needs the bias itself"):
        triton_attention.query_attention_backward(grad_out, q, kv, 2, size, out, lse, True, log_bias=True)


@pytest.mark.interpreter
def test_packed_query_training_path_compiles_without_graph_breaks(device):
    """``torch.compile(fullgraph=True)`` through ``QueryAttentionFunction`` and its custom ops: the output
    and the gradients of q and kv equal the eager ones."""
    q, kv, size = query_inputs(2, 3, 9, 2, 16, torch.float32, device)

    def attend(a, b):
        return ops.query_attention(a, b, 2, size, impl="triton", backend="triton")
    results = []
    for fn in (attend, torch.compile(attend, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")):
        leaves = q.detach().requires_grad_(), kv.detach().requires_grad_()
        out = fn(*leaves)
        out.square().sum().backward()
        results.append((out.detach(), *(t.grad for t in leaves)))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
