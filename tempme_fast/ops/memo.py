"""Launch descriptions kept per input signature, so a launcher's host arithmetic runs once per shape.

Everything a Triton launcher computes before it launches (token counts, tiles, warps, the grid,
the integer and stride arguments, the output shapes) follows from its inputs' shapes, strides and
dtypes, its integer arguments and its module's tunables (tile tables, limits). An encoder calls
the same few signatures at every forward, and on a GPU at small batch that arithmetic, a few dozen
Python calls a launch, is host time the GPU waits for. A launcher builds its description once per
signature (:func:`remembered`) and then only allocates its outputs and launches.

The tunables are module attributes that tests, sweeps and users may assign. Each module that
holds some is registered here (:func:`forget_on_assign`): assigning or deleting any of its
attributes forgets every description, so the next call builds it from the new values. (Assigning
a module attribute goes through the module's ``__setattr__``; a function's own ``global``
statement does not, and the registered modules use none for tunables.)
"""
from __future__ import annotations

import sys
import types
from typing import Callable, Dict, Hashable, TypeVar

__all__ = ["MAX_ENTRIES", "clear", "forget_on_assign", "remembered"]

T = TypeVar("T")

# Distinct signatures kept; all are forgotten when full (a workload of ever-new shapes).
MAX_ENTRIES = 4096
_MEMO: Dict[Hashable, object] = {}


def clear() -> None:
    """Forget every launch description."""
    _MEMO.clear()


def remembered(key: Hashable, build: Callable[[], T]) -> T:
    """The description kept for ``key``, built by ``build()`` on the first call with it."""
    value = _MEMO.get(key)
    if value is None:
        if len(_MEMO) >= MAX_ENTRIES:
            _MEMO.clear()
        value = _MEMO[key] = build()
    return value


class _ForgetsOnAssign(types.ModuleType):
    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        _MEMO.clear()

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        _MEMO.clear()


def forget_on_assign(module_name: str) -> None:
    """Make every assignment to an attribute of module ``module_name`` forget the descriptions."""
    sys.modules[module_name].__class__ = _ForgetsOnAssign
