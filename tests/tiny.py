"""Small random open_clip models and configs that keep the tests fast."""
import open_clip
import torch

from tempme_fast import TempMeConfig

# The tiny model as an open_clip JSON model config (for the command-line tools) and TINY_CONFIG's options.
TINY_JSON = {
    "embed_dim": 24,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}
TINY_ARGS = ["--frames", "4", "--imgme-r", "1", "--clip-layers", "2", "3", "--clip-groups", "2", "2"]

# 4 layers, width 64, 2 heads, 32x32 images in 8x8 patches: 17 tokens per frame.
TINY_CONFIG = TempMeConfig(frames=4, imgme_r=1, clip_layers=(2, 3), clip_groups=(2, 2), cross_ratio=0.3,
                           intra_ratio=0.1)


def tiny_clip(layers=4, width=64, patch_size=8, image_size=32, quick_gelu=True, seed=0,
              ls_init_value=None) -> torch.nn.Module:
    torch.manual_seed(seed)
    vision = open_clip.model.CLIPVisionCfg(layers=layers, width=width, head_width=32, patch_size=patch_size,
                                           image_size=image_size, ls_init_value=ls_init_value)
    text = open_clip.model.CLIPTextCfg(context_length=16, vocab_size=1000, width=32, heads=2, layers=1)
    model = open_clip.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu)
    # Non-zero biases and LayerNorm affine terms, so a test cannot pass by ignoring them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def video(batch, frames, image_size=32, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 3, image_size, image_size, generator=g).to(dtype)
