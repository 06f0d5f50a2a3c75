"""LoRA on the fused q/k/v projection of every attention layer, for TempMe's parameter-efficient mode.

    tempme_fast.apply_tempme(model)
    add_lora(model, rank=8)                  # vision and text towers
    mark_trainable(model, "lora")            # LoRA + temporal position embeddings train, the rest is frozen
    ...train...
    save_lora(model, "adapter.pt")           # only LoRA + tempme_frame_pos, with rank/scale/towers
    merge_lora(model)                        # fold into in_proj_weight for serving: original keys back

How: each ``nn.MultiheadAttention`` of a tower gets a ``torch.nn.utils.parametrize``
parametrization on ``in_proj_weight`` ``[3D, D]``, so every read of ``attn.in_proj_weight`` gives
``W + scale * B @ A`` with ``A [rank, D]`` (kaiming-uniform, as ``nn.Linear``) and ``B [3D, rank]``
(zero, so training starts at the pretrained model). Both readers of that attribute see it: open_clip's
own ``nn.MultiheadAttention.forward`` (the text tower, ``encode_image``) and TempMe's block forward
(``F.linear(h, attn.in_proj_weight, ...)``).

Why our own module and not peft: peft's LoRA hooks ``nn.Linear``-like modules, and the q/k/v
projection here is a bare ``Parameter`` of ``nn.MultiheadAttention``. peft's LoRA layer for that
module (a) also puts LoRA on ``out_proj``, with no way to leave it out, so it is not TempMe's
method and its parameter count is not ~0.5M; (b) merges the delta into the weight before
``MultiheadAttention.forward`` and unmerges after it, but TempMe's vision path never calls that
forward (it reads ``attn.in_proj_weight`` itself), so the vision tower would train nothing; and
(c) it wraps the model in a ``PeftModel`` (renamed state_dict keys) and pulls in transformers and
accelerate. A parametrization is ~40 lines of torch, leaves open_clip's forward untouched, is seen
by every reader of the weight, merges with ``remove_parametrizations``, and uses the released
TempMe layout (``A [rank, D]``, ``B [3D, rank]``), so its checkpoints load directly
(:mod:`tempme_fast.official`).

Cost: the weight ``W + B @ A`` is materialised at every read (one ``[3D, rank] x [rank, D]``
product per layer per forward, negligible), and backward forms the full ``[3D, D]`` gradient of
that weight before reducing it to ``A`` and ``B`` (one more ``N x D x 3D`` matmul per layer, about
the q/k/v projection's own cost). Applying LoRA on the activations (``(x A^T) B^T``, as the released
code does) would avoid that, but needs the attention forwards to call it. Merge for serving.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from .checkpoint import atomic_save, load_file
from .errors import ConfigError

TOWERS = ("visual", "text")
MODES = ("lora", "full")
LORA_FORMAT = "tempme_fast.lora"

log = logging.getLogger(__name__)
_PARAM = "in_proj_weight"
_FRAME_POS = "tempme_frame_pos"

__all__ = ["LORA_FORMAT", "LoRAQKV", "TOWERS", "add_lora", "attention_layers", "count_parameters", "has_lora",
           "load_lora", "load_lora_state_dict", "lora_config", "lora_layers", "lora_state_dict", "mark_trainable",
           "merge_lora", "remove_lora", "save_lora", "trainable_parameters"]


class LoRAQKV(nn.Module):
    """Parametrization ``W -> W + scale * B @ A`` of a fused q/k/v weight ``W [3D, D]``.

    Attributes:
        lora_a: ``[rank, D]`` down-projection (kaiming-uniform, ``a=sqrt(5)``, as ``nn.Linear``).
        lora_b: ``[3D, rank]`` up-projection (zero at the start).
        scale: multiplies the delta (1.0 in the released TempMe code).
    """

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float = 1.0,
                 device=None, dtype=None):
        super().__init__()
        self.rank, self.scale = rank, float(scale)
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        """``scale * B @ A``: ``[3D, D]`` in the LoRA parameters' dtype."""
        delta = self.lora_b @ self.lora_a
        return delta if self.scale == 1.0 else delta * self.scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale}"


def _tower_of(name: str) -> str:
    return "visual" if name == "visual" or name.startswith("visual.") else "text"


