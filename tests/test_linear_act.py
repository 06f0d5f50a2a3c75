"""``ops.linear_act``: a linear layer and its activation in one op (a block's ``c_fc`` and GELU), and the encoder
that takes it for every block's MLP with ``encoder.FUSED_MLP``.

The Triton forward applies the activation to each product tile before writing it. Checked against the twin
(``reference.linear_act``, open_clip's modules) in float64: at most twice the twin's own error in the same dtype
(both round the product, then the activation), in every dtype and activation, over several tiles and with
strided inputs; where a gradient can flow, both backends run the twin.
"""
import pytest
import torch
from open_clip.transformer import QuickGELU
from torch import nn

from tempme_fast import apply_tempme, encode_video, encoder, ops
from tempme_fast.ops import accuracy, triton_linear
from tempme_fast.ops import reference as ref
from kit import DTYPES
from tiny import TINY_CONFIG, tiny_clip, video

from test_triton_ops import nan_outputs  # noqa: F401

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("nan_outputs")]

ALL_DTYPES = {**DTYPES, "fp64": torch.float64}


def _inputs(m, k, n, dtype, device, seed=0, layout="contiguous", bias=True):
    """``x [2, m, k]`` in ``layout`` (``sliced``: the first k features of wider rows, a view with a row stride
    of 2k; ``strided``: every other feature, no unit stride along K; ``transposed``: tokens outermost in memory),
    ``weight [n, k]`` (a view of a ``[k, n]`` tensor but for ``contiguous``) and ``bias [n]`` (or None)."""
    g = torch.Generator().manual_seed(seed)
    x = {"contiguous": lambda: torch.randn(2, m, k, generator=g),
         "sliced": lambda: torch.randn(2, m, 2 * k, generator=g)[..., :k],
         "strided": lambda: torch.randn(2, m, 2 * k, generator=g)[..., ::2],
         "transposed": lambda: torch.randn(m, 2, k, generator=g).transpose(0, 1)}[layout]()
    weight = torch.randn(n, k, generator=g) if layout == "contiguous" else torch.randn(k, n, generator=g).t()
    b = torch.randn(n, generator=g) if bias else None
    move = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return move(x), move(weight / k ** 0.5), move(b)


def _check(x, weight, bias, act, dtype):
    got = ops.linear_act(x, weight, bias, act, backend="triton")
    assert got.shape == (*x.shape[:-1], weight.shape[0]) and got.dtype == dtype
    want = ref.linear_act(x.double().cpu(), weight.double().cpu(), None if bias is None else bias.double().cpu(), act)
    same = ref.linear_act(x.cpu(), weight.cpu(), None if bias is None else bias.cpu(), act)
    err = (got.double().cpu() - want).abs().max().item()
    own = (same.double() - want).abs().max().item()
    assert err <= 2 * own + (1e-12 if dtype == torch.float64 else 1e-6), (act, err, own)


@pytest.mark.parametrize("act", ops.LINEAR_ACTIVATIONS)
@pytest.mark.parametrize("dtype", ALL_DTYPES.values(), ids=ALL_DTYPES.keys())
def test_linear_act_matches_the_twin(act, dtype, device):
    _check(*_inputs(37, 40, 72, dtype, device), act, dtype)


