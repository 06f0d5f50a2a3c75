"""The whole model on the Triton backend equals the torch backend (interpreter without a GPU)."""
import open_clip
import pytest
import torch

from kit import parametrize_dtypes
from tempme_fast import TempMeConfig, apply_tempme
from tiny import TINY_CONFIG, tiny_clip, video

pytestmark = pytest.mark.interpreter

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def _encode_both(model, v, mask=None):
    with torch.no_grad():
        apply_tempme(model, model.tempme.config, backend="torch")
        want = model.encode_video(v, mask)
        apply_tempme(model, model.tempme.config, backend="triton")
        got = model.encode_video(v, mask)
    return got, want


@parametrize_dtypes()
def test_tiny_model_triton_equals_torch(device, dtype):
    model = apply_tempme(tiny_clip(), TINY_CONFIG).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in model.visual.tempme_frame_pos.values():
            p.normal_()
    v = video(3, 4).to(device=device, dtype=dtype)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], device=device)
    got, want = _encode_both(model, v, mask)
    err = ((got.float() - want.float()).norm(dim=-1) / want.float().norm(dim=-1)).max().item()
    assert err < TOLERANCE[dtype]


def test_tiny_model_triton_gradients_equal_torch(device):
    grads = {}
    for backend in ("torch", "triton"):
        model = apply_tempme(tiny_clip(), TINY_CONFIG, backend=backend).to(device).train()
        with torch.no_grad():
            for p in model.visual.tempme_frame_pos.values():
                p.normal_()
        model.encode_video(video(2, 4).to(device)).square().sum().backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["torch"].keys() == grads["triton"].keys()
    for name, g in grads["torch"].items():
        torch.testing.assert_close(grads["triton"][name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_vit_b32_two_videos_triton_equals_torch(device):
    model = apply_tempme(open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval(),
                         TempMeConfig()).to(device)
    got, want = _encode_both(model, video(2, 12, image_size=224).to(device))
    assert ((got - want).norm(dim=-1) / want.norm(dim=-1)).max() < 1e-4


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_whole_model_compiles_without_graph_breaks(device, backend):
    model = apply_tempme(tiny_clip(), TINY_CONFIG, backend=backend).to(device)
    v = video(2, 4).to(device)
    # aot_eager traces the whole forward (fullgraph: any graph break fails) without inductor's C++ build.
    compiled = torch.compile(model.encode_video, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    with torch.no_grad():
        torch.testing.assert_close(compiled(v), model.encode_video(v), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_whole_model_trains_compiled(device, backend):
    """``torch.compile`` of ``encode_video`` in training (fullgraph; AOTAutograd compiles the backward through
    the merge, attention and LayerNorm autograd functions): the gradients of eager training."""
    model = apply_tempme(tiny_clip(), TINY_CONFIG, backend=backend).to(device).train()
    v = video(2, 4).to(device)

    def grads(encode):
        model.zero_grad(set_to_none=True)
        encode(v).float().square().sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    want = grads(model.encode_video)
    compiled = torch.compile(model.encode_video, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    got = grads(compiled)
    assert got.keys() == want.keys() and len(want) > 20
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("config", [TINY_CONFIG.replace(cross_ratio=0.0), TINY_CONFIG.replace(intra_ratio=0.0)],
                         ids=["no-cross-merge", "no-intra-merge"])
def test_joins_without_a_merge_keep_token_order(device, config):
    """A join that removes nothing is a plain join on both backends (no merge-order shuffle)."""
    model = apply_tempme(tiny_clip(), config).to(device)
    v = video(2, 4).to(device)
    with torch.no_grad():
        apply_tempme(model, config, backend="torch")
        want, want_sources = model.encode_video(v, return_sources=True)
        apply_tempme(model, config, backend="triton")
        got, got_sources = model.encode_video(v, return_sources=True)
    assert torch.equal(got_sources.assignment, want_sources.assignment)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