def attention_layers(model: nn.Module, towers: Sequence[str] = TOWERS) -> Dict[str, nn.MultiheadAttention]:
    """Every fused-projection ``nn.MultiheadAttention`` of the given towers, by module name.

    ``visual`` is everything under ``model.visual``; ``text`` every other attention (``transformer``
    of a ``CLIP``, ``text`` of a ``CustomTextCLIP``).
    """
    towers = _check_towers(towers)
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and _tower_of(name) in towers:
            if not module._qkv_same_embed_dim:
                raise TypeError(f"attention {name} has separate q/k/v projections; LoRA here needs the fused "
                                f"in_proj_weight of open_clip's ResidualAttentionBlock")
            found[name] = module
    return found


def _check_towers(towers) -> Tuple[str, ...]:
    if isinstance(towers, str):
        towers = (towers,)
    towers = tuple(towers)
    bad = [t for t in towers if t not in TOWERS]
    if bad or not towers:
        raise ValueError(f"towers={towers!r} must be a non-empty subset of {TOWERS}")
    return towers


def lora_layers(model: nn.Module) -> Dict[str, LoRAQKV]:
    """The LoRA parametrization of every attention that has one, by attention module name."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and parametrize.is_parametrized(module, _PARAM):
            for p in module.parametrizations[_PARAM]:
                if isinstance(p, LoRAQKV):
                    found[name] = p
    return found


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def lora_config(model: nn.Module) -> Optional[dict]:
    """``{"rank", "scale", "towers"}`` of the model's LoRA, or None without LoRA."""
    layers = lora_layers(model)
    if not layers:
        return None
    first = next(iter(layers.values()))
    towers = tuple(t for t in TOWERS if any(_tower_of(n) == t for n in layers))
    return {"rank": first.rank, "scale": first.scale, "towers": list(towers)}


