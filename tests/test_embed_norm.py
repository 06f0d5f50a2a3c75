"""``ops.embed_norm``: the class token, the position embedding and ``ln_pre`` of each frame in one op, and
the encoder that starts with it on the Triton backend.

The Triton forward reads the patch embeddings once and writes the LayerNorm alone. Checked against the
reference twin (``reference.embed_norm``, the torch ops the encoder ran before): the LayerNorm within the
merge-norm tolerance of the twin's, in every dtype and patch layout; where a gradient can flow, both
backends run the twin.
"""
import pytest
import torch
from open_clip.transformer import PatchDropout

from tempme_fast import apply_tempme, encode_video, ops
from tempme_fast.encoder import embed_frames
from tempme_fast.ops import reference as ref
from tempme_fast.ops import triton_norm
from kit import dtype_layout_cases
from tiny import TINY_CONFIG, tiny_clip, video
# nan_outputs and tiling are fixtures: imported, pytest finds them in this module too.
from test_triton_ops import make_tokens, nan_outputs, tiling  # noqa: F401,F811
from test_merge_norm import NORM_TOL, _norm_params

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("nan_outputs")]


def _inputs(frames, patches, width, dtype, layout, device, seed=0, table_dtype=None):
    """Patch embeddings in ``layout``, and class and position embeddings (``table_dtype``, default the
    patches' dtype) and LayerNorm parameters of ``width`` features."""
    g = torch.Generator().manual_seed(seed)
    x = make_tokens(frames, patches, width, dtype, layout, device, g)
    table = table_dtype or dtype
    cls = torch.randn(width, generator=g).to(table).to(device)
    pos = torch.randn(patches + 1, width, generator=g).to(table).to(device)
    weight, bias = _norm_params(width, dtype, device, g)
    return x, cls, pos, weight, bias


# (M, P, D): ViT-B/32 and ViT-B/16 frames, a width that is no power of two, one patch.
@pytest.mark.parametrize("m, p, d, dtype, layout",
                         dtype_layout_cases([(3, 49, 768), (2, 196, 64), (4, 7, 80), (2, 1, 32)], "MPD"))
def test_embed_norm_matches_reference(m, p, d, dtype, layout, device):
    x, cls, pos, weight, bias = _inputs(m, p, d, dtype, layout, device, seed=m * p + d)
    ln = ops.embed_norm(x, cls, pos, weight, bias, 1e-5, backend="triton")
    assert ln.dtype == dtype and ln.shape == (m, p + 1, d) and ln.is_contiguous()
    assert not ln.isnan().any(), "an output element was never written"
    want = ref.embed_norm(x.cpu(), cls.cpu(), pos.cpu(), weight.cpu(), bias.cpu(), 1e-5)
    atol, rtol = NORM_TOL[dtype]
    torch.testing.assert_close(ln.cpu(), want, atol=atol, rtol=rtol)
    # The torch backend is the twin itself.
    assert torch.equal(ops.embed_norm(x.cpu(), cls.cpu(), pos.cpu(), weight.cpu(), bias.cpu(), 1e-5, "torch"), want)
    # With the next LayerNorm (the first block's ln_1): the same first output, and that LayerNorm of it.
    g = torch.Generator().manual_seed(d)
    nxt = (torch.randn(d, generator=g).to(dtype).to(device), torch.randn(d, generator=g).to(dtype).to(device), 1e-6)
    ln2, h = ops.embed_norm(x, cls, pos, weight, bias, 1e-5, backend="triton", next_norm=nxt)
    assert torch.equal(ln2, ln) and h.shape == ln.shape and h.dtype == dtype and not h.isnan().any()
    torch.testing.assert_close(h.cpu(), ref.layer_norm(ln2.cpu(), *(t.cpu() for t in nxt[:2]), 1e-6), atol=atol,
                               rtol=rtol)
    pair = ops.embed_norm(x.cpu(), cls.cpu(), pos.cpu(), weight.cpu(), bias.cpu(), 1e-5, "torch",
                          next_norm=tuple(t.cpu() for t in nxt[:2]) + (1e-6,))
    assert torch.equal(pair[0], want) and torch.equal(pair[1], ref.layer_norm(want, *(t.cpu() for t in nxt[:2]),
                                                                              1e-6))


