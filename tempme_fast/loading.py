"""Build open_clip models from a name or a JSON config, with pretrained weights or a checkpoint."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import torch

from .errors import ConfigError, UnsupportedModelError, as_config_error

log = logging.getLogger(__name__)

# The activation dtypes the command-line tools take, by their short names.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_dtype_name(device: torch.device) -> str:
    """Half precision on a GPU, float32 on the CPU."""
    return "fp16" if device.type == "cuda" else "fp32"


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is a GPU, else CPU), ``cpu``, ``cuda`` or ``cuda:N``, checked."""
    valid = "valid: auto, cpu, cuda, cuda:N"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r} is not a device; {valid}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: TempMe runs on cpu or cuda; {valid}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {name}: no CUDA GPU is available; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"--device {name}: this machine has {count} GPU{'s' if count > 1 else ''} "
                              f"(cuda:0 to cuda:{count - 1})")
    return device


def _model_config(name: str, path: Optional[Path]) -> dict:
    import json

    import open_clip

    if path is not None:
        with open(path) as f, as_config_error(f"--model {path}: not a JSON model config"):
            config = json.load(f)
        lacks = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(config, dict) or k not in config]
        if lacks or not all(isinstance(config[k], dict) for k in ("vision_cfg", "text_cfg")):
            raise ConfigError(f"--model {path}: not an open_clip model config (an object with embed_dim, vision_cfg "
                              f"and text_cfg{'; it lacks ' + ', '.join(lacks) if lacks else ''})")
        return config
    return open_clip.get_model_config(name) or {}


def text_context_length(model: str) -> int:
    """Token positions of ``--model``'s text tower, from its config alone (77 unless the config says)."""
    name, path, _ = resolve_model(model)
    return int((_model_config(name, path).get("text_cfg") or {}).get("context_length", 77))


def check_model_config(name: str, vision: dict) -> None:
    """Refuse, from its config alone, a model TempMe cannot patch, before any weights are read.

    ``vision`` is the ``vision_cfg`` of an open_clip model config; the built model is checked again
    by :func:`tempme_fast.model.vit_geometry`.
    """
    need = "TempMe needs a ViT with a class token (e.g. ViT-B-32-quickgelu, ViT-B-16, ViT-L-14)"
    if isinstance(vision.get("layers"), (list, tuple)):
        raise UnsupportedModelError(f"--model {name} is a ResNet, not a ViT with a class token; {need}")
    if vision.get("timm_model_name"):
        raise UnsupportedModelError(f"--model {name} uses a timm vision tower ({vision['timm_model_name']}), not "
                                    f"open_clip's own ViT; {need}")
    if vision.get("attentional_pool"):
        raise UnsupportedModelError(f"--model {name} pools its tokens with attentional pooling (as CoCa does), "
                                    f"not the class token; {need}")
    if vision.get("pool_type", "tok") != "tok":
        raise UnsupportedModelError(f"--model {name} pools with pool_type={vision['pool_type']!r}, not the class "
                                    f"token; {need}")
    if vision.get("patch_dropout", 0):
        raise UnsupportedModelError(f"--model {name} drops patches in training (patch_dropout="
                                    f"{vision['patch_dropout']}), which the merge schedule's token counts cannot "
                                    f"follow; set it to 0 in the config")


def resolve_model(model: str) -> Tuple[str, Optional[Path], dict]:
    """``(name, JSON path or None, vision config)`` of ``--model``, refused unless TempMe can patch it.

    Reads configs only: nothing is built or downloaded.
    """
    import open_clip

    name, path = model, None
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise ConfigError(f"--model {model}: looks like a JSON config but no such file exists")
        name = path.stem
    elif name not in open_clip.list_models():
        raise ConfigError(f"--model {model!r} is not an open_clip model name (see open_clip.list_models()) "
                          f"nor a .json model config file")
    config = _model_config(name, path)
    if path is not None:
        _check_config_keys(path, config)
    vision = config.get("vision_cfg") or {}
    check_model_config(name, vision)
    return name, path, vision