def add_lora(model: nn.Module, rank: int = 8, scale: Optional[float] = None, alpha: Optional[float] = None,
             towers: Sequence[str] = TOWERS) -> Dict[str, LoRAQKV]:
    """Add LoRA to ``in_proj_weight`` of every attention layer of ``towers``, in place.

    Args:
        model: an open_clip ``CLIP`` (TempMe-patched or not).
        rank: LoRA rank (8 in the TempMe recipe).
        scale: multiplier of ``B @ A``; default 1.0, as the released TempMe code (no scaling).
        alpha: the usual LoRA convention instead of ``scale``: ``scale = alpha / rank``.
        towers: ``("visual", "text")`` or one of them.
    Returns:
        the added parametrizations by attention module name. The LoRA parameters take the device
        and dtype of each base weight. The base weights are left as they are (call
        :func:`mark_trainable` to freeze them).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r} must be a positive int (8 in the TempMe recipe)")
    if scale is not None and alpha is not None:
        raise ValueError(f"give scale={scale} or alpha={alpha} (scale = alpha / rank), not both")
    name, value = ("alpha", alpha) if alpha is not None else ("scale", 1.0 if scale is None else scale)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value == 0:
        raise ValueError(f"{name}={value!r} must be a finite non-zero number"
                         + (" (scale = alpha / rank)" if name == "alpha" else ""))
    scale = value / rank if name == "alpha" else value
    towers = _check_towers(towers)
    if has_lora(model):
        raise ValueError(f"model already has LoRA ({lora_config(model)}); merge_lora(model) or "
                         f"remove_lora(model) first")
    layers = attention_layers(model, towers)
    if not layers:
        raise ValueError(f"model has no nn.MultiheadAttention in towers {towers}")
    added = {}
    for name, attn in layers.items():
        weight = getattr(attn, _PARAM)
        lora = LoRAQKV(weight.shape[0], weight.shape[1], rank, scale, device=weight.device, dtype=weight.dtype)
        lora.base_order = list(attn._parameters)  # merge_lora puts the weight back in its place
        parametrize.register_parametrization(attn, _PARAM, lora)
        added[name] = lora
    return added


def _own_class(module: nn.Module) -> None:
    """Give ``module`` a class of its own, the same as its parametrized one. ``copy.deepcopy`` of a parametrized
    module shares that class (torch makes it at run time) between the copies, and ``remove_parametrizations``
    deletes the weight's property from it: merging a copy's LoRA broke the original's attention."""
    shared = type(module)
    body = {k: v for k, v in vars(shared).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(shared.__name__, shared.__bases__, body)


def _remove(model: nn.Module, leave_parametrized: bool) -> int:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA (add_lora adds it)")
    modules = dict(model.named_modules())
    for name in layers:
        attn = modules[name]
        if len(attn.parametrizations[_PARAM]) != 1:
            raise ValueError(f"{name}.{_PARAM} has other parametrizations besides LoRA; remove them first")
        base = attn.parametrizations[_PARAM].original
        requires_grad = base.requires_grad
        _own_class(attn)
        with torch.no_grad():
            parametrize.remove_parametrizations(attn, _PARAM, leave_parametrized=leave_parametrized)
        getattr(attn, _PARAM).requires_grad_(requires_grad)
        # Same parameter order as before add_lora: state_dict keys and optimiser order as open_clip's.
        order = getattr(layers[name], "base_order", None) or list(attn._parameters)
        params = dict(attn._parameters)
        attn._parameters.clear()
        attn._parameters.update({k: params[k] for k in order if k in params})
        attn._parameters.update({k: v for k, v in params.items() if k not in attn._parameters})
    return len(layers)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA delta into its ``in_proj_weight`` (for serving), in place.

    Afterwards the model has no LoRA parameters and open_clip's own state_dict keys; its outputs
    are those of the LoRA model (the merged weight is the very tensor the LoRA forward computed).
    """
    _remove(model, leave_parametrized=True)
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Drop LoRA without merging: the base weights come back unchanged."""
    _remove(model, leave_parametrized=False)
    return model


def _is_trainable_extra(name: str) -> bool:
    return f"{_FRAME_POS}." in name or name.endswith(_FRAME_POS)


def _is_lora(name: str) -> bool:
    return name.endswith(".lora_a") or name.endswith(".lora_b")


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """``(trainable, total)`` parameter counts (LoRA and frame_pos included in the total)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def mark_trainable(model: nn.Module, mode: str = "lora", verbose: bool = False) -> int:
    """Set ``requires_grad`` for a fine-tuning mode; returns the number of trainable parameters.

    Args:
        mode: ``"lora"``: only LoRA and the temporal position embeddings (``tempme_frame_pos``)
            train, every CLIP weight (``logit_scale`` included) is frozen; the model needs LoRA
            (:func:`add_lora`). ``"full"``: every parameter trains.
        verbose: also print ``trainable parameters: N of M (x%)``.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if mode == "lora" and not has_lora(model):
        raise ValueError("mode='lora' needs LoRA on the model: call add_lora(model) first")
    for name, p in model.named_parameters():
        p.requires_grad_(mode == "full" or _is_lora(name) or _is_trainable_extra(name))
    trainable, total = count_parameters(model)
    if verbose:
        print(f"trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / total:.2f}%), mode={mode}")
    return trainable


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The LoRA and temporal-position-embedding tensors, under the model's own state_dict keys."""
    return {k: v for k, v in model.state_dict().items() if _is_lora(k) or _is_trainable_extra(k)}


def load_lora_state_dict(model: nn.Module, state: Dict[str, torch.Tensor], strict: bool = True):
    """Load what :func:`lora_state_dict` returned; returns ``(missing, unexpected)`` key lists.

    With ``strict`` any missing or unexpected key raises ``ValueError`` listing them. Shapes must match.
    """
    own = lora_state_dict(model)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    hint = "(the --model, LoRA towers and TempMe schedule of the run that saved it?)"
    if strict and (missing or unexpected):
        parts = [f"{len(keys)} {what}, e.g. {keys[:2]}" for what, keys in
                 (("missing", missing), ("unexpected", unexpected)) if keys]
        raise ConfigError(f"LoRA state does not fit the model: {'; '.join(parts)} {hint}")
    wrong = [f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in state
             if k in own and state[k].shape != own[k].shape]
    if wrong:
        raise ConfigError(f"LoRA state does not fit the model: {len(wrong)} shape mismatch(es), e.g. {wrong[0]} "
                          f"{hint}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return missing, unexpected


def _vision_sizes(model: nn.Module) -> Optional[dict]:
    """The image tower's sizes (:class:`~tempme_fast.geometry.ViTGeometry`), None for a model they do not
    describe."""
    from .geometry import ViTGeometry

    try:
        return dataclasses.asdict(ViTGeometry.from_model(model))
    except (TypeError, ValueError, AttributeError):
        return None


def _schedule(model: nn.Module) -> Optional[dict]:
    settings = getattr(model, "tempme", None)
    config = getattr(settings, "config", None)
    return None if config is None else {k: list(v) if isinstance(v, tuple) else v
                                        for k, v in dataclasses.asdict(config).items()}


def save_lora(model: nn.Module, path, base: Optional[Mapping[str, Any]] = None) -> None:
    """Save LoRA + ``tempme_frame_pos`` with the LoRA's rank, scale and towers (atomically), and what the adapter
    is a delta of: the image tower's sizes, the TempMe schedule it trained under, and ``base``, the caller's
    description of the base weights (``tempme train`` gives the model's name and its weights' tag or SHA-256),
    which :func:`load_lora` compares."""
    config = lora_config(model)
    if config is None:
        raise ValueError("model has no LoRA to save (add_lora adds it)")
    state = {k: v.detach().cpu() for k, v in lora_state_dict(model).items()}
    atomic_save({"format": LORA_FORMAT, "version": 1, "lora": config, "state_dict": state,
                 "vision": _vision_sizes(model), "tempme": _schedule(model),
                 "base": None if base is None else dict(base)}, path)


def check_adapter_fits(model: nn.Module, obj: Mapping[str, Any], base: Optional[Mapping[str, Any]] = None) -> None:
    """Refuse a :func:`save_lora` adapter (``obj``) that is a delta of another model: another image tower (a
    ViT-B/16 adapter has the shapes of a ViT-B/32 one), or, where both are known, other base weights than
    ``base`` says the model has. A TempMe schedule other than the one it trained under is allowed, with a
    warning. Files of earlier releases record none of these."""
    saved, ours = obj.get("vision"), _vision_sizes(model)
    if saved and ours and saved != ours:
        differ = ", ".join(f"{k} {saved[k]} (the model's {ours.get(k)})" for k in saved if saved[k] != ours.get(k))
        raise ValueError(f"the adapter was trained on another image tower: {differ}; load it into the model of its "
                         f"run")
    saved_base = obj.get("base")
    if saved_base and base:
        differ = [k for k in saved_base if k in base and saved_base[k] != base[k]]
        if differ:
            raise ValueError(f"the adapter is a delta of other weights: trained with "
                             f"{', '.join(f'{k}={saved_base[k]!r}' for k in differ)}, this model has "
                             f"{', '.join(f'{k}={base[k]!r}' for k in differ)}; load it onto the base of its run")
    schedule, current = obj.get("tempme"), _schedule(model)
    if schedule and current and schedule != current:
        log.warning("the adapter trained under the TempMe schedule %s; the model runs %s",
                    {k: v for k, v in schedule.items() if current.get(k) != v},
                    {k: v for k, v in current.items() if schedule.get(k) != v})


def load_lora(model: nn.Module, path_or_obj, strict: bool = True, base: Optional[Mapping[str, Any]] = None
              ) -> nn.Module:
    """Load a :func:`save_lora` file; adds LoRA of the saved rank/scale/towers if the model has none.
    ``base``: what the model's base weights are, as :func:`save_lora` took it; an adapter of other weights, or
    of another image tower, is refused (:func:`check_adapter_fits`)."""
    obj = path_or_obj
    if not isinstance(obj, dict):
        obj = load_file(path_or_obj, "LoRA file")
    format_ = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
    if format_ != LORA_FORMAT:
        raise ValueError(f"not a LoRA file saved by save_lora (format={format_!r}, expected {LORA_FORMAT!r})")
    check_adapter_fits(model, obj, base)
    saved = obj["lora"]
    current = lora_config(model)
    if current is None:
        add_lora(model, rank=saved["rank"], scale=saved["scale"], towers=saved["towers"])
    elif current["rank"] != saved["rank"] or current["scale"] != saved["scale"]:
        raise ValueError(f"model has LoRA rank={current['rank']} scale={current['scale']} but the file holds "
                         f"rank={saved['rank']} scale={saved['scale']}")
    load_lora_state_dict(model, obj["state_dict"], strict=strict)
    return model


def trainable_parameters(model: nn.Module) -> Iterable[Tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
