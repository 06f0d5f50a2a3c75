"""Build open_clip models from a name or a JSON config, with pretrained weights or a checkpoint."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch


# The activation dtypes the command-line tools take, by their short names.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_dtype_name(device: torch.device) -> str:
    """Half precision on a GPU, float32 on the CPU."""
    return "fp16" if device.type == "cuda" else "fp32"


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is a GPU, else CPU), ``cpu``, ``cuda`` or ``cuda:N``, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available; use --device cpu")
    return device


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
    # OpenAI's weights were trained with QuickGELU; open_clip only warns when the model name lacks it.
    quick_gelu = bool(pretrained and not os.path.isfile(pretrained)
                      and open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))
    net = open_clip.create_model(name, pretrained=pretrained or None, device=device, force_quick_gelu=quick_gelu)
    return net.to(dtype=dtype).eval()
