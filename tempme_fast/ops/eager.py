"""When the Triton ops can skip PyTorch's machinery, and when they must go through it.

On a fast GPU at small batch the forward waits on the host, where a ``torch.library`` custom-op
call (schema parsing, dispatch, fake-tensor bookkeeping) costs several aten ops' worth of time
and an ``autograd.Function`` adds a graph node even when nothing needs a gradient. So an eager
call runs the host launchers directly, and only these cases go through the custom ops:

- ``torch.compile`` tracing (it must see the ops with their fake implementations);
- a ``TorchDispatchMode`` on the stack (FLOP counting, fake tensors, tracing): there a custom op
  is one op with a known meaning, while a launcher would hand a fake tensor to a Triton kernel.
  A mode that sets ``sees_eager_path = True`` (the host-cost counter of ``benchmarks/host.py``)
  watches the eager path instead.

The autograd functions are used only when a gradient can flow (:func:`needs_grad`).
"""
from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch
from torch.utils import _python_dispatch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

__all__ = ["cast", "custom_op_or", "detached", "needs_grad", "refuse_second_order", "use_custom_ops"]

T = TypeVar("T")


def use_custom_ops() -> bool:
    """Whether a Triton op must be called through its ``torch.library`` custom op."""
    if torch.compiler.is_compiling():
        return True
    if not _python_dispatch._is_in_torch_dispatch_mode:  # is_in_torch_dispatch_mode(), without the call
        return False
    stack = _get_current_dispatch_mode_stack()
    # An empty user stack with the flag set: only an infrastructure mode (fake tensors, tracing) is on.
    return not stack or any(not getattr(mode, "sees_eager_path", False) for mode in stack)


def custom_op_or(launcher: Callable[..., T], name: str) -> Callable[..., T]:
    """``launcher`` where an eager call may skip the dispatcher, else the custom op ``tempme::name``
    that wraps it (:func:`use_custom_ops` decides on every call); both take the same positional
    arguments."""
    def call(*args):
        return getattr(torch.ops.tempme, name)(*args) if use_custom_ops() else launcher(*args)
    call.__name__ = call.__qualname__ = f"{name}_call"
    return call


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd must record an op on ``tensors`` (grad mode on and one of them requires grad)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # (a loop, not any() of a generator: this runs at every op)
        if t is not None and t.requires_grad:
            return True
    return False


def refuse_second_order(op: str) -> None:
    """Raise for a second derivative through the Triton ``op``: its backward runs kernels that build no graph, so
    a ``create_graph=True`` gradient (a gradient penalty) would lose its second-order terms without a word. A
    backward checks ``torch.is_grad_enabled()`` (True there only under ``create_graph``) before calling this."""
    raise RuntimeError(f"{op}: a second derivative through the Triton backend (torch.autograd.grad(..., "
                       f"create_graph=True), as a gradient penalty takes) is not supported; compute it with "
                       f"backend='torch' (attention: impl='eager' or 'sdpa')")


def detached(t: torch.Tensor) -> torch.Tensor:
    """``t.detach()`` where it matters: a tensor that requires no gradient is returned as is (a
    ``detach`` is an aten op, host time on every call)."""
    return t.detach() if t.requires_grad else t


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` where it changes something: a ``.to`` that changes nothing is still an aten op,
    host time on every call."""
    return t if t.dtype == dtype else t.to(dtype)
