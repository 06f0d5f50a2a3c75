"""Load checkpoints saved by the released TempMe training code into a TempMe-patched open_clip model.

    model = apply_tempme(open_clip.create_model("ViT-B-32-quickgelu"))
    load_official_checkpoint(model, "tempme_msrvtt_vitb32.bin")   # adds LoRA of the checkpoint's rank
    model.encode_video(video)                                    # the released model's embeddings

The released layout (a ``state_dict`` of its video-text model, maybe with DDP's ``module.`` prefix):

- ``clip.<name>``: OpenAI CLIP's parameter names, which are open_clip ``CLIP``'s own names for the
  OpenAI-architecture models (``clip.visual.conv1.weight``, ``clip.transformer.resblocks.0.attn.in_proj_weight``,
  ``clip.token_embedding.weight``, ``clip.logit_scale``, ...).
- ``clip.<tower>.transformer.resblocks.{i}.attn.TVPt_LoRA_a`` ``[rank, D]`` and ``...TVPt_LoRA_b``
  ``[3D, rank]``: LoRA applied without a scale, ``qkv += (x @ A^T) @ B^T``, i.e. a weight delta
  ``B @ A``: :mod:`tempme_fast.lora` with ``scale=1``.
- ``clip.visual.transformer.resblocks.{layer}.TVPt_Video_Positional_embedding`` at every clip-joining
  layer, ``F_before * D`` elements read as ``[1, F_before, 1, D]``: ``model.visual.tempme_frame_pos[layer]``.

Keys with no counterpart (other heads of the released code, adapters, ...) and weights the model
needs but the checkpoint lacks are reported, never dropped silently. The only entries skipped are
OpenAI's non-weight metadata (``input_resolution``, ``context_length``, ``vocab_size``), and they are
listed too.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .checkpoint import load_file
from .lora import add_lora, lora_config, remove_lora

log = logging.getLogger(__name__)

PREFIX = "clip."
METADATA = ("input_resolution", "context_length", "vocab_size")
_LORA = {"TVPt_LoRA_a": "lora_a", "TVPt_LoRA_b": "lora_b"}
_FRAME_POS = "TVPt_Video_Positional_embedding"
_PARAM = "parametrizations.in_proj_weight"

__all__ = ["OfficialLoadResult", "load_official_checkpoint", "official_key_map"]


@dataclass
class OfficialLoadResult:
    """What :func:`load_official_checkpoint` did.

    Attributes:
        missing: checkpoint names (``clip.…``) the model has a weight for but the checkpoint lacks.
        unexpected: checkpoint keys with no counterpart in the model (without a DDP ``module.`` prefix).
        ignored: OpenAI metadata entries that hold no weight.
        lora_rank: rank of the checkpoint's LoRA (None without LoRA).
        added_lora: whether LoRA was added to the model to receive it.
        loaded: how many tensors were copied into the model.
    """

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)
    lora_rank: Optional[int] = None
    added_lora: bool = False
    loaded: int = 0


def official_key_map(model: nn.Module) -> Dict[str, str]:
    """``{released-code name: model state_dict key}`` for every tensor of ``model``'s state_dict."""
    mapping = {}
    for key in model.state_dict():
        m = re.fullmatch(r"visual\.tempme_frame_pos\.(\d+)", key)
        if m:
            mapping[f"{PREFIX}visual.transformer.resblocks.{m.group(1)}.{_FRAME_POS}"] = key
            continue
        name = key.replace(f"{_PARAM}.original", "in_proj_weight")
        name = name.replace(f"{_PARAM}.0.lora_a", "TVPt_LoRA_a").replace(f"{_PARAM}.0.lora_b", "TVPt_LoRA_b")
        mapping[PREFIX + name] = key
    return mapping


def _read(path_or_state_dict) -> Tuple[Dict[str, torch.Tensor], str]:
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        where = os.fspath(path_or_state_dict)
        if not os.path.isfile(where):
            raise FileNotFoundError(f"checkpoint {where} does not exist")
        obj = load_file(where, "checkpoint")
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a state dict of name -> tensor, found a {type(obj).__name__}")
    elif isinstance(path_or_state_dict, dict):
        obj, where = path_or_state_dict, "state dict"
    else:
        raise TypeError(f"path_or_state_dict must be a file path or a dict of tensors, got "
                        f"{type(path_or_state_dict).__name__}")
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{where}: expected a state dict of name -> tensor; entries {bad[:5]} are not")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj, where


def _checkpoint_lora(state: Dict[str, torch.Tensor], where: str) -> Tuple[Optional[int], Tuple[str, ...]]:
    ranks, towers = set(), set()
    for key, value in state.items():
        if key.startswith(PREFIX) and key.endswith(".attn.TVPt_LoRA_a"):
            if value.dim() != 2:
                raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}; expected [rank, D]")
            ranks.add(value.shape[0])
            towers.add("visual" if key.startswith(PREFIX + "visual.") else "text")
    if len(ranks) > 1:
        raise ValueError(f"{where}: LoRA of several ranks {sorted(ranks)}; one rank per model is supported")
    return (ranks.pop() if ranks else None), tuple(t for t in ("visual", "text") if t in towers)


def _few(items: List[str], shown: int = 5) -> str:
    """A list of keys for an error line: all of a few, else how many and the first ``shown``."""
    if len(items) <= shown:
        return repr(items)
    return f"{len(items)} ({', '.join(items[:shown])}, ...)"


