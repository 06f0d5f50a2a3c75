"""The patch embedding as one matrix product (CUDA's path) equals open_clip's convolution."""
import pytest
import torch
from torch import nn

from tempme_fast import apply_tempme
from tempme_fast.encoder import patch_embed
from tiny import TINY_CONFIG, tiny_clip, video


@pytest.mark.parametrize("patch, height, width, bias", [(32, 224, 224, False), (16, 224, 224, True),
                                                        (14, 230, 225, False), (8, 32, 40, False)],
                         ids=["B32", "B16-bias", "remainder", "wide"])
def test_matmul_equals_the_convolution(patch, height, width, bias):
    """Float64, so that the two summation orders agree to rounding; a size that is no multiple of the
    patch drops its remainder as the stride-``patch`` convolution does."""
    g = torch.Generator().manual_seed(patch)
    conv = nn.Conv2d(3, 48, patch, patch, bias=bias).double()
    frames = torch.randn(3, 3, height, width, generator=g, dtype=torch.float64)
    want = patch_embed(conv, frames, as_matmul=False)
    got = patch_embed(conv, frames, as_matmul=True)
    assert got.shape == want.shape == (3, (height // patch) * (width // patch), 48)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 16, 8, 4), nn.Conv2d(3, 16, 8, 8, padding=1),
                                  nn.Conv2d(3, 16, 8, 8, dilation=2)], ids=["overlap", "padding", "dilation"])
def test_other_convolutions_run_as_convolutions(conv):
    frames = torch.randn(2, 3, 32, 32)
    assert torch.equal(patch_embed(conv, frames, as_matmul=True), conv(frames).flatten(2).transpose(1, 2))


def test_a_hooked_convolution_runs_its_hook():
    conv = nn.Conv2d(3, 16, 8, 8)
    conv.register_forward_hook(lambda module, args, out: out * 0)
    assert patch_embed(conv, torch.randn(1, 3, 16, 16), as_matmul=True).abs().max() == 0


def test_the_encoder_on_cuda_takes_the_product(device):
    """On CUDA the encoder's patch embedding is the matrix product, within float32 rounding of the
    convolution; on the CPU it is the convolution itself."""
    model = apply_tempme(tiny_clip(), TINY_CONFIG, backend="torch").to(device)
    frames = video(1, 4).flatten(0, 1).to(device)
    conv = model.visual.conv1
    got = patch_embed(conv, frames)
    with torch.backends.cudnn.flags(allow_tf32=False):  # cuDNN's default on CUDA: TF32 products
        want = conv(frames).flatten(2).transpose(1, 2)
    if device == "cpu":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