def test_embed_norm_reads_each_token_where_it_is(tiling, device):
    """Several programs over frames (and, with ``gpu-tiles``, the GPU's tiles): token 0 of every frame is
    the class embedding, token t the frame's patch t - 1, each with its own position embedding; float32
    tables under 16-bit patches are cast first, as the encoder casts them."""
    x, cls, pos, weight, bias = _inputs(5, 11, 48, torch.float16, "transposed", device, seed=3,
                                        table_dtype=torch.float32)
    (ln,) = triton_norm.embed_norm(x, cls, pos, weight, bias, 1e-6)
    want = ref.embed_norm(x.cpu(), cls.cpu(), pos.cpu(), weight.cpu(), bias.cpu(), 1e-6)
    torch.testing.assert_close(ln.cpu(), want, atol=NORM_TOL[torch.float16][0], rtol=NORM_TOL[torch.float16][1])
    # A frame's rows differ from another's only in their patches: the class token's row is the same.
    torch.testing.assert_close(ln[:, 0], ln[:1, 0].expand(5, -1), atol=0, rtol=0)


def test_embed_norm_takes_the_twin_where_a_gradient_flows(device):
    x, cls, pos, weight, bias = _inputs(2, 4, 16, torch.float32, "contiguous", device)
    pos.requires_grad_()
    ln = ops.embed_norm(x, cls, pos, weight, bias, 1e-5, backend="triton")
    assert ln.grad_fn is not None
    ln.square().sum().backward()
    want = pos.detach().clone().requires_grad_()
    ref.embed_norm(x, cls, want, weight, bias, 1e-5).square().sum().backward()
    torch.testing.assert_close(pos.grad, want.grad)


def test_embed_norm_compiles_in_one_graph(device):
    """The custom op passes opcheck, and the encoder's start traces in one graph with eager's values."""
    x, cls, pos, weight, bias = _inputs(2, 9, 16, torch.float32, "contiguous", device, seed=4)
    torch.library.opcheck(torch.ops.tempme.embed_norm_fwd, (x, cls, pos, weight, bias, 1e-5),
                          test_utils=("test_schema", "test_faketensor"))

    def start(x, cls, pos, weight, bias):
        return ops.embed_norm(x.cos(), cls, pos, weight, bias, 1e-5, backend="triton").square()

    torch._dynamo.reset()
    compiled = torch.compile(start, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, cls, pos, weight, bias), start(x, cls, pos, weight, bias))


@pytest.mark.parametrize("change, message", [
    (dict(patches=torch.ones(2, 10)), r"patches must have shape \[M, P, D\]"),
    (dict(patches=torch.ones(0, 10, 16)), "patches is empty"),
    (dict(class_embedding=torch.ones(15)), r"class_embedding must have shape \[16\]"),
    (dict(positional_embedding=torch.ones(10, 16)), r"positional_embedding must have shape \[11, 16\]"),
    (dict(positional_embedding=torch.ones(11, 16, dtype=torch.int64)), "positional_embedding has dtype"),
    (dict(weight=torch.ones(15)), r"weight must have shape \[D\] = \[16\]"),
    (dict(eps=0.0), "eps=0.0 must be a positive float"),
    (dict(backend="gpu"), "backend='gpu' is not one of"),
    (dict(next_norm=(torch.ones(16), torch.zeros(16))), r"next_norm must be \(weight, bias, eps\)"),
    (dict(next_norm=(torch.ones(15), torch.zeros(16), 1e-5)), r"weight must have shape \[D\] = \[16\]"),
], ids=["patches-rank", "patches-empty", "cls-shape", "pos-shape", "pos-dtype", "weight-shape", "eps-zero",
        "backend", "next-norm-arity", "next-norm-weight"])
def test_embed_norm_errors_name_the_argument(change, message):
    args = dict(patches=torch.randn(2, 10, 16), class_embedding=torch.randn(16),
                positional_embedding=torch.randn(11, 16), weight=torch.ones(16), bias=torch.zeros(16), eps=1e-5,
                backend="torch")
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        ops.embed_norm(**args)


def test_embed_norm_check_finite_names_the_tensor():
    x = torch.randn(1, 3, 4)
    x[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="patches"):
        ops.embed_norm(x, torch.ones(4), torch.ones(4, 4), torch.ones(4), torch.zeros(4), 1e-5, "torch",
                       check_finite=True)


