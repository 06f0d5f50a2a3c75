"""FLOPs per video, total and per layer: measured with ``FlopCounterMode`` and derived from the schedule.

``torch.utils.flop_counter.FlopCounterMode`` counts nothing for some attention paths: SDPA's CPU
kernel and ``nn.MultiheadAttention``'s inference fast path (``_native_multi_head_attention``).
:data:`ATTENTION_FLOPS` adds formulas for them, so measured counts include attention everywhere.
Convention: one multiply-add is 2 FLOPs (as ``FlopCounterMode``); LayerNorm, softmax, GELU and the
merge's gathers are not counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from .encoder import block_forward, embed_frames, frame_features
from .geometry import ViTGeometry
from .model import block_function, encoder_options, layer_steps, tempme_settings, trims_last_block
from .ops.reference import split_sizes
from .schedule import TokenSchedule

aten = torch.ops.aten


def _sdpa_fwd(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    b, h, n, d = query_shape
    m, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * n * m * d + 2 * b * h * n * m * dv


def _sdpa_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    # Recompute q k^T, then dV, dP, dQ and dK: five matmuls of the forward's size each.
    b, h, n, d = query_shape
    m = key_shape[-2]
    return 5 * 2 * b * h * n * m * d


def _packed_fwd(qkv_shape, heads, *args, **kwargs) -> int:
    # tempme::self_attention_fwd(qkv [B', N, 3 D], heads, ...): the SDPA forward of its heads.
    b, n, width = qkv_shape
    return 2 * 2 * b * n * n * (width // 3)


def _packed_bwd(grad_out_shape, qkv_shape, heads, *args, **kwargs) -> int:
    b, n, width = qkv_shape
    return 5 * 2 * b * n * n * (width // 3)


def _native_mha(query_shape, key_shape, value_shape, embed_dim, num_heads, *args, **kwargs) -> int:
    b, n, d = query_shape
    return 2 * b * n * d * 3 * d + 4 * b * n * n * d + 2 * b * n * d * d


ATTENTION_FLOPS: Dict[object, Callable] = {}
for _name, _fn in (("_scaled_dot_product_flash_attention_for_cpu", _sdpa_fwd),
                   ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_bwd),
                   ("_native_multi_head_attention", _native_mha)):
    if hasattr(aten, _name):
        ATTENTION_FLOPS[getattr(aten, _name)] = _fn


def _tempme_attention_flops() -> Dict[object, Callable]:
    """Formulas for the Triton attention ops of ``tempme_fast.ops.triton_attention``: those on heads
    (their arguments start as SDPA's: ``q, k, v`` and ``grad_out, q, k, v``) and those on the packed
    projection (``qkv, heads`` and ``grad_out, qkv, heads``)."""
    try:
        from .ops import triton_attention  # noqa: F401  registers the ops, if triton is installed
    except ImportError:
        return {}
    found = {}
    for name, fn in (("attention_fwd", _sdpa_fwd), ("attention_bwd", _sdpa_bwd),
                     ("self_attention_fwd", _packed_fwd), ("self_attention_bwd", _packed_bwd)):
        try:
            found[getattr(torch.ops.tempme, name)] = fn
        except (AttributeError, RuntimeError):  # not registered: triton not imported, nothing to count
            pass
    return found


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts the attention paths PyTorch leaves out."""
    return FlopCounterMode(display=False, custom_mapping={**ATTENTION_FLOPS, **_tempme_attention_flops()})


@dataclass(frozen=True)
class FlopsReport:
    """FLOPs of encoding one video."""

    stem: float
    layers: List[float]
    head: float

    @property
    def total(self) -> float:
        return self.stem + sum(self.layers) + self.head

    @property
    def gflops(self) -> float:
        return self.total / 1e9


def analytic_flops(schedule: TokenSchedule, width: int, mlp_width: int, heads: int, patch_size: int,
                   embed_dim: int, in_chans: int = 3, class_last: bool = False) -> FlopsReport:
    """FLOPs per video from the token schedule and the ViT's sizes (same convention as measured).

    ``class_last``: count the last block as :func:`~tempme_fast.encoder.class_block_forward` runs it
    (keys and values of every token; queries, attention rows, output projection and MLP of the class
    tokens only; no merge after attention). False (the default) counts every block in full, as
    TempMe's own FLOPs figures do.
    """
    frames, patches = schedule.frames, schedule.tokens_per_frame - 1
    head_dim = width // heads
    stem = frames * 2 * patches * width * in_chans * patch_size * patch_size
    layers = []
    for i, p in enumerate(schedule.layers):
        per_clip = 0
        if p.r_cross:
            na, nb = split_sizes(p.tokens_joined, p.protected_out)
            per_clip += 2 * na * nb * width  # cross-clip metric: the hidden states
        n = p.tokens_attn
        if class_last and i == len(schedule.layers) - 1:
            c = p.protected_out
            per_clip += 2 * n * width * 2 * width + 2 * c * width * width  # keys and values of all, queries of c
            per_clip += 4 * c * n * width + 2 * c * width * width + 4 * c * width * mlp_width
            layers.append(float(per_clip * p.clips_out))
            continue
        per_clip += 2 * n * width * 3 * width + 4 * n * n * width + 2 * n * width * width
        if p.r:
            na, nb = split_sizes(n, p.protected_out)
            per_clip += 2 * na * nb * head_dim  # key metric, averaged over heads
        per_clip += 4 * p.tokens_out * width * mlp_width
        layers.append(float(per_clip * p.clips_out))
    head = frames * 2 * width * embed_dim
    return FlopsReport(float(stem), layers, float(head))


def schedule_flops(schedule: TokenSchedule, geometry: ViTGeometry, class_last: bool = False) -> FlopsReport:
    """FLOPs per video of ``schedule`` on a ViT of the sizes ``geometry`` (no model needed);
    ``class_last`` as :func:`analytic_flops`."""
    return analytic_flops(schedule, width=geometry.width, mlp_width=geometry.mlp_width, heads=geometry.heads,
                          patch_size=geometry.patch_size, embed_dim=geometry.embed_dim,
                          in_chans=geometry.in_chans, class_last=class_last)


def model_flops(model: torch.nn.Module, executed: bool = False) -> FlopsReport:
    """Analytic FLOPs per video of a model patched by ``apply_tempme``: TempMe's count (every block in
    full), or with ``executed`` what ``encode_video`` runs (the last block trimmed to its class tokens
    when ``apply_tempme(trim_last_block=True)``, the default)."""
    settings = tempme_settings(model)
    class_last = executed and trims_last_block(model)
    return schedule_flops(settings.schedule, ViTGeometry.from_model(model), class_last=class_last)


@torch.no_grad()
def measure_flops(model: torch.nn.Module, video: Optional[torch.Tensor] = None, executed: bool = False) -> FlopsReport:
    """Count FLOPs per video by running the patched model's encoder piece by piece.

    Args:
        model: patched by ``apply_tempme``; the unmerged config runs the same block loop, so its
            count is open_clip's per-frame count.
        video: ``[B, T, 3, H, W]`` to run (default: one random video on the model's device).
        executed: run the blocks as ``encode_video`` does (the last one trimmed to its class tokens
            where the model says so); False runs every block in full, TempMe's count.
    """
    settings = tempme_settings(model)
    visual = model.visual
    if video is None:
        ref = visual.conv1.weight
        video = torch.randn(1, settings.config.frames, 3, *visual.image_size, device=ref.device,
                            dtype=ref.dtype)
    videos = video.shape[0]
    options = encoder_options(model)
    with flop_counter() as counter:
        state = embed_frames(visual, video.flatten(0, 1))
    stem = counter.get_total_flops()
    layers = []
    for i, (block, plan, pos) in enumerate(layer_steps(model)):
        forward = block_function(model, i, state) if executed else block_forward
        with flop_counter() as counter:
            state = forward(block, state, plan, pos, options)
        layers.append(counter.get_total_flops() / videos)
    with flop_counter() as counter:
        frame_features(visual, state, videos)
    return FlopsReport(stem / videos, layers, counter.get_total_flops() / videos)
