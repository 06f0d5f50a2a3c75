"""The sizes of an open_clip ViT that the token schedule and its FLOPs depend on, from a model or a name.

A schedule can be planned and costed before any weights exist: an open_clip model name (or JSON model
config) gives the same sizes as the built model, read from open_clip's model config.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class ViTGeometry:
    """Sizes of an open_clip ViT image tower with a class token.

    Attributes:
        depth: transformer layers.
        tokens_per_frame: class token + patches (50 for ViT-B/32 at 224 px, 197 for B/16, 257 for L/14).
        width: residual width ``D``; ``heads`` attention heads of ``width // heads`` channels.
        mlp_width: hidden width of each block's MLP.
        patch_size, in_chans: the patch embedding's kernel and input channels.
        embed_dim: width of the projected image embedding.
    """

    depth: int
    tokens_per_frame: int
    width: int
    mlp_width: int
    heads: int
    patch_size: int
    embed_dim: int
    in_chans: int = 3

    @property
    def grid(self) -> int:
        """Patches per side (7 for ViT-B/32 at 224 px, 14 for B/16, 16 for L/14)."""
        return round((self.tokens_per_frame - 1) ** 0.5)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "ViTGeometry":
        """The sizes of a built open_clip model (checked to be a ViT TempMe can patch)."""
        from .model import vit_geometry

        visual = getattr(model, "visual", None)
        if visual is None:
            raise TypeError(f"model is a {type(model).__name__} without .visual; pass an open_clip CLIP model")
        depth, tokens = vit_geometry(visual)
        block = visual.transformer.resblocks[0]
        conv = visual.conv1.weight
        return cls(depth=depth, tokens_per_frame=tokens, width=conv.shape[0],
                   mlp_width=block.mlp.c_fc.weight.shape[0], heads=block.attn.num_heads,
                   patch_size=conv.shape[-1], embed_dim=visual.proj.shape[1], in_chans=conv.shape[1])

    @classmethod
    def from_name(cls, name: str) -> "ViTGeometry":
        """The sizes of open_clip model ``name`` (or of a ``.json`` model config file), without building it."""
        import open_clip

        if name.endswith(".json"):
            path = Path(name)
            if not path.is_file():
                raise ValueError(f"model={name!r} looks like a JSON config but no such file exists")
            config = json.loads(path.read_text())
        else:
            config = open_clip.get_model_config(name)
            if config is None:
                raise ValueError(f"model={name!r} is not an open_clip model name (see open_clip.list_models()) "
                                 f"nor a .json model config file")
        vision = open_clip.model.CLIPVisionCfg(**config["vision_cfg"])
        if vision.timm_model_name or not isinstance(vision.layers, int):
            raise TypeError(f"model={name!r} has a timm or ResNet image tower; TempMe needs an open_clip "
                            f"VisionTransformer with a class token")
        if vision.attentional_pool or vision.pool_type != "tok":
            raise TypeError(f"model={name!r} pools with pool_type={vision.pool_type!r} / attentional pooling; "
                            f"TempMe needs class-token pooling (pool_type='tok')")
        image = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
        side = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[1]
        patches = (image // vision.patch_size) * (side // vision.patch_size)
        return cls(depth=vision.layers, tokens_per_frame=1 + patches, width=vision.width,
                   mlp_width=int(vision.width * vision.mlp_ratio), heads=vision.width // vision.head_width,
                   patch_size=vision.patch_size, embed_dim=config["embed_dim"])

    @classmethod
    def of(cls, model_or_name) -> "ViTGeometry":
        """Sizes from a model, a model name, a JSON config path, or a ``ViTGeometry`` (returned as is)."""
        if isinstance(model_or_name, cls):
            return model_or_name
        if isinstance(model_or_name, str):
            return cls.from_name(model_or_name)
        if isinstance(model_or_name, torch.nn.Module):
            return cls.from_model(model_or_name)
        raise TypeError(f"model_or_name must be an open_clip model, a model name or a ViTGeometry, got "
                        f"{type(model_or_name).__name__}")
