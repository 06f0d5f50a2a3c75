"""ToMe's per-layer ``r`` (``parse_r`` of ``tome/utils.py``) and the token counts it gives."""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

RSpec = Union[int, Tuple[int, float], Sequence[int]]


def parse_r(num_layers: int, r: RSpec) -> List[int]:
    """Tokens to remove at each of ``num_layers`` layers, as ToMe reads ``r``.

    ``r`` is an int (the same at every layer), a list of ints (one per layer; a shorter list is
    padded with zeros), or the tuple ``(r, inflection)`` with ``-1 <= inflection <= 1``: ``r`` on average,
    decreasing over depth for ``inflection < 0`` and increasing for ``> 0``.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers={num_layers!r} must be a positive int")
    if isinstance(r, tuple) and len(r) != 2:
        raise ValueError(f"r={r!r} as a tuple must be (r, inflection); give per-layer values as a list")
    if isinstance(r, list):
        values = list(r)
        if len(values) > num_layers or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            raise ValueError(f"r={r!r} as a list needs at most {num_layers} ints >= 0 (one per layer)")
        return values + [0] * (num_layers - len(values))
    inflect = 0.0
    if isinstance(r, tuple):
        r, inflect = r
        if not -1.0 <= inflect <= 1.0:
            raise ValueError(f"the inflection of r=({r}, {inflect}) must be in [-1, 1]")
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r={r!r} must be an int >= 0, a list of them (one per layer) or (int, inflection)")
    low = int(r * (1.0 - inflect))
    high = 2 * r - low
    step = (high - low) / max(num_layers - 1, 1)
    return [int(low + step * i) for i in range(num_layers)]


def clamped_r(tokens: int, r_per_layer: Sequence[int], protected: int) -> List[Tuple[int, int]]:
    """``(tokens_in, r)`` per layer with each ``r`` clamped to ``(tokens_in - protected) // 2``, as ToMe does."""
    out = []
    for r in r_per_layer:
        r = min(r, (tokens - protected) // 2)
        out.append((tokens, r))
        tokens -= r
    return out
