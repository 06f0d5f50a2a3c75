"""ToMe for timm ViTs: :func:`patch_timm` does what ToMe's ``tome.patch.timm`` does.

After each block's attention (proportional to token size when ``prop_attn``) and residual add,
``model.r`` tokens are merged by bipartite soft matching with the keys averaged over heads as
the metric, protecting the prefix tokens (class, distillation and register tokens; ToMe protects
the class and distillation tokens, and timm's register tokens did not exist then), then the MLP.
As in ToMe, ``model.r`` is read at every forward (an int, a per-layer list or ``(r, inflection)``).

Unlike ToMe's patch, no dictionary is shared between the blocks: ``forward_features`` runs them
itself and hands tokens, sizes and sources from block to block; the blocks and attention modules
keep their classes, so :func:`unpatch_timm` only restores the model's class.
"""
from __future__ import annotations

from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..subclass import patched_class
from ..model import warn_of_bypassed_hooks
from .merge import bipartite_plan, merge_source, merge_wavg
from .schedule import parse_r

_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def _check_model(model: nn.Module) -> None:
    for attr in ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head"):
        if not hasattr(model, attr):
            raise TypeError(f"model is a {type(model).__name__} without '{attr}': patch_timm needs a timm "
                            f"VisionTransformer (timm.models.vision_transformer)")
    for i, block in enumerate(model.blocks):
        missing = [p for p in _BLOCK_PARTS if not hasattr(block, p)]
        if missing or not hasattr(block.attn, "qkv"):
            raise TypeError(f"block {i} is a {type(block).__name__} without {missing or ['attn.qkv']}: "
                            f"patch_timm supports timm's pre-norm Block with a fused qkv Attention")
        attn = block.attn
        heads = getattr(attn, "num_heads", None)
        head_dim = getattr(attn, "head_dim", None) or (attn.qkv.in_features // heads if heads else None)
        if not heads or getattr(attn.qkv, "out_features", None) != 3 * heads * head_dim:
            raise TypeError(f"block {i}'s attention is a {type(attn).__name__} whose qkv projection is not "
                            f"3 x heads x head_dim wide: patch_timm supports timm's Attention (one q, k and v a head)")


def prefix_tokens(model: nn.Module) -> Tuple[int, bool]:
    """``(protected, has_class_token)``: tokens in front of the patches that are never merged."""
    has_cls = getattr(model, "cls_token", None) is not None
    default = int(has_cls) + int(getattr(model, "dist_token", None) is not None)
    return getattr(model, "num_prefix_tokens", default), has_cls


def timm_attention(attn: nn.Module, x: torch.Tensor, size: Optional[torch.Tensor]
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """timm ``Attention`` with proportional attention; returns ``(out [B, N, C], keys [B, N, heads * d])``:
    every head's keys, token-major (a view of the projection unless timm normalises them), which
    ToMe's match averages over heads (``bipartite_plan(..., heads=attn.num_heads)``).

    ``size [B, N, 1]`` adds ``log(size)`` to the logits of every key (None: plain attention).
    """
    b, n, c = x.shape
    heads = attn.num_heads
    head_dim = getattr(attn, "head_dim", c // heads)
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = getattr(attn, "q_norm", nn.Identity())(q), getattr(attn, "k_norm", nn.Identity())(k)  # timm >= 0.9
    bias = None if size is None else size.reshape(b, 1, 1, n).log().to(q.dtype)
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=attn.scale)
    out = out.transpose(1, 2).reshape(b, n, heads * head_dim)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), k.transpose(1, 2).flatten(2)


def _tome_block(block: nn.Module, x, size, source, r: int, protected: int, kept_by_score: bool,
                prop_attn: bool, backend: str):
    out, keys = timm_attention(block.attn, block.norm1(x), size if prop_attn else None)
    x = x + block.drop_path1(block.ls1(out))
    r = min(r, (x.shape[1] - protected) // 2)
    if r > 0:
        merge, _ = bipartite_plan(keys, r, protected, kept_by_score, backend, heads=block.attn.num_heads)
        if source is not None:
            source = merge_source(merge, x, source)
        x, size = merge_wavg(merge, x, size)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, size, source


class _ToMeTimm:
    def forward_features(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """timm's ``forward_features`` with a ToMe merge in every block (masks are not supported)."""
        if args or any(v is not None and v is not False for v in kwargs.values()):  # (not ==: v may be a tensor)
            raise ValueError("a ToMe-patched timm model takes no attention mask (merging changes the tokens)")
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        protected, has_cls = prefix_tokens(self)
        size = torch.ones(x.shape[0], x.shape[1], 1, device=x.device, dtype=torch.float32)
        source = None
        if self._tome_trace_source:
            source = torch.eye(x.shape[1], device=x.device)[None].expand(x.shape[0], -1, -1)
        for block, r in zip(self.blocks, parse_r(len(self.blocks), self.r)):
            x, size, source = _tome_block(block, x, size, source, r, protected, not has_cls,
                                          self._tome_prop_attn, self._tome_backend)
        self.tome_size = size
        if source is not None:
            self.tome_source = source
        return self.norm(x)


def _tome_class(cls: Type[nn.Module]) -> Type[nn.Module]:
    return patched_class(_ToMeTimm, cls, "ToMe", "_tome_original_class")


def patch_timm(model: nn.Module, trace_source: bool = False, prop_attn: bool = True, *, r=0,
               backend: str = "auto") -> nn.Module:
    """Apply ToMe to a timm ``VisionTransformer`` in place; set ``model.r`` afterwards, as with ToMe.

    Args:
        trace_source: keep ``model.tome_source [B, N_out, N]`` (0/1) after each forward.
        prop_attn: proportional attention (ToMe: on for off-the-shelf models, off for training and MAE).
        r: the initial ``model.r``.
        backend: merge ops backend, ``"auto"``, ``"torch"`` or ``"triton"``.
    Returns:
        ``model``; :func:`unpatch_timm` undoes the patch. ``model.tome_size`` holds the last sizes.
    """
    _check_model(model)
    if backend not in ops.BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {ops.BACKENDS}")
    for name, flag in (("trace_source", trace_source), ("prop_attn", prop_attn)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    parse_r(len(model.blocks), r)  # a bad r fails here rather than at the first forward
    warn_of_bypassed_hooks([("blocks", model.blocks)] + [
        (f"blocks.{i}{part}", module) for i, block in enumerate(model.blocks)
        for part, module in (("", block), (".attn", block.attn))], "a ToMe-patched timm model")
    model.r = r
    model._tome_trace_source, model._tome_prop_attn, model._tome_backend = trace_source, prop_attn, backend
    if not isinstance(model, _ToMeTimm):
        model.__class__ = _tome_class(type(model))
    return model


def unpatch_timm(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_timm`: the original class and no added attributes."""
    if not isinstance(model, _ToMeTimm):
        raise ValueError("model is not patched by patch_timm; nothing to remove")
    model.__class__ = model._tome_original_class
    for attr in ("r", "_tome_trace_source", "_tome_prop_attn", "_tome_backend", "tome_size", "tome_source"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model
