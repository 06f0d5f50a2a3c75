"""Build open_clip models from a name or a JSON config, with pretrained weights or a checkpoint."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch


def create_model(model: str, pretrained: Optional[str] = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An open_clip CLIP model in eval mode.

    Args:
        model: an open_clip model name (``ViT-B-32-quickgelu``) or the path of a JSON model config
            in open_clip's format (its file name, without ``.json``, becomes the model name).
        pretrained: an open_clip pretrained tag (``openai``) or a local checkpoint file; None keeps
            random weights.
    """
    import open_clip

    name = model
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise ValueError(f"model={model!r} looks like a JSON config but no such file exists")
        open_clip.add_model_config(path)
        name = path.stem
    elif name not in open_clip.list_models():
        raise ValueError(f"model={model!r} is not an open_clip model name (see open_clip.list_models()) "
                         f"nor a .json model config file")
    if pretrained and os.path.sep in pretrained and not os.path.isfile(pretrained):
        raise ValueError(f"pretrained={pretrained!r} is neither an open_clip tag nor an existing file")
    net = open_clip.create_model(name, pretrained=pretrained or None, device=device)
    return net.to(dtype=dtype).eval()