@pytest.mark.parametrize("layout", ["sliced", "strided", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_linear_act_over_many_tiles_and_strides(layout, dtype, device, monkeypatch):
    """16-wide tiles: several row, column and K steps, a partial tile along each, rows grouped for L2; inputs
    without unit stride along K, and strided tokens; no bias."""
    monkeypatch.setattr(triton_linear, "INTERPRETER_TILE", 16)
    for bias in (True, False):
        _check(*_inputs(53, 36, 41, dtype, device, seed=2, layout=layout, bias=bias), "gelu", dtype)


def test_linear_act_takes_the_gpu_tiles(device, monkeypatch):
    """The GPU's tile table (128 x 128 at 8 warps, or 64 x 128 where those would leave few programs) and its
    16-bit ``tl.dot``, run by the interpreter on a shape of several such tiles (float16: the interpreter's
    bfloat16 ``tl.dot`` is wrong)."""
    dtype = torch.float16
    monkeypatch.setattr(triton_linear, "_interpreting", lambda: False)
    assert triton_linear._linear_tiles(36480, 3072, 768, dtype)["BLOCK_M"] == 128
    assert triton_linear._linear_tiles(547, 3072, 768, dtype)["BLOCK_M"] == 64
    _check(*_inputs(70, 64, 136, dtype, device, seed=3), "quick_gelu", dtype)


def test_linear_act_takes_the_twin_where_a_gradient_flows(device):
    x, weight, bias = _inputs(5, 8, 12, torch.float32, device)
    weight.requires_grad_()
    out = ops.linear_act(x, weight, bias, "gelu", backend="triton")
    assert out.grad_fn is not None
    out.square().sum().backward()
    want = weight.detach().clone().requires_grad_()
    ref.linear_act(x, want, bias, "gelu").square().sum().backward()
    torch.testing.assert_close(weight.grad, want.grad)


def test_linear_act_compiles_in_one_graph(device):
    x, weight, bias = _inputs(9, 16, 24, torch.float32, device, seed=4)
    torch.library.opcheck(torch.ops.tempme.linear_act_fwd, (x, weight, bias, "quick_gelu"),
                          test_utils=("test_schema", "test_faketensor"))

    def mlp_half(x, weight, bias):
        return ops.linear_act(x.cos(), weight, bias, "gelu", backend="triton").square()

    torch._dynamo.reset()
    compiled = torch.compile(mlp_half, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, weight, bias), mlp_half(x, weight, bias))


@pytest.mark.parametrize("change, message", [
    (dict(x=torch.ones(16)), r"x must be \[\.\.\., K\]"),
    (dict(x=torch.ones(2, 16, dtype=torch.int64)), "x has dtype torch.int64"),
    (dict(weight=torch.ones(8, 15)), r"weight must have shape \[N, 16\]"),
    (dict(weight=torch.ones(8, 16, dtype=torch.int32)), "weight has dtype"),
    (dict(bias=torch.ones(7)), r"bias must have shape \[8\]"),
    (dict(act="relu"), "act='relu': valid: 'none', 'gelu', 'gelu_tanh', 'quick_gelu'"),
    (dict(backend="gpu"), "backend='gpu' is not one of"),
], ids=["x-rank", "x-dtype", "weight-shape", "weight-dtype", "bias-shape", "act", "backend"])
def test_linear_act_errors_name_the_argument(change, message):
    args = dict(x=torch.randn(3, 16), weight=torch.randn(8, 16), bias=torch.zeros(8), act="gelu", backend="torch")
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        ops.linear_act(**args)


# ---------------------------------------------------------------------------------------------
# The encoder: with FUSED_MLP, every block's c_fc and activation are one linear_act on the Triton backend
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), QuickGELU()], ids=["gelu", "tanh", "quick"])
def test_the_encoder_fuses_each_blocks_mlp(act, device, monkeypatch):
    """fp16 on the Triton backend with ``FUSED_MLP``: one ``linear_act`` a block with the block's activation,
    and the embedding within the Triton backend's tolerance of the torch backend's; none without the switch,
    on the torch backend, in float32 or where a gradient flows."""
    model = tiny_clip().to(device=device, dtype=torch.float16).eval()
    blocks = model.visual.transformer.resblocks
    for block in blocks:
        block.mlp.gelu = act
    v = video(2, TINY_CONFIG.frames, seed=6).to(device=device, dtype=torch.float16)
    calls = []
    fused = triton_linear.linear_act
    monkeypatch.setattr(triton_linear, "linear_act", lambda *a: calls.append(a[3]) or fused(*a))
    monkeypatch.setattr(encoder, "FUSED_MLP", True)
    with torch.no_grad():
        want = encode_video(apply_tempme(model, TINY_CONFIG, backend="torch"), v)
        assert calls == []
        got = encode_video(apply_tempme(model, TINY_CONFIG, backend="triton"), v)
    assert calls == [encoder._mlp_activation(blocks[0].mlp)] * len(blocks), calls
    assert accuracy.relative_error(got, want) <= accuracy.EMBEDDING_TOL[torch.float16]
    monkeypatch.setattr(encoder, "FUSED_MLP", False)
    with torch.no_grad():
        unfused = encode_video(model, v)
    assert len(calls) == len(blocks) and accuracy.relative_error(unfused, want) <= accuracy.EMBEDDING_TOL[
        torch.float16]
    monkeypatch.setattr(encoder, "FUSED_MLP", True)
    encode_video(model, v)  # a gradient can flow to the weights: open_clip's modules
    with torch.no_grad():
        encode_video(apply_tempme(model.float(), TINY_CONFIG, backend="triton"), v.float())  # float32
    assert len(calls) == len(blocks), calls


def test_an_mlp_of_other_layers_or_with_hooks_runs_as_its_module():
    mlp = nn.Sequential()
    mlp.add_module("c_fc", nn.Linear(4, 8))
    mlp.add_module("gelu", nn.GELU())
    mlp.add_module("c_proj", nn.Linear(8, 4))
    assert encoder._mlp_activation(mlp) == "gelu"
    mlp.gelu = nn.ReLU()
    assert encoder._mlp_activation(mlp) is None
    mlp.gelu = nn.GELU()
    mlp.add_module("ln", nn.LayerNorm(4))
    assert encoder._mlp_activation(mlp) is None
    del mlp.ln
    assert encoder._mlp_activation(mlp) == "gelu"
    handle = mlp.c_fc.register_forward_hook(lambda module, args, out: out * 2)  # the fused op would skip it
    assert encoder._mlp_activation(mlp) is None
    handle.remove()

    class Adapted(nn.Linear):  # computes something else from its weight
        def forward(self, x):
            return super().forward(x) + 1
    mlp.c_fc = Adapted(4, 8)
    assert encoder._mlp_activation(mlp) is None
    assert encoder._mlp_activation(nn.Linear(4, 4)) is None