# ---------------------------------------------------------------------------------------------
# The encoder: on the Triton backend its residual stream starts with embed_norm
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_the_encoder_starts_with_one_embed_norm(dtype, device, monkeypatch):
    """``embed_frames`` on the Triton backend gives the torch ops' state through one ``embed_norm``; on the
    torch backend, in training (patch dropout) and where a gradient flows, it runs the torch ops as before."""
    model = tiny_clip().to(device=device, dtype=dtype).eval()
    frames = video(2, 3, seed=5).flatten(0, 1).to(device=device, dtype=dtype)
    calls = []
    fused = triton_norm.embed_norm
    monkeypatch.setattr(triton_norm, "embed_norm", lambda *a: calls.append(a[0].shape) or fused(*a))
    with torch.no_grad():
        got = embed_frames(model.visual, frames, backend="triton").x
        want = embed_frames(model.visual, frames, backend="torch").x
    assert len(calls) == 1, calls
    atol, rtol = NORM_TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    with torch.no_grad():
        embed_frames(model.visual, frames, backend="torch")
        model.visual.patch_dropout = PatchDropout(0.5).train()  # drops patches: the LayerNorm reads fewer
        assert embed_frames(model.visual, frames, backend="triton").x.shape[1] < want.shape[1]
        model.visual.patch_dropout = PatchDropout(0.5).eval()  # drops nothing
        torch.testing.assert_close(embed_frames(model.visual, frames, backend="triton").x, got, atol=0, rtol=0)
    assert len(calls) == 2, calls
    assert all(p.requires_grad for p in model.visual.parameters())
    embed_frames(model.visual, frames, backend="triton")
    assert len(calls) == 2, calls


def test_encode_video_on_triton_matches_torch_from_the_start(device):
    """The whole encoder, both backends, with the embedding fused on Triton (no gradient)."""
    model = apply_tempme(tiny_clip().to(device).eval(), TINY_CONFIG, backend="triton")
    v = video(2, TINY_CONFIG.frames, seed=6).to(device)
    with torch.no_grad():
        got = encode_video(model, v)
        want = encode_video(apply_tempme(model, TINY_CONFIG, backend="torch"), v)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_the_embedding_applies_the_first_blocks_ln_1(dtype, device, monkeypatch):
    """``embed_frames(..., next_norm=ln_1)`` on the Triton backend hands ``(ln_1, ln_1(x))`` on in ``normed``,
    from its one ``embed_norm``; ``encode_video`` passes the first block's ``ln_1`` (``model.first_norm``) and
    that block reads it from the state, so it runs no LayerNorm of its own before attention (one
    ``layer_norm`` call fewer). The torch backend, and a gradient, hand nothing on."""
    from tempme_fast import encoder
    from tempme_fast.model import first_norm

    model = tiny_clip().to(device=device, dtype=dtype).eval()
    ln_1 = model.visual.transformer.resblocks[0].ln_1
    frames = video(2, 3, seed=7).flatten(0, 1).to(device=device, dtype=dtype)
    with torch.no_grad():
        state = embed_frames(model.visual, frames, backend="triton", next_norm=ln_1)
        assert state.normed is not None and state.normed[0] is ln_1
        atol, rtol = NORM_TOL[dtype]
        torch.testing.assert_close(state.normed[1], ref.layer_norm(state.x, ln_1.weight, ln_1.bias, ln_1.eps),
                                   atol=atol, rtol=rtol)
        assert torch.equal(state.x, embed_frames(model.visual, frames, backend="triton").x)
        assert embed_frames(model.visual, frames, backend="torch", next_norm=ln_1).normed is None
    assert embed_frames(model.visual, frames, backend="triton", next_norm=ln_1).normed is None  # a gradient flows
    model = apply_tempme(model, TINY_CONFIG, backend="triton")
    assert first_norm(model) is ln_1
    v = video(2, TINY_CONFIG.frames, seed=8).to(device=device, dtype=dtype)
    norms = []
    layer_norm = encoder._layer_norm
    monkeypatch.setattr(encoder, "_layer_norm", lambda norm, x: norms.append(norm) or layer_norm(norm, x))
    with torch.no_grad():
        encode_video(model, v)
        assert ln_1 not in norms
        norms.clear()
        encode_video(apply_tempme(model, TINY_CONFIG, backend="torch"), v)
    assert ln_1 in norms
