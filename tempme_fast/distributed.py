"""Data-parallel training with torch DDP, launched by ``torchrun``.

    torchrun --nproc_per_node 8 -m tempme_fast train --data data/MSRVTT ...   (or your own script:)

    info = init_distributed()                    # reads RANK / WORLD_SIZE / LOCAL_RANK from torchrun
    model = apply_tempme(create_model(...)).to(info.device)
    trainer = Trainer(model, shard_of_the_data)  # wraps DDP, gathers features for the loss

The loss: every process gathers the L2-normalised video and text embeddings of all processes
(:func:`all_gather_with_grad`) and computes the symmetric InfoNCE over the combined batch, so its
value is the single-process loss on the concatenated batch. The gather keeps each process's own
slice in its autograd graph; its backward sums the gradient every process computed for a slice
and hands each process its own. Every process computes the same loss, so the summed gradient of a
slice is ``world_size`` times that of the loss, and DDP's averaging over processes divides that
factor out again: the parameter gradients equal the single-process gradients of the combined batch.
"""
from __future__ import annotations

import os
from typing import List, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "all_gather_with_grad", "cleanup", "init_distributed", "is_distributed", "rank",
           "wrap_ddp", "world_size"]


class DistInfo(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_distributed(backend: Optional[str] = None, device: Optional[str] = None) -> DistInfo:
    """Join the process group ``torchrun`` set up (env vars ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``); a single process without them gets world size 1.

    Args:
        backend: default ``nccl`` with CUDA, else ``gloo``.
        device: default ``cuda:LOCAL_RANK`` with CUDA, else ``cpu``.
    """
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return DistInfo(0, 1, 0, dev)
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"WORLD_SIZE is set but {var} is not; launch with torchrun")
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    dev = torch.device(device if device and device != "cuda" else (f"cuda:{local_rank}" if use_cuda else "cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _AllGather(torch.autograd.Function):
    """Concatenate every process's ``[B_r, ...]`` tensor along dim 0 (``B_r`` may differ).

    Backward: sum the incoming gradients over processes (all-reduce; gloo has no reduce-scatter)
    and return this process's rows.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        sizes = torch.tensor([x.shape[0]], device=x.device)
        all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
        dist.all_gather(all_sizes, sizes)
        counts: List[int] = [int(s) for s in all_sizes]
        most = max(counts)
        padded = x.new_zeros((most,) + tuple(x.shape[1:]))
        padded[:x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        ctx.counts, ctx.rank = counts, dist.get_rank()
        return torch.cat([p[:n] for p, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.counts[:ctx.rank])
        return grad[start:start + ctx.counts[ctx.rank]]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``[sum_r B_r, ...]``: every process's ``x`` in rank order; gradients flow back to each
    process's own rows (see the module docstring). Identity without a process group."""
    if not is_distributed():
        return x
    return _AllGather.apply(x)


def wrap_ddp(module: nn.Module, find_unused_parameters: bool = False, **kwargs) -> nn.Module:
    """``DistributedDataParallel`` around ``module``, on the device of its parameters.

    For training a TempMe CLIP, wrap :class:`tempme_fast.train.VideoTextForward` of it: DDP
    synchronises the gradients of what runs inside the wrapped ``forward``, and CLIP's own ``forward``
    encodes images. Set ``requires_grad`` (:func:`tempme_fast.lora.mark_trainable`) before wrapping:
    DDP registers the trainable parameters once.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not is_distributed():
        raise RuntimeError("wrap_ddp needs an initialised process group with more than one process "
                           "(init_distributed under torchrun)")
    device = next(module.parameters()).device
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters,
                                   **kwargs)
