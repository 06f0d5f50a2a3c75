"""``encode_video`` captured in a CUDA graph, for low latency at a fixed input shape.

At one or a few videos the GPU work of a TempMe forward is small and the host's launches (two per
merge step, plus attention and MLPs) set the latency. A CUDA graph replays the whole forward with
one launch. The merge ops never read back to the host and their shapes follow from the schedule,
so the forward captures as it is; what changes from call to call is only the data, copied into
static input buffers before each replay.

    encoder = tempme_fast.GraphedVideoEncoder(model, batch=1)   # captures; model on CUDA, eval
    emb = encoder(video, mask)                                  # [1, embed_dim], as model.encode_video
"""
from __future__ import annotations

import sys
from typing import List, Optional, Tuple

import torch

from .model import check_video, encode_video

__all__ = ["GraphedVideoEncoder"]


class WeightsWatch:
    """Tells whether any parameter or buffer of a module is no longer the tensor, at the address, that it
    was when watched: a captured CUDA graph reads the weights at their captured addresses, so a
    replaced parameter (``module.weight = ...``, ``load_state_dict(assign=True)``) or one whose data moved
    (``.to(...)``, ``.half()``) would leave it reading stale or freed memory. In-place updates
    (``load_state_dict``, an optimizer step, ``copy_``) keep the address and are seen by the graph."""

    def __init__(self, module: torch.nn.Module):
        self._watched: List[Tuple[dict, str, torch.Tensor, int]] = []
        for owner in module.modules():
            for table in (owner._parameters, owner._buffers):
                for name, tensor in table.items():
                    if tensor is not None:
                        self._watched.append((table, name, tensor, tensor.data_ptr()))

    def changed(self) -> Optional[str]:
        """The first parameter or buffer that changed (its name in its own module), or None."""
        for table, name, tensor, pointer in self._watched:
            if table.get(name) is not tensor or tensor.data_ptr() != pointer:
                return name
        return None


class GraphedVideoEncoder:
    """``model.encode_video`` for videos of one shape, replayed from a CUDA graph (inference only).

    Args:
        model: patched by :func:`tempme_fast.apply_tempme`, on a CUDA device; its weights are read
            by the graph where they are, so later in-place weight updates are seen, but replacing a
            parameter tensor (``load_state_dict(assign=True)``, ``.to(...)``) needs a new encoder: a
            call raises an error then (unless ``check_weights=False``).
        batch: videos per call, ``>= 1``.
        masked: whether calls pass a frame mask ``[batch, T]`` (then it is required).
        normalize: L2-normalise the embeddings, as ``encode_video(normalize=True)``.
        dtype: dtype of the videos passed in (default: the model's); they are copied into a buffer
            of this dtype, so another float dtype is cast on the copy.
        warmup: eager forwards on a side stream before capture (compiles the Triton kernels and
            sizes their scratch buffers).
    Calling it with ``video [batch, T, 3, H, W]`` (and ``mask [batch, T]`` when ``masked``) returns a
    new ``[batch, embed_dim]`` tensor equal to ``model.encode_video(video, mask, normalize)``.
    Shapes and devices are checked on every call, the mask's values too unless ``check_mask=False``
    (that check reads the mask back to the host), and that every parameter and buffer of the model is
    still the tensor at the address the graph reads unless ``check_weights=False`` (:class:`WeightsWatch`
    of the vision tower: 155 tensors at ViT-B/32, about 25 us of host time on a 2-core CPU).
    """

    def __init__(self, model: torch.nn.Module, batch: int, masked: bool = False, normalize: bool = False,
                 dtype: Optional[torch.dtype] = None, warmup: int = 2):
        if not hasattr(model, "tempme"):
            raise TypeError("model must be patched by tempme_fast.apply_tempme before capturing encode_video")
        device = model.visual.conv1.weight.device
        if device.type != "cuda":
            raise ValueError(f"a CUDA graph needs the model on a CUDA device; it is on {device}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch={batch!r} must be a positive int (videos per call)")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup={warmup!r} must be an int >= 1: the kernels compile before capture")
        config = model.tempme.config
        size = tuple(model.visual.image_size)
        dtype = model.visual.conv1.weight.dtype if dtype is None else dtype
        self.model, self.normalize = model, normalize
        self.video = torch.zeros(batch, config.frames, 3, *size, dtype=dtype, device=device)
        self.mask = torch.ones(batch, config.frames, dtype=torch.bool, device=device) if masked else None
        check_video(model, self.video, self.mask)

        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(warmup):
                self._forward()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.out = self._forward()
        # The match kernel's scratch buffer (kept per device and thread by the Triton ops) is baked into the
        # graph: hold it, so that a later eager call with larger shapes, which replaces it, cannot free it.
        triton_ops = sys.modules.get("tempme_fast.ops.triton_ops")
        self._scratch = dict(triton_ops.scratch_buffers()) if triton_ops is not None else {}
        self._weights = WeightsWatch(model.visual)  # all that encode_video reads

    def _forward(self) -> torch.Tensor:
        return encode_video(self.model, self.video, self.mask, self.normalize)

    def __call__(self, video: torch.Tensor, mask: Optional[torch.Tensor] = None, *, check_mask: bool = True,
                 check_weights: bool = True) -> torch.Tensor:
        if check_weights:
            changed = self._weights.changed()
            if changed is not None:
                raise RuntimeError(f"the vision tower's {changed!r} was replaced or moved since this encoder captured "
                                   f"its graph, which would read the old memory; capture a new "
                                   f"GraphedVideoEncoder (in-place updates such as load_state_dict are fine)")
        if not isinstance(video, torch.Tensor) or video.shape != self.video.shape:
            got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"video must have the captured shape {tuple(self.video.shape)}, got {got}; "
                             f"capture another GraphedVideoEncoder for another shape")
        if video.device != self.video.device or not video.is_floating_point():
            raise ValueError(f"video must be a float tensor on {self.video.device}, got {video.dtype} on "
                             f"{video.device}")
        if (mask is None) != (self.mask is None):
            raise ValueError("this encoder was captured with masked=True: pass a mask [batch, T]" if mask is None
                             else "this encoder was captured with masked=False: pass no mask (or capture "
                                  "with masked=True)")
        if mask is not None:
            if check_mask:
                check_video(self.model, video, mask)  # shapes, device and the mask's values
            elif not isinstance(mask, torch.Tensor) or mask.shape != self.mask.shape:
                raise ValueError(f"mask must have shape {tuple(self.mask.shape)}")
            self.mask.copy_(mask != 0)
        self.video.copy_(video)
        self.graph.replay()
        return self.out.clone()
