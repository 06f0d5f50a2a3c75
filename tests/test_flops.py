import open_clip
import pytest
import torch

from tempme_fast import TempMeConfig, apply_tempme, ops, remove_tempme
from tempme_fast.flops import flop_counter, measure_flops, model_flops
from tiny import TINY_CONFIG, tiny_clip


def _vit_b32_unmerged_flops(frames=12, n=50, d=768, layers=12, embed=512):
    """Closed form for one video through per-frame ViT-B/32: 2 FLOPs per multiply-add."""
    per_layer = 24 * n * d * d + 4 * n * n * d  # qkv 6nd^2 + out 2nd^2 + mlp 16nd^2; qk^T and av 4n^2d
    stem = 2 * (n - 1) * d * 3 * 32 * 32
    return frames * (stem + layers * per_layer + 2 * d * embed)


@pytest.fixture(scope="module")
def vit_b32():
    return open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()


def test_unmerged_vit_b32_counts_attention(vit_b32):
    expected = _vit_b32_unmerged_flops()
    with torch.no_grad(), flop_counter() as counter:  # open_clip's own inference path (native MHA)
        vit_b32.encode_image(torch.randn(12, 3, 224, 224))
    assert abs(counter.get_total_flops() - expected) / expected < 0.01
    apply_tempme(vit_b32, TempMeConfig.unmerged(12))
    try:
        measured, analytic = measure_flops(vit_b32), model_flops(vit_b32)
    finally:
        remove_tempme(vit_b32)
    assert abs(measured.total - expected) / expected < 0.01
    assert abs(analytic.total - expected) / expected < 0.01


def test_tempme_vit_b32_measured_equals_schedule(vit_b32):
    apply_tempme(vit_b32)
    try:
        measured, analytic = measure_flops(vit_b32), model_flops(vit_b32)
    finally:
        remove_tempme(vit_b32)
    assert len(measured.layers) == 12
    for got, want in zip(measured.layers, analytic.layers):
        assert abs(got - want) / want < 0.01
    ratio = measured.total / _vit_b32_unmerged_flops()
    assert 0.60 < ratio < 0.70  # about 65% of the unmerged model
    # Per-layer cost falls as the tokens do.
    assert measured.layers[11] < measured.layers[8] < measured.layers[0]


def test_tiny_measured_equals_analytic_with_batch():
    model = apply_tempme(tiny_clip(), TINY_CONFIG)
    batch = torch.randn(3, 4, 3, 32, 32)
    measured, analytic = measure_flops(model, batch), model_flops(model)
    assert measured.total == pytest.approx(analytic.total, rel=1e-9)


def test_sdpa_on_cpu_is_counted():
    q = torch.randn(2, 3, 10, 8)
    with flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(2, 1, 1, 10))
    assert counter.get_total_flops() == 4 * 2 * 3 * 10 * 10 * 8


@pytest.mark.interpreter
def test_triton_attention_is_counted_as_sdpa():
    """The Triton attention ops count the FLOPs of the SDPA path they replace, forward and backward."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 16, requires_grad=True) for _ in range(3))
    size = torch.rand(2, 9) + 1
    counts = {}
    for impl in ("sdpa", "triton"):
        with flop_counter() as counter:
            ops.attention(q, k, v, size, impl=impl).sum().backward()
        counts[impl] = counter.get_total_flops()
    assert counts["sdpa"] > 0 and counts["triton"] == counts["sdpa"]


@pytest.mark.interpreter
def test_triton_self_attention_is_counted_as_sdpa():
    """So do the ops on the packed projection (the encoder's training and traced path)."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 9, 3 * 32, requires_grad=True)
    size = torch.rand(2, 9) + 1
    counts = {}
    for impl in ("sdpa", "triton"):
        with flop_counter() as counter:
            ops.self_attention(qkv, 2, size, impl=impl)[0].sum().backward()
        counts[impl] = counter.get_total_flops()
    assert counts["sdpa"] > 0 and counts["triton"] == counts["sdpa"]