def _check_config_keys(path: Path, config: dict) -> None:
    """Refuse a JSON model config (``config``, read from ``path``) whose towers hold a key open_clip does not take
    (a misspelt ``patch_szie``, or one of another open_clip version), naming it, where open_clip's TypeError came
    when the model was built."""
    import dataclasses

    import open_clip

    for tower, cls in (("vision_cfg", open_clip.model.CLIPVisionCfg), ("text_cfg", open_clip.model.CLIPTextCfg)):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config[tower]) - known)
        if unknown:
            raise ConfigError(f"--model {path}: {tower} holds {unknown}, which this open_clip's {cls.__name__} does "
                              f"not take (misspelt, or of another open_clip version)")


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

    from .model import vit_geometry
    from .weights import check_pretrained, is_weights_file

    name, path, _ = resolve_model(model)
    if path is not None:
        open_clip.add_model_config(path)
    if pretrained:
        check_pretrained(name, pretrained)
    # OpenAI's weights were trained with QuickGELU; open_clip only warns when the model name lacks it.
    quick_gelu = bool(pretrained and not is_weights_file(pretrained)
                      and open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))
    if not (pretrained and is_weights_file(pretrained)):
        net = open_clip.create_model(name, pretrained=pretrained or None, device=device, force_quick_gelu=quick_gelu)
    else:
        _warn_if_openai_file(name, pretrained)
        try:
            net = open_clip.create_model(name, pretrained=pretrained, device=device)
        except Exception as err:  # noqa: BLE001 (whatever open_clip's reading of a user's file raises)
            raise ConfigError(_unloadable_weights(name, pretrained, err)) from err
    vit_geometry(net.visual)
    return net.to(dtype=dtype).eval()


def _unloadable_weights(name: str, path: str, err: BaseException) -> str:
    """One line on a ``--pretrained`` file that open_clip could not load as ``name``'s weights."""
    from .checkpoint import load_file

    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or [type(err).__name__]
    # (load_state_dict's first line only says that it failed; the next one says how)
    reason = next((line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))),
                  lines[0])[:200]
    try:
        state = load_file(path, "--pretrained")
    except ConfigError as unreadable:
        return str(unreadable) + (" (a TorchScript archive, not a state dict; --pretrained openai gets OpenAI's "
                                  "weights as one)" if "torchscript" in str(err).lower() else "")
    keys = list(state) if isinstance(state, dict) else []
    if any("tempme_frame_pos" in str(k) or "lora" in str(k).lower() for k in keys):
        return (f"--pretrained {path} holds a TempMe model or adapter (tempme train's model.pt or lora.pt): give it "
                f"as --checkpoint, over the --pretrained weights it was trained from")
    return f"--pretrained {path}: open_clip cannot load it as {name}'s weights ({reason}); another model's?"


def _warn_if_openai_file(name: str, path: str) -> None:
    """OpenAI CLIP was trained with QuickGELU, which a tag (``openai``) brings and a file cannot say: warn where
    the file's path names OpenAI and ``name`` runs plain GELU."""
    import open_clip

    config = open_clip.get_model_config(name) or {}
    if "openai" in path.lower() and not config.get("quick_gelu", False):
        log.warning("--pretrained %s looks like OpenAI weights, which were trained with QuickGELU, but %s runs GELU: "
                    "give --model %s-quickgelu (or --pretrained openai)", path, name, name)


