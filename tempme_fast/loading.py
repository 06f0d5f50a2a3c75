"""Build open_clip models from a name or a JSON config, with pretrained weights or a checkpoint."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

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


def _unwrap_state_dict(obj, path: str) -> dict:
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"--checkpoint {path}: expected a state dict (name -> tensor), got "
                         f"{type(obj).__name__}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_checkpoint(model: torch.nn.Module, path: str) -> None:
    """Load ``path`` into a TempMe-patched model; errors name the keys that do not fit.

    ``path`` holds either a state dict of a patched model (full fine-tuning, or LoRA already merged)
    or a LoRA adapter written by ``tempme_fast.lora.save_lora``, which is loaded and merged into the
    weights (``--pretrained`` then supplies the base weights).
    """
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("format"), str) and "lora" in obj["format"]:
        from . import lora

        lora.load_lora(model, obj)
        lora.merge_lora(model)
        return
    state = _unwrap_state_dict(obj, path)
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    if unexpected:
        hint = ""
        if any("tempme_frame_pos" in k for k in unexpected):
            hint = " (TempMe temporal position embeddings: evaluate with --merge)"
        elif any("lora" in k.lower() or "parametrizations" in k for k in unexpected):
            hint = (" (LoRA weights: save the adapter with tempme_fast.lora.save_lora, or call "
                    "tempme_fast.lora.merge_lora(model) before saving the state dict)")
        raise ValueError(f"--checkpoint {path}: {len(unexpected)} key(s) the model does not have, e.g. "
                         f"{unexpected[:3]}{hint}")
    wrong = [k for k in state if tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise ValueError(f"--checkpoint {path}: {len(wrong)} shape mismatch(es), e.g. {k}: checkpoint "
                         f"{tuple(state[k].shape)} vs model {tuple(own[k].shape)} (another --model or "
                         f"--frames?)")
    missing = [k for k in own if k not in state]
    model.load_state_dict(state, strict=False)
    if missing:
        log.warning("--checkpoint %s lacks %d key(s) (kept from --pretrained/initialisation), e.g. %s",
                    path, len(missing), missing[:3])