def _hint(unexpected: List[str], model: nn.Module) -> str:
    hints = []
    if any(k.endswith(_FRAME_POS) for k in unexpected):
        settings = getattr(model, "tempme", None)
        layers = [p.layer for p in settings.schedule.layers if p.group > 1] if settings is not None else []
        hints.append(f"temporal position embeddings of layers the model does not join clips at (the model's "
                     f"TempMeConfig joins at {layers or 'no layer'}; apply_tempme with the released schedule)")
    if any(".TVPt_" in k and not k.endswith(_FRAME_POS) and not any(k.endswith(n) for n in _LORA) for k in unexpected):
        hints.append("other TVPt_* modules (adapters/prompts of other variants) have no counterpart here")
    if any(not k.startswith(PREFIX) for k in unexpected):
        hints.append("keys outside 'clip.' belong to heads of the released training code, which this "
                     "library does not have")
    return ("; " + "; ".join(hints)) if hints else ""


def _check_quick_gelu(model: nn.Module) -> None:
    """The released models are OpenAI CLIP, trained with QuickGELU: their weights in a model with plain GELU load
    without a word and compute something else, so such a model is refused."""
    towers = (("visual", getattr(getattr(model, "visual", None), "transformer", None)),
              ("text", getattr(model, "transformer", None)))
    for tower, transformer in towers:
        blocks = getattr(transformer, "resblocks", None)
        act = getattr(getattr(blocks[0], "mlp", None), "gelu", None) if blocks else None
        if act is not None and type(act).__name__ != "QuickGELU":
            raise ValueError(f"the model's {tower} tower runs {type(act).__name__}, but the released TempMe models are "
                             f"OpenAI CLIP, trained with QuickGELU: build it as the -quickgelu model "
                             f"(ViT-B-32-quickgelu, ViT-B-16-quickgelu) or with --pretrained openai")


def load_official_checkpoint(model: nn.Module, path_or_state_dict, strict: bool = True) -> OfficialLoadResult:
    """Load a released-TempMe state dict into a model patched by :func:`tempme_fast.apply_tempme`.

    Args:
        model: an open_clip ``CLIP`` with the OpenAI architecture (``ViT-B-32-quickgelu``, ...),
            patched with the checkpoint's TempMe schedule. Without LoRA it gets LoRA of the
            checkpoint's rank with scale 1 on the towers the checkpoint has LoRA for (both, in the
            released models); with LoRA, its rank must match and its scale be 1.
        path_or_state_dict: a file saved with ``torch.save(state_dict)`` or the dict itself.
        strict: raise ``ValueError`` listing missing and unexpected keys; otherwise load what fits and
            return the lists.
    Returns:
        an :class:`OfficialLoadResult`. Shape mismatches always raise. On any error the model is
        left as it was.
    """
    if not hasattr(model, "visual"):
        raise TypeError(f"model is a {type(model).__name__} without .visual; pass an open_clip CLIP model")
    _check_quick_gelu(model)
    state, where = _read(path_or_state_dict)
    rank, towers = _checkpoint_lora(state, where)
    result = OfficialLoadResult(lora_rank=rank)
    current = lora_config(model)
    if rank is not None and current is None:
        add_lora(model, rank=rank, scale=1.0, towers=towers)
        result.added_lora = True
    elif rank is not None and (current["rank"] != rank or current["scale"] != 1.0):
        raise ValueError(f"model has LoRA rank={current['rank']} scale={current['scale']} but {where} holds "
                         f"rank={rank} applied with scale 1; remove_lora(model) and load again")
    try:
        mapping = official_key_map(model)
        own = model.state_dict()
        converted = {}
        wrong = []
        for key, value in state.items():
            if key.startswith(PREFIX) and key[len(PREFIX):] in METADATA:
                result.ignored.append(key)
                continue
            target = mapping.get(key)
            if target is None:
                result.unexpected.append(key)
                continue
            want = own[target].shape
            if key.endswith(_FRAME_POS) and value.numel() == want.numel():
                value = value.reshape(want)  # any layout of F_before * D elements, read as [1, F, 1, D]
            if value.shape != want:
                wrong.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(want)}")
                continue
            converted[target] = value
        result.missing = [name for name, target in mapping.items() if target not in converted
                          and not any(name == w.split(":")[0] for w in wrong)]
        if wrong:
            raise ValueError(f"{where}: {len(wrong)} shape mismatch(es) (another model size or TempMe "
                             f"schedule?): {_few(wrong)}")
        if state and not any(k.startswith(PREFIX) for k in state):
            raise ValueError(f"{where} holds no '{PREFIX}' key, so it is not a checkpoint of the released TempMe code: "
                             f"an open_clip state dict (tempme_fast's own model.pt, or open_clip weights) loads with "
                             f"--checkpoint (load_checkpoint) or --pretrained instead")
        if strict and (result.missing or result.unexpected):
            raise ValueError(f"{where} does not fit the model: missing {_few(result.missing)}, unexpected "
                             f"{_few(result.unexpected)}{_hint(result.unexpected, model)} (strict=False loads what "
                             f"fits and returns these lists)")
    except BaseException:
        if result.added_lora:
            remove_lora(model)
        raise
    model.load_state_dict(converted, strict=False)
    if result.missing or result.unexpected:
        log.warning("%s: loaded %d tensors; missing %s; unexpected %s", where, len(converted), result.missing,
                    result.unexpected)
    result.loaded = len(converted)
    return result