def _unwrap_state_dict(obj, path: str) -> dict:
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"--checkpoint {path}: expected a state dict (name -> tensor), got "
                          f"{type(obj).__name__}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def base_weights(model: str, pretrained: Optional[str]) -> dict:
    """What a LoRA adapter trained on ``--model`` and ``--pretrained`` is a delta of (``lora.save_lora``'s
    ``base``): the model's name, and its weights by their tag, or by their SHA-256 for a file, or none (random
    weights). A tag and a file are not compared: the file may hold the tag's weights."""
    name = resolve_model(model)[0]
    if pretrained and os.path.isfile(pretrained):
        from .checkpoint import file_sha256

        return {"model": name, "pretrained_sha256": file_sha256(pretrained)}
    return {"model": name, "pretrained": pretrained} if pretrained else \
        {"model": name, "pretrained": None, "pretrained_sha256": None}


def load_checkpoint(model: torch.nn.Module, path: str,
                    base: Optional[Union[dict, Callable[[], dict]]] = None) -> str:
    """Load ``path`` into a TempMe-patched model; errors name the keys that do not fit. Returns what it was:
    ``"adapter"`` or ``"state_dict"``.

    ``path`` holds either a state dict of a patched model (full fine-tuning, or LoRA already merged)
    or a LoRA adapter written by ``tempme_fast.lora.save_lora``, which is loaded and merged into the
    weights (``--pretrained`` then supplies the base weights; ``base``, :func:`base_weights` of them, refuses
    an adapter of other weights; a callable is asked only for an adapter, so that a state dict's load hashes
    no weights file).
    """
    if not os.path.isfile(path):
        raise ConfigError(f"--checkpoint {path}: no such file")
    from .checkpoint import load_file
    from .trainer import CHECKPOINT_FORMAT

    obj = load_file(path, "--checkpoint")
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        folder = os.path.dirname(path) or "."
        raise ConfigError(f"--checkpoint {path} is a resumable training state (tempme train --resume takes it); "
                          f"pass the model file {os.path.join(folder, 'model.pt')} or the LoRA file "
                          f"{os.path.join(folder, 'lora.pt')} the run wrote")
    if isinstance(obj, dict) and isinstance(obj.get("format"), str) and "lora" in obj["format"]:
        from . import lora

        try:
            lora.load_lora(model, obj, base=base() if callable(base) else base)
        except ValueError as err:  # ConfigErrors too: the message gains the option and file
            raise ConfigError(f"--checkpoint {path}: {err}") from err
        lora.merge_lora(model)
        return "adapter"
    state = _unwrap_state_dict(obj, path)
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    if unexpected:
        hint = " (pass the model.pt or lora.pt that tempme train writes, or a state dict of a patched model)"
        if any(k.startswith("clip.") or "TVPt_" in k for k in unexpected):
            hint = (" (a checkpoint of the released TempMe code: tempme train --official-checkpoint and "
                    "tempme_fast.load_official_checkpoint read it)")
        elif any("tempme_frame_pos" in k for k in unexpected):
            hint = (" (TempMe temporal position embeddings of other joining layers: give the --frames and schedule "
                    "it was trained with)" if any("tempme_frame_pos" in k for k in own) else
                    " (TempMe temporal position embeddings: evaluate with --merge)")
        elif any("lora" in k.lower() or "parametrizations" in k for k in unexpected):
            hint = (" (LoRA weights: save the adapter with tempme_fast.lora.save_lora, or call "
                    "tempme_fast.lora.merge_lora(model) before saving the state dict)")
        raise ConfigError(f"--checkpoint {path}: {len(unexpected)} key(s) the model does not have, e.g. "
                          f"{unexpected[:3]}{hint}")
    wrong = [k for k in state if tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise ConfigError(f"--checkpoint {path}: {len(wrong)} shape mismatch(es), e.g. {k}: checkpoint "
                          f"{tuple(state[k].shape)} vs model {tuple(own[k].shape)} (another --model or "
                          f"--frames?)")
    missing = [k for k in own if k not in state]
    model.load_state_dict(state, strict=False)
    if missing:
        log.warning("--checkpoint %s lacks %d key(s) (kept from --pretrained/initialisation), e.g. %s",
                    path, len(missing), missing[:3])
    return "state_dict"
